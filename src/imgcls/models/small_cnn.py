"""A small, fast CNN for training from scratch on small images (the default model).

The shape follows the fast CIFAR-10 recipes (Page's ResNet-9 "DAWNBench" net, Keller Jordan's
airbench): a 3x3 stem, then three blocks of conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU,
each halving the resolution, then global max-pooling and one linear layer whose output is scaled
down (airbench: a temperature on the logits trains faster than a plain head). Few, wide layers
keep the matmuls large, which is what a 2-core CPU with AMX (or a GPU) runs well.
Global pooling makes it work at any input size from 8 px up, grey or colour, 2 to 1000 classes.
"""

from __future__ import annotations

import torch
from torch import nn

from imgcls.models.registry import register_model
from imgcls.transforms import PreprocessSpec


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]


class ConvBlock(nn.Sequential):
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU; halves H and W."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(c_out),
            nn.GELU(),
            *_conv_bn(c_out, c_out),
        )


class SmallCNN(nn.Module):
    classifier_name = "fc"

    def __init__(self, num_classes: int, widths: tuple[int, int, int, int] = (32, 64, 256, 256), logit_scale: float = 1 / 9, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.logit_scale = logit_scale
        self.stem = nn.Sequential(*_conv_bn(3, widths[0]))
        self.blocks = nn.Sequential(*[ConvBlock(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes, bias=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))  # (B, C, H/8, W/8)

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # (B, C): global max-pool, as airbench. The logit scale is applied before the bias-free fc
        # (same result) so that logits == fc(pre_logits), like every other model here.
        x = torch.amax(feats, dim=(2, 3)) * self.logit_scale
        if pre_logits:
            return x
        return self.fc(self.drop(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_SMALL_SPEC = PreprocessSpec(img_size=32, resize_mode="crop", crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@register_model("small_cnn", _SMALL_SPEC, description="fast from-scratch CNN for small images (default, 32 px)")
def small_cnn(num_classes: int, **kwargs) -> SmallCNN:
    return SmallCNN(num_classes, **kwargs)
