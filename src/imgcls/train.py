"""Training: `fit(cfg)` turns a dataset into a model folder; `train_one_epoch` is the loop itself.

The run folder RUN_DIR is also the artifact: model.safetensors + model.json (the best epoch),
checkpoint.safetensors (the last epoch, with optimizer state, for --resume), metrics.csv (one row
per epoch), split.json, bad_files.csv and report/ (plots and report.html on the validation split).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from imgcls.artifact import package_versions, save_artifact
from imgcls.atomic import atomic_write_text
from imgcls.budget import BudgetSchedule, choose_width, plan_epochs, time_eval
from imgcls.checkpoint import CHECKPOINT_FILE, load_checkpoint, read_checkpoint_config, read_checkpoint_state, save_checkpoint, write_history
from imgcls.config import RunConfig
from imgcls.data import DatasetIndex, dataset_fingerprint, index_dataset, load_split, stratified_split
from imgcls.finetune import classifier_of, discriminative_param_groups, extract_features, fit_linear_head, resolve_strategy
from imgcls.metrics import classification_metrics
from imgcls.models import create_model, get_entry
from imgcls.report import write_report
from imgcls.recipes import BUDGET_WIDTHS, MIN_BUDGET_EPOCHS, Lookahead, build_recipe_optimizer, init_whitening, resolve_recipe, whiten_bias_trains
from imgcls.runtime import autocast, batched_logits, prepare_inference_model, resolve_device, resolve_precision, set_threads
from imgcls.transforms import AugmentSpec, PreprocessSpec, train_transform

DEFAULT_EPOCHS = 30


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float
    steps: int = 0


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier on the base learning rate at optimizer step `step` (0-based).

    Linear warmup from 1/warmup to 1, then cosine to 0 ('cosine'), linear to 0 ('onecycle',
    the triangular one-cycle shape of Smith 2018), or flat ('constant'). 'triangle' is airbench's
    shape: linear from 0.2 to 1 during the warmup, then linear down to 0.07 at the last step.
    """
    if schedule == "triangle":
        if warmup_steps > 0 and step < warmup_steps:
            return 0.2 + 0.8 * step / warmup_steps
        t = min(max((step - warmup_steps) / max(1, total_steps - warmup_steps), 0.0), 1.0)
        return 1.0 - 0.93 * t
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    t = min(max(t, 0.0), 1.0)
    if schedule == "onecycle":
        return 1.0 - t
    return 0.5 * (1.0 + math.cos(math.pi * t))


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    """AdamW or SGD-Nesterov; no weight decay on biases and norm parameters (1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": weight_decay, "initial_lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "initial_lr": lr},
    ]
    groups = [g for g in groups if g["params"]]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def train_one_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    spec: PreprocessSpec,
    aug: AugmentSpec,
    batch_size: int,
    generator: torch.Generator,
    set_lr: Callable[[int], None],
    first_step: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    grad_clip: float | None,
    progress: bool = False,
    desc: str = "train",
    scaler: torch.amp.GradScaler | None = None,
    average_weights: Callable[[int, bool], None] | None = None,
    max_batches: int | None = None,
    keep_going: Callable[[int], bool] | None = None,
) -> EpochStats:
    """One pass over `images` (uint8, (N, S, S, 3)) in a seeded random order.

    max_batches stops the pass early: the last epoch of a time-budgeted run may be partial.
    keep_going(step), when given, is asked before each step (global index) and ends the pass when
    it says no: a time budget shortens the schedule as it goes (see fit).
    average_weights(step, epoch_end), when given, runs after each optimizer step (the recipe's
    lookahead EMA of the weights, imgcls.recipes.Lookahead).
    """
    from tqdm.auto import tqdm

    model.train()
    n = len(images)
    order = torch.randperm(n, generator=generator)
    n_batches = n // batch_size if n % batch_size < 2 else n // batch_size + 1  # a last batch of 1 breaks BN
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    total_loss, total_correct, seen, steps = 0.0, 0, 0, 0
    start = time.perf_counter()
    bar = tqdm(total=n_batches * batch_size if n_batches else 0, desc=desc, unit="img", disable=None if progress else True, leave=False)
    for b in range(n_batches):
        if keep_going is not None and b > 0 and not keep_going(first_step + b):
            break
        idx = order[b * batch_size : (b + 1) * batch_size]
        x = images[idx].permute(0, 3, 1, 2)  # (B, 3, S, S) uint8
        x = train_transform(x, spec, aug, generator)  # (B, 3, H, W) float, normalised
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels[idx].to(device, non_blocking=True)
        set_lr(first_step + b)
        with autocast(device, amp_dtype):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        if scaler is not None:  # fp16 on GPUs without bf16: scale the loss so gradients don't underflow
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if average_weights is not None:
            average_weights(first_step + b, b == n_batches - 1)
        steps += 1
        total_loss += loss.item() * len(idx)
        total_correct += int((logits.argmax(1) == y).sum())
        seen += len(idx)
        bar.update(len(idx))
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{total_correct / seen:.3f}", refresh=False)
    bar.close()
    return EpochStats(total_loss / max(seen, 1), total_correct / max(seen, 1), seen, time.perf_counter() - start, steps)


def resolve_spec(cfg: RunConfig) -> PreprocessSpec:
    """The model entry's default preprocessing, with the user's size/resize/crop overrides."""
    spec = get_entry(cfg.model.name).default_spec
    changes = {k: v for k, v in (("img_size", cfg.data.img_size), ("resize_mode", cfg.data.resize_mode), ("crop_pct", cfg.data.crop_pct)) if v is not None}
    return spec.replace(**changes) if changes else spec


def build_model(cfg: RunConfig, num_classes: int, **model_kwargs: Any) -> tuple[nn.Module, str]:
    """The model with its starting weights: built-in pretrained, a user's file or URL, or random.
    model_kwargs (e.g. small_cnn's widths) go to the builder and are recorded in model.json."""
    m = cfg.model
    model = create_model(m.name, num_classes=num_classes, pretrained=m.pretrained, **model_kwargs)
    if not m.weights:
        return model, f"loaded {get_entry(m.name).pretrained_source}" if m.pretrained else ""
    from imgcls.models.weights import load_pretrained_weights

    cache = Path(cfg.data.cache_dir) / "weights" if cfg.data.cache_dir else None
    loaded = load_pretrained_weights(model, m.name, m.weights, sha256=m.weights_sha256, cache_dir=cache, num_classes=num_classes)
    return model, loaded.message


def linear_probe(model: nn.Module, train: "SplitData", val: "SplitData | None", spec: PreprocessSpec, device: torch.device, amp_dtype: torch.dtype | None, progress: bool, log: Callable[[str], None]) -> dict[str, float]:
    """Fit the classifier on frozen, cached features (see imgcls.finetune); one history row."""
    t0 = time.perf_counter()
    x_tr = extract_features(model, train.images.numpy(), spec, device, amp_dtype, progress=progress)
    x_va = extract_features(model, val.images.numpy(), spec, device, amp_dtype, progress=progress) if val is not None and len(val.paths) else None
    t_feat = time.perf_counter() - t0
    n_img = len(x_tr) + (len(x_va) if x_va is not None else 0)
    log(f"features: {n_img} images in {t_feat:.1f}s ({n_img / max(t_feat, 1e-9):.0f} img/s)")
    fit = fit_linear_head(classifier_of(model), x_tr, train.labels, x_va, val.labels if x_va is not None else None, log=log)
    seconds = time.perf_counter() - t0
    log(f"linear probe: L2 {fit['reg']:g}, train acc {fit['train_acc']:.4f}, val acc {fit['val_acc']:.4f} ({seconds:.1f}s)")
    return {"epoch": 1, "train_loss": fit["train_loss"], "train_acc": fit["train_acc"], "val_loss": fit["val_loss"], "val_acc": fit["val_acc"],
            "lr": 0.0, "epoch_time_s": seconds, "images_per_s": n_img / max(t_feat, 1e-9)}


# ----------------------------------------------------------------------------- time budget


def time_train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, train: "SplitData", spec: PreprocessSpec, aug: AugmentSpec,
                     batch_size: int, n_steps: int, device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool, passes: int = 2) -> float:
    """Seconds per training step, measured on real batches; model and optimizer are restored after."""
    import copy

    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    n = min(len(train.paths), batch_size * n_steps)
    sub = train.images[:n], train.labels[:n]
    g = torch.Generator().manual_seed(0)
    no_lr = lambda step: [grp.__setitem__("lr", 0.0) for grp in optimizer.param_groups]  # noqa: E731  (timing only)
    train_one_epoch(model, sub[0][: 2 * batch_size], sub[1][: 2 * batch_size], optimizer, loss_fn, spec, aug, batch_size, g, no_lr, 0, device, amp_dtype, channels_last, None)
    # Two timed passes, the faster one kept: on a shared machine one pass can catch a burst of
    # someone else's work, and the per-epoch re-planning in fit corrects the rest.
    seconds = []
    for _ in range(passes):
        stats = train_one_epoch(model, sub[0], sub[1], optimizer, loss_fn, spec, aug, batch_size, g, no_lr, 0, device, amp_dtype, channels_last, None)
        seconds.append(stats.seconds / max(1, stats.images // batch_size))
    model.load_state_dict(saved_model)
    optimizer.load_state_dict(saved_opt)
    return min(seconds)


DTYPES: dict[str, torch.dtype | None] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


def dtype_name(dtype: torch.dtype | None) -> str:
    """The autocast dtype as model.json and checkpoints record it (None: plain float32)."""
    return str(dtype).replace("torch.", "") if dtype else "float32"


def faster_train_dtype(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, train: "SplitData", spec: PreprocessSpec, aug: AugmentSpec,
                       batch_size: int, device: torch.device, channels_last: bool, log: Callable[[str], None]) -> tuple[torch.dtype | None, float]:
    """bf16 autocast or fp32 for the training steps on a CPU with AMX or AVX512-BF16, whichever
    runs faster here, and its measured seconds per step (a time budget plans with it).

    Measured rather than assumed: on 2 cores bf16 trains small_cnn 1.8x (AVX512-BF16) to ~3x
    (AMX) faster than fp32, but EfficientNet-Lite's depthwise convolutions train up to 1.7x slower
    in bf16 at 64-128 px (bench/RESULTS.md). A few real steps of each decide; model and optimizer
    are restored.
    """
    n = 2
    t = {dt: time_train_steps(model, optimizer, loss_fn, train, spec, aug, batch_size, n, device, dt, channels_last, passes=1) for dt in (torch.bfloat16, None)}
    pick = torch.bfloat16 if t[torch.bfloat16] <= t[None] else None
    log(f"training precision: {'bf16 autocast' if pick else 'fp32'} (measured {batch_size / t[torch.bfloat16]:.0f} img/s bf16, {batch_size / t[None]:.0f} img/s fp32)")
    return pick, t[pick]


# ----------------------------------------------------------------------------- data for a run


@dataclass
class SplitData:
    images: torch.Tensor  # (N, S, S, 3) uint8
    labels: torch.Tensor  # (N,) int64
    paths: list[str]
    hashes: list[str]


def _prepare_splits(cfg: RunConfig, index: DatasetIndex, spec: PreprocessSpec, progress: bool, log: Callable[[str], None]) -> tuple[dict[str, SplitData], list[tuple[str, str]], dict[str, Any]]:
    """Decode every split once, drop bad files, and split off validation if DATA has none."""
    d = cfg.data
    decoded: dict[str, SplitData] = {}
    failures: list[tuple[str, str]] = []
    for name, samples in index.splits.items():
        dec, labels = load_split(samples, spec, d.cache_dir, d.workers, d.max_pixels, progress, f"decode {name}")
        failures += dec.failures
        decoded[name] = SplitData(torch.from_numpy(np.ascontiguousarray(dec.images)), torch.from_numpy(labels), dec.paths, dec.hashes)
    source = "train" if "train" in decoded else "all"
    if source not in decoded or len(decoded[source].paths) == 0:
        raise ValueError(f"{index.root}: no usable training images")
    split_info: dict[str, Any] = {"layout": index.layout, "seed": d.seed}
    if "val" not in decoded and d.val_fraction > 0:
        full = decoded.pop(source)
        tr, va = stratified_split(full.labels.numpy(), d.val_fraction, d.seed, index.class_names)
        for name, idx in (("train", tr), ("val", va)):
            ti = torch.from_numpy(idx)
            decoded[name] = SplitData(full.images[ti], full.labels[ti], [full.paths[i] for i in idx], [full.hashes[i] for i in idx])
        split_info.update(method="stratified", val_fraction=d.val_fraction)
    else:
        if source == "all":
            decoded["train"] = decoded.pop("all")
        split_info.update(method="folders" if index.layout != "csv" else "manifest", val_fraction=0.0 if "val" not in decoded else None)
    counts = {k: int(len(v.paths)) for k, v in decoded.items()}
    split_info["counts"] = counts
    for c, name in enumerate(index.class_names):
        if int((decoded["train"].labels == c).sum()) == 0:
            log(f"warning: class {name!r} has no training images")
    return decoded, failures, split_info


# ----------------------------------------------------------------------------- fit


def fit(cfg: RunConfig, resume: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Train a model as `cfg` says; return the run folder, which is the model artifact.

    resume=True continues the run in cfg.train.out from its last checkpoint, with the config
    stored there (the flags that started it), and gives the same result as an uninterrupted run.
    torch's process-wide settings that a run changes (threads, deterministic algorithms) are put
    back afterwards, so calling fit from a program leaves the program as it was.
    """
    threads, deterministic, warn_only = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        return _fit(cfg, resume, progress, log)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _fit(cfg: RunConfig, resume: bool, progress: bool, log: Callable[[str], None]) -> Path:
    run_dir = Path(cfg.train.out)
    model_kwargs: dict[str, Any] = {}  # builder arguments beyond num_classes (a time budget may narrow small_cnn)
    if resume:
        cfg = read_checkpoint_config(run_dir)
        model_kwargs = read_checkpoint_state(run_dir).get("model_kwargs", {})
        log(f"resuming {run_dir} with its saved configuration")
    t_cfg = cfg.train
    run_dir.mkdir(parents=True, exist_ok=True)
    set_threads(t_cfg.threads)
    torch.manual_seed(cfg.data.seed)
    if t_cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = resolve_device(t_cfg.device)
    amp_dtype = resolve_precision(t_cfg.precision, device)
    spec = resolve_spec(cfg)
    t_start = time.perf_counter()

    index = index_dataset(cfg.data.path)
    log(index.summary())
    splits, failures, split_info = _prepare_splits(cfg, index, spec, progress, log)
    if failures:
        with open(run_dir / "bad_files.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "reason"])
            w.writerows(failures)
        log(f"{len(failures)} file(s) could not be decoded and were left out (list: {run_dir / 'bad_files.csv'}):")
        for p, why in failures[:5]:
            log(f"  {p}: {why}")
    root = index.root.parent if index.root.is_file() else index.root
    atomic_write_text(run_dir / "split.json", json.dumps({k: [os.path.relpath(p, root) for p in v.paths] for k, v in splits.items()}))
    all_paths = [p for s in splits.values() for p in s.paths]
    all_labels = [int(y) for s in splits.values() for y in s.labels]
    fingerprint = dataset_fingerprint(all_paths, all_labels, [h for s in splits.values() for h in s.hashes], index.class_names, root)

    train, val, test = splits["train"], splits.get("val"), splits.get("test")
    class_names = index.class_names
    strategy = resolve_strategy(cfg.model.strategy, cfg.model.starts_pretrained, len(train.paths))
    aug = t_cfg.augment.resolve(spec.img_size)
    recipe = resolve_recipe(t_cfg, cfg.model, aug, len(train.paths), spec.img_size, device.type)
    lr = recipe.lr

    def new_model(kwargs: dict[str, Any], say: bool = True) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The model with its starting weights, on the device, and its optimizer."""
        m, weights_note = build_model(cfg, len(class_names), **kwargs)
        if weights_note and say:
            log(weights_note)
        m = m.to(device)
        if t_cfg.channels_last:
            m = m.to(memory_format=torch.channels_last)
        if not cfg.model.starts_pretrained and init_whitening(m, train.images, spec) and say:
            log("patch-whitening layer set from the training images")
        if strategy == "fine-tune":
            groups = discriminative_param_groups(m, lr, recipe.weight_decay)
            opt: torch.optim.Optimizer = torch.optim.AdamW(groups) if recipe.optimizer == "adamw" else torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=True)
        elif recipe.name == "fast":
            opt = build_recipe_optimizer(m, recipe)
        else:
            opt = build_optimizer(m, recipe.optimizer, lr, recipe.weight_decay, recipe.momentum)
        return m, opt

    model, optimizer = new_model(model_kwargs)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    bs = min(recipe.batch_size, len(train.paths))
    steps_per_epoch = max(1, len(train.paths) // bs if len(train.paths) % bs < 2 else len(train.paths) // bs + 1)
    train_dtype = amp_dtype  # training steps; validation, the probe and evaluation keep amp_dtype (what evaluate and predict run)
    trial_step_s: float | None = None  # seconds per step measured by the precision trial: a time budget's first plan uses it
    if t_cfg.precision == "auto" and amp_dtype == torch.bfloat16 and device.type == "cpu" and strategy != "linear-probe" and not resume:
        train_dtype, trial_step_s = faster_train_dtype(model, optimizer, loss_fn, train, spec, aug, bs, device, t_cfg.channels_last, log)
    scaler = torch.amp.GradScaler(device.type) if train_dtype == torch.float16 else None
    log(f"model {cfg.model.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), strategy {strategy}, recipe {recipe.name}, "
        f"{spec.img_size} px, {'bf16 autocast' if train_dtype == torch.bfloat16 else 'fp16 autocast' if train_dtype else 'fp32'} on {device}, "
        f"{recipe.optimizer} lr {lr:g}, batch {recipe.batch_size}" + (f", TTA {recipe.tta} at evaluation" if recipe.tta != "none" else ""))
    total_steps: int | None = None
    # Evaluated at the end with the recipe's TTA: val, and test unless there is a time budget. Under a
    # budget the test split is left to `imgcls evaluate`, so the budget's seconds go to training
    # (CIFAR-10's 10,000 test images with 6 TTA views took 34 s of a 4-minute budget on 2 cores).
    final_splits = {"val": val, "test": test if t_cfg.time_budget is None else None}
    t_final_eval: float | None = None  # seconds of the final evaluation, kept back from a time budget

    def time_final_eval() -> float:
        return time_eval(model, [s.images for s in final_splits.values() if s is not None], spec, device, amp_dtype, recipe.tta)

    if strategy == "linear-probe":
        epochs = 0
    elif t_cfg.time_budget is not None and not resume:
        t_final_eval = time_final_eval()
        # fine-tune starts with the linear probe: one feature pass over train and val, kept back too
        t_probe = time_eval(model, [s.images for s in (train, val) if s is not None], spec, device, amp_dtype) if strategy == "fine-tune" else 0.0

        def plan(m: nn.Module, opt: torch.optim.Optimizer, step_s: float | None = None) -> float:
            return plan_epochs(
                t_cfg.time_budget * 60 - (time.perf_counter() - t_start) - t_probe, t_cfg.epochs, steps_per_epoch,
                lambda n: step_s or time_train_steps(m, opt, loss_fn, train, spec, aug, bs, n, device, train_dtype, t_cfg.channels_last),
                lambda: (time_eval(m, [val.images] if val is not None else [], spec, device, amp_dtype), t_final_eval), log,
            )

        # the precision trial's timing when there was one (the plan is redone after every epoch anyway)
        planned = plan(model, optimizer, trial_step_s)
        enough = min(MIN_BUDGET_EPOCHS, t_cfg.epochs or math.inf)  # an --epochs cap that binds leaves the width alone
        if recipe.name == "fast" and cfg.model.name in BUDGET_WIDTHS and not cfg.model.starts_pretrained and planned < enough:
            # Too few epochs for the full width: a narrower net trains more of them (see recipes.BUDGET_WIDTHS).
            built: dict[tuple[int, ...], tuple[nn.Module, torch.optim.Optimizer]] = {}

            def plan_width(widths: tuple[int, ...]) -> float:
                built[widths] = new_model({"widths": list(widths)}, say=False)
                return plan(*built[widths])

            widths, planned = choose_width(BUDGET_WIDTHS[cfg.model.name], planned, enough, plan_width)
            model, optimizer = built[widths]
            model_kwargs = {"widths": list(widths)}
            log(f"time budget: {cfg.model.name} narrowed to widths {model_kwargs['widths']} to train {planned:.1f} epochs")
        total_steps = max(1, int(planned * steps_per_epoch))
        epochs = math.ceil(total_steps / steps_per_epoch)
    else:
        epochs = t_cfg.epochs or DEFAULT_EPOCHS
    if total_steps is None:
        total_steps = steps_per_epoch * max(epochs, 1)

    state: dict[str, Any] = {"epoch": -1, "best_epoch": -1, "best_acc": -1.0, "best_loss": float("inf"), "history": [], "bad_epochs": 0, "planned_epochs": epochs,
                             "total_steps": total_steps, "train_precision": dtype_name(train_dtype), "model_kwargs": model_kwargs}
    ckpt_path = run_dir / CHECKPOINT_FILE
    if resume:
        state.update(load_checkpoint(ckpt_path, model, optimizer))
        epochs = state.get("planned_epochs", epochs)
        total_steps = state.get("total_steps") or steps_per_epoch * max(epochs, 1)
        train_dtype = DTYPES.get(state.get("train_precision", ""), train_dtype)  # the precision the run measured and chose
        log(f"resumed after epoch {state['epoch'] + 1}/{epochs}")

    meta_base = {
        "arch": cfg.model.name,
        "model_kwargs": model_kwargs,
        "class_names": class_names,
        "preprocess": spec.to_dict(),
        "augment": aug.to_dict(),
        "strategy": strategy,
        "config": cfg.to_dict(),
        "seed": cfg.data.seed,
        "split": {**split_info, "file": "split.json"},
        "dataset": {"root": str(index.root), "layout": index.layout, "fingerprint": fingerprint, "bad_files": len(failures), "ignored": dict(index.ignored)},
        "versions": package_versions(),
        "device": str(device),
        "precision": dtype_name(train_dtype),  # of the training steps
        "recipe": recipe.to_dict(),
        "tta": recipe.tta,  # what `imgcls evaluate` and `predict` use unless told otherwise (--tta)
    }

    def val_metrics(m: nn.Module) -> tuple[float, float]:
        logits = batched_logits(m, val.images.numpy(), spec, device=device, amp_dtype=amp_dtype, progress=progress, desc="validate")
        loss = nn.functional.cross_entropy(logits, val.labels).item()
        return loss, float((logits.argmax(1) == val.labels).float().mean())

    if strategy in ("linear-probe", "fine-tune") and not resume:
        row = linear_probe(model, train, val, spec, device, amp_dtype, progress, log)
        if strategy == "linear-probe":
            state["history"].append(row)
            write_history(run_dir, state["history"])
            state.update(best_epoch=0, epoch=0)
        save_artifact(run_dir, model, {**meta_base, "training": {"strategy": strategy, "stage": "linear-probe"}})

    stopped_early = False
    first_epoch = state["epoch"] + 1
    epoch = first_epoch
    # A resumed run keeps its schedule: its clock restarted, so it is not cut short mid-epoch.
    sched = BudgetSchedule(total_steps, steps_per_epoch, first_epoch * steps_per_epoch, t_start, None if t_cfg.time_budget is None else t_cfg.time_budget * 60,
                           t_final_eval, cut_off=not resume, max_steps=(t_cfg.epochs or 0) * steps_per_epoch or None)

    def set_lr(step: int) -> None:
        f = lr_factor(step, sched.total_steps, recipe.warmup_steps(steps_per_epoch, sched.total_steps), recipe.schedule)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f

    # The lookahead EMA equals the weights at every epoch end, so a resumed run starts it from them.
    lookahead = Lookahead(model, last_step=first_epoch * steps_per_epoch - 1) if recipe.lookahead and epochs > first_epoch else None
    whiten_bias = getattr(getattr(model, "whiten", None), "bias", None)
    # --compile: inductor on the training forward (same parameters). Off by default: on 2 CPU cores it
    # took 30 s to compile and then ran small_cnn slower than eager (bench/RESULTS.md).
    train_model = torch.compile(model) if t_cfg.compile else model
    while epoch < epochs:
        g = torch.Generator().manual_seed(cfg.data.seed * 100_003 + epoch)  # per-epoch stream: resume replays it
        if whiten_bias is not None:
            whiten_bias.requires_grad_(whiten_bias_trains(recipe, epoch, epochs))
        planned_total = sched.total_steps
        stats = train_one_epoch(
            train_model, train.images, train.labels, optimizer, loss_fn, spec, aug, bs, g, set_lr,
            epoch * steps_per_epoch, device, train_dtype, t_cfg.channels_last, t_cfg.grad_clip,
            progress, f"epoch {epoch + 1}/{epochs}", scaler,
            average_weights=(lambda step, epoch_end: lookahead.update(model, step, sched.total_steps, epoch_end)) if lookahead is not None else None,
            max_batches=sched.total_steps - epoch * steps_per_epoch,
            keep_going=sched.keep_going,
        )
        out_of_time = sched.total_steps < planned_total
        if out_of_time:  # behind the time budget: the schedule was shortened during this epoch
            if lookahead is not None and epoch * steps_per_epoch + stats.steps >= sched.total_steps:
                lookahead.update(model, sched.total_steps - 1, sched.total_steps, True)  # the run's last step: the EMA is copied in
            log(f"time budget: schedule shortened to {sched.total_steps} steps ({sched.total_steps / steps_per_epoch:.2f} epochs)")
        val_loss, val_acc = val_metrics(model) if val is not None and len(val.paths) else (float("nan"), float("nan"))
        row = {"epoch": epoch + 1, "train_loss": stats.loss, "train_acc": stats.accuracy, "val_loss": val_loss, "val_acc": val_acc,
               "lr": optimizer.param_groups[0]["lr"], "epoch_time_s": stats.seconds, "images_per_s": stats.images / max(stats.seconds, 1e-9)}
        state["history"].append(row)
        write_history(run_dir, state["history"])
        improved = val is None or val_acc > state["best_acc"] or (val_acc == state["best_acc"] and val_loss < state["best_loss"])
        if improved:
            state.update(best_epoch=epoch, best_acc=val_acc if val is not None else stats.accuracy, best_loss=val_loss, bad_epochs=0)
            save_artifact(run_dir, model, {**meta_base, "training": {"best_epoch": epoch + 1, "epochs_run": epoch + 1}})
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        done = min(sched.total_steps, (epoch + 1) * steps_per_epoch)  # global steps trained so far
        if sched.budget_s is not None:
            if done == (epoch + 1) * steps_per_epoch and not out_of_time:  # a full epoch: re-plan the rest of the budget
                sched.replan(done, time_final_eval)
            epochs = sched.epochs  # shortened during the epoch or re-planned: the checkpoint records it
            state.update(planned_epochs=epochs, total_steps=sched.total_steps)
        save_checkpoint(ckpt_path, model, optimizer, {k: v for k, v in state.items()} | {"config": cfg.to_dict()})
        log(f"epoch {epoch + 1}/{epochs}  loss {stats.loss:.4f}  acc {stats.accuracy:.4f}  val_loss {val_loss:.4f}  val_acc {val_acc:.4f}  "
            f"lr {row['lr']:.2e}  {stats.seconds:.1f}s  {row['images_per_s']:.0f} img/s" + ("  *" if improved else ""))
        if val is not None and t_cfg.patience and state["bad_epochs"] >= t_cfg.patience:
            log(f"early stop: no validation improvement for {t_cfg.patience} epochs; keeping epoch {state['best_epoch'] + 1}")
            stopped_early = True
            break
        epoch += 1

    # Final metrics on the kept (best) weights.
    from imgcls.artifact import load_artifact

    best, _ = load_artifact(run_dir, device=device)
    best_eval, eval_dtype = prepare_inference_model(load_artifact(run_dir, device=device)[0], device, amp_dtype)  # what evaluate and predict run
    metrics: dict[str, Any] = {}
    if test is not None and final_splits["test"] is None:
        log(f"test split not evaluated inside the time budget: imgcls evaluate {run_dir} {cfg.data.path} --split test")
    for name, split in final_splits.items():
        if split is not None and len(split.paths):
            probs = torch.softmax(batched_logits(best_eval, split.images.numpy(), spec, device=device, amp_dtype=eval_dtype, progress=progress, desc=f"evaluate {name}", tta=recipe.tta), 1).numpy()
            metrics[name] = classification_metrics(probs, split.labels.numpy(), class_names)
    training = {"strategy": strategy, "best_epoch": state["best_epoch"] + 1, "epochs_run": state["epoch"] + 1, "stopped_early": stopped_early,
                "wall_time_s": round(time.perf_counter() - t_start, 2), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    save_artifact(run_dir, best, {**meta_base, "metrics": metrics, "training": training})
    report_split = "val" if "val" in metrics else ("test" if "test" in metrics else None)
    if report_split:
        write_report(run_dir / "report", metrics[report_split], class_names, state["history"], title=f"{cfg.model.name} on {report_split} ({index.root.name})")
        log(f"{report_split}: accuracy {metrics[report_split]['accuracy']:.4f}  macro-F1 {metrics[report_split]['macro_f1']:.4f}  report: {run_dir / 'report' / 'report.html'}")
    log(f"model saved to {run_dir}")
    return run_dir
