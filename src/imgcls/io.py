"""Decode images: a path, bytes, a PIL image or a NumPy array -> a fully loaded RGB ``PIL.Image``.

This is imgcls's only decoder; every other module gets pixels through :func:`load_image`, so
training, evaluation, prediction and the server all see the same pixels for the same file:

- EXIF orientation is applied.
- Every mode becomes RGB. 16-bit data is scaled to 8 bit by its range (value / 257), not clipped.
  Alpha is composited over white (also palette and colour-key transparency).
- Animated GIFs and multi-page TIFFs give their first frame.
- width * height is checked against ``max_pixels`` from the header, before any pixel is decoded.
  Pillow's own hard limit (2 * ``PIL.Image.MAX_IMAGE_PIXELS``) still applies on top; an
  application that needs bigger images raises that limit itself, this module never changes it.
- Every failure is an :class:`ImageDecodeError` naming the file and the problem.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgcls.config import DEFAULT_MAX_PIXELS

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "PA"})
_WHITE = (255, 255, 255)


class ImageDecodeError(ValueError):
    """An image could not be decoded. ``path`` names the file, ``reason`` says why."""

    def __init__(self, path: str, reason: str = "") -> None:
        # reason may be empty so that ``cls(message)`` works: torch's DataLoader re-raises a
        # worker's exception that way, and would turn it into a RuntimeError otherwise.
        super().__init__(f"{path}: {reason}" if reason else path)
        self.path = path
        self.reason = reason

    def __reduce__(self):  # pickle (multiprocessing workers) with both fields, not args[0]
        return (type(self), (self.path, self.reason))


def is_image_path(path: str | os.PathLike) -> bool:
    """True if ``path`` has an image extension (any case) and its basename is not hidden."""
    name = os.path.basename(os.fsdecode(path))
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def load_image(
    source: ImageSource,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode ``source`` into a fully loaded RGB image.

    ``source`` is a path, encoded bytes, a PIL image or a NumPy array (HxW, HxWx1, HxWx3 or HxWx4;
    uint8, uint16, bool, or float in [0, 1]). ``name`` labels the source in error messages.
    ``draft_size`` lets a JPEG file or bytes decode at a reduced scale (DCT scaling) whose sides
    stay >= ``draft_size``; nothing else is resized, and a PIL image passed in is never changed. Raises :class:`ImageDecodeError`.
    """
    if isinstance(source, Image.Image):
        return _decode(source, name or "<PIL image>", max_pixels, draft_size, owned=False)
    if isinstance(source, np.ndarray):
        return _from_array(source, name or "<array>", max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        if memoryview(source).nbytes == 0:
            raise ImageDecodeError(label, "empty file (0 bytes)")
        return _open(io.BytesIO(source), label, max_pixels, draft_size)
    if isinstance(source, (str, os.PathLike)):
        label = name or os.fsdecode(source)
        try:
            f = open(source, "rb")
        except FileNotFoundError:
            raise ImageDecodeError(label, "file not found") from None
        except OSError as e:
            raise ImageDecodeError(label, f"cannot read file: {e.strerror or e}") from None
        with f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ImageDecodeError(label, "empty file (0 bytes)")
            return _open(f, label, max_pixels, draft_size)
    raise TypeError(f"load_image: unsupported source type {type(source).__name__}")


def _bomb_error(label: str, detail: str) -> ImageDecodeError:
    return ImageDecodeError(label, f"{detail} (possible decompression bomb)")


def _open(fp: BinaryIO, label: str, max_pixels: int, draft_size: int | None) -> Image.Image:
    """Identify the format and read the header; pixels are decoded later, in ``_decode``."""
    try:
        img = Image.open(fp)
    except UnidentifiedImageError:
        raise ImageDecodeError(label, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own check, done inside Image.open; the Warning arrives here as an exception
        # only when the application's warning filters turn it into one.
        raise ImageDecodeError(label, f"image has too many pixels ({e})") from None
    except Exception as e:  # a broken header: Pillow raises OSError, SyntaxError, struct.error...
        raise ImageDecodeError(label, f"truncated or corrupt image data: {e}") from e
    return _decode(img, label, max_pixels, draft_size, owned=True)


def _decode(
    img: Image.Image, label: str, max_pixels: int, draft_size: int | None, *, owned: bool
) -> Image.Image:
    """Check the size, decode the pixels, apply EXIF orientation, convert to RGB."""
    width, height = img.size
    if width * height > max_pixels:
        raise _bomb_error(
            label,
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
        )
    try:
        if owned and draft_size is not None and img.format == "JPEG":  # draft() resizes in place
            img.draft(img.mode, (draft_size, draft_size))
        img.load()  # the first frame only, for GIF and TIFF
        if owned:
            ImageOps.exif_transpose(img, in_place=True)
        else:  # never modify the caller's image
            img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(label, f"image has too many pixels ({e})") from None
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, EOFError...
        raise ImageDecodeError(label, f"truncated or corrupt image data: {e}") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: alpha over white, high-bit data scaled, not clipped."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        # Pillow's convert() clips these to 0..255, which turns a 16-bit photo almost all white.
        gray = _scale_to_uint8(np.asarray(img), mode)
        return Image.fromarray(gray).convert("RGB")
    has_alpha = (
        mode in _ALPHA_MODES
        or "transparency" in img.info  # palette index or colour key (PNG tRNS, GIF)
        or (mode == "P" and img.palette is not None and img.palette.mode == "RGBA")
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", img.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img if mode == "RGB" else img.convert("RGB")


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Map high-bit or float samples to uint8 by the range of the data type."""
    if a.dtype.kind == "f":  # float images and arrays are taken to be in [0, 1]
        scaled = np.clip(np.nan_to_num(a, nan=0.0), 0.0, 1.0) * 255.0
    elif mode.startswith("I;16") or a.dtype.kind == "u" or (a.min() >= 0 and a.max() <= 65535):
        # Mode "I" (32-bit) in practice holds 16-bit PNG/TIFF samples; treat it as 16-bit.
        scaled = a / 257.0  # 65535 / 255 = 257 exactly
    else:  # genuinely 32-bit data (negative or > 65535): stretch its own range
        lo, hi = float(a.min()), float(a.max())
        scaled = (a - lo) * (255.0 / max(hi - lo, 1.0))
    return np.rint(scaled).astype(np.uint8)


def _from_array(a: np.ndarray, label: str, max_pixels: int) -> Image.Image:
    """Build an RGB image from an HxW[xC] array of uint8, uint16, bool or float."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageDecodeError(
            label, f"unsupported array shape {a.shape}; expected HxW, HxWx1, HxWx3 or HxWx4"
        )
    height, width = a.shape[:2]
    if height * width == 0:
        raise ImageDecodeError(label, f"empty image (array shape {a.shape})")
    if height * width > max_pixels:
        raise _bomb_error(
            label,
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
        )
    kind, itemsize = a.dtype.kind, a.dtype.itemsize
    if kind == "b":
        a = a.astype(np.uint8) * 255
    elif kind == "u" and itemsize == 2:
        a = _scale_to_uint8(a, "I;16")
    elif kind == "f":
        a = _scale_to_uint8(a, "F")
    elif not (kind == "u" and itemsize == 1):
        raise ImageDecodeError(
            label, f"unsupported array dtype {a.dtype}; expected uint8, uint16, bool or float"
        )
    # fromarray picks L / RGB / RGBA from the shape; RGB arrays are copied, the rest converted.
    return _to_rgb(Image.fromarray(np.ascontiguousarray(a)))
