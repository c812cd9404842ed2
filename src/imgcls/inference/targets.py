"""Where Grad-CAM reads each model family: the target layer for an input size, and where that
layer's cells sit on the model input.

The standard targets (the Grad-CAM paper; the pytorch-grad-cam package: ResNet layer4[-1],
EfficientNet's last conv block) give 7 x 7 cells at 224 px, and imgcls keeps them there (VGG: its
last ReLU, 14 x 14, as the paper used for VGG-16). At a smaller input the same layer has fewer
cells (2 x 2 at 64 px), too few to point at anything, so `target_layer` takes the deepest stage
with at least MIN_CAM_SIDE cells a side. On the pointing game of tests/test_pointing.py (numbers
in bench/RESULTS.md and bench/pointing.py) that moved the peak into the patch for far more images:
at 64 px ResNet-18 layer2 (8 x 8) 54-66 % against 2-6 % for layer4 (2 x 2), VGG-11 features.20
(8 x 8) 58 % against 12 % for its last ReLU (4 x 4).

`TargetLayer.offset`: a stride-2 conv or pool that pads k // 2 on both sides (ResNet) centres
output cell j on input pixel 2j, half a pixel before the middle of the 2 x 2 pixels it replaces;
over five halvings cell j of layer4 sits 15.5 px up and left of (j + 0.5) * 32, where plain
bilinear upsampling (pytorch-grad-cam's cv2.resize) puts it. TensorFlow's "SAME" padding
(EfficientNet-Lite) puts the odd pixel after, so there the cells sit down and right by as much
(where each halving's input is even, as at 224 px; an odd one pads both sides alike, -0.5 px).
VGG's 2 x 2 pools tile exactly. Measured as the centroid of |d cell / d input| at 224 px: ResNet-18
layer4/3/2 -11.8/-7.4/-3.5 px (the deepest pulled back by the image border), EfficientNet-Lite0
head/_blocks.10/_blocks.4 +12.3/+8.0/+3.7, VGG-11 +0.9/+0.0.
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
    """A layer Grad-CAM can read: its module name (or FEATURES), input pixels per cell, and how far
    (input pixels, right and down) cell j's centre sits past (j + 0.5) * stride."""

    name: str
    stride: int
    offset: float = 0.0


def _tf_same_offset(img_size: int | None, halvings: int) -> float:
    """Input pixels by which TF "SAME" stride-2 layers move a cell's centre past the even spread."""
    offset, n, scale = 0.0, img_size or 2**halvings, 1
    for _ in range(halvings):
        offset += 0.5 * scale if n % 2 == 0 else -0.5 * scale  # even input: the padding pixel goes after
        n, scale = -(-n // 2), scale * 2
    return offset


def candidate_layers(model: nn.Module, img_size: int | None = None) -> list[TargetLayer]:
    """The stage outputs Grad-CAM can read, deepest first (the first is the standard target)."""
    if isinstance(model, SmallCNN):
        # Its second block, not the last, whose map is 3 x 3 at 32 px. On the pointing game of
        # tests/test_explain.py (2-3 trainings of 60 images each) the map's peak fell within 4 px
        # of the patch for 68-77 % of images with the last block at 48 px input and 82-95 % at
        # 64 px, against 97-100 % with blocks.1 at both sizes.
        return [TargetLayer(f"blocks.{len(model.blocks) - 2}", 2 ** (len(model.blocks) - 1))]
    if isinstance(model, ResNet):
        stages = [(FEATURES, 32), ("layer3", 16), ("layer2", 8), ("layer1", 4)]
        return [TargetLayer(name, s, -(s - 1) / 2) for name, s in stages]
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
        out = [TargetLayer(FEATURES, stride, _tf_same_offset(img_size, stride.bit_length() - 1))]
        stages = sorted(last.items(), reverse=True)
        return out + [TargetLayer(f"_blocks.{i}", s, _tf_same_offset(img_size, s.bit_length() - 1)) for s, i in stages if s < stride]
    return [TargetLayer(FEATURES, 32)]


def target_layer(model: nn.Module, img_size: int | None = None, layer: str | None = None) -> TargetLayer:
    """The layer to read: `layer` when given (offset 0 unless it is one of the candidates), else the
    deepest candidate with at least MIN_CAM_SIDE cells a side at img_size (the finest one when
    none has; the standard target when img_size is None)."""
    candidates = candidate_layers(model, img_size)
    if layer is not None:
        return next((c for c in candidates if c.name == layer), TargetLayer(layer, 1))
    if img_size is None:
        return candidates[0]
    return next((c for c in candidates if img_size // c.stride >= MIN_CAM_SIDE), candidates[-1])


def default_target_layer(model: nn.Module, img_size: int | None = None) -> str | None:
    """The module name `target_layer` picks, or None for `forward_features`' output."""
    name = target_layer(model, img_size).name
    return None if name == FEATURES else name
