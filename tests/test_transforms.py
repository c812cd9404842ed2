"""Tests for imgcls.transforms: the preprocessing spec, per-image resize and batched transforms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.transforms import (
    AugmentSpec,
    PreprocessSpec,
    center_crop,
    eval_transform,
    normalize,
    resize_image,
    to_batch,
    train_transform,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# ----------------------------------------------------------------------------- PreprocessSpec


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"img_size": 3}, "img_size"),
        ({"img_size": 32.0}, "img_size"),
        ({"resize_mode": "stretch"}, "resize_mode"),
        ({"crop_pct": 0.05}, "crop_pct"),
        ({"crop_pct": 1.5}, "crop_pct"),
        ({"interpolation": "cubic-ish"}, "interpolation"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.5, 0.0, 0.5)}, "std"),
    ],
)
def test_spec_validation(kwargs, word):
    with pytest.raises(ValueError, match=word):
        PreprocessSpec(**kwargs)


def test_spec_round_trip_through_json():
    spec = PreprocessSpec(
        img_size=224, resize_mode="pad", crop_pct=0.875, mean=[0.485, 0.456, 0.406], std=(0.229, 0.224, 0.225), interpolation="bicubic"
    )
    assert isinstance(spec.mean, tuple) and isinstance(spec.std, tuple)
    d = spec.to_dict()
    assert d == {
        "img_size": 224,
        "resize_mode": "pad",
        "crop_pct": 0.875,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bicubic",
    }
    back = PreprocessSpec.from_dict(json.loads(json.dumps(d)))
    assert back == spec
    assert PreprocessSpec.from_dict({**d, "added_in_a_later_version": 1}) == spec  # unknown keys ignored


@pytest.mark.parametrize("img_size, crop_pct, cache", [(32, 1.0, 32), (224, 0.875, 256), (12, 0.75, 16), (240, 0.882, 272)])
def test_cache_size(img_size, crop_pct, cache):
    assert PreprocessSpec(img_size=img_size, crop_pct=crop_pct).cache_size == cache


def test_augment_spec_validation_and_resolve():
    with pytest.raises(ValueError, match="crop"):
        AugmentSpec(crop="zoom")
    with pytest.raises(ValueError, match="translate"):
        AugmentSpec(translate=0.9)
    with pytest.raises(ValueError, match="rrc_scale"):
        AugmentSpec(rrc_scale=(0.8, 0.2))
    assert AugmentSpec().resolve(32).crop == "translate"
    assert AugmentSpec().resolve(224).crop == "rrc"
    assert AugmentSpec(crop="none").resolve(224).crop == "none"


# ----------------------------------------------------------------------------- resize_image


def bands(width: int, height: int) -> Image.Image:
    """Three vertical bands of equal width: RED | GREEN | BLUE."""
    a = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    a[:, :third], a[:, third : 2 * third], a[:, 2 * third :] = RED, GREEN, BLUE
    return Image.fromarray(a)


def close(pixel, colour, tol=10) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, int) - np.asarray(colour)) <= tol))


@pytest.mark.parametrize("mode", ["crop", "squash", "pad"])
@pytest.mark.parametrize("size", [(60, 20), (20, 60), (7, 5), (16, 16)])
def test_resize_output_is_a_cache_size_square(mode, size):
    spec = PreprocessSpec(img_size=12, crop_pct=0.75, resize_mode=mode)
    out = resize_image(Image.new("RGB", size, RED), spec)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_resize_crop_keeps_the_centre():
    out = resize_image(bands(60, 20), PreprocessSpec(img_size=16, resize_mode="crop", interpolation="nearest"))
    # 60x20 -> 48x16, centre 16 columns = the GREEN band exactly.
    assert np.all(out == GREEN)


@pytest.mark.parametrize("size", [(90, 61), (61, 90), (40, 40), (13, 9)])
def test_resize_crop_matches_resizing_the_whole_image_then_cropping(size):
    """resize_image resamples only the kept region (Pillow's box); the pixels must be those of
    the plain resize-then-crop, up to rounding at the crop's edges."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).resize(
        (size[0] * 2, size[1] * 2), Image.Resampling.BILINEAR
    )
    spec = PreprocessSpec(img_size=24, crop_pct=0.75, resize_mode="crop", interpolation="bicubic")
    s = spec.cache_size
    w, h = img.size
    nw, nh = max(s, round(w * s / min(w, h))), max(s, round(h * s / min(w, h)))
    left, top = (nw - s) // 2, (nh - s) // 2
    ref = np.asarray(img.resize((nw, nh), Image.Resampling.BICUBIC).crop((left, top, left + s, top + s)), dtype=np.int16)
    out = resize_image(img, spec).astype(np.int16)
    assert out.shape == ref.shape == (32, 32, 3)
    inner = np.abs(out - ref)[2:-2, 2:-2]
    assert inner.max() <= 2 and np.abs(out - ref).mean() < 1.0


def test_resize_squash_keeps_everything():
    out = resize_image(bands(60, 20), PreprocessSpec(img_size=15, resize_mode="squash", interpolation="nearest"))
    assert np.all(out[:, :5] == RED) and np.all(out[:, 5:10] == GREEN) and np.all(out[:, 10:] == BLUE)


def test_resize_pad_uses_the_mean_colour():
    spec = PreprocessSpec(img_size=16, resize_mode="pad", mean=(0.2, 0.4, 0.6), interpolation="nearest")
    out = resize_image(Image.new("RGB", (32, 16), RED), spec)  # -> 16x8 image centred, 4 rows pad each side
    fill = (51, 102, 153)
    assert np.all(out[:4] == fill) and np.all(out[-4:] == fill)
    assert np.all(out[4:12] == RED)
    tall = resize_image(Image.new("RGB", (8, 32), BLUE), spec)  # -> 4x16, 6 columns pad each side
    assert np.all(tall[:, :6] == fill) and np.all(tall[:, -6:] == fill) and np.all(tall[:, 6:10] == BLUE)


def test_resize_converts_other_modes_to_rgb():
    out = resize_image(Image.new("L", (20, 20), 77), PreprocessSpec(img_size=10))
    assert out.shape == (10, 10, 3) and np.all(out == 77)


# ----------------------------------------------------------------------------- eval transform


def test_eval_transform_is_centre_crop_then_normalise_exactly():
    spec = PreprocessSpec(img_size=4, crop_pct=0.5, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    assert spec.cache_size == 8
    x = torch.arange(192, dtype=torch.uint8).view(1, 3, 8, 8)  # (B, C, S, S), values 0..191
    out = eval_transform(x, spec)
    assert out.shape == (1, 3, 4, 4) and out.dtype == torch.float32
    crop = x[0, :, 2:6, 2:6].double() / 255.0
    expected = torch.stack([(crop[0] - 0.5) / 0.5, (crop[1] - 0.25) / 0.25, crop[2]])
    assert torch.allclose(out[0].double(), expected, atol=1e-6)
    # Spot values: the crop's top-left in channel 0 is x[0, 0, 2, 2] = 18; its bottom-right in
    # channel 2 is x[0, 2, 5, 5] = 128 + 45 = 173 (mean 0, std 1 there).
    assert out[0, 0, 0, 0].item() == pytest.approx((18 / 255 - 0.5) / 0.5, abs=1e-6)
    assert out[0, 2, 3, 3].item() == pytest.approx(173 / 255, abs=1e-6)


def test_normalize_accepts_float_in_unit_range():
    spec = PreprocessSpec(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.full((1, 3, 2, 2), 0.75)
    assert torch.allclose(normalize(x, spec), torch.ones(1, 3, 2, 2))
    assert torch.allclose(normalize((x * 255).round().to(torch.uint8), spec), torch.ones(1, 3, 2, 2), atol=1e-2)


def test_center_crop_and_to_batch():
    arrays = [np.full((6, 6, 3), i, np.uint8) for i in range(3)]
    b = to_batch(arrays)
    assert b.shape == (3, 3, 6, 6) and b.dtype == torch.uint8 and b[2].unique().tolist() == [2]
    assert torch.equal(to_batch(np.stack(arrays)), b)
    x = torch.arange(36).view(1, 1, 6, 6)
    assert center_crop(x, 2).flatten().tolist() == [14, 15, 20, 21]
    assert center_crop(x, 6) is x


# ----------------------------------------------------------------------------- train transform


def random_batch(b=8, s=20, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, s, s), generator=g, dtype=torch.uint8)


SPEC16 = PreprocessSpec(img_size=16, crop_pct=0.8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))  # cache 20


@pytest.mark.parametrize("crop", ["translate", "rrc", "none"])
@pytest.mark.parametrize("hflip", [True, False])
def test_train_transform_shape_dtype_range(crop, hflip):
    x = random_batch()
    out = train_transform(x, SPEC16, AugmentSpec(crop=crop, hflip=hflip, translate=0.125), torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 16, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    mean, std = torch.tensor(SPEC16.mean).view(1, 3, 1, 1), torch.tensor(SPEC16.std).view(1, 3, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    assert (out >= lo - 1e-5).all() and (out <= hi + 1e-5).all()  # normalised pixels of [0, 255] inputs


@pytest.mark.parametrize("crop", ["translate", "rrc", "none"])
def test_train_transform_same_seed_same_batch(crop):
    x = random_batch()
    aug = AugmentSpec(crop=crop, hflip=True, color_jitter=0.3)
    a = train_transform(x, SPEC16, aug, torch.Generator().manual_seed(123))
    b = train_transform(x, SPEC16, aug, torch.Generator().manual_seed(123))
    c = train_transform(x, SPEC16, aug, torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_train_transform_without_augmentation_is_the_eval_transform():
    x = random_batch()
    ev = eval_transform(x, SPEC16)
    none = train_transform(x, SPEC16, AugmentSpec(crop="none", hflip=False), torch.Generator().manual_seed(0))
    still = train_transform(x, SPEC16, AugmentSpec(crop="translate", translate=0.0, hflip=False), torch.Generator().manual_seed(0))
    assert torch.allclose(none, ev, atol=1e-6) and torch.allclose(still, ev, atol=1e-6)


def test_hflip_flips_the_images_the_generator_picks():
    b = 1000
    x = random_batch(b=b, s=16)
    spec = PreprocessSpec(img_size=16)
    out = train_transform(x, spec, AugmentSpec(crop="none", hflip=True), torch.Generator().manual_seed(5))
    flip = torch.rand(b, generator=torch.Generator().manual_seed(5)) < 0.5  # the first draw in train_transform
    expected = eval_transform(torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x), spec)
    assert torch.allclose(out, expected, atol=1e-6)
    assert 0.4 < flip.float().mean().item() < 0.6
    plain = eval_transform(x, spec)
    flipped = ~torch.isclose(out, plain).flatten(1).all(1)
    assert torch.equal(flipped, flip)  # random noise images are never symmetric


def test_hflip_off_never_flips():
    x = random_batch(b=64, s=16)
    spec = PreprocessSpec(img_size=16)
    out = train_transform(x, spec, AugmentSpec(crop="none", hflip=False), torch.Generator().manual_seed(5))
    assert torch.allclose(out, eval_transform(x, spec), atol=1e-6)


def test_rotate_turns_each_image_by_a_random_quarter():
    """--rotate: every image comes out as one of its four quarter turns, each turn drawn about as often."""
    b = 400
    x = random_batch(b=b, s=16)
    spec = PreprocessSpec(img_size=16)
    out = train_transform(x, spec, AugmentSpec(crop="none", hflip=False, rotate=True), torch.Generator().manual_seed(3))
    turns = torch.stack([eval_transform(x.rot90(k, dims=(-2, -1)), spec) for k in range(4)])  # (4, B, 3, S, S)
    match = torch.isclose(turns, out.unsqueeze(0), atol=1e-6).flatten(2).all(2)  # (4, B)
    assert torch.equal(match.sum(0), torch.ones(b, dtype=torch.long))  # exactly one turn each (noise has no symmetry)
    counts = match.sum(1)
    assert counts.min() > 60 and counts.sum() == b
    none = train_transform(x, spec, AugmentSpec(crop="none", hflip=False, rotate=None), torch.Generator().manual_seed(3))
    assert torch.allclose(none, eval_transform(x, spec), atol=1e-6)  # None (auto's default) is off


def test_translate_moves_by_at_most_the_pad():
    """A single bright pixel in the centre lands within +-pad pixels of where eval puts it."""
    size, pad = 16, 2
    x = torch.zeros(200, 3, size, size, dtype=torch.uint8)
    x[:, :, 8, 8] = 255
    spec = PreprocessSpec(img_size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    out = train_transform(x, spec, AugmentSpec(crop="translate", translate=pad / size, hflip=False), torch.Generator().manual_seed(0))
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = pos // size, pos % size
    assert (rows - 8).abs().max() <= pad and (cols - 8).abs().max() <= pad
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10  # it does move
    assert torch.allclose(out.sum(dim=(1, 2, 3)), torch.full((200,), 3.0))  # content kept, not blurred


def test_rrc_of_a_solid_image_is_that_colour():
    x = torch.empty(4, 3, 20, 20, dtype=torch.uint8)
    x[:, 0], x[:, 1], x[:, 2] = 200, 100, 50
    spec = PreprocessSpec(img_size=16, crop_pct=0.8, mean=(0, 0, 0), std=(1, 1, 1))
    out = train_transform(x, spec, AugmentSpec(crop="rrc"), torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, 0], torch.full_like(out[:, 0], 200 / 255), atol=1e-4)
    assert torch.allclose(out[:, 2], torch.full_like(out[:, 2], 50 / 255), atol=1e-4)
