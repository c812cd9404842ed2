"""Training recipes: which optimizer, schedule and tricks `fit` uses.

Two recipes:

- "fast": the airbench94 recipe (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single
  GPU", 2024, github.com/KellerJordan/cifar10-airbench) for small_cnn trained from scratch. Each
  part and its reason is commented where it is set below.
- "generic": AdamW, warmup + cosine, label smoothing 0.1: a safe default for any architecture,
  pretrained or not; batches of 128, fewer for large inputs on CPUs (`generic_batch_size`).

"auto" picks "fast" for small_cnn from scratch and "generic" otherwise. A setting the user gave
(TrainConfig fields that are not None) always wins over the recipe's value. `resolve_recipe` is
called once at the start of `fit`; the config itself is never changed, and the resolved values
are recorded in model.json under "recipe".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from imgcls.config import RECIPES, ModelConfig, TrainConfig
from imgcls.runtime import cache_sized_batch
from imgcls.transforms import AugmentSpec, PreprocessSpec, normalize

FAST_MODELS = ("small_cnn",)

# Under a time budget that buys the full network fewer than MIN_BUDGET_EPOCHS epochs, the fast
# recipe trains a narrower one: the widest of these that gets that many, else the narrowest.
# airbench94's widths are tuned for ~10 epochs on a GPU; a 2-core CPU affords a fraction of that.
# Measured (CIFAR-10 JPEG, 4-minute budget, 2-core AMD EPYC with AVX512-BF16, seed 0): full width
# 2.1 epochs at 506 img/s -> 84.2% test; half width 6.5 epochs at 1,650 img/s -> 87.8%.
BUDGET_WIDTHS: dict[str, tuple[tuple[int, int, int], ...]] = {"small_cnn": ((64, 256, 256), (48, 192, 192), (32, 128, 128))}
MIN_BUDGET_EPOCHS = 8.0


@dataclass(frozen=True)
class Recipe:
    """Resolved optimisation settings; every field concrete.

    lr is the peak learning rate as torch.optim sees it, with the loss averaged over the batch.
    weight_decay is decoupled from the learning-rate multipliers: each step shrinks a weight by
    lr_schedule(step) * lr * weight_decay, for every parameter group alike.
    """

    name: str
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    warmup_epochs: float | None  # None: warmup_fraction of the run
    warmup_fraction: float
    label_smoothing: float
    batch_size: int
    bias_lr_scale: float  # learning-rate multiplier for normalisation-layer biases
    lookahead: bool  # airbench's lookahead EMA of the weights
    whiten_bias_fraction: float  # share of the run during which the whitening conv's bias trains (1 = all)
    tta: str  # test-time augmentation this recipe recommends for evaluate/predict
    # optimizer "muon": the conv filters' rate and momentum (airbench94_muon's 0.24 and 0.6; Nesterov);
    # the other parameters keep the recipe's SGD groups (imgcls.training.muon)
    muon_lr: float = 0.24
    muon_momentum: float = 0.6
    # share of the epochs trained at PROGRESSIVE_SCALE x the input size before the full size (0: off)
    progressive_resize: float = 0.0
    # share of each evaluation batch, its least confident images, that gets the TTA views (1: all; runtime.tta_logits)
    tta_select: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def airbench_lr(batch_size: int, momentum: float) -> float:
    """airbench's 11.5 per 1024 images, as a PyTorch learning rate for a batch-mean loss.

    airbench sums the loss over the batch and divides its rate by 1024 * (1 + 1 / (1 - momentum)),
    the factor by which Nesterov momentum enlarges a steady gradient, so the step per image does
    not depend on the momentum. With a mean loss the same step needs the rate times batch_size.
    Below 256 images per batch the rate stays at its 256 value: small batches come from small
    datasets, whose short runs (tens of steps) need the larger steps (measured on the test suite's
    30-image sets: 42-67% validation accuracy at the linear rate, 100% from 0.3 up).
    """
    return 11.5 / (1024 * (1 + 1 / (1 - momentum))) * max(batch_size, 256)


def fast_batch_size(num_train: int) -> int:
    """256 images per step, fewer for small datasets so that an epoch has at least 16 steps: a
    power of two from 32 to 256. airbench uses 1024 on a GPU; on 2 CPU cores a step of 256 ran
    small_cnn at ~1,050-1,200 images/s against ~950-980 at 512 (smaller activations stay in
    cache), and twice the steps per epoch help the short runs a time budget allows."""
    b = 32
    while b * 2 <= min(256, num_train // 16):
        b *= 2
    return b


def generic_batch_size(img_size: int, device_type: str) -> int:
    """128 on accelerators; on CPUs the cache-sized batch from 32 to 128 (`runtime.cache_sized_batch`).
    Measured on 2 cores (AVX512-BF16), EfficientNet-Lite0 training steps: 114 img/s at batch 32
    against 77 at 128 (96 px), 56 against 42 at 64 (128 px); 232 against 200 (batch 32 vs 128, 64 px)."""
    return 128 if device_type != "cpu" else cache_sized_batch(img_size, 32, 128)


def resolve_recipe(
    train: TrainConfig, model: ModelConfig, aug: AugmentSpec, num_train: int, img_size: int = 32, device_type: str = "cpu"
) -> Recipe:
    """The recipe `train.recipe` names ("auto" decided from the model), with the user's overrides."""
    name = train.recipe
    if name == "auto":
        name = "fast" if model.name in FAST_MODELS and not model.starts_pretrained else "generic"
    if name == "fast":
        momentum = 0.85 if train.momentum is None else train.momentum  # airbench's tuned value
        batch_size = train.batch_size or fast_batch_size(num_train)
        base = Recipe(
            name="fast",
            # Nesterov SGD: airbench's tuning; on this small net it beats AdamW per epoch.
            optimizer="sgd",
            lr=airbench_lr(batch_size, momentum),
            momentum=momentum,
            # airbench: 0.0153 per 1024 images at lr 11.5 per 1024 -> a per-step shrink of lr * 0.0153 / 11.5.
            weight_decay=0.0153 / 11.5,
            # airbench: linear warmup from 0.2x over the first 23% of steps, then linear down to 0.07x.
            schedule="triangle",
            warmup_epochs=None,
            warmup_fraction=0.23,
            # airbench: 0.2 smoothing; with a logit scale of 1/9 it keeps the net from over-confidence.
            label_smoothing=0.2,
            batch_size=batch_size,
            # airbench: BN biases learn 64x faster (BN scales are frozen at 1, see models/small_cnn.py;
            # the groups are imgcls.training.optim.norm_scaled_groups).
            bias_lr_scale=64.0,
            # airbench: every 5 steps the weights are averaged into an EMA and reset to it (lookahead),
            # with the EMA's memory growing as (step / total)^3: smoother late weights, +0.3-0.5 points.
            lookahead=True,
            # airbench: the whitening conv's bias trains for 3 of 10 epochs, then stays fixed.
            whiten_bias_fraction=0.3,
            # airbench: mirror + 1-px translate TTA: +0.5-1 point for 6 forward passes of a tiny net.
            # Mirroring only where training mirrored (no flips for digits or text).
            # Also with --rotate: on EuroSAT a model trained with quarter turns scored the same with
            # these 6 views as with the 8 turned and mirrored ones ("dihedral": 98.32 against 98.30 %).
            tta="flip-translate" if aug.hflip else "translate",
        )
    elif name == "generic":
        optimizer = train.optimizer or "adamw"
        if model.starts_pretrained:  # fine-tuning: gentler than training from scratch
            # 1e-3 for the head, as fastai's fine_tune after unfreezing (base_lr 2e-3 / 2); earlier
            # layers get less (imgcls.training.optim.discriminative_groups). 5e-4 left EuroSAT
            # (a domain far from ImageNet) below its own linear probe after 3 epochs.
            lr = 1e-3 if optimizer == "adamw" else 0.01
        else:
            lr = 2e-3 if optimizer == "adamw" else 0.05
        base = Recipe(
            name="generic",
            optimizer=optimizer,
            lr=lr,
            momentum=0.9,
            weight_decay=0.05,
            schedule="cosine",
            warmup_epochs=1.0,
            warmup_fraction=0.0,
            label_smoothing=0.1,
            batch_size=train.batch_size or generic_batch_size(img_size, device_type),
            bias_lr_scale=1.0,
            lookahead=False,
            whiten_bias_fraction=1.0,
            tta="none",
        )
    else:
        raise ValueError(f"recipe must be one of {RECIPES}, got {name!r}")
    if train.optimizer == "muon" and model.starts_pretrained:
        raise ValueError(
            "--optimizer muon renormalises every conv filter and replaces its update by an orthogonal one: it is for training "
            "from scratch; fine-tune pretrained weights with sgd or adamw"
        )
    overrides = {
        k: getattr(train, k)
        for k in (
            "optimizer",
            "lr",
            "momentum",
            "weight_decay",
            "schedule",
            "warmup_epochs",
            "label_smoothing",
            "batch_size",
            "progressive_resize",
            "tta_select",
        )
        if getattr(train, k) is not None
    }
    return dataclasses.replace(base, **overrides)


def init_whitening(
    model: nn.Module, images: torch.Tensor, spec: PreprocessSpec, max_images: int = 5000, max_patches: int = 5_000_000
) -> bool:
    """Set a model's patch-whitening layer from training images (uint8 (N, S, S, 3)); False if it has none.

    airbench uses 5,000 CIFAR images (about 5M 2x2 patches); larger images use fewer, so the
    float copy made here stays small (about 60 MB at any size).
    """
    if not hasattr(model, "init_whitening"):
        return False
    from imgcls.transforms import center_crop

    n = max(1, min(max_images, max_patches // max(1, (spec.img_size - 1) ** 2)))
    x = images[:n].permute(0, 3, 1, 2)  # (n, 3, S, S) uint8
    x = normalize(center_crop(x, spec.img_size), spec)  # (N, 3, H, W) float, as the model sees it
    model.init_whitening(x)
    return True


class Lookahead:
    """airbench's lookahead: an EMA of the weights that the weights are reset to every few steps.

    At step s of T, every `every` steps: ema <- decay * ema + (1 - decay) * w, then w <- ema, with
    decay = 0.95^k * (s / T)^3 (k steps since the last update): no averaging early, when the weights
    move fast, and a long memory at the end. The last step of every epoch also updates, so at each
    epoch end (checkpoint, artifact) weights and EMA agree and --resume needs no extra state; the
    last step of the run copies the EMA in (decay 1).

    It keeps `model` itself (not a torch.compile wrapper of it, whose state_dict keys differ).
    """

    def __init__(self, model: nn.Module, every: int = 5, last_step: int = -1) -> None:
        self.model = model
        self.every = every
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        self.last_update = last_step  # the step the weights last equalled the EMA (an epoch end, on resume)

    @torch.no_grad()
    def update(self, step: int, total_steps: int, epoch_end: bool) -> None:
        """Call after optimizer step `step` (0-based, global) of a schedule `total_steps` long."""
        done = step + 1 >= total_steps
        if not (done or epoch_end or (step + 1) % self.every == 0):
            return
        gap = step - self.last_update
        self.last_update = step
        decay = 1.0 if done else 0.95**gap * ((step + 1) / total_steps) ** 3
        for k, v in self.model.state_dict().items():
            e = self.ema.get(k)
            if e is None:
                continue
            e.lerp_(v, 1.0 - decay)
            v.copy_(e)


def whiten_bias_trains(recipe: Recipe, epoch: int, epochs: int) -> bool:
    """Whether the whitening conv's bias is trained in `epoch` (0-based) of `epochs`."""
    return recipe.whiten_bias_fraction >= 1.0 or epoch < max(1, math.ceil(recipe.whiten_bias_fraction * epochs))


# Progressive resizing (fast.ai's DAWNBench entries; hlb-CIFAR10): the first epochs see images
# downscaled to 3/4 of the side, 0.56x the pixels and so about that share of the compute, then the
# full size. small_cnn's global max-pool takes any size, and its BN statistics (momentum 0.4)
# follow the full-size batches within a few steps.
PROGRESSIVE_SCALE = 0.75


def train_size(recipe: Recipe, epoch: int, epochs: int, img_size: int) -> int | None:
    """The side the training images of `epoch` (0-based, of `epochs`) are resized to; None: img_size, as evaluated."""
    if recipe.progressive_resize <= 0 or epoch >= math.ceil(recipe.progressive_resize * epochs) or epoch + 1 >= epochs:
        return None  # the last epoch always trains at the evaluated size
    return max(8, round(img_size * PROGRESSIVE_SCALE))
