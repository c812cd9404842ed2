"""The report's images: the top losses with their Grad-CAM overlays and examples of the most
confused pairs, each a small JPEG thumbnail embedded as a data: URI.

Thumbnails are THUMB_PX on their longer side (a JPEG draft decodes a large photo at a fraction
of its size, so a thumbnail costs a few milliseconds). Grad-CAM runs on the first EXPLAIN_TOP
losses only: 0.31 s per 224 px image on 2 cores, so 12 cost about 4 s.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

THUMB_PX = 128
EXPLAIN_TOP = 12  # top losses shown as cards, each with its Grad-CAM overlay
PAIRS = 5  # most confused pairs shown with examples
PAIR_EXAMPLES = 4  # images per side of a pair


@dataclass(frozen=True)
class Predictions:
    """One evaluated split, image by image: what the report's gallery and calibration need.

    probs: (N, C) probabilities as the metrics were computed from them; labels: (N,) true class
    indices; paths: the N image files (thumbnails and Grad-CAM read them again).
    """

    probs: np.ndarray
    labels: np.ndarray
    paths: Sequence[str]

    def __post_init__(self) -> None:
        if not (len(self.probs) == len(self.labels) == len(self.paths)):
            raise ValueError(f"probs, labels and paths differ in length: {len(self.probs)}, {len(self.labels)}, {len(self.paths)}")


def top_losses(pred: Predictions, class_names: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The k misclassified images with the lowest probability for their true class, worst
    first: path, index, true, predicted, score (p(predicted)), true_score (p(true))."""
    n = len(pred.labels)
    if n == 0 or k <= 0:
        return []
    rows = np.arange(n)
    true_p = pred.probs[rows, pred.labels]  # (N,)
    preds = pred.probs.argmax(1)  # (N,)
    wrong = np.flatnonzero(preds != pred.labels)
    worst = wrong[np.argsort(true_p[wrong], kind="stable")][:k]
    return [
        {
            "path": str(pred.paths[i]),
            "index": int(i),
            "true": class_names[pred.labels[i]],
            "predicted": class_names[preds[i]],
            "score": float(pred.probs[i, preds[i]]),
            "true_score": float(true_p[i]),
        }
        for i in worst
    ]


def confused_pairs(
    pred: Predictions, class_names: Sequence[str], pairs: int = PAIRS, per_side: int = PAIR_EXAMPLES
) -> list[dict[str, Any]]:
    """The most frequent (true, predicted) mistakes with examples of each side.

    Each pair: true, predicted, count; "mistakes": images of the true class taken for the other
    (most confident mistakes first); "examples": images of the predicted class that the model got
    right (most confident first), to show what it expects that class to look like.
    """
    preds = pred.probs.argmax(1)  # (N,)
    k = len(class_names)
    counts = np.zeros((k, k), np.int64)
    np.add.at(counts, (pred.labels, preds), 1)
    np.fill_diagonal(counts, 0)
    out = []
    for flat in np.argsort(-counts, axis=None, kind="stable")[:pairs]:
        t, p = np.unravel_index(flat, counts.shape)
        if counts[t, p] == 0:
            break
        mistakes = np.flatnonzero((pred.labels == t) & (preds == p))
        right = np.flatnonzero((pred.labels == p) & (preds == p))
        mistakes = mistakes[np.argsort(-pred.probs[mistakes, p], kind="stable")][:per_side]
        right = right[np.argsort(-pred.probs[right, p], kind="stable")][:per_side]
        out.append(
            {
                "true": class_names[t],
                "predicted": class_names[p],
                "count": int(counts[t, p]),
                "mistakes": [{"path": str(pred.paths[i]), "score": float(pred.probs[i, p])} for i in mistakes],
                "examples": [{"path": str(pred.paths[i]), "score": float(pred.probs[i, p])} for i in right],
            }
        )
    return out


# ----------------------------------------------------------------------------- thumbnails


def thumbnail(img: Image.Image, size: int = THUMB_PX) -> Image.Image:
    """At most `size` on the longer side; a small image (CIFAR's 32 px) is enlarged by a whole
    factor with its pixels kept sharp, so it is visible and not blurred."""
    scale = size / max(img.size)
    if scale < 1:
        img = img.copy()
        img.thumbnail((size, size), Image.Resampling.BILINEAR)
    elif scale >= 2:
        k = int(scale)
        img = img.resize((img.width * k, img.height * k), Image.Resampling.NEAREST)
    return img


def jpeg_uri(img: Image.Image, quality: int = 82) -> str:
    """The image as a base64 JPEG data: URI."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


class Thumbnails:
    """Thumbnail data: URIs by path, each file decoded once (None for a file that no longer reads)."""

    def __init__(self, size: int = THUMB_PX) -> None:
        self.size = size
        self._cache: dict[str, str | None] = {}

    def __call__(self, path: str | os.PathLike) -> str | None:
        from imgcls.io import ImageDecodeError, load_image

        key = os.fspath(path)
        if key not in self._cache:
            try:
                self._cache[key] = jpeg_uri(thumbnail(load_image(key, draft_size=self.size), self.size))
            except (ImageDecodeError, OSError):
                self._cache[key] = None
        return self._cache[key]


def loss_cards(
    losses: Sequence[dict[str, Any]],
    thumbs: Thumbnails,
    explain: Callable[[list[str], list[str]], list[Image.Image]] | None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Each top loss with "image" (thumbnail URI) and "overlay" (the Grad-CAM of the predicted
    class over the image, as a thumbnail URI; None without `explain` or for a file it cannot read).

    explain(paths, labels) -> the overlay images, in one batch (`inference.explain.Explainer.explain_many`).
    """
    from imgcls.io import ImageDecodeError

    overlays: list[Image.Image | None] = [None] * len(losses)
    if explain is not None and losses:
        try:
            overlays = list(explain([t["path"] for t in losses], [t["predicted"] for t in losses]))
        except (ImageDecodeError, OSError):  # a file gone or changed since it was evaluated: one at a time, without it
            for i, t in enumerate(losses):
                try:
                    overlays[i] = explain([t["path"]], [t["predicted"]])[0]
                except (ImageDecodeError, OSError) as e:
                    if log is not None:
                        log(f"report: no Grad-CAM for {t['path']}: {e}")
    return [
        {**t, "image": thumbs(t["path"]), "overlay": jpeg_uri(thumbnail(o, thumbs.size)) if o is not None else None}
        for t, o in zip(losses, overlays)
    ]
