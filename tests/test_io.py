"""Tests for imgcls.io: every odd file decodes to RGB or fails with a clear ImageDecodeError."""

from __future__ import annotations

import io
import pathlib
import pickle
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from badfiles import BLUE, GREEN, OK_SIZES, RED, make_bad_files, make_good_image, png_header_only
from imgcls.io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    is_image_path,
    load_image,
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
    with pytest.raises(ImageDecodeError, match="not a recognised image format$"):
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
        f"image is 12000x9000 = 108000000 pixels, over the limit of {DEFAULT_MAX_PIXELS} "
        "(possible decompression bomb)"
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
    with pytest.raises(ImageDecodeError, match="cannot read file"):
        load_image(tmp_path)  # a directory


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
