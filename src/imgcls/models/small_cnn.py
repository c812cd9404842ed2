"""A small, fast CNN for training from scratch on small images (the default model).

The network is airbench94's (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU",
2024), itself a descendant of Page's ResNet-9 DAWNBench net:

    2x2 patch-whitening conv (frozen weights) -> GELU
    3 x [conv3x3 -> 2x2 max-pool -> BN -> GELU -> conv3x3 -> BN -> GELU]   (64, 256, 256 wide)
    global max-pool -> bias-free linear, logits scaled by 1/9

Few, wide layers keep the matmuls large, which is what a 2-core CPU with AMX (or a GPU) runs well.
Global pooling, and a pool that is skipped once a map is 1 px, make it work at any input size from
8 px up, grey (decoded as RGB) or colour, 2 to 1000 classes. The training recipe that goes with it
(whitening init from data, optimizer, lookahead, TTA) is in `imgcls.training.recipes`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imgcls.models.registry import register_model
from imgcls.transforms import PreprocessSpec

# airbench: BN running stats follow the last few batches (new = 0.6 * old + 0.4 * batch), which
# suits short runs where the weights move fast; PyTorch's `momentum` is the weight of the batch.
BN_MOMENTUM = 0.4
WHITEN_KERNEL = 2
# GELU as airbench94; SiLU as the hiverge CIFAR-10 speedrun (--activation silu), cheaper to compute on CPUs.
ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"small_cnn activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    # airbench: identity ("dirac") init of the first c_in filters on top of the default init, so
    # each block starts close to passing its input through and early training is stable.
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(c_in, c_out)])
    return conv


def _batch_norm(c: int) -> nn.BatchNorm2d:
    # Scale frozen at 1, only the shift is learned (airbench): the next conv can absorb a scale,
    # and without it the high learning rate of the BN biases (see recipes) stays stable.
    # eps 1e-5, not airbench's 1e-12: the same for channels of unit variance, but a channel that
    # is nearly constant over a batch (flat backgrounds, binary strokes) would have its gradient
    # multiplied by up to 1e6, which sent MNIST and synthetic grey images to NaN.
    bn = nn.BatchNorm2d(c, eps=1e-5, momentum=BN_MOMENTUM)
    bn.weight.requires_grad_(False)
    return bn


class ConvBlock(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU; halves H and W (down to 1 px)."""

    def __init__(self, c_in: int, c_out: int, activation: str = "gelu") -> None:
        super().__init__()
        self.conv1 = _conv(c_in, c_out)
        self.norm1 = _batch_norm(c_out)
        self.conv2 = _conv(c_out, c_out)
        self.norm2 = _batch_norm(c_out)
        self.act = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (B, C_out, H, W)
        if min(x.shape[-2:]) >= 2:  # an 8 px input reaches 1 px before the last block: keep it
            x = F.max_pool2d(x, 2)  # (B, C_out, H/2, W/2)
        x = self.act(self.norm1(x))
        return self.act(self.norm2(self.conv2(x)))


class SmallCNN(nn.Module):
    classifier_name = "fc"

    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, int, int] = (64, 256, 256),
        logit_scale: float = 1 / 9,
        drop_rate: float = 0.0,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.logit_scale = logit_scale
        # 2x2 patches of 3 channels = 12 dimensions; the whitening conv has each eigen-direction
        # twice, with both signs (24 channels), so the GELU after it loses nothing.
        c_whiten = 2 * 3 * WHITEN_KERNEL**2
        self.whiten = nn.Conv2d(3, c_whiten, WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from data by init_whitening, then frozen
        self.act = _activation(activation)
        chans = (c_whiten, *widths)
        self.blocks = nn.Sequential(*[ConvBlock(a, b, activation) for a, b in zip(chans[:-1], chans[1:])])
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes, bias=False)

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4, max_patches: int = 5_000_000) -> None:
        """Set the first conv to whiten 2x2 patches of `images` (normalised float, (N, 3, H, W)).

        airbench: the filters are the eigenvectors of the patch covariance, each divided by the
        square root of its eigenvalue, so the first layer's outputs are decorrelated with unit
        variance from the first step; frozen, they cost no optimisation at all. Up to
        `max_patches` patches (about 5,000 CIFAR images) give a stable 12x12 covariance.
        """
        k = WHITEN_KERNEL
        n, c, h, w = images.shape
        per_image = max(1, (h - k + 1) * (w - k + 1))
        n_use = max(1, min(n, max_patches // per_image))
        cov = torch.zeros(c * k * k, c * k * k, dtype=torch.float64)
        count = 0
        for start in range(0, n_use, 256):
            x = images[start : min(n_use, start + 256)].float()
            p = F.unfold(x, k).transpose(1, 2).reshape(-1, c * k * k).double()  # (B * positions, 12), (c, kh, kw) order
            cov += p.T @ p
            count += p.shape[0]
        cov /= max(count, 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(c * k * k, c, k, k)
        # Grey images decoded as RGB vary in only 4 of the 12 directions (the channels are equal).
        # A filter for a direction without variance, scaled by 1/sqrt(eps), outputs only rounding
        # noise (large in bf16), which BatchNorm then blows up to unit variance: MNIST trained to
        # NaN in bf16. Such slots repeat the directions the data has instead, so every channel
        # carries signal (a no-op for colour data, whose 12 directions all vary).
        rank = max(1, int((eigenvalues > 1e-6 * eigenvalues[0]).sum()))
        filters = filters[torch.arange(c * k * k) % rank]
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight.dtype))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.act(self.whiten(x)))  # (B, C, ~H/8, ~W/8)

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


# arch_version 2: the airbench94 layout (whitening stem, three conv groups); 1 was a plain CNN.
@register_model(
    "small_cnn", _SMALL_SPEC, description="fast from-scratch CNN for small images (default, 32 px; airbench94 network)", arch_version=2
)
def small_cnn(num_classes: int, **kwargs) -> SmallCNN:
    return SmallCNN(num_classes, **kwargs)
