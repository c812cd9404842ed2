"""Whether the features can tell a copy from a look-alike on this data, measured on the data itself.

The feature rules of `neighbours.DuplicateRule` assume that a resized, re-encoded copy lands closer
to its original than any other image does. On photos it does (Oxford flowers: cosine 0.99-1.0 with
their originals), but on small, simple images the pretrained features of an upscaled thumbnail move
more under a resize than between two different pictures: MNIST copies resized to 80 % and saved as
JPEG kept a median cosine of 0.79 to their originals while different writers' look-alike digits
reached 0.92-0.98, so the feature rules found 2 of 200 planted copies and matched 229 pairs of
different digits in 4,000 random rows (the 1,964 false groups of the full audit). CIFAR-10's copies
kept a median 0.81 too, yet stood closer to their originals than any other image more often.

So the audit plants its own copies: a sample of the decoded images, each resized to the data's native
size, shrunk to 80 %, saved as JPEG (quality 80), decoded and scaled back, and run through the same
feature extractor. The share of copies whose cosine to their original beats the original's most
similar other image is how well features find copies here; under MIN_FOUND_SHARE the feature rules
are left out of the duplicate search (the hash rule stays) and the report says why.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

SAMPLE = 200  # images copied
SHRINK = 0.8  # the copy's side, as a share of the native side
JPEG_QUALITY = 80
MIN_FOUND_SHARE = 0.5  # copies that must stand out from every other image for the feature rules to be used


@dataclass(frozen=True)
class CopyCheck:
    """How planted copies fared in feature space."""

    sampled: int
    found_share: float  # copies closer to their original than the original's most similar other image
    median_cosine: float  # copy to original

    @property
    def features_find_copies(self) -> bool:
        return self.sampled == 0 or self.found_share >= MIN_FOUND_SHARE

    def to_dict(self) -> dict[str, Any]:
        return {
            "sampled": self.sampled,
            "found_share": round(self.found_share, 3),
            "median_cosine": round(self.median_cosine, 3),
            "min_found_share": MIN_FOUND_SHARE,
            "feature_rules": "used" if self.features_find_copies else "left out: features do not tell copies from look-alikes here",
        }


def sample_rows(n: int, seed: int) -> np.ndarray:
    """Sorted indices (into the decoded images) of the images to copy."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, min(SAMPLE, n), replace=False)) if n > 1 else np.zeros(0, np.int64)


def make_copy(image: np.ndarray, native_side: int) -> np.ndarray:
    """A resized, re-encoded copy of one decoded uint8 (S, S, 3) image, decoded back to (S, S, 3)."""
    from PIL import Image

    s = image.shape[0]
    native = max(8, min(s, native_side or s))
    small = max(8, round(native * SHRINK))
    img = Image.fromarray(image).resize((native, native), Image.Resampling.BICUBIC).resize((small, small), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    back = Image.open(io.BytesIO(buf.getvalue())).convert("RGB").resize((s, s), Image.Resampling.BICUBIC)
    return np.asarray(back, dtype=np.uint8)


def check_copies(features: np.ndarray, rows: np.ndarray, copy_features: np.ndarray) -> CopyCheck:
    """features (N, D) of every image; rows: the copied images' indices; copy_features (len(rows), D).
    Cosines are taken after centring on the data's mean feature (pooled ReLU features are all positive)."""
    import torch

    if len(rows) == 0 or len(features) < 2:
        return CopyCheck(0, 1.0, 1.0)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    mean = x.mean(dim=0, keepdim=True)
    x = torch.nn.functional.normalize(x - mean, dim=1)
    c = torch.nn.functional.normalize(torch.from_numpy(copy_features.astype(np.float32)) - mean, dim=1)
    r = torch.from_numpy(rows)
    to_copy = (x[r] * c).sum(dim=1)  # (m,)
    others = x[r] @ x.T  # (m, N)
    others[torch.arange(len(r)), r] = -2.0  # not itself
    nearest_other = others.max(dim=1).values
    found = (to_copy > nearest_other).float().mean().item()
    return CopyCheck(len(rows), float(found), float(to_copy.median().item()))
