"""Pixel statistics of decoded images: perceptual hash, brightness, contrast, sharpness.

All of it runs on a grey thumbnail (THUMB px, area-averaged from the decoded uint8 image), on
whole batches at once. The decoded image is the one the features are computed from (the model's
centre crop), or a 64 px centre crop for an audit without features.

pHash is the DCT hash of Zauner (2010) as the `imagehash` package computes it: grey image
resized to 32x32, 2-D DCT-II, the 8x8 lowest frequencies compared with their median, 64 bits.
Written here in a few lines of numpy-on-torch instead of depending on imagehash (and scipy): a
resized or re-encoded copy keeps its low frequencies, so its hash differs in a few bits at most.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

THUMB = 64  # side of the grey thumbnail the statistics are measured on
HASH_SIZE = 8  # 8x8 low frequencies -> 64-bit hash
HASH_DCT = 32  # the image is reduced to 32x32 before the DCT (imagehash's highfreq_factor 4)
# Thresholds on the 0..255 grey thumbnail. Each is an absolute bound AND a bound relative to the
# median of the image's class (`unusual_for_class`): an image is flagged when it is far off what its
# class looks like, not when the whole class looks like that. MNIST (white ink on black, class means
# 19-44 grey) flagged 2,813 digits "dark" on the absolute bound alone; EuroSAT's calm water and
# dense forest tiles are near-constant by nature (std medians 1.5 and 3.6).
DARK_MEAN = 20.0  # mean grey below this may be dark (under-exposed, black) ...
BRIGHT_MEAN = 235.0  # ... above this may be bright (over-exposed, white) ...
# ... when also below DARK_RELATIVE x the class median (for bright: 255 - mean below that share of
# 255 - the class median). 0.25: a photo at mean 15 among photos at 100 is dark; the faintest MNIST
# digits (mean 9.5 in class "1" at median 18.7, 12.5 in "9" at 30.7) are not. At 1/3, 4 of 20,000
# MNIST digits were (faint strokes at mean 8-11 in classes at median 30-38).
DARK_RELATIVE = 0.25
CONSTANT_STD = 4.0  # grey standard deviation below this may be near-constant (blank, uniform) ...
# ... when also below CONSTANT_RELATIVE x the class median std: a uniform tile in a textured class,
# not a calm-water tile among calm water (a class of blank images has median 0 and flags none).
CONSTANT_RELATIVE = 0.2
MIN_CLASS = 10  # classes with fewer images are compared with the whole data set's median
# Variance of the Laplacian (Pech-Pacheco et al. 2000) below BLUR_RELATIVE x the data set's median
# is "very blurry". Relative, because the absolute value depends on the source resolution: every
# CIFAR image upscaled to the model's size is soft, and none should be flagged for that.
BLUR_RELATIVE = 0.05
# Side of the tiny grey signature that confirms a hash match when there are no features: a resized
# or re-encoded copy correlates above 0.99 with its original at 16 px, different pictures rarely
# above 0.95 (the hash alone matches simple images, two digits "1", too easily).
SIGNATURE = 16


@dataclass
class PixelStats:
    """Per-image statistics, aligned with the images they were computed from."""

    phash: np.ndarray  # (N,) uint64
    phash_mirror: np.ndarray  # (N,) uint64: the hash of the horizontally mirrored image
    mean: np.ndarray  # (N,) float32, grey level 0..255
    std: np.ndarray  # (N,) float32
    laplacian_var: np.ndarray  # (N,) float32
    thumb: np.ndarray  # (N, SIGNATURE**2) float32: the grey thumbnail at SIGNATURE px, centred, unit length

    @classmethod
    def concat(cls, parts: list[PixelStats]) -> PixelStats:
        if not parts:
            empty = np.zeros(0, np.float32)
            hashes = np.zeros(0, np.uint64)
            return cls(hashes, hashes, empty, empty, empty, np.zeros((0, SIGNATURE * SIGNATURE), np.float32))
        fields = ("phash", "phash_mirror", "mean", "std", "laplacian_var", "thumb")
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix (n, n): dct(x) = D @ x for a column x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.astype(np.float32)


_DCT = _dct_matrix(HASH_DCT)
_BITS = (1 << np.arange(HASH_SIZE * HASH_SIZE, dtype=np.uint64)[::-1]).astype(np.uint64)


def grey_thumbnails(images: np.ndarray, size: int = THUMB) -> torch.Tensor:  # noqa: F821
    """uint8 (N, S, S, 3) -> float32 grey (N, 1, size, size) in 0..255 (ITU-R 601 luma, area resize)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()  # (N, 3, S, S)
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    grey = (x * w).sum(dim=1, keepdim=True)  # (N, 1, S, S)
    if grey.shape[-1] != size:
        grey = F.interpolate(grey, size=(size, size), mode="area" if grey.shape[-1] > size else "bilinear", align_corners=None)
    return grey


def phash_bits(grey: torch.Tensor, mirror: bool = False) -> np.ndarray:  # noqa: F821
    """Grey thumbnails (N, 1, H, W) -> 64-bit perceptual hashes (N,) uint64.

    mirror: the hash of the horizontally mirrored thumbnails, from the same DCT: mirroring the
    columns flips the sign of every odd horizontal frequency (the resize is symmetric too), so a
    mirrored copy's hash equals the original's mirror hash.
    """
    import torch
    import torch.nn.functional as F

    small = (
        F.interpolate(grey, size=(HASH_DCT, HASH_DCT), mode="area")
        if grey.shape[-1] >= HASH_DCT
        else F.interpolate(grey, size=(HASH_DCT, HASH_DCT), mode="bilinear", align_corners=False)
    )
    d = torch.from_numpy(_DCT)
    coeffs = d @ small[:, 0] @ d.T  # (N, 32, 32): 2-D DCT-II
    low = coeffs[:, :HASH_SIZE, :HASH_SIZE]  # (N, 8 vertical, 8 horizontal frequencies)
    if mirror:
        low = low * torch.tensor([1.0, -1.0] * (HASH_SIZE // 2))  # odd horizontal frequencies change sign
    low = low.reshape(len(grey), -1)  # (N, 64)
    bits = (low > low.median(dim=1, keepdim=True).values).numpy()  # (N, 64) bool
    return (bits.astype(np.uint64) * _BITS).sum(axis=1, dtype=np.uint64)


def pixel_stats(images: np.ndarray) -> PixelStats:
    """pHash, mean and standard deviation of grey, variance of the Laplacian, for uint8 (N, S, S, 3)."""
    import torch
    import torch.nn.functional as F

    if len(images) == 0:
        return PixelStats.concat([])
    grey = grey_thumbnails(images)  # (N, 1, THUMB, THUMB)
    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    edges = F.conv2d(grey, lap)  # (N, 1, THUMB - 2, THUMB - 2), no padding: borders are not edges
    flat = grey.flatten(1)
    sig = F.adaptive_avg_pool2d(grey, SIGNATURE).flatten(1)  # (N, SIGNATURE**2)
    sig = F.normalize(sig - sig.mean(dim=1, keepdim=True), dim=1)
    return PixelStats(
        phash=phash_bits(grey),
        phash_mirror=phash_bits(grey, mirror=True),
        mean=flat.mean(dim=1).numpy().astype(np.float32),
        std=flat.std(dim=1, correction=0).numpy().astype(np.float32),
        laplacian_var=edges.flatten(1).var(dim=1, correction=0).numpy().astype(np.float32),
        thumb=sig.numpy().astype(np.float32),
    )


def mirror_signatures(thumb: np.ndarray) -> np.ndarray:
    """Signatures (N, SIGNATURE**2) of the horizontally mirrored images (a column permutation)."""
    return np.ascontiguousarray(thumb.reshape(-1, SIGNATURE, SIGNATURE)[:, :, ::-1].reshape(thumb.shape))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit differences between uint64 hashes, broadcast: a (n, 1) with b (m,) -> (n, m) uint8."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.uint8)


def unusual_for_class(values: np.ndarray, labels: np.ndarray, absolute: float, relative: float) -> tuple[np.ndarray, np.ndarray]:
    """(flagged, typical) boolean masks for "low" values: below `absolute` and below `relative` x the class median.

    typical: below `absolute` but not flagged, i.e. what that class looks like. Classes of fewer
    than MIN_CLASS images use the median of the whole data set.
    """
    low = values < absolute
    reference = np.full(len(values), float(np.median(values)) if len(values) else 0.0)
    for c in np.unique(labels):
        members = labels == c
        if members.sum() >= MIN_CLASS:
            reference[members] = float(np.median(values[members]))
    flagged = low & (values < relative * reference)
    return flagged, low & ~flagged


def pixel_findings(stats: PixelStats, labels: np.ndarray) -> tuple[dict[str, list[tuple[int, dict]]], dict[str, dict[int, int]]]:
    """(image index, figures) for "dark", "bright", "near_constant" and "blurry" images, and the
    counts per class label of the images left unflagged because they are typical of their class
    ({kind: {label: n}}, see `unusual_for_class`).

    A near-constant image is not also called blurry: it has no edges to be sharp.
    """
    labels = np.asarray(labels)
    out: dict[str, list[tuple[int, dict]]] = {"dark": [], "bright": [], "near_constant": [], "blurry": []}
    masks = {
        "dark": unusual_for_class(stats.mean, labels, DARK_MEAN, DARK_RELATIVE),
        "bright": unusual_for_class(255.0 - stats.mean, labels, 255.0 - BRIGHT_MEAN, DARK_RELATIVE),
        "near_constant": unusual_for_class(stats.std, labels, CONSTANT_STD, CONSTANT_RELATIVE),
    }
    typical = {}
    for kind, (_, usual) in masks.items():
        per_class = Counter(labels[usual].tolist())
        if per_class:
            typical[kind] = dict(sorted(per_class.items()))
    textured = stats.std >= CONSTANT_STD
    median_lap = float(np.median(stats.laplacian_var[textured])) if textured.any() else 0.0
    for i in range(len(stats.mean)):
        figs = {"mean_grey": round(float(stats.mean[i]), 1), "std_grey": round(float(stats.std[i]), 1)}
        for kind, (flagged, _) in masks.items():
            if flagged[i]:
                out[kind].append((i, figs))
        if textured[i] and median_lap > 0 and stats.laplacian_var[i] < BLUR_RELATIVE * median_lap:
            figs = {"laplacian_var": round(float(stats.laplacian_var[i]), 2), "median_laplacian_var": round(median_lap, 2)}
            out["blurry"].append((i, figs))
    return out, typical
