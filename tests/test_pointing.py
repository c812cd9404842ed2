"""The pointing game (issue 13) for every model family: trained here on generated images whose
class is decided only by a small patch at a random place, does the Grad-CAM map's peak fall on it?

Each image is noise with two squares at random places that do not overlap: the class's colour
(red or blue) and a yellow distractor that every image has. A family is trained briefly with the
library's own pieces (`create_model` + `train_one_epoch` from scratch; EfficientNet-Lite0 from its
ImageNet weights with a linear probe, as `imgcls train --pretrained` does for a few hundred
images), must classify held-out images, and then `explain_images` (the default target layer of
`imgcls.inference.targets`) must put the map's peak within half a cell of the target layer of the
patch for a share of them well above chance. bench/pointing.py plays the same game at larger
sizes and prints a table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.config import AugmentSpec
from imgcls.inference import explain
from imgcls.inference.targets import MIN_CAM_SIDE, candidate_layers, target_layer
from imgcls.models import MissingWeightsError, create_model
from imgcls.transforms import PreprocessSpec

COLOURS = ((230, 40, 40), (40, 80, 230))  # the class: red 0, blue 1
CLASS_NAMES = ["red", "blue"]
DISTRACTOR = (240, 220, 40)  # in every image, of no class


def patch_image(label: int, size: int, patch: int, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """(image (size, size, 3) uint8, x, y of the class patch's top-left corner)."""
    a = np.clip(rng.normal(120, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    while True:
        x, y, dx, dy = (int(v) for v in rng.integers(0, size - patch + 1, 4))
        if abs(x - dx) >= patch or abs(y - dy) >= patch:  # patch and distractor do not overlap
            break
    a[dy : dy + patch, dx : dx + patch] = DISTRACTOR
    a[y : y + patch, x : x + patch] = COLOURS[label]
    return a, x, y


def patch_set(n: int, size: int, patch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n images (n, size, size, 3) uint8, their labels (n,) and patch corners (n, 2) as (x, y)."""
    labels = rng.integers(0, len(COLOURS), n)
    drawn = [patch_image(int(k), size, patch, rng) for k in labels]
    return np.stack([d[0] for d in drawn]), labels, np.array([(d[1], d[2]) for d in drawn])


def map_peak(heat: np.ndarray) -> tuple[float, float]:
    """(y, x) of the map's maximum: the middle of the pixels at the maximum, since a coarse map
    upsampled bilinearly is flat around its maximum near the border (np.argmax would take that
    flat patch's first pixel, the image's corner)."""
    ys, xs = np.nonzero(heat >= heat.max() - 1e-6)
    return float(ys.mean()), float(xs.mean())


def is_hit(heat: np.ndarray, x: int, y: int, patch: int, tolerance: float) -> bool:
    """The pointing game (Zhang et al., 2016): the map's peak within `tolerance` px of the patch."""
    py, px = map_peak(heat)
    return x - tolerance <= px < x + patch + tolerance and y - tolerance <= py < y + patch + tolerance


@dataclass(frozen=True)
class Game:
    """One family's game: image and patch size, and how it is trained."""

    arch: str
    size: int
    patch: int
    n_train: int
    epochs: int = 0  # 0: a linear probe on the pretrained features
    lr: float = 1e-3
    batch_size: int = 16
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    frozen: tuple[str, ...] = ()  # parameters whose names start with one of these keep their initial values

    @property
    def pretrained(self) -> bool:
        return self.epochs == 0

    def spec(self) -> PreprocessSpec:
        # squash with crop_pct 1: the model sees the whole image, pixel for pixel
        if self.pretrained:  # EfficientNet-Lite's own normalisation, as its ImageNet weights expect
            return PreprocessSpec(img_size=self.size, resize_mode="squash", crop_pct=1.0, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
        return PreprocessSpec(img_size=self.size, resize_mode="squash", crop_pct=1.0, mean=(0.5,) * 3, std=(0.25,) * 3)


def train_model(game: Game, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> torch.nn.Module:
    """A model of game.arch trained on uint8 images (N, S, S, 3): from scratch with AdamW and
    `train_one_epoch`, or a linear probe on the pretrained features (`training.finetune`)."""
    from imgcls.training.finetune import classifier_of, extract_features, fit_linear_head
    from imgcls.training.loop import StepOptions, TrainData, train_one_epoch
    from imgcls.training.recipes import init_whitening

    torch.manual_seed(seed)
    spec, y = game.spec(), torch.as_tensor(labels)
    if game.pretrained:
        model = create_model(game.arch, len(COLOURS), pretrained=True, **game.model_kwargs).eval()
        feats = extract_features(model, images, spec, torch.device("cpu"), None)  # (N, F), eval mode
        fit_linear_head(classifier_of(model), feats, y, log=lambda _: None)
        return model
    model = create_model(game.arch, len(COLOURS), **game.model_kwargs)
    init_whitening(model, torch.from_numpy(images), spec)  # small_cnn's data-set whitening; a no-op for the others
    data = TrainData(torch.from_numpy(images), y, spec, AugmentSpec(hflip=True, crop="none"), game.batch_size)
    for name, p in model.named_parameters():
        if name.startswith(game.frozen or ("-",)):
            p.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=game.lr, weight_decay=0.0)
    generator, options = torch.Generator().manual_seed(seed), StepOptions(torch.device("cpu"), channels_last=False)
    for _ in range(game.epochs):
        train_one_epoch(model, optimizer, torch.nn.CrossEntropyLoss(), data, generator, options)
    return model.eval()


@dataclass(frozen=True)
class Score:
    accuracy: float  # held-out images classified right
    hit_rate: float  # share of held-out images whose map's peak is on the patch
    chance: float  # the hit rate of a peak at a uniformly random place
    layer: str
    cells: int  # the target layer's map, cells a side
    seconds_per_image: float  # explain_images, one batch of 16 images per pass


def play(model: torch.nn.Module, game: Game, n: int, rng: np.random.Generator, layer: str | None = None) -> Score:
    """Explain n new images for their predicted class and count the peaks on the patch, within
    half a cell of the target layer (`layer`, else the default one for game.size)."""
    images, labels, corners = patch_set(n, game.size, game.patch, rng)
    meta = {"class_names": CLASS_NAMES, "preprocess": game.spec().to_dict()}
    chosen = target_layer(model, game.size) if layer is None else next(c for c in candidate_layers(model) if c.name == layer)
    t0 = time.perf_counter()
    found = explain.explain_images(model, meta, [Image.fromarray(a) for a in images], layer=layer)
    seconds = (time.perf_counter() - t0) / n
    tolerance = chosen.stride / 2
    hits = [is_hit(e.map, int(x), int(y), game.patch, tolerance) for e, (x, y) in zip(found, corners)]
    span = min(game.size, game.patch + 2 * tolerance)
    return Score(
        accuracy=float(np.mean([e.class_index == k for e, k in zip(found, labels)])),
        hit_rate=float(np.mean(hits)),
        chance=(span / game.size) ** 2,
        layer=chosen.name,
        cells=game.size // chosen.stride,
        seconds_per_image=seconds,
    )


# ----------------------------------------------------------------------------- the games

# Small sizes and short trainings that each family learnt the task with on 2 cores. Measured with
# bench/pointing.py --quick (seeds 0 and 1, 60 held-out images each): held-out accuracy 0.97-1.00
# for all; peaks on the patch small_cnn 0.95/0.92, resnet18 0.83/0.97 (layer1, 8 x 8; its layer4 is
# 1 x 1 here), vgg11_bn 1.00/0.97 (features.13; its last ReLU, 2 x 2: 0.50/0.32, below the 0.56 a
# random point gets with that layer's tolerance), efficientnet_lite0 0.72/0.62 (_blocks.10, 8 x 8;
# its head, 4 x 4: 0.28/0.23). A random point hits 0.10-0.14. MIN_HITS leaves a margin below those.
GAMES = {
    "small_cnn": Game("small_cnn", size=48, patch=12, n_train=96, epochs=3, lr=3e-3, model_kwargs={"widths": (32, 64, 64)}),
    "resnet18": Game("resnet18", size=32, patch=8, n_train=96, epochs=3, lr=1e-3),
    # VGG's classifier (120M of its 133M weights) made a training step cost about as much at 32 px
    # as at 64 px (4-5 CPU-s per 16 images here), so its two 4096-wide layers stay as initialised
    # (bench/pointing.py trains them all; at 64 px that took ~4x as long for the same hit rate).
    "vgg11_bn": Game(
        "vgg11_bn", size=32, patch=8, n_train=96, epochs=4, lr=3e-4, model_kwargs={"dropout": 0.0}, frozen=("classifier.0", "classifier.3")
    ),
    "efficientnet_lite0": Game("efficientnet_lite0", size=128, patch=24, n_train=200),
}
MIN_HITS = {"small_cnn": 0.8, "resnet18": 0.6, "vgg11_bn": 0.7, "efficientnet_lite0": 0.45}


def test_patch_images_put_the_class_patch_where_they_say():
    rng = np.random.default_rng(1)
    images, labels, corners = patch_set(8, 40, 8, rng)
    for a, k, (x, y) in zip(images, labels, corners):
        assert (a[y : y + 8, x : x + 8] == COLOURS[k]).all()
        assert (a == DISTRACTOR).all(-1).sum() == 64  # the distractor, whole
    assert map_peak(np.pad(np.ones((3, 3)), ((0, 5), (4, 1)))) == (1.0, 5.0)


@pytest.mark.parametrize("arch", list(GAMES))
def test_small_inputs_get_a_finer_target_layer(arch):
    # At 224 px every family keeps the standard target; at the games' sizes that layer has 1-4
    # cells a side, and the default moves to the deepest stage with at least 7 (small_cnn has one).
    model = create_model(arch, 2)
    standard = candidate_layers(model)[0]
    assert target_layer(model) == target_layer(model, 224) == standard
    size, chosen = GAMES[arch].size, target_layer(model, GAMES[arch].size)
    if arch == "small_cnn":
        assert chosen == standard
    else:
        assert size // chosen.stride >= MIN_CAM_SIDE > size // standard.stride
        assert explain.default_target_layer(model, size) == chosen.name


@pytest.mark.parametrize("arch", list(GAMES))
def test_pointing_game(arch):
    game = GAMES[arch]
    rng = np.random.default_rng(0)
    images, labels, _ = patch_set(game.n_train, game.size, game.patch, rng)
    try:
        model = train_model(game, images, labels)
    except MissingWeightsError as e:
        pytest.skip(str(e))
    score = play(model, game, 60, rng)
    assert score.accuracy >= 0.8, score
    assert score.hit_rate >= max(MIN_HITS[arch], 3 * score.chance), score
