"""ImageNet-1k class names, in the index order used by every pretrained head in imgcls."""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

NUM_IMAGENET_CLASSES = 1000


@lru_cache(maxsize=1)
def _read_class_names() -> tuple[str, ...]:
    text = (files("imgcls") / "resources" / "imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != NUM_IMAGENET_CLASSES:
        raise RuntimeError(f"imagenet_classes.txt holds {len(names)} names, expected {NUM_IMAGENET_CLASSES}")
    return names


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names; index i names logit i of a pretrained ImageNet head."""
    return list(_read_class_names())
