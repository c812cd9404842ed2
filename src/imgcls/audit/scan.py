"""The file-level part of the audit: which files there are, and what their headers say.

Nothing here decodes pixels: `read_header` opens each file with Pillow, which parses only the
header (size, mode, bit depth, transparency), so the whole data set is scanned in seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from imgcls.data import DatasetIndex
from imgcls.io import is_image_path

# Pillow modes that imgcls converts on decoding (io._to_rgb) and that a user may not expect in a
# training set: ink separations, high bit depth, transparency composited over white, palettes.
ODD_MODES = {
    "CMYK": "CMYK (print colour separation)",
    "I;16": "16-bit greyscale",
    "I;16B": "16-bit greyscale",
    "I;16L": "16-bit greyscale",
    "I": "32-bit integer",
    "F": "32-bit float",
    "RGBA": "alpha channel",
    "RGBa": "alpha channel",
    "LA": "greyscale with alpha",
    "PA": "palette with alpha",
    "P": "palette",
    "1": "1-bit black and white",
    "YCbCr": "YCbCr",
    "LAB": "Lab",
    "HSV": "HSV",
}
# An image is "tiny" below this many pixels on its short side, or below TINY_RELATIVE of the
# data set's median short side (CIFAR's 32 px images are all small, none of them tiny).
TINY_ABSOLUTE = 10
TINY_RELATIVE = 0.5
# Long side / short side beyond which the centre crop throws away most of the picture (a 3:1
# panorama keeps a third of its width).
EXTREME_ASPECT = 3.0
# Greyscale files among colour ones are flagged when they are fewer than this share of the images.
GREY_MINORITY = 0.1


@dataclass(frozen=True)
class Sample:
    """One indexed file: path as listed by the index, integer label, split name."""

    path: str
    label: int
    split: str


@dataclass(frozen=True)
class Header:
    """What the file's header says, or why it could not be read (`error`)."""

    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""
    transparency: bool = False
    error: str = ""


def list_samples(index: DatasetIndex) -> list[Sample]:
    """Every indexed file of every split, in index order."""
    return [Sample(p, y, split) for split, rows in index.splits.items() for p, y in rows]


def unsupported_files(index: DatasetIndex) -> list[tuple[str, str]]:
    """(path, reason) for files inside the data folders that the index skipped as non-images.

    Only folder layouts are walked; a CSV manifest's skipped rows are counted by the index
    (`DatasetIndex.ignored`) and reported as counts.
    """
    if index.root.is_file():
        return []
    folders = _split_dirs(index) if index.layout == "splits" else [index.root]
    out = []
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or is_image_path(name) or Path(dirpath) == index.root:
                    continue
                ext = os.path.splitext(name)[1].lower() or "(none)"
                out.append((os.path.join(dirpath, name), f"not an image extension: {ext}"))
    return out


def _split_dirs(index: DatasetIndex) -> list[Path]:
    from imgcls.data import SPLIT_ALIASES

    return [p for p in sorted(index.root.iterdir()) if p.is_dir() and SPLIT_ALIASES.get(p.name.lower()) in index.splits]


def read_header(path: str) -> Header:
    """Size, mode, format and transparency from the file's header; no pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            transparency = "transparency" in img.info or (img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA")
            return Header(img.width, img.height, img.mode, img.format or "", transparency)
    except FileNotFoundError:
        return Header(error="file not found")
    except UnidentifiedImageError:
        return Header(error="not a recognised image format")
    except Exception as e:  # noqa: BLE001  (a broken header: OSError, SyntaxError, struct.error...)
        return Header(error=f"unreadable header: {e}")


def odd_mode(header: Header, grey_is_rare: bool) -> str:
    """Why the header's mode is unusual ("" when it is not)."""
    if header.mode in ODD_MODES:
        why = ODD_MODES[header.mode]
        return f"{header.mode}: {why}"
    if header.transparency:
        return f"{header.mode}: transparent colour (composited over white)"
    if header.mode == "L" and grey_is_rare:
        return "L: greyscale among colour images"
    return ""


def header_findings(headers: list[Header]) -> dict[str, list[tuple[int, dict]]]:
    """(sample index, figures) per header finding: "tiny", "extreme_aspect", "unusual_mode".

    Thresholds: see TINY_ABSOLUTE, TINY_RELATIVE, EXTREME_ASPECT, ODD_MODES, GREY_MINORITY.
    """
    ok = [i for i, h in enumerate(headers) if not h.error and h.width > 0 and h.height > 0]
    short = sorted(min(headers[i].width, headers[i].height) for i in ok)
    median_short = short[len(short) // 2] if short else 0
    n_grey = sum(headers[i].mode == "L" for i in ok)
    grey_is_rare = 0 < n_grey < GREY_MINORITY * len(ok)
    out: dict[str, list[tuple[int, dict]]] = {"tiny": [], "extreme_aspect": [], "unusual_mode": []}
    for i in ok:
        h = headers[i]
        lo, hi = min(h.width, h.height), max(h.width, h.height)
        size = {"width": h.width, "height": h.height}
        if lo < TINY_ABSOLUTE or lo < TINY_RELATIVE * median_short:
            out["tiny"].append((i, {**size, "median_short_side": median_short}))
        if hi / lo > EXTREME_ASPECT:
            out["extreme_aspect"].append((i, {**size, "aspect_ratio": round(hi / lo, 2)}))
        why = odd_mode(h, grey_is_rare)
        if why:
            out["unusual_mode"].append((i, {"mode": h.mode, "format": h.format, "reason": why}))
    return out
