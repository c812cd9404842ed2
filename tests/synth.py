"""Small synthetic, learnable image datasets written to disk for data/train/evaluate/CLI tests.

Each class is one shape (circle, square, triangle, cross, ...) in one colour, drawn at a random
position and size on a noisy grey background, so small_cnn separates the classes within a few
epochs at 16-24 px while no two images are identical.
"""

from __future__ import annotations

import colorsys
import csv
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")
DEFAULT_CLASSES = ("circle", "square", "triangle")


def class_names_for(classes: Sequence[str] | int) -> list[str]:
    """('a', 'b') -> ['a', 'b']; 4 -> ['class0', ..., 'class3']."""
    if isinstance(classes, int):
        if classes < 1:
            raise ValueError("need at least one class")
        return [f"class{i}" for i in range(classes)]
    return list(classes)


def _colour(i: int, n: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(i / max(n, 1), 0.9, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_sample(label: int, num_classes: int, size: int, rng: np.random.Generator, mode: str = "RGB") -> Image.Image:
    """One image of class `label`: its shape and colour at a random place on a noisy background."""
    bg = rng.integers(90, 140)
    noise = rng.normal(0, 12, (size, size, 3))
    arr = np.clip(bg + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    r = int(rng.uniform(0.25, 0.38) * size)
    cx = int(rng.integers(r, size - r + 1))
    cy = int(rng.integers(r, size - r + 1))
    colour = _colour(label, num_classes)
    shape = SHAPES[label % len(SHAPES)]
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        w = max(1, r // 3)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    elif shape == "ring":
        d.ellipse(box, outline=colour, width=max(1, r // 3))
    else:  # bar
        d.rectangle((cx - r, cy - max(1, r // 3), cx + r, cy + max(1, r // 3)), fill=colour)
    return img.convert(mode) if mode != "RGB" else img


def _ext_for(ext: str, i: int) -> str:
    if ext == "mixed":  # alternate formats (and letter case) inside one class
        return (".png", ".jpg", ".PNG", ".JPG")[i % 4]
    return ext


def _save(img: Image.Image, path: pathlib.Path) -> None:
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, format="JPEG", quality=95)
    else:
        img.save(path, format="PNG")


def write_images(
    folder: pathlib.Path,
    label: int,
    num_classes: int,
    count: int,
    size: int,
    rng: np.random.Generator,
    mode: str,
    ext: str,
    prefix: str = "",
) -> list[pathlib.Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        path = folder / f"{prefix}{i:03d}{_ext_for(ext, i)}"
        _save(draw_sample(label, num_classes, size, rng, mode), path)
        out.append(path)
    return out


def make_class_folders(
    root: str | pathlib.Path,
    classes: Sequence[str] | int = DEFAULT_CLASSES,
    per_class: int = 20,
    size: int = 24,
    seed: int = 0,
    mode: str = "RGB",
    ext: str = ".png",
) -> pathlib.Path:
    """Write ROOT/<class>/NNN.<ext>, `per_class` images per class; return ROOT.

    ext: ".png", ".jpg" or "mixed" (.png, .jpg, .PNG, .JPG in turn).
    """
    root = pathlib.Path(root)
    names = class_names_for(classes)
    rng = np.random.default_rng(seed)
    for label, name in enumerate(names):
        write_images(root / name, label, len(names), per_class, size, rng, mode, ext)
    return root


def make_split_folders(
    root: str | pathlib.Path,
    classes: Sequence[str] | int = DEFAULT_CLASSES,
    per_split: dict[str, int] | None = None,
    size: int = 24,
    seed: int = 0,
    mode: str = "RGB",
    ext: str = ".png",
) -> pathlib.Path:
    """Write ROOT/<split>/<class>/NNN.<ext>; default splits train 16, valid 6, test 6 per class."""
    root = pathlib.Path(root)
    per_split = per_split or {"train": 16, "valid": 6, "test": 6}
    names = class_names_for(classes)
    rng = np.random.default_rng(seed)
    for split, count in per_split.items():
        for label, name in enumerate(names):
            write_images(root / split / name, label, len(names), count, size, rng, mode, ext)
    return root


def make_csv_manifest(
    root: str | pathlib.Path,
    classes: Sequence[str] | int = DEFAULT_CLASSES,
    per_class: int = 20,
    size: int = 24,
    seed: int = 0,
    mode: str = "RGB",
    ext: str = ".png",
    splits: dict[str, float] | None = None,
    name: str = "manifest.csv",
) -> pathlib.Path:
    """Write ROOT/images/<class>_NNN.<ext> and ROOT/<name> (path,label[,split], paths relative
    to the CSV); return the CSV path.

    splits: e.g. {"train": 0.7, "val": 0.3} adds a 'split' column, assigning each class's images
    to the splits in order by those shares.
    """
    root = pathlib.Path(root)
    names = class_names_for(classes)
    rng = np.random.default_rng(seed)
    rows: list[list[str]] = []
    for label, cname in enumerate(names):
        paths = write_images(root / "images", label, len(names), per_class, size, rng, mode, ext, prefix=f"{cname}_")
        split_of = [""] * len(paths)
        if splits:
            bounds = np.cumsum([0.0, *splits.values()]) / sum(splits.values()) * len(paths)
            for i in range(len(paths)):
                k = int(np.searchsorted(bounds, i, side="right")) - 1
                split_of[i] = list(splits)[min(k, len(splits) - 1)]
        for p, s in zip(paths, split_of):
            rows.append([p.relative_to(root).as_posix(), cname] + ([s] if splits else []))
    csv_path = root / name
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"] + (["split"] if splits else []))
        w.writerows(rows)
    return csv_path
