"""Hypothesis strategies shared by the fuzz tests: small real images in every format imgcls reads,
their mutations (truncated, bit-flipped, overwritten, random tails) and headers that claim a size.

`claim_size(data, fmt, w, h)` rewrites the size fields of a real file so its header says w x h
while its pixel data stays tiny: what a decompression bomb looks like to the decoder.
"""

from __future__ import annotations

import io
import struct
from collections import Counter

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from badfiles import png_chunk

# "PNG16" is a 16-bit grey PNG: Pillow decodes it through another path (mode I;16).
FORMATS = ("PNG", "PNG16", "JPEG", "GIF", "WEBP", "TIFF", "BMP")
# The largest width and height each format's header can state.
MAX_SIDE = {"PNG": 2**31 - 1, "PNG16": 2**31 - 1, "JPEG": 65535, "GIF": 65535, "WEBP": 16384, "TIFF": 2**32 - 1, "BMP": 2**31 - 1}


def encode_image(fmt: str, width: int, height: int, seed: int) -> bytes:
    """A real width x height image in `fmt` with random pixels."""
    a = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    if fmt == "PNG16":
        Image.fromarray(a[..., 0].astype(np.uint16) * 257).save(buf, format="PNG")
    elif fmt == "GIF":
        Image.fromarray(a).convert("P").save(buf, format="GIF")
    elif fmt == "WEBP":
        Image.fromarray(a).save(buf, format="WEBP", lossless=seed % 2 == 0)  # VP8L and VP8 (lossy)
    else:
        Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


@st.composite
def images(draw, formats: tuple[str, ...] = FORMATS, max_side: int = 40) -> tuple[str, bytes]:
    """(format, bytes) of a small valid image."""
    fmt = draw(st.sampled_from(formats))
    w, h = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    return fmt, encode_image(fmt, w, h, draw(st.integers(0, 2**16)))


def _truncate(draw, data: bytes) -> bytes:
    return data[: draw(st.integers(0, max(0, len(data) - 1)))]


def _bitflip(draw, data: bytes) -> bytes:
    b = bytearray(data)
    for i, bit in draw(st.lists(st.tuples(st.integers(0, len(b) - 1), st.integers(0, 7)), min_size=1, max_size=16)):
        b[i] ^= 1 << bit
    return bytes(b)


def _overwrite(draw, data: bytes) -> bytes:
    """Random bytes over a stretch near the start, where headers and size fields are."""
    at = draw(st.integers(0, min(64, len(data) - 1)))
    patch = draw(st.binary(min_size=1, max_size=16))
    return data[:at] + patch + data[at + len(patch) :]


def _random_tail(draw, data: bytes) -> bytes:
    cut = draw(st.integers(1, len(data)))
    return data[:cut] + draw(st.binary(min_size=1, max_size=512))


MUTATIONS = {"truncate": _truncate, "bitflip": _bitflip, "overwrite": _overwrite, "random_tail": _random_tail}


@st.composite
def mutated_images(draw, formats: tuple[str, ...] = FORMATS) -> tuple[str, str, bytes]:
    """(format, mutation, bytes): a valid image broken in one of MUTATIONS' ways (or untouched)."""
    fmt, data = draw(images(formats))
    kind = draw(st.sampled_from([*MUTATIONS, "none"]))
    return fmt, kind, data if kind == "none" else MUTATIONS[kind](draw, data)


# ----------------------------------------------------------------------------- header-claimed sizes


def _png_size(data: bytes, w: int, h: int) -> bytes:
    ihdr = struct.pack(">II", w, h) + data[24:29]
    return data[:8] + png_chunk(b"IHDR", ihdr) + data[33:]  # a valid CRC: the header itself is fine


def _jpeg_size(data: bytes, w: int, h: int) -> bytes:
    i = next(i for i in range(2, len(data) - 9) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2))  # SOFn
    return data[: i + 5] + struct.pack(">HH", h, w) + data[i + 9 :]


def _webp_size(data: bytes, w: int, h: int) -> bytes:
    if data[12:16] == b"VP8L":  # 14 bits each for width - 1 and height - 1, then alpha and version
        bits = struct.unpack("<I", data[21:25])[0] & ~((1 << 28) - 1)
        return data[:21] + struct.pack("<I", bits | (w - 1) | ((h - 1) << 14)) + data[25:]
    # lossy VP8: 14-bit width and height after the 3-byte frame tag and the start code
    return data[:26] + struct.pack("<HH", w & 0x3FFF, h & 0x3FFF) + data[30:]


def _tiff_size(data: bytes, w: int, h: int) -> bytes:
    b = bytearray(data)
    ifd = struct.unpack("<I", b[4:8])[0]
    for n in range(struct.unpack("<H", b[ifd : ifd + 2])[0]):
        at = ifd + 2 + 12 * n
        tag, kind = struct.unpack("<HH", b[at : at + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength; written as LONG by Pillow
            b[at + 2 : at + 12] = struct.pack("<HII", 4, 1, w if tag == 256 else h)
    return bytes(b)


def claim_size(data: bytes, fmt: str, w: int, h: int) -> bytes:
    """`data` (a real image of `fmt`) with its header rewritten to say w x h pixels."""
    if fmt.startswith("PNG"):
        return _png_size(data, w, h)
    if fmt == "JPEG":
        return _jpeg_size(data, w, h)
    if fmt == "GIF":  # the logical screen, which Pillow takes as the image's size
        return data[:6] + struct.pack("<HH", w, h) + data[10:]
    if fmt == "WEBP":
        return _webp_size(data, w, h)
    if fmt == "TIFF":
        return _tiff_size(data, w, h)
    return data[:18] + struct.pack("<ii", w, h) + data[26:]  # BMP's BITMAPINFOHEADER


@st.composite
def claimed_sizes(draw) -> tuple[str, int, int, bytes]:
    """(format, width, height, bytes): a small real image whose header claims width x height,
    mostly huge (up to the format's largest), sometimes small."""
    fmt, data = draw(images(max_side=16))
    side = MAX_SIDE[fmt]
    sizes = st.one_of(st.integers(1, 64), st.integers(1, side), st.sampled_from([side, 10**4, 10**5]).map(lambda s: min(s, side)))
    w, h = draw(sizes), draw(sizes)
    if fmt == "WEBP" and data[12:16] != b"VP8L":
        w, h = w & 0x3FFF or 1, h & 0x3FFF or 1  # lossy VP8 has 14-bit sides
    return fmt, w, h, claim_size(data, fmt, w, h)


class CaseCount:
    """Examples run per test, for the summary line each fuzz module prints at its end."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def summary(self, what: str) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        return f"{what}: {sum(self.counts.values())} fuzz cases ({parts})"


def report(request, line: str) -> None:
    """Write `line` to the pytest terminal (shown also without -s)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write("\n")
            reporter.write_sep("-", line)
