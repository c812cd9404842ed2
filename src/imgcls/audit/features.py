"""Feature vectors for the audit: pooled features of a pretrained network, or raw pixels.

The network runs once over every image (at a reduced input size, see `feature_spec`); the
duplicate search, the outlier scores and the label probe all work on these vectors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from imgcls.transforms import PreprocessSpec

PIXELS = "pixels"  # features = the image itself at PIXEL_SIDE px, for tests and a model-free audit
PIXEL_SIDE = 16
DEFAULT_FEATURE_MODEL = "efficientnet_lite0"
# Input size for the feature pass. efficientnet_lite0 at 128 px runs about 3x faster than at its
# native 224 px on CPU (459 against 145 img/s in bf16 on 2 cores, runtime.CACHE_BATCH_PIXELS), so
# 60,000 CIFAR images take about 2 minutes; duplicates and label errors need features that tell
# images apart, not the last point of ImageNet accuracy.
DEFAULT_FEATURE_SIZE = 128
# The feature pass is most of an audit's time (85 % of CIFAR-10's 1,323 s at 128 px) and its cost
# grows with the square of the size, while upscaling a 32 px image to 128 px adds no detail. The
# automatic size (`choose_feature_size`) is 1.5 x the data's median short side, rounded up to a
# multiple of 32, between MIN_FEATURE_SIZE and DEFAULT_FEATURE_SIZE: 28-64 px images (MNIST,
# CIFAR, EuroSAT) -> 96 px (1.8x fewer pixels than 128), photos -> 128 px. At 64 px the CIFAR-10
# audit took 162 s but found 79.5 % of 5 % flipped labels in its top 2x, against 85.7 % at 128 px
# (bench/RESULTS.md, third session): 96 px is the floor.
MIN_FEATURE_SIZE = 96
FEATURE_SIZE_STEP = 32
EMBED_DIMS = 128  # PCA dimensions kept for cosine similarity (duplicates, outliers)
PROBE_DIMS = 256  # PCA dimensions the label probe is fitted on


@dataclass
class FeatureExtractor:
    """`extract(uint8 (N, S, S, 3)) -> float32 (N, D)` with the spec the images are decoded at."""

    name: str
    spec: PreprocessSpec
    extract: Callable[[np.ndarray], np.ndarray]


def feature_spec(model_name: str, img_size: int | None) -> PreprocessSpec:
    """The model's preprocessing at `img_size` (None: the model's own size)."""
    from imgcls.models import get_entry

    spec = get_entry(model_name).default_spec
    return spec if img_size is None else spec.replace(img_size=img_size)


def choose_feature_size(median_short_side: int) -> int:
    """The feature pass's input size for images whose median short side is `median_short_side` px (see MIN_FEATURE_SIZE)."""
    if median_short_side <= 0:
        return DEFAULT_FEATURE_SIZE
    size = -(-int(1.5 * median_short_side) // FEATURE_SIZE_STEP) * FEATURE_SIZE_STEP  # round up
    return max(MIN_FEATURE_SIZE, min(DEFAULT_FEATURE_SIZE, size))


def pixel_extractor(side: int = PIXEL_SIDE) -> FeatureExtractor:
    """Raw pixels, area-averaged to side x side x 3 and scaled to [0, 1]: no model at all."""
    import torch
    import torch.nn.functional as F

    def extract(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, S, S)
        return F.adaptive_avg_pool2d(x, side).flatten(1).numpy()  # (N, 3 * side * side)

    return FeatureExtractor(PIXELS, PreprocessSpec(img_size=max(side, 32), resize_mode="crop"), extract)


def model_extractor(
    model_name: str = DEFAULT_FEATURE_MODEL,
    pretrained: bool = True,
    img_size: int | None = DEFAULT_FEATURE_SIZE,
    precision: str = "auto",
    batch_size: int | None = None,
) -> FeatureExtractor:
    """Pooled pre-logit features of a registered model (forward_head(..., pre_logits=True))."""
    import torch

    from imgcls.models import create_model
    from imgcls.runtime import batched_logits, prepare_inference_model, resolve_precision

    spec = feature_spec(model_name, img_size)
    device = torch.device("cpu")
    model = create_model(model_name, num_classes=1000 if pretrained else 2, pretrained=pretrained)
    model, amp_dtype = prepare_inference_model(model, device, resolve_precision(precision, device))

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(x), pre_logits=True)  # (B, D)

    def extract(images: np.ndarray) -> np.ndarray:
        return batched_logits(model, images, spec, batch_size=batch_size, device=device, amp_dtype=amp_dtype, forward=forward).numpy()

    return FeatureExtractor(model_name + ("" if pretrained else " (random weights)"), spec, extract)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block: for LAPACK and for many small products.

    On the 2-core machines here, with other jobs running, two threads made a 1280 x 1280 eigh take
    8 s instead of 1.4 s, and the label probe on 326 images 14 s instead of 0.4 s (OpenMP threads
    waiting for each other); on an idle machine one thread costs little for these.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def principal_components(features: np.ndarray, dims: int = PROBE_DIMS) -> np.ndarray:
    """Centred features projected on their top `dims` principal axes, largest first: float32 (N, dims')."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    x = x - x.mean(dim=0, keepdim=True)  # (N, D)
    dims = min(dims, x.shape[1], max(1, x.shape[0] - 1))
    cov = (x.T @ x).double() / max(1, x.shape[0] - 1)  # (D, D); D <= 1280, so this is cheap
    with one_thread():
        _, vecs = torch.linalg.eigh(cov)  # eigenvalues ascending
    return (x @ vecs[:, -dims:].flip(1).float()).numpy()  # (N, dims)


def embedding(components: np.ndarray, dims: int = EMBED_DIMS) -> np.ndarray:
    """The first `dims` principal components, each row L2-normalised: float32 (N, dims').

    Centring (done by `principal_components`) matters for cosine similarity: pooled ReLU features
    are all positive, and without it any two images look alike; after it unrelated images score
    near 0 and copies near 1.
    """
    z = components[:, :dims]
    return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def probe_inputs(components: np.ndarray) -> np.ndarray:
    """Principal components scaled by one number to unit mean square, for the linear probe.

    One scale for all components, not one each: standardising every component (whitening) blows
    the weakest ones, mostly noise, up to the strength of the strongest, and with few images per
    dimension the probe then fits noise (on 107 generated images, 256 whitened components gave
    19 % out-of-fold accuracy, one global scale 95 %).
    """
    return (components / max(float(np.sqrt(np.mean(components**2))), 1e-12)).astype(np.float32)
