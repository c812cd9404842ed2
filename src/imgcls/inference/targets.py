"""Where Grad-CAM reads each model family: the target layer for an input size.

The standard targets (the Grad-CAM paper; the pytorch-grad-cam package: ResNet layer4[-1],
EfficientNet's last conv block) give 7 x 7 cells at 224 px, and imgcls keeps them there (VGG: its
last ReLU, 14 x 14, as the paper used for VGG-16). At a smaller input the same layer has fewer
cells (2 x 2 at 64 px), too few to point at anything, so `target_layer` takes the deepest stage
with at least MIN_CAM_SIDE cells a side. On the pointing game of tests/test_pointing.py (models
trained there; bench/pointing.py plays it at larger sizes) the map's peak fell inside the patch
for 54-66 % of images with ResNet-18's layer2 at 64 px (8 x 8) against 2-6 % with layer4 (2 x 2),
and for 58 % with VGG-11's features.20 (8 x 8) against 12 % with its last ReLU (4 x 4); within
half a cell, at the test's sizes: ResNet-18 layer1 (32 px) 83-97 %, VGG-11 features.13 (32 px)
97-100 % against 32-50 % for its last ReLU (2 x 2), EfficientNet-Lite0 _blocks.10 (128 px)
62-72 % against 23-28 % for its head (4 x 4).

The map is drawn on an even spread of the cells over the input, as pytorch-grad-cam's resize does.
Geometrically the cells sit half a cell off that spread (stride-2 layers padding k // 2 on both
sides centre cell j of ResNet's layer4 15.5 px up and left; TensorFlow "SAME" padding puts
EfficientNet-Lite's 15.5 px down and right; the centroid of |d cell / d input| with positive
weights at 224 px: -11.8 and +12.3 px), but trained weights make up for it: a red patch moved
across the pretrained EfficientNet-Lite0's input excited the cells whose even-spread centres were
2 px from it on average, and drawing the maps shifted lowered the pointing game (EfficientNet-Lite0
at 224 px: 43 -> 23 % of peaks within half a cell of the patch; ResNet-18 at 64 px, layer2:
55 -> 42 % inside it), so no shift is applied.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from imgcls.models.efficientnet_lite import EfficientNetLite
from imgcls.models.resnet import ResNet
from imgcls.models.small_cnn import SmallCNN
from imgcls.models.vgg import VGG

FEATURES = "forward_features"  # the layer name for the output of model.forward_features
MIN_CAM_SIDE = 7  # cells a side: what the standard target layers give at 224 px


@dataclass(frozen=True)
class TargetLayer:
    """A layer Grad-CAM can read: its module name (or FEATURES) and input pixels per cell."""

    name: str
    stride: int


def candidate_layers(model: nn.Module) -> list[TargetLayer]:
    """The stage outputs Grad-CAM can read, deepest first (the first is the standard target)."""
    if isinstance(model, SmallCNN):
        # Its second block, not the last, whose map is 3 x 3 at 32 px. On the pointing game of
        # tests/test_explain.py (2-3 trainings of 60 images each) the map's peak fell within 4 px
        # of the patch for 68-77 % of images with the last block at 48 px input and 82-95 % at
        # 64 px, against 97-100 % with blocks.1 at both sizes.
        return [TargetLayer(f"blocks.{len(model.blocks) - 2}", 2 ** (len(model.blocks) - 1))]
    if isinstance(model, ResNet):
        return [TargetLayer(FEATURES, 32), TargetLayer("layer3", 16), TargetLayer("layer2", 8), TargetLayer("layer1", 4)]
    if isinstance(model, VGG):  # the ReLU before each max-pool, as the last one keeps twice the final resolution
        out, stride = [], 1
        for i, m in enumerate(model.features):
            if isinstance(m, nn.MaxPool2d):
                stride *= 2
            elif isinstance(m, nn.ReLU) and i + 1 < len(model.features) and isinstance(model.features[i + 1], nn.MaxPool2d):
                out.append(TargetLayer(f"features.{i}", stride))
        return out[::-1]
    if isinstance(model, EfficientNetLite):
        last, stride = {}, 2  # the stem halves the input
        for i, block in enumerate(model._blocks):
            stride *= block._depthwise_conv.stride[0]
            last[stride] = i  # the last block at each resolution
        return [TargetLayer(FEATURES, stride)] + [
            TargetLayer(f"_blocks.{i}", s) for s, i in sorted(last.items(), reverse=True) if s < stride
        ]
    return [TargetLayer(FEATURES, 32)]


def target_layer(model: nn.Module, img_size: int | None = None) -> TargetLayer:
    """The deepest candidate layer with at least MIN_CAM_SIDE cells a side at img_size (the finest
    one when none has; the standard target when img_size is None)."""
    candidates = candidate_layers(model)
    if img_size is None:
        return candidates[0]
    return next((c for c in candidates if img_size // c.stride >= MIN_CAM_SIDE), candidates[-1])


def default_target_layer(model: nn.Module, img_size: int | None = None) -> str | None:
    """The module name `target_layer` picks, or None for `forward_features`' output."""
    name = target_layer(model, img_size).name
    return None if name == FEATURES else name
