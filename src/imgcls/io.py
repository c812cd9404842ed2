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
- ``max_bytes`` (optional) bounds the memory decoding may take, also from the header (after a JPEG
  draft): ``ImageHeader.decode_bytes`` estimates it from the format, mode and size, because a
  small file can still cost gigabytes (a 200 KB 16-bit PNG of 9999x9999 pixels took 2.2 GB).
  ``read_header`` gives that estimate without decoding, for callers that budget memory.
- Only the formats the README names are opened (``IMAGE_FORMATS``: JPEG, PNG, BMP, GIF, WebP, TIFF),
  whatever the file's extension says; Pillow's other plugins (EPS through Ghostscript, PPM, TGA,
  ICO, JPEG 2000, ...) never see the bytes.
- A path must be a regular file: FIFOs, devices, sockets and folders are refused without reading
  (a FIFO would block forever, ``/dev/zero`` would read forever).
- Every failure is an :class:`ImageDecodeError` naming the file and the problem.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgcls.config import DEFAULT_MAX_PIXELS

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Pillow format names opened at all (Image.open(formats=...)); what the extensions above stand for.
IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
# Formats an opened image may report: Pillow's JPEG opener returns "MPO" for a JPEG with
# multi-picture data (what many phone cameras write); it is decoded as its first, plain JPEG frame.
_DETECTED_FORMATS = frozenset({*IMAGE_FORMATS, "MPO"})
_FORMATS_TEXT = "JPEG, PNG, BMP, GIF, WebP and TIFF"

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "PA"})
_WHITE = (255, 255, 255)


# ImageDecodeError.kind, for programs that act on the failure (the HTTP server's status code):
# not a format imgcls reads / over the pixel limit (or memory) / empty, truncated or broken data /
# missing, not a regular file or not readable.
DECODE_ERROR_KINDS: tuple[str, ...] = ("unsupported", "too_large", "corrupt", "unreadable")


class ImageDecodeError(ValueError):
    """An image could not be decoded. ``path`` names the file, ``reason`` says why (for people),
    ``kind`` says what went wrong (for programs: one of ``DECODE_ERROR_KINDS``)."""

    def __init__(self, path: str, reason: str = "", kind: str = "corrupt") -> None:
        # reason may be empty so that ``cls(message)`` works: torch's DataLoader re-raises a
        # worker's exception that way, and would turn it into a RuntimeError otherwise.
        if kind not in DECODE_ERROR_KINDS:
            raise ValueError(f"kind must be one of {DECODE_ERROR_KINDS}, got {kind!r}")
        super().__init__(f"{path}: {reason}" if reason else path)
        self.path = path
        self.reason = reason
        self.kind = kind

    def __reduce__(self):  # pickle (multiprocessing workers) with every field, not args[0]
        return (type(self), (self.path, self.reason, self.kind))


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
    max_bytes: int | None = None,
) -> Image.Image:
    """Decode ``source`` into a fully loaded RGB image.

    ``source`` is a path, encoded bytes, a PIL image or a NumPy array (HxW, HxWx1, HxWx3 or HxWx4;
    uint8, uint16, bool, or float in [0, 1]). ``name`` labels the source in error messages.
    ``draft_size`` lets a JPEG file or bytes decode at a reduced scale (DCT scaling) whose sides
    stay >= ``draft_size``; nothing else is resized, and a PIL image passed in is never changed.
    ``max_bytes``: refuse (kind "too_large") an encoded image whose decoding would take more memory
    than this (``ImageHeader.decode_bytes``); None: no such limit. Raises :class:`ImageDecodeError`.
    """
    if isinstance(source, Image.Image):
        label = name or "<PIL image>"
        _check_size(source, label, max_pixels, None, max_bytes)
        return _decode(source, label, owned=False)
    if isinstance(source, np.ndarray):
        return _from_array(source, name or "<array>", max_pixels)
    with _opened(source, name, "load_image") as (img, label):
        _check_size(img, label, max_pixels, draft_size, max_bytes)
        return _decode(img, label, owned=True)


@dataclass(frozen=True)
class ImageHeader:
    """What an encoded image's header says: Pillow's format and mode, (width, height) after any
    JPEG draft, and ``decode_bytes``: about the most memory decoding it to RGB takes."""

    format: str
    mode: str
    size: tuple[int, int]
    decode_bytes: int


def read_header(
    source: str | os.PathLike | bytes | bytearray | memoryview,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    max_bytes: int | None = None,
) -> ImageHeader:
    """The header of encoded bytes or a file, with the checks ``load_image`` makes before it
    decodes (same arguments); no pixel is decoded. Raises :class:`ImageDecodeError`."""
    with _opened(source, name, "read_header") as (img, label):
        _check_size(img, label, max_pixels, draft_size, max_bytes)
        return ImageHeader(str(img.format), img.mode, img.size, decode_bytes(img))


@contextlib.contextmanager
def _opened(source: object, name: str | None, caller: str) -> Iterator[tuple[Image.Image, str]]:
    """Encoded bytes or a path -> (the image with only its header read, its label)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        if memoryview(source).nbytes == 0:
            raise ImageDecodeError(label, "empty file (0 bytes)")
        yield _open(io.BytesIO(source), label), label
    elif isinstance(source, (str, os.PathLike)):
        label = name or os.fsdecode(source)
        with open_image_file(source, label) as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ImageDecodeError(label, "empty file (0 bytes)")
            yield _open(f, label), label
    else:
        raise TypeError(f"{caller}: unsupported source type {type(source).__name__}")


def open_image_file(path: str | os.PathLike, name: str | None = None) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file (a symlink to one is fine).

    Anything else (FIFO, device, socket, folder), a missing file or an invalid path raises
    :class:`ImageDecodeError` labelled ``name``. Never blocks: the type is checked before opening,
    and the open itself is non-blocking in case the path is swapped for a FIFO in between.
    """
    label = name or os.fsdecode(path)
    try:
        mode = os.stat(path).st_mode
    except ValueError:  # os.stat refuses a path with a NUL byte before asking the OS
        raise ImageDecodeError(label, "invalid path (it contains a NUL byte)", "unreadable") from None
    except OSError as e:
        raise _read_error(label, e) from None
    _require_regular(label, mode)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        raise _read_error(label, e) from None
    try:
        _require_regular(label, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


# O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer; on a regular file it
# changes nothing.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


def _read_error(label: str, e: OSError) -> ImageDecodeError:
    if isinstance(e, FileNotFoundError):
        return ImageDecodeError(label, "file not found", "unreadable")
    return ImageDecodeError(label, f"cannot read file: {e.strerror or e}", "unreadable")


_SPECIAL_FILES = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _require_regular(label: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((what for test, what in _SPECIAL_FILES if test(mode)), "a special file")
        raise ImageDecodeError(label, f"not a regular file ({kind})", "unreadable")


def _bomb_error(label: str, detail: str) -> ImageDecodeError:
    return ImageDecodeError(label, f"{detail} (possible decompression bomb)", "too_large")


def _open(fp: BinaryIO, label: str) -> Image.Image:
    """Identify the format and read the header; pixels are decoded later, in ``_decode``."""
    start = fp.tell()
    try:
        # Only the allowed formats' plugins read the header: whatever the extension says, an EPS
        # never reaches Ghostscript and a TGA or PPM is not decoded as if it were a photo.
        img = Image.open(fp, formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        fp.seek(start)
        raise ImageDecodeError(label, _unidentified_reason(fp.read(16)), "unsupported") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own check, done inside Image.open; the Warning arrives here as an exception
        # only when the application's warning filters turn it into one.
        raise ImageDecodeError(label, f"image has too many pixels ({e})", "too_large") from None
    except MemoryError:
        raise ImageDecodeError(label, "not enough memory to read the image header", "too_large") from None
    except Exception as e:  # a broken header: Pillow raises OSError, SyntaxError, struct.error...
        raise ImageDecodeError(label, f"truncated or corrupt image data: {e}") from e
    if img.format not in _DETECTED_FORMATS:  # a plugin may hand back another class than asked for
        raise ImageDecodeError(label, f"unsupported image format {img.format}; imgcls reads {_FORMATS_TEXT}", "unsupported")
    return img


def _unidentified_reason(prefix: bytes) -> str:
    """Why no allowed format opened these bytes: another format's signature, or none known."""
    Image.init()
    # Only the plugins' signature checks run here (pure tests on the first 16 bytes, the ones
    # Image.open itself starts with), never their parsers. Some formats have no signature
    # (TGA's header can look like CUR's), hence "looks like".
    other = next((fmt for fmt, (_, accept) in Image.OPEN.items() if fmt not in _DETECTED_FORMATS and _accepts(accept, prefix)), None)
    if other is not None:
        return f"unsupported image format (its header looks like {other}); imgcls reads {_FORMATS_TEXT}"
    return f"not a recognised image format (imgcls reads {_FORMATS_TEXT})"


def _accepts(accept, prefix: bytes) -> bool:
    """A plugin's signature check on `prefix`; False where it fails on a short prefix (DIB's reads
    4 bytes: a 1-byte file raised struct.error, found by tests/test_fuzz_inputs.py). Image.open
    skips a plugin whose check raises these, too."""
    try:
        return bool(accept and accept(prefix))
    except (SyntaxError, IndexError, TypeError, struct.error):
        return False


def _check_size(img: Image.Image, label: str, max_pixels: int, draft_size: int | None, max_bytes: int | None) -> None:
    """Refuse an empty image, or one over ``max_pixels`` or ``max_bytes``, from its header alone.

    ``draft_size`` (an image opened here, not yet loaded): let a JPEG decode at a reduced scale
    first, so ``max_bytes`` applies to what will really be decoded.
    """
    width, height = img.size
    if width * height == 0:  # Pillow makes 0x0 images; resizing one would fail far from here
        raise ImageDecodeError(label, f"empty image ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise _bomb_error(
            label,
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
        )
    if draft_size is not None and img.format == "JPEG":  # draft() resizes in place
        try:
            img.draft(img.mode, (draft_size, draft_size))
        except Exception as e:  # a header Pillow could read but the JPEG decoder refuses
            raise ImageDecodeError(label, f"truncated or corrupt image data: {e}") from e
    need = decode_bytes(img)
    if max_bytes is not None and need > max_bytes:
        w, h = img.size
        raise _bomb_error(
            label,
            f"decoding this {w}x{h} {img.format} image (mode {img.mode}) would take about {_mb(need)}, over the limit of {_mb(max_bytes)}",
        )


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 10 * 2**20 else f"{n / 2**20:.3g} MB"


def _decode(img: Image.Image, label: str, *, owned: bool) -> Image.Image:
    """Decode the pixels (sizes already checked), apply EXIF orientation, convert to RGB."""
    width, height = img.size
    try:
        img.load()  # the first frame only, for GIF and TIFF
        if owned:
            ImageOps.exif_transpose(img, in_place=True)
        else:  # never modify the caller's image
            img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(label, f"image has too many pixels ({e})", "too_large") from None
    except MemoryError:  # the image fits max_pixels but not this machine's memory right now
        raise ImageDecodeError(label, f"not enough memory to decode this {width}x{height} image", "too_large") from None
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, EOFError...
        raise ImageDecodeError(label, f"truncated or corrupt image data: {e}") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: alpha over white, high-bit data scaled, not clipped."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        # Pillow's convert() clips these to 0..255, which turns a 16-bit photo almost all white.
        gray = _scale_to_uint8(np.asarray(img), mode)
        return Image.fromarray(gray).convert("RGB")
    if _has_alpha(img):
        rgba = img if mode == "RGBA" else img.convert("RGBA")  # convert() would copy an RGBA image
        out = Image.new("RGB", img.size, _WHITE)
        out.paste(rgba, mask=rgba)  # an RGBA mask is its alpha band, without a separate copy of it
        return out
    return img if mode == "RGB" else img.convert("RGB")


def _has_alpha(img: Image.Image) -> bool:
    return (
        img.mode in _ALPHA_MODES
        or "transparency" in img.info  # palette index or colour key (PNG tRNS, GIF)
        or (img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA")
    )


def _stored_bytes(mode: str) -> int:
    """Bytes a pixel of this mode takes in Pillow's memory: 1, 2 (16-bit) or 4 (RGB is padded to 4)."""
    return 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4


# Peak memory of decoding to RGB, in bytes per pixel, beyond the pixels Pillow keeps
# (`_stored_bytes`), measured with Pillow 13 as the growth of the process's resident memory on
# 4000x4000 images: RGB 4 in all, L/P 5, RGBA 8, P with transparency 9, 16-bit 10, float 21.
# libwebp decodes into its own buffer that Pillow then copies: 16 bytes a pixel in all.
_DECODER_BYTES = {"WEBP": 16}


def decode_bytes(img: Image.Image) -> int:
    """About the most memory decoding ``img`` (opened, not yet loaded) to RGB takes, from its header."""
    width, height = img.size
    mode, stored = img.mode, _stored_bytes(img.mode)
    if mode == "F":  # nan_to_num, clip, scale and round each make a float32 copy
        convert = 4 * stored + 1
    elif mode.startswith("I;16") or mode == "I":  # a copy, the uint32 work array, uint8 and RGB
        convert = stored + 6
    elif _has_alpha(img):  # the RGBA copy (none for RGBA itself) and the RGB result
        convert = 4 + (0 if mode == "RGBA" else 4)
    else:  # the RGB copy
        convert = 0 if mode == "RGB" else 4
    return width * height * max(stored + convert, _DECODER_BYTES.get(str(img.format), 0))


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Map high-bit or float samples to uint8 by the range of the data type."""
    if a.dtype.kind == "f":  # float images and arrays are taken to be in [0, 1]
        scaled = np.clip(np.nan_to_num(a, nan=0.0), 0.0, 1.0) * 255.0
        return np.rint(scaled).astype(np.uint8)
    if mode.startswith("I;16") or a.dtype.kind == "u" or (a.min() >= 0 and a.max() <= 65535):
        # Mode "I" (32-bit) in practice holds 16-bit PNG/TIFF samples; treat it as 16-bit.
        # round(v / 257) (65535 / 255 = 257 exactly; 257 is odd, so there are no ties) in uint32,
        # in place: 4 bytes a pixel where float64 took 16 (2.2 GB for a 9999x9999 16-bit PNG).
        wide = a.astype(np.uint32)
        wide += 128
        wide //= 257
        return wide.astype(np.uint8)
    # genuinely 32-bit data (negative or > 65535): stretch its own range
    lo, hi = float(a.min()), float(a.max())
    return np.rint((a - lo) * (255.0 / max(hi - lo, 1.0))).astype(np.uint8)


def _from_array(a: np.ndarray, label: str, max_pixels: int) -> Image.Image:
    """Build an RGB image from an HxW[xC] array of uint8, uint16, bool or float."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageDecodeError(label, f"unsupported array shape {a.shape}; expected HxW, HxWx1, HxWx3 or HxWx4", "unsupported")
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
        raise ImageDecodeError(label, f"unsupported array dtype {a.dtype}; expected uint8, uint16, bool or float", "unsupported")
    # fromarray picks L / RGB / RGBA from the shape; RGB arrays are copied, the rest converted.
    return _to_rgb(Image.fromarray(np.ascontiguousarray(a)))
