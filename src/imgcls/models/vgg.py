"""VGG-11-BN and VGG-16-BN with torchvision's state-dict layout.

Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition"
(2014), with batch norm after every conv as torchvision's `vgg*_bn`. Module names match
torchvision (features.N, classifier.0/3/6); timm's VGG stores the same classifier as 7x7 and
1x1 convs under pre_logits/head, which `imgcls.models.weights.convert_timm_state_dict` maps back.
"""

from __future__ import annotations

import torch
from torch import nn

from imgcls.models.registry import register_model
from imgcls.transforms import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec

VGG_SPEC = PreprocessSpec(img_size=224, crop_pct=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear")

# Conv widths per layer, "M" = 2x2 max-pool. Configurations A (11 layers) and D (16 layers).
VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def _make_features(cfg: list[int | str]) -> nn.Sequential:
    # Conv, BN, ReLU per entry and one MaxPool per "M": this order fixes torchvision's indices
    # (features.0 conv, features.1 bn, features.3 conv, ...).
    layers: list[nn.Module] = []
    in_chs = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            out_chs = int(v)
            layers += [nn.Conv2d(in_chs, out_chs, kernel_size=3, padding=1), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True)]
            in_chs = out_chs
    return nn.Sequential(*layers)


def _init_linear(m: nn.Linear) -> None:
    # torchvision's VGG init: N(0, 0.01) weights, zero bias.
    nn.init.normal_(m.weight, 0.0, 0.01)
    nn.init.zeros_(m.bias)


class VGG(nn.Module):
    """Conv/BN/ReLU stages, 7x7 adaptive average pool, then Linear-ReLU-Dropout x2 and a Linear."""

    classifier_name = "classifier.6"  # the module `reset_classifier` replaces

    def __init__(self, cfg: list[int | str], num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.num_features = 4096  # width of the input to classifier.6
        self.features = _make_features(cfg)
        # Pooling to 7x7 (instead of requiring a 224 input) keeps the 25088-wide first Linear
        # valid at any input size; at 32x32 the 1x1 map is simply replicated.
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                _init_linear(m)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> feature map (B, 512, H/32, W/32)."""
        return self.features(x)

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits (B, num_classes), or the (B, 4096) output of classifier.0-5."""
        x = torch.flatten(self.avgpool(feats), 1)  # (B, 512*7*7)
        x = self.classifier[:6](x)  # (B, 4096)
        return x if pre_logits else self.classifier[6](x)  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace classifier.6 with a fresh Linear of `num_classes` outputs (same device and dtype)."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        old = self.classifier[6].weight
        fc = nn.Linear(self.num_features, num_classes, device=old.device, dtype=old.dtype)
        _init_linear(fc)
        self.classifier[6] = fc
        self.num_classes = num_classes


@register_model("vgg11_bn", VGG_SPEC, description="VGG-11 with batch norm (torchvision layout), 132.9M params")
def vgg11_bn(num_classes: int = 1000, dropout: float = 0.5) -> VGG:
    return VGG(VGG_CFGS["vgg11"], num_classes=num_classes, dropout=dropout)


@register_model("vgg16_bn", VGG_SPEC, description="VGG-16 with batch norm (torchvision layout), 138.4M params")
def vgg16_bn(num_classes: int = 1000, dropout: float = 0.5) -> VGG:
    return VGG(VGG_CFGS["vgg16"], num_classes=num_classes, dropout=dropout)
