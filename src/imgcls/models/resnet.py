"""ResNet-18/34/50 with torchvision's state-dict layout.

He et al., "Deep Residual Learning for Image Recognition" (2015), in the "v1.5" form that
torchvision ships: the Bottleneck puts its stride on the 3x3 conv, not the first 1x1 (about
+0.5% top-1 on ImageNet for a little more compute). Module names (conv1, bn1, layer1.0.conv1,
layer2.0.downsample.0/1, fc) match torchvision and timm exactly, so their checkpoints load as
they are; `imgcls.models.weights` does the loading.
"""

from __future__ import annotations

import torch
from torch import nn

from imgcls.models.registry import register_model
from imgcls.transforms import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec

# The spec the ImageNet weights of torchvision and timm were evaluated with: resize to 256,
# centre-crop 224, bilinear.
RESNET_SPEC = PreprocessSpec(img_size=224, crop_pct=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear")


def _conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs plus the identity (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_chs, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)  # (B, planes, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))  # (B, planes, H/s, W/s)
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand by 4, plus the identity (ResNet-50)."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = _conv1x1(in_chs, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, out_chs)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)  # (B, 4*planes, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))  # (B, planes, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # (B, planes, H/s, W/s)
        out = self.bn3(self.conv3(out))  # (B, 4*planes, H/s, W/s)
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """Stem (7x7/2 conv, 3x3/2 max-pool), four stages, global average pool, one Linear `fc`."""

    classifier_name = "fc"  # the module `reset_classifier` replaces; weights.py skips it on a class-count change

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self._in_chs = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(block, 64, layers[0], stride=1)
        self.layer2 = self._make_stage(block, 128, layers[1], stride=2)
        self.layer3 = self._make_stage(block, 256, layers[2], stride=2)
        self.layer4 = self._make_stage(block, 512, layers[3], stride=2)
        self.num_features = 512 * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each block starts as the identity, which trains faster and reaches ~0.2-0.3% more
            # top-1 (Goyal et al., "Accurate, Large Minibatch SGD", 2017). Keys are unchanged.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

    def _make_stage(self, block: type[BasicBlock] | type[Bottleneck], planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        out_chs = planes * block.expansion
        downsample = None
        if stride != 1 or self._in_chs != out_chs:
            # Projection shortcut (option B of the paper): 1x1 conv + BN, named downsample.0/1.
            downsample = nn.Sequential(_conv1x1(self._in_chs, out_chs, stride), nn.BatchNorm2d(out_chs))
        blocks: list[nn.Module] = [block(self._in_chs, planes, stride, downsample)]
        self._in_chs = out_chs
        blocks += [block(self._in_chs, planes) for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> feature map (B, num_features, H/32, W/32)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        x = self.layer1(x)  # (B, 64*e, H/4, W/4)
        x = self.layer2(x)  # (B, 128*e, H/8, W/8)
        x = self.layer3(x)  # (B, 256*e, H/16, W/16)
        return self.layer4(x)  # (B, 512*e, H/32, W/32)

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits (B, num_classes), or the pooled (B, num_features) when pre_logits."""
        x = torch.flatten(self.avgpool(feats), 1)  # (B, num_features)
        return x if pre_logits else self.fc(x)  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace `fc` with a fresh Linear of `num_classes` outputs (same device and dtype)."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        old = self.fc.weight
        self.fc = nn.Linear(self.num_features, num_classes, device=old.device, dtype=old.dtype)
        self.num_classes = num_classes


@register_model("resnet18", RESNET_SPEC, description="ResNet-18 (torchvision/timm layout), 11.7M params")
def resnet18(num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, zero_init_residual=zero_init_residual)


@register_model("resnet34", RESNET_SPEC, description="ResNet-34 (torchvision/timm layout), 21.8M params")
def resnet34(num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes=num_classes, zero_init_residual=zero_init_residual)


@register_model("resnet50", RESNET_SPEC, description="ResNet-50 v1.5 (torchvision/timm layout), 25.6M params")
def resnet50(num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, zero_init_residual=zero_init_residual)
