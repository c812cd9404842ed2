"""A corpus of good, odd and broken image files, generated on the fly for decoder tests.

``make_bad_files(root)`` writes the corpus and returns ``{filename: "ok" | "error"}``: "ok" files
must decode to RGB, "error" files must raise ``imgcls.io.ImageDecodeError``. ``OK_SIZES`` gives
the (width, height) each "ok" file must decode to (after EXIF rotation). Colours are chosen so
tests can assert on pixels; they are listed next to each file below.
"""

from __future__ import annotations

import io
import pathlib
import struct
import zlib

import numpy as np
from PIL import Image

RED = (220, 20, 20)
BLUE = (20, 20, 220)
GREEN = (20, 200, 20)

# (width, height) of every "ok" file after decoding.
OK_SIZES: dict[str, tuple[int, int]] = {
    "good.jpg": (64, 48),
    "cmyk.jpg": (32, 24),
    "gray16.png": (256, 8),
    "palette_transparent.png": (40, 20),
    "rgba.png": (40, 20),
    "la.png": (40, 20),
    "bilevel.png": (40, 20),
    "exif_rotated.jpg": (20, 40),
    "image.bmp": (30, 20),
    "animated.gif": (30, 20),
    "multipage.tiff": (30, 20),
    "image.webp": (30, 20),
}


def make_good_image(
    path: str | pathlib.Path,
    size: tuple[int, int] = (32, 32),
    color: tuple[int, int, int] = (200, 30, 30),
) -> pathlib.Path:
    """Write a solid-colour RGB image; the format follows the file extension."""
    path = pathlib.Path(path)
    Image.new("RGB", size, color).save(path)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 of type + data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height RGB pixels but whose IDAT holds only a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, colour type 2 = RGB
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def _halves(size: tuple[int, int], left, right, mode: str = "RGB") -> Image.Image:
    """An image whose left half is ``left`` and right half is ``right``."""
    img = Image.new(mode, size, right)
    img.paste(left, (0, 0, size[0] // 2, size[1]))
    return img


def _noisy_jpeg_bytes(size: tuple[int, int] = (128, 128)) -> bytes:
    # Noise makes the entropy-coded data dominate, so cutting the file in half lands inside it.
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make_bad_files(root: pathlib.Path) -> dict[str, str]:
    """Write the corpus into ``root`` and return ``{filename: "ok" | "error"}``."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    size = (40, 20)

    # good.jpg: left half RED, right half BLUE.
    _halves((64, 48), RED, BLUE).save(root / "good.jpg", quality=95)

    # truncated.jpg: the first half of a real JPEG.
    jpeg = _noisy_jpeg_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])

    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")

    # bomb.png: header claims 100000 x 100000 = 1e10 pixels.
    (root / "bomb.png").write_bytes(png_header_only(100_000, 100_000))

    # corrupt.png: a valid 40x20 header followed by an IDAT of garbage (bad zlib data).
    ihdr = struct.pack(">IIBBBBB", 40, 20, 8, 2, 0, 0, 0)
    (root / "corrupt.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"not zlib data at all" * 4) + png_chunk(b"IEND", b"")
    )

    # cmyk.jpg: solid red in CMYK (no cyan, full magenta and yellow).
    Image.new("CMYK", (32, 24), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)

    # gray16.png: mode I;16, horizontal gradient from 0 (left) to 65535 (right).
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    Image.fromarray(np.tile(ramp, (8, 1))).save(root / "gray16.png")

    # palette_transparent.png: left half palette index 0, which is transparent; right half BLUE.
    pal = Image.new("P", size, 1)
    pal.putpalette([0, 0, 0, *BLUE] + [0] * (256 - 2) * 3)
    pal.paste(0, (0, 0, size[0] // 2, size[1]))
    pal.save(root / "palette_transparent.png", transparency=0)

    # rgba.png: left half transparent black (so dropping alpha would show black), right half GREEN.
    _halves(size, (0, 0, 0, 0), (*GREEN, 255), "RGBA").save(root / "rgba.png")

    # la.png: left half transparent black, right half opaque gray 100.
    _halves(size, (0, 0), (100, 255), "LA").save(root / "la.png")

    # bilevel.png: mode 1, left half black, right half white.
    _halves(size, 0, 1, "1").save(root / "bilevel.png")

    # exif_rotated.jpg: stored 40x20, left half RED, right half BLUE, EXIF orientation 6
    # ("rotate 90 degrees clockwise to display"): shown 20x40, RED on top, BLUE below.
    exif = Image.Exif()
    exif[0x0112] = 6
    _halves(size, RED, BLUE).save(root / "exif_rotated.jpg", quality=95, exif=exif.tobytes())

    # Other formats: left half RED, right half BLUE.
    _halves((30, 20), RED, BLUE).save(root / "image.bmp")
    _halves((30, 20), RED, BLUE).save(root / "image.webp", lossless=True)
    # Animated GIF and two-page TIFF: the first frame is RED | BLUE, the second solid GREEN.
    first, second = _halves((30, 20), RED, BLUE), Image.new("RGB", (30, 20), GREEN)
    first.save(root / "animated.gif", save_all=True, append_images=[second], duration=100, loop=0)
    first.save(root / "multipage.tiff", save_all=True, append_images=[second])

    errors = ["truncated.jpg", "empty.jpg", "text.jpg", "bomb.png", "corrupt.png"]
    return {**{name: "ok" for name in OK_SIZES}, **{name: "error" for name in errors}}


# Formats Pillow reads (most without any library) that imgcls must refuse whatever the file is
# called: name -> the Pillow format written into it. The .png/.jpg names are the point.
WRONG_FORMAT_FILES: dict[str, str] = {
    "ppm_named.png": "PPM",
    "pcx_named.jpg": "PCX",
    "tga_named.png": "TGA",  # TGA has no signature: its header happens to look like CUR's
    "ico_named.png": "ICO",
    "eps_named.jpg": "EPS",  # the format whose loading runs Ghostscript
    "sgi_named.png": "SGI",
    "dds_named.jpg": "DDS",
}


def make_wrong_format_files(root: pathlib.Path) -> dict[str, str]:
    """Write RED | BLUE images in other formats under image names; returns WRONG_FORMAT_FILES."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    img = _halves((30, 20), RED, BLUE)
    for name, fmt in WRONG_FORMAT_FILES.items():
        img.save(root / name, format=fmt)
    return dict(WRONG_FORMAT_FILES)
