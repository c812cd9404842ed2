"""Tests for imgcls.io: every odd file decodes to RGB or fails with a clear ImageDecodeError."""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from badfiles import (
    BLUE,
    GREEN,
    OK_SIZES,
    RED,
    WRONG_FORMAT_FILES,
    make_bad_files,
    make_good_image,
    make_wrong_format_files,
    png_header_only,
)
from imgcls.io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    is_image_path,
    load_image,
    read_header,
)

# JPEG and lossy paths move colours by a few levels; lossless formats must be exact.
TOL = 12

ERROR_WORDS = {
    "empty.jpg": "empty",
    "text.jpg": "recognised",
    "truncated.jpg": "truncated",
    "corrupt.png": "corrupt",
    "bomb.png": "pixels",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[pathlib.Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, make_bad_files(root)


def close(pixel, expected, tol: int = TOL) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


def test_corpus_has_both_kinds(corpus):
    _, expectations = corpus
    assert set(expectations.values()) == {"ok", "error"}
    assert set(ERROR_WORDS) == {n for n, e in expectations.items() if e == "error"}


@pytest.mark.parametrize("filename", sorted(OK_SIZES))
def test_ok_files_decode_to_rgb(corpus, filename):
    root, expectations = corpus
    assert expectations[filename] == "ok"
    img = load_image(root / filename)
    assert img.mode == "RGB"
    assert img.size == OK_SIZES[filename]
    np.asarray(img)  # fully loaded: pixels readable with the file closed


@pytest.mark.parametrize("filename", sorted(ERROR_WORDS))
def test_error_files_raise_with_name_and_reason(corpus, filename):
    root, expectations = corpus
    assert expectations[filename] == "error"
    with pytest.raises(ImageDecodeError) as info:
        load_image(root / filename)
    err = info.value
    assert filename in str(err) and err.path == str(root / filename)
    assert ERROR_WORDS[filename] in err.reason
    assert str(err) == f"{err.path}: {err.reason}"


def test_error_messages_exact(corpus):
    root, _ = corpus
    with pytest.raises(ImageDecodeError, match=r"empty file \(0 bytes\)$"):
        load_image(root / "empty.jpg")
    with pytest.raises(ImageDecodeError, match=r"not a recognised image format \(imgcls reads JPEG, PNG, BMP, GIF, WebP and TIFF\)$"):
        load_image(root / "text.jpg")
    with pytest.raises(ImageDecodeError, match="truncated or corrupt image data: "):
        load_image(root / "truncated.jpg")


def test_bomb_png_rejected_quickly(corpus):
    root, _ = corpus
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="pixels"):
        load_image(root / "bomb.png")
    assert time.perf_counter() - start < 1.0


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_own_pixel_limit_checked_from_header():
    # 12000 x 9000 = 108 M pixels: over our default 100 M, under Pillow's hard limit (~179 M),
    # so this is our check; the IDAT holds a few bytes, so it must fail before decoding.
    data = png_header_only(12_000, 9_000)
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError) as info:
        load_image(data, name="big.png")
    assert time.perf_counter() - start < 1.0
    assert info.value.reason == (
        f"image is 12000x9000 = 108000000 pixels, over the limit of {DEFAULT_MAX_PIXELS} (possible decompression bomb)"
    )


def test_max_pixels_argument(corpus):
    root, _ = corpus
    with pytest.raises(ImageDecodeError, match="64x48 = 3072 pixels, over the limit of 3000"):
        load_image(root / "good.jpg", max_pixels=3000)
    assert load_image(root / "good.jpg", max_pixels=3072).size == (64, 48)
    with pytest.raises(ImageDecodeError, match="pixels"):
        load_image(np.zeros((10, 10), np.uint8), max_pixels=99)


def test_pillow_bomb_warning_as_error_becomes_decode_error():
    # An application running with warnings as errors gets Pillow's warning as an exception.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageDecodeError, match="too many pixels"):
            load_image(png_header_only(10_000, 9_000), max_pixels=10**9)


def test_missing_and_unreadable_paths(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found") as info:
        load_image(tmp_path / "nope.jpg")
    assert "nope.jpg" in str(info.value)
    with pytest.raises(ImageDecodeError, match=r"not a regular file \(a folder\)$"):
        load_image(tmp_path)


def test_exif_rotation(corpus):
    root, _ = corpus
    img = load_image(root / "exif_rotated.jpg")
    assert img.size == (20, 40)
    # Stored 40x20 with RED on the left; orientation 6 turns it 90 degrees clockwise: RED on top.
    assert close(img.getpixel((10, 5)), RED)
    assert close(img.getpixel((10, 35)), BLUE)


def test_transparent_pixels_become_white(corpus):
    root, _ = corpus
    for filename, opaque in [
        ("rgba.png", GREEN),
        ("palette_transparent.png", BLUE),
        ("la.png", (100, 100, 100)),
    ]:
        img = load_image(root / filename)
        assert img.getpixel((5, 10)) == (255, 255, 255), filename
        assert img.getpixel((35, 10)) == opaque, filename


def test_colour_key_transparency_becomes_white():
    img = Image.new("RGB", (4, 2), (9, 9, 9))
    img.putpixel((3, 1), (50, 60, 70))
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=(9, 9, 9))
    out = load_image(buf.getvalue())
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((3, 1)) == (50, 60, 70)


def test_16bit_gradient_scaled_not_clipped(corpus):
    root, _ = corpus
    with Image.open(root / "gray16.png") as raw:
        assert raw.mode == "I;16"
    row = np.asarray(load_image(root / "gray16.png"))[0, :, 0]
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row.astype(int)) >= 0)  # monotonic
    assert 120 <= row[128] <= 135  # mid-grey, not saturated
    assert len(np.unique(row)) > 200  # the full range is used


def test_other_formats_colours_and_first_frame(corpus):
    root, _ = corpus
    for filename in ["image.bmp", "image.webp", "animated.gif", "multipage.tiff"]:
        img = load_image(root / filename)
        # The first frame is RED | BLUE; the second frame (solid GREEN) must not show.
        assert img.getpixel((2, 10)) == RED, filename
        assert img.getpixel((27, 10)) == BLUE, filename


def test_cmyk_and_bilevel_colours(corpus):
    root, _ = corpus
    assert close(load_image(root / "cmyk.jpg").getpixel((16, 12)), (255, 0, 0))
    bilevel = load_image(root / "bilevel.png")
    assert bilevel.getpixel((5, 10)) == (0, 0, 0)
    assert bilevel.getpixel((35, 10)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["LAB", "HSV", "YCbCr", "I", "F", "PA", "I;16B"])
def test_other_modes_become_rgb(mode):
    img = load_image(Image.new(mode, (3, 2)))
    assert img.mode == "RGB" and img.size == (3, 2)


def test_mode_i_holding_16bit_data_is_scaled():
    img = Image.fromarray(np.array([[0, 32896, 65535]], np.int32))
    assert img.mode == "I"
    assert np.asarray(load_image(img))[0, :, 0].tolist() == [0, 128, 255]


def test_bytes_inputs(corpus):
    root, _ = corpus
    data = (root / "good.jpg").read_bytes()
    for source in (data, bytearray(data), memoryview(data)):
        img = load_image(source)
        assert img.mode == "RGB" and img.size == (64, 48)
    with pytest.raises(ImageDecodeError, match=r"^<bytes>: empty file"):
        load_image(b"")
    with pytest.raises(ImageDecodeError, match=r"^upload\.png: not a recognised"):
        load_image(b"hello", name="upload.png")


def test_pil_input_not_modified(corpus):
    root, _ = corpus
    with Image.open(root / "exif_rotated.jpg") as src:
        out = load_image(src)
        assert out.size == (20, 40) and out is not src
        assert src.size == (40, 20)
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert rgba.mode == "RGBA"
    with Image.open(root / "truncated.jpg") as lazy:
        with pytest.raises(ImageDecodeError, match=r"^<PIL image>: truncated or corrupt"):
            load_image(lazy)


def test_numpy_inputs():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    img = load_image(gray)
    assert img.mode == "RGB" and img.size == (4, 3)
    assert np.array_equal(np.asarray(img)[..., 1], gray)

    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[..., 0] = 200
    assert load_image(rgb).getpixel((0, 0)) == (200, 0, 0)
    assert load_image(rgb[..., :1]).getpixel((0, 0)) == (200, 200, 200)  # HxWx1

    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[:, 2:] = (10, 20, 30, 255)
    out = load_image(rgba)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((3, 0)) == (10, 20, 30)

    floats = np.array([[0.0, 0.5, 1.0, 2.0]], np.float32)
    assert np.asarray(load_image(floats))[0, :, 0].tolist() == [0, 128, 255, 255]

    u16 = np.array([[0, 257 * 128, 65535]], np.uint16)
    assert np.asarray(load_image(u16))[0, :, 0].tolist() == [0, 128, 255]
    assert np.asarray(load_image(u16.astype(">u2")))[0, :, 0].tolist() == [0, 128, 255]

    mask = np.array([[True, False]])
    assert np.asarray(load_image(mask))[0, :, 0].tolist() == [255, 0]

    noncontiguous = np.zeros((4, 6, 3), np.uint8)[:, ::2]
    assert load_image(noncontiguous).size == (3, 4)


def test_numpy_bad_inputs():
    with pytest.raises(ImageDecodeError, match=r"^<array>: unsupported array shape"):
        load_image(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ImageDecodeError, match="unsupported array dtype"):
        load_image(np.zeros((2, 2), np.int64), name="x")
    with pytest.raises(ImageDecodeError, match="empty image"):
        load_image(np.zeros((0, 5), np.uint8))
    with pytest.raises(TypeError):
        load_image(42)  # type: ignore[arg-type]


def test_draft_size_shrinks_large_jpeg(tmp_path):
    path = tmp_path / "big.jpg"
    make_good_image(path, size=(2000, 1500))
    full = load_image(path)
    assert full.size == (2000, 1500)
    small = load_image(path, draft_size=224)
    assert small.mode == "RGB"
    assert small.width < 2000
    assert min(small.size) >= 224
    # draft is JPEG-only: other formats decode at full size.
    png = make_good_image(tmp_path / "big.png", size=(600, 450))
    assert load_image(png, draft_size=224).size == (600, 450)


def test_error_is_value_error_and_pickles():
    err = ImageDecodeError("a.jpg", "empty file (0 bytes)")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.reason, str(again)) == ("a.jpg", "empty file (0 bytes)", str(err))
    # torch's DataLoader re-raises a worker's error as type(err)(message).
    assert str(ImageDecodeError(str(err))) == str(err)


def test_is_image_path():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    assert is_image_path("a/b/cat.jpg")
    assert is_image_path("CAT.JPEG")
    assert is_image_path(pathlib.Path("x/y.TiFf"))
    assert not is_image_path("notes.txt")
    assert not is_image_path("archive.jpg.zip")
    assert not is_image_path("dir/.hidden.png")
    assert not is_image_path("._cat.jpg")  # macOS resource-fork files
    assert not is_image_path(".jpg")
    assert not is_image_path("photos/")


# ----------------------------------------------------------------------------- formats and special files


@pytest.fixture(scope="module")
def wrong_formats(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("wrong_formats")
    make_wrong_format_files(root)
    return root


@pytest.mark.parametrize("filename", sorted(WRONG_FORMAT_FILES))
def test_other_formats_under_image_names_are_refused(wrong_formats, filename):
    # Pillow decodes every one of these; the extension (.png/.jpg) must not let them through.
    with pytest.raises(ImageDecodeError) as info:
        load_image(wrong_formats / filename)
    reason = info.value.reason
    assert reason.startswith(("unsupported image format", "not a recognised image format")), reason
    assert "imgcls reads JPEG, PNG, BMP, GIF, WebP and TIFF" in reason
    assert getattr(info.value, "kind", "unsupported") == "unsupported"
    # Uploads (bytes) go through the same allow-list.
    with pytest.raises(ImageDecodeError, match="image format"):
        load_image((wrong_formats / filename).read_bytes(), name="upload.png")


@pytest.mark.parametrize(
    "filename, fmt", [("ppm_named.png", "PPM"), ("ico_named.png", "ICO"), ("eps_named.jpg", "EPS"), ("dds_named.jpg", "DDS")]
)
def test_refused_format_is_named(wrong_formats, filename, fmt):
    with pytest.raises(ImageDecodeError, match=rf"unsupported image format \(its header looks like {fmt}\)"):
        load_image(wrong_formats / filename)


def test_eps_never_reaches_its_plugin(wrong_formats, monkeypatch):
    from PIL import EpsImagePlugin

    calls = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: calls.append(1))
    with pytest.raises(ImageDecodeError, match="EPS"):
        load_image(wrong_formats / "eps_named.jpg")
    assert calls == []  # Ghostscript is started from this plugin's load(); its parser never ran


def test_jpeg_with_multi_picture_data_is_a_jpeg(tmp_path):
    # Phone cameras write MPO (JPEG + a second picture); Pillow reports format "MPO".
    img = Image.new("RGB", (20, 10), RED)
    img.save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[Image.new("RGB", (20, 10), BLUE)])
    out = load_image(tmp_path / "phone.jpg")
    assert out.size == (20, 10) and close(out.getpixel((5, 5)), RED)


def _in_thread(fn, timeout: float = 5.0):
    """fn() in a daemon thread: ("ok", value) / ("error", exc), or ("blocked", None) after timeout."""
    box: list = []

    def run():
        try:
            box.append(("ok", fn()))
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box.append(("error", e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return box[0] if box else ("blocked", None)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "p.png"
    os.mkfifo(fifo)
    try:
        status, err = _in_thread(lambda: load_image(fifo))
    finally:  # release a reader stuck in open() (only if the check is broken)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert status == "error", f"load_image on a FIFO: {status}"
    assert isinstance(err, ImageDecodeError) and err.reason == "not a regular file (a named pipe (FIFO))"


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_link_to_a_device_is_refused(tmp_path):
    link = tmp_path / "zero.jpg"
    link.symlink_to("/dev/zero")
    status, err = _in_thread(lambda: load_image(link))
    assert status == "error" and isinstance(err, ImageDecodeError), status
    assert err.reason == "not a regular file (a character device)"


def test_link_to_a_regular_image_is_fine(tmp_path):
    target = make_good_image(tmp_path / "real.png", size=(8, 6))
    (tmp_path / "link.png").symlink_to(target)
    assert load_image(tmp_path / "link.png").size == (8, 6)


def test_open_image_file_refuses_special_files_and_opens_regular_ones(tmp_path):
    from imgcls.io import open_image_file

    with pytest.raises(ImageDecodeError, match="a folder"):
        open_image_file(tmp_path, name="dir")
    p = make_good_image(tmp_path / "x.png")
    with open_image_file(p) as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_path_with_nul_byte_is_a_decode_error():
    with pytest.raises(ImageDecodeError, match="NUL byte"):
        load_image("bad\0name.png")


@pytest.mark.parametrize("size", [(0, 0), (0, 5), (7, 0)])
def test_zero_size_pil_image_is_a_decode_error(size):
    with pytest.raises(ImageDecodeError, match=rf"^<PIL image>: empty image \({size[0]}x{size[1]} pixels\)$"):
        load_image(Image.new("RGB", size))


def test_out_of_memory_has_its_own_message(corpus, monkeypatch):
    from PIL import ImageFile

    def no_memory(self):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_memory)
    root, _ = corpus
    with pytest.raises(ImageDecodeError) as info:
        load_image(root / "good.jpg")
    assert info.value.reason == "not enough memory to decode this 64x48 image"
    assert "corrupt" not in str(info.value)


# ----------------------------------------------------------------------------- memory limit (max_bytes)


def png16_header_only(width: int, height: int) -> bytes:
    """A 16-bit greyscale PNG header claiming width x height, with a few bytes of IDAT."""
    import struct
    import zlib

    from badfiles import png_chunk

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)  # 16-bit, colour type 0 = grey
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_read_header_estimates_decode_memory_without_decoding():
    # 9999 x 9999 16-bit grey: under the pixel limit, but decoding it to RGB peaks at ~10 bytes a
    # pixel (the 16-bit pixels, a copy, the uint32 work array, uint8, RGB): about 1 GB.
    data = png16_header_only(9999, 9999)
    start = time.perf_counter()
    header = read_header(data, name="deep.png")
    assert (header.format, header.mode, header.size) == ("PNG", "I;16", (9999, 9999))
    assert header.decode_bytes == 9999 * 9999 * 10
    with pytest.raises(ImageDecodeError) as info:
        load_image(data, name="deep.png", max_bytes=128 * 2**20)
    assert time.perf_counter() - start < 1.0  # refused from the header: nothing decoded
    assert info.value.kind == "too_large"
    assert info.value.reason == (
        "decoding this 9999x9999 PNG image (mode I;16) would take about 953 MB, over the limit of 128 MB (possible decompression bomb)"
    )
    with pytest.raises(ImageDecodeError, match="over the limit of 128 MB"):
        read_header(data, max_bytes=128 * 2**20)


@pytest.mark.parametrize(
    ("mode", "fmt", "per_pixel"),
    [
        ("RGB", "PNG", 4),
        ("RGBA", "PNG", 8),
        ("L", "PNG", 5),
        ("LA", "PNG", 12),
        ("RGB", "WEBP", 16),
        ("RGB", "BMP", 4),
    ],
)
def test_decode_bytes_by_format_and_mode(mode, fmt, per_pixel):
    buf = io.BytesIO()
    Image.new(mode, (40, 30)).save(buf, fmt)
    assert read_header(buf.getvalue()).decode_bytes == 40 * 30 * per_pixel


def test_max_bytes_applies_after_the_jpeg_draft(tmp_path):
    path = make_good_image(tmp_path / "big.jpg", size=(2000, 1500))
    full = read_header(path)
    assert full.size == (2000, 1500) and full.decode_bytes == 2000 * 1500 * 4
    drafted = read_header(path, draft_size=224)
    assert drafted.size == load_image(path, draft_size=224).size and drafted.decode_bytes == full.decode_bytes // 16
    limit = drafted.decode_bytes  # the draft decodes at 1/4 scale: the full image would not fit
    assert load_image(path, draft_size=224, max_bytes=limit).size == drafted.size
    with pytest.raises(ImageDecodeError, match="2000x1500 JPEG"):
        load_image(path, max_bytes=limit)


def test_max_bytes_exact_boundary_and_errors_of_read_header(tmp_path, corpus):
    png = make_good_image(tmp_path / "a.png", size=(50, 40))
    assert load_image(png, max_bytes=50 * 40 * 4).size == (50, 40)
    with pytest.raises(ImageDecodeError, match="over the limit of"):
        load_image(png, max_bytes=50 * 40 * 4 - 1)
    root, _ = corpus
    with pytest.raises(ImageDecodeError) as info:
        read_header(root / "bomb.png")
    assert info.value.kind == "too_large"
    with pytest.raises(ImageDecodeError) as info:
        read_header(b"hello, not an image")
    assert info.value.kind == "unsupported"
    with pytest.raises(TypeError):
        read_header(np.zeros((2, 2), np.uint8))


def test_16bit_scaling_is_exact_rounding_for_every_value():
    """The integer path equals round(v / 257) for all 65536 values (it replaced float64 arithmetic)."""
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    got = np.asarray(load_image(values))[..., 0]
    assert np.array_equal(got, np.rint(values / 257.0).astype(np.uint8))
