"""Build what trains (step 2 of fit): the model with its starting weights, its optimizer, the
loss and the precision of the training steps, gathered in a `Setup`; and `Evaluation`, how the
run evaluates while it trains and at the end."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from imgcls.config import ModelConfig, RunConfig, TrainConfig
from imgcls.models import create_model, get_entry
from imgcls.threads import HOW_DEFAULT, ThreadChoice, fixed_choice, usable_cores
from imgcls.training.balance import ClassBalance, resolve_class_balance
from imgcls.training.checkpoint import TrainState
from imgcls.training.finetune import resolve_strategy
from imgcls.training.loop import StepOptions, TrainData
from imgcls.training.measure import faster_thread_count, faster_train_dtype, time_eval
from imgcls.training.multilabel import build_multilabel_loss, multilabel_recipe
from imgcls.training.optim import build_optimizer, param_groups
from imgcls.training.prepare import RunData, SplitData
from imgcls.training.recipes import Recipe, init_whitening, resolve_recipe
from imgcls.training.schedule import steps_per_epoch
from imgcls.transforms import PreprocessSpec

if TYPE_CHECKING:
    from imgcls.training.distributed import Shard

Log = Callable[[str], None]

DTYPES: dict[str, torch.dtype | None] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


def dtype_name(dtype: torch.dtype | None) -> str:
    """The autocast dtype as model.json and checkpoints record it (None: plain float32)."""
    return str(dtype).replace("torch.", "") if dtype else "float32"


def build_model(model_cfg: ModelConfig, num_classes: int, weights_cache: Path | None = None, **model_kwargs: Any) -> tuple[nn.Module, str]:
    """The model with its starting weights: built-in pretrained, a user's file or URL, or random;
    and a note on where the weights came from ("" for random). model_kwargs (e.g. small_cnn's
    widths) go to the builder and are recorded in model.json."""
    m = model_cfg
    model = create_model(m.name, num_classes=num_classes, pretrained=m.pretrained, **model_kwargs)
    if not m.weights:
        return model, f"loaded {get_entry(m.name).pretrained_source}" if m.pretrained else ""
    from imgcls.models.weights import load_pretrained_weights

    loaded = load_pretrained_weights(model, m.name, m.weights, sha256=m.weights_sha256, cache_dir=weights_cache, num_classes=num_classes)
    return model, loaded.message


@dataclass(frozen=True)
class Blueprint:
    """Everything it takes to build a run's model and optimizer, again if need be (a time budget
    builds small_cnn at narrower widths to time them)."""

    model: ModelConfig
    num_classes: int
    recipe: Recipe
    strategy: str
    spec: PreprocessSpec
    device: torch.device
    channels_last: bool
    train_images: torch.Tensor  # (N, S, S, 3) uint8: small_cnn's whitening layer is set from them
    weights_cache: Path | None = None  # where a weights URL is downloaded to


def build_trainable(bp: Blueprint, model_kwargs: dict[str, Any], log: Log | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model with its starting weights, on the device, and its optimizer. log None: silently."""
    model, weights_note = build_model(bp.model, bp.num_classes, bp.weights_cache, **model_kwargs)
    if weights_note and log:
        log(weights_note)
    model = model.to(bp.device)
    if bp.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not bp.model.starts_pretrained and init_whitening(model, bp.train_images, bp.spec) and log:
        log("patch-whitening layer set from the training images")
    return model, build_optimizer(bp.recipe, param_groups(model, bp.recipe, bp.strategy))


def base_model_kwargs(model_cfg: ModelConfig) -> dict[str, Any]:
    """Builder arguments the config asks for (--activation, small_cnn only); a time budget may add widths."""
    if model_cfg.activation is None:
        return {}
    if model_cfg.name != "small_cnn":
        raise ValueError(f"--activation applies to small_cnn only, not {model_cfg.name}")
    return {"activation": model_cfg.activation}


def build_loss(recipe: Recipe, class_weights: torch.Tensor | None = None) -> nn.Module:
    """The training loss: cross-entropy with the recipe's label smoothing, weighted per class when
    `class_weights` (C,) are given (--class-balance, `balance.ClassBalance.loss_weights`)."""
    return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=recipe.label_smoothing)


def choose_train_dtype(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    data: TrainData,
    options: StepOptions,
    precision: str,
    trial: bool,
    log: Log,
) -> tuple[torch.dtype | None, float | None]:
    """The autocast dtype of the training steps, and its seconds per step when they were measured.

    options.amp_dtype is what validation, the probe and evaluation run (as evaluate and predict
    do); the training steps use it too, except under --precision auto on a CPU with fast bf16,
    where a short trial picks bf16 or fp32. trial False skips it (a linear probe trains no steps;
    a resumed run keeps the precision it chose).
    """
    if trial and precision == "auto" and options.amp_dtype == torch.bfloat16 and options.device.type == "cpu":
        return faster_train_dtype(model, optimizer, loss_fn, data, options.device, options.channels_last, log)
    return options.amp_dtype, None


def choose_train_threads(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    data: TrainData,
    options: StepOptions,
    t_cfg: TrainConfig,
    trial: bool,
    log: Log,
) -> tuple[ThreadChoice, float | None]:
    """The intra-op threads of the training steps (torch is left at them) and the seconds per
    step measured at them, if any. --threads and --deterministic fix the count and time nothing;
    otherwise, on a CPU with more than one usable core, a short trial picks one thread or all
    (measure.faster_thread_count); trial False (a linear probe trains no steps) keeps all."""
    usable = usable_cores()
    choice = fixed_choice(t_cfg.threads, usable, t_cfg.deterministic)
    if choice is None and (not trial or options.device.type != "cpu"):
        choice = ThreadChoice(torch.get_num_threads(), usable, HOW_DEFAULT)
    if choice is not None:
        torch.set_num_threads(choice.threads)  # what start_process set, unless the usable cores say otherwise
        log(choice.describe())
        return choice, None
    return faster_thread_count(model, optimizer, loss_fn, data, options, usable, log)


@dataclass(frozen=True)
class Setup:
    """What trains. Built once; a time budget may swap in a narrower network before the first epoch."""

    blueprint: Blueprint  # how the model and optimizer were built (recipe, strategy...)
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    data: TrainData
    options: StepOptions  # of the training steps; options.amp_dtype may differ from Evaluation's
    model_kwargs: dict[str, Any]  # builder arguments beyond num_classes, recorded in model.json
    trial_step_s: float | None = None  # seconds per step the precision trial measured (a time budget's first plan uses them)
    class_balance: ClassBalance | None = None  # --class-balance resolved; None: none
    threads: ThreadChoice | None = None  # the training steps' intra-op threads, and how they were chosen
    pos_weight: torch.Tensor | None = None  # multi-label: BCE's positive weights (C,) (--pos-weight), which the probe uses too
    shard: Shard | None = None  # distributed (torchrun): this rank's share of the work (training.distributed); None: one process

    @property
    def recipe(self) -> Recipe:
        return self.blueprint.recipe

    @property
    def best_key(self) -> str:
        """The validation measure the kept epoch is chosen on (a metrics.csv row's key): macro mAP
        for multi-label data, balanced accuracy while classes are rebalanced, else accuracy."""
        if self.data.labels.ndim == 2:
            return "val_map"
        return "val_balanced_acc" if self.class_balance and self.class_balance.on else "val_acc"

    @property
    def strategy(self) -> str:
        return self.blueprint.strategy

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.data.images), self.data.batch_size)


@dataclass(frozen=True)
class Evaluation:
    """How the run evaluates: the validation pass after each epoch, the probe's features and the
    final evaluation all run in amp_dtype (as evaluate and predict do); the final one with `tta`."""

    spec: PreprocessSpec
    device: torch.device
    amp_dtype: torch.dtype | None
    tta: str
    val: SplitData | None  # validated after every epoch
    final_splits: dict[str, SplitData | None]  # evaluated at the end; None: left out
    progress: bool = False
    tta_select: float = 1.0  # share of the least confident images the final evaluation gives TTA views (runtime.tta_logits)

    def time_final(self, model: nn.Module) -> float:
        """Seconds the final evaluation will take (kept back from a time budget)."""
        return time_eval(
            model, [s.images for s in self.final_splits.values() if s is not None], self.spec, self.device, self.amp_dtype, self.tta
        )


def build_setup(
    cfg: RunConfig,
    data: RunData,
    spec: PreprocessSpec,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    saved: TrainState | None,
    log: Log,
) -> Setup:
    """Step 2: the model with its starting weights, optimizer, loss and training precision."""
    t_cfg, n_train = cfg.train, len(data.train.paths)
    strategy = resolve_strategy(cfg.model.strategy, cfg.model.starts_pretrained, n_train)
    aug = t_cfg.augment.resolve(spec.img_size)
    recipe = resolve_recipe(t_cfg, cfg.model, aug, n_train, spec.img_size, device.type)
    multilabel = data.train.labels.ndim == 2  # (N, C) multi-hot: sigmoid + BCE (training.multilabel)
    if multilabel:
        recipe = multilabel_recipe(recipe, t_cfg, log)
    weights_cache = Path(cfg.data.cache_dir) / "weights" if cfg.data.cache_dir else None
    bp = Blueprint(cfg.model, len(data.class_names), recipe, strategy, spec, device, t_cfg.channels_last, data.train.images, weights_cache)
    model_kwargs = saved.model_kwargs if saved is not None else base_model_kwargs(cfg.model)
    model, optimizer = build_trainable(bp, model_kwargs, log)
    balance, pos_weight = None, None
    if multilabel:
        loss_fn, pos_weight = build_multilabel_loss(recipe, data.train.labels, t_cfg.pos_weight, device, log)
    else:
        balance = resolve_class_balance(t_cfg.class_balance, data.train.labels, len(data.class_names))
        log(balance.describe())
        loss_weights = balance.loss_weights()
        loss_fn = build_loss(recipe, None if loss_weights is None else loss_weights.to(device))
    batch = min(recipe.batch_size, n_train)
    sample_weights = balance.sample_weights(data.train.labels) if balance else None
    train_data = TrainData(data.train.images, data.train.labels, spec, aug, batch, sample_weights)
    eval_options = StepOptions(device, amp_dtype, t_cfg.channels_last)
    trial = saved is None and strategy not in ("linear-probe", "fine-tune-last")  # neither trains the whole network
    # Threads first: with a neighbour busy on a core, two threads ran 4-20x slower and scattered,
    # which would blur the precision trial; at the chosen count it compares like with like.
    threads, thread_step_s = choose_train_threads(
        model, optimizer, loss_fn, train_data, eval_options, t_cfg, strategy not in ("linear-probe", "fine-tune-last"), log
    )
    train_dtype, trial_step_s = choose_train_dtype(model, optimizer, loss_fn, train_data, eval_options, t_cfg.precision, trial, log)
    if saved is not None:
        train_dtype = DTYPES.get(saved.train_precision, train_dtype)  # the precision the run measured and chose
    if trial_step_s is None and train_dtype == amp_dtype:
        trial_step_s = thread_step_s  # the thread trial timed these very steps
    scaler = torch.amp.GradScaler(device.type) if train_dtype == torch.float16 else None
    options = StepOptions(device, train_dtype, t_cfg.channels_last, t_cfg.grad_clip, scaler)
    precision = "bf16 autocast" if train_dtype == torch.bfloat16 else "fp16 autocast" if train_dtype else "fp32"
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    tta = f", TTA {recipe.tta} at evaluation" if recipe.tta != "none" else ""
    log(
        f"model {cfg.model.name} ({millions:.2f}M parameters), strategy {strategy}, recipe {recipe.name}, {spec.img_size} px, "
        f"{precision} on {device}, {recipe.optimizer} lr {recipe.lr:g}, batch {recipe.batch_size}{tta}"
    )
    if t_cfg.augment.rotate and strategy in ("linear-probe", "fine-tune-last"):
        log(f"--rotate: not applied by {strategy}, which trains on cached features of the images as they are")
    return Setup(bp, model, optimizer, loss_fn, train_data, options, model_kwargs, trial_step_s, balance, threads, pos_weight)
