"""`fit(cfg)`: a dataset in, a model folder out.

`_fit` takes a run through six named steps:

1. prepare the run (prepare.py): index DATA, decode every split once, split off validation;
2. build what trains (build.py): model and starting weights, optimizer, loss, precision;
3. decide how long (plan.py): --epochs, a time budget (budget.py) or the checkpoint being
   resumed, as the `TrainState` the loop starts from, and the `Schedule`;
4. the linear probe first (`probe_first`), for --strategy linear-probe and fine-tune;
5. the epochs (`train_epochs`): train (loop.py), validate, keep the best weights, checkpoint;
6. finish (finish.py, `finish_run`): calibrate the kept weights on validation (temperature, "unknown"
   threshold, conformal scores: inference.trust.fit_trust), evaluate them, the final model.json,
   the report.

The run folder RUN_DIR is also the artifact: model.safetensors + model.json (the best epoch),
checkpoint.safetensors (the last epoch, with optimizer state, for --resume), metrics.csv (one row
per epoch), split.json, bad_files.csv and report/ (plots and report.html on the validation split).
A folder that already holds a model is refused unless the run resumes it or overwrites it
(prepare.check_run_folder, clear_run_folder).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgcls.artifact import ArtifactError, load_meta, package_versions
from imgcls.config import RunConfig, TrainConfig, resolve_unknown_method
from imgcls.report import write_probe_sweep
from imgcls.runtime import (
    default_threads,
    resolve_device,
    resolve_precision,
    set_threads,
)
from imgcls.training import distributed
from imgcls.training.auto import choose_model
from imgcls.training.budget_data import fit_to_budget
from imgcls.training.build import Evaluation, Log, Setup, build_setup, dtype_name
from imgcls.training.checkpoint import RunFolder, TrainState, read_checkpoint
from imgcls.training.finetune import linear_probe
from imgcls.training.finish import finish_run, report_run
from imgcls.training.loop import EpochStats, train_one_epoch, validate
from imgcls.training.measure import recheck_threads, watch_threads
from imgcls.training.multilabel import MULTI_LABEL, finish_multilabel, validate_multilabel
from imgcls.training.partial import fine_tune_last_step
from imgcls.training.plan import build_schedule, plan_run
from imgcls.training.prepare import SPLIT_FILE, RunData, SplitData, check_run_folder, prepare_run, resolve_spec
from imgcls.training.recipes import Lookahead, train_size, whiten_bias_trains
from imgcls.training.schedule import Schedule
from imgcls.transforms import PreprocessSpec


def fit(
    cfg: RunConfig,
    resume: bool = False,
    progress: bool = True,
    log: Log = print,
    overwrite: bool = False,
    ranks: distributed.Ranks | None = None,
) -> Path:
    """Train a model as `cfg` says; return the run folder, which is the model artifact.

    resume=True continues the run in cfg.train.out from its last checkpoint, with the config
    stored there (the flags that started it), and gives the same result as an uninterrupted run.
    A folder that already holds a model is a `prepare.RunFolderError` unless resume=True or
    overwrite=True, which deletes what the earlier run wrote there once DATA has decoded
    (`prepare.clear_run_folder`).
    overwrite is an argument, not a TrainConfig field: it says what to do with the folder, not how
    to train, so it does not belong in model.json, nor in the checkpoint config a --resume reloads.
    torch's process-wide settings that a run changes (threads, deterministic algorithms) are put
    back afterwards, so calling fit from a program leaves the program as it was.
    ranks: this process's place among torchrun's workers (distributed.ranks_from_env); None: one
    process. Rank 0 alone logs and writes RUN_DIR (see training.distributed).
    """
    threads, deterministic, warn_only = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if ranks is not None and not ranks.is_main:
        log, progress = _quiet, False
    try:
        with distributed.group_errors(ranks):
            return _fit(cfg, resume, overwrite, progress, log, ranks)
    finally:
        if ranks is not None:
            distributed.leave_group()
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _quiet(_: str) -> None:
    """The log of distributed ranks other than 0."""


def _fit(cfg: RunConfig, resume: bool, overwrite: bool, progress: bool, log: Log, ranks: distributed.Ranks | None) -> Path:
    run_dir = Path(cfg.train.out)
    saved: TrainState | None = None
    if resume:
        cfg, saved = read_checkpoint(run_dir)
        log(f"resuming {run_dir} with its saved configuration")
    if ranks is not None:  # refuse what does not run distributed; each rank its share of the cores, no timed choice below
        cfg = distributed.pin_choices(cfg, ranks)
    if cfg.train.deterministic or ranks is not None:
        cfg = pin_timed_choices(cfg, log)
    check_run_folder(run_dir, resume, overwrite)  # at once; the folder is cleared only once DATA has decoded
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg, auto = choose_model(cfg, run_dir, progress, log)  # --model auto: a concrete model, candidates tried where unclear
    if auto is not None and "kept_candidate" in auto:
        return run_dir  # the winning candidate is the model: the budget's time left would not train a better one
    if saved is not None:
        auto = resumed_auto_record(run_dir)
    device, amp_dtype = start_process(cfg.train, cfg.data.seed)
    if ranks is not None:
        device = distributed.join_group(ranks, device)  # gloo on CPUs, NCCL on this rank's GPU
        log(f"distributed: {ranks.world_size} processes, global batch split between them (training.distributed)")
    spec = resolve_spec(cfg)
    t_start = time.perf_counter()

    data = prepare_run(cfg, spec, run_dir, progress, log, resume, overwrite, write=ranks is None or ranks.is_main)  # 1
    setup = build_setup(cfg, data, spec, device, amp_dtype, saved, log)  # 2
    if saved is None and ranks is None:  # transfer learning under --time-budget: as many images as its first pass can cover
        data, setup = fit_to_budget(data, setup, cfg.train.time_budget, t_start, device, amp_dtype, cfg.data.seed, log)
    if ranks is not None:  # every rank decoded DATA itself: the same dataset, or stop
        setup = dataclasses.replace(setup, shard=distributed.start_shard(ranks, data.fingerprint, setup.strategy, data.index.multilabel))
    splits = final_splits(data, cfg.train, keep_test=bool(auto and auto["default_budget"]))
    ev = Evaluation(spec, device, amp_dtype, setup.recipe.tta, data.val, splits, progress, setup.recipe.tta_select)
    state, setup, final_eval_s = plan_run(cfg.train, setup, ev, data, saved, t_start, log)  # 3
    writer = RunFolder if ranks is None or ranks.is_main else distributed.QuietFolder  # distributed: rank 0 alone writes
    folder = writer(run_dir, artifact_meta(cfg, data, setup, spec, device), cfg.to_dict())
    if auto is not None:
        folder.meta["auto"] = auto  # what --model auto chose and why, the candidates it tried
    if setup.strategy in ("linear-probe", "fine-tune") and saved is None:
        probe_first(setup, data, ev, state, folder, log)  # 4
        if ranks is not None:
            distributed.broadcast_state(state)  # rank 0's probe result decides, on every rank, which epoch is kept
    elif setup.strategy == "fine-tune-last" and saved is None:
        fine_tune_last_step(setup, data, ev, state, folder, cfg.train, t_start, log)  # 4-5: the probe, then the last blocks (partial.py)
    schedule = build_schedule(setup, state, cfg.train, t_start, final_eval_s, resumed=saved is not None)
    stopped_early = train_epochs(setup, schedule, state, folder, ev, cfg.train, cfg.data.seed, log)  # 5
    if ranks is not None and not ranks.is_main:
        return run_dir  # rank 0 alone calibrates, evaluates and writes the final model
    if data.test is not None and ev.final_splits["test"] is None:
        log(f"test split not evaluated inside the time budget: imgcls evaluate {run_dir} {cfg.data.path} --split test")
    training = {
        "strategy": setup.strategy,
        "kept": kept_stage(setup.strategy, state, log),
        "best_epoch": state.best_epoch + 1,
        "epochs_run": state.epoch + 1,
        "stopped_early": stopped_early,
    }
    if data.index.multilabel:  # 6, multi-label: thresholds and temperatures per label (training.multilabel)
        metrics, probs = finish_multilabel(folder, ev, training, t_start, log, cfg.train.label_precision)
    else:
        unknown = resolve_unknown_method(cfg.train.unknown_method, bool(cfg.model.pretrained or cfg.model.weights))
        metrics, probs = finish_run(folder, ev, training, t_start, log, unknown, data.train, cfg.data.seed)  # 6
    report_run(run_dir, metrics, probs, data, state.history, cfg.model.name, log, ev)
    return run_dir


def resumed_auto_record(run_dir: Path) -> dict[str, Any] | None:
    """A resumed run's "auto" record (what --model auto chose for it): from the model.json its first
    epochs wrote, since the checkpoint's config names the concrete model."""
    try:
        return load_meta(run_dir).get("auto")
    except (ArtifactError, OSError):
        return None


def pin_timed_choices(cfg: RunConfig, log: Log) -> RunConfig:
    """--deterministic: the config with every choice a run would make from a timing fixed by a rule
    instead, so that it is what model.json's "config" records (and what a --resume reloads).

    - precision "auto" trains in bf16 or fp32, whichever a timed trial of two steps found faster
      (measure.faster_train_dtype); on a busy machine 11 of 18 identical runs chose bf16 and 7 fp32,
      with different weights. Pinned to what "auto" means without the trial: bf16 on a CPU with
      AMX or AVX512-BF16 (runtime.cpu_has_fast_bf16; and on CUDA), else fp32. That keeps bf16's
      2-4x speed where the CPU has it; --precision fp32 remains the choice for bit-identical
      results across machines with and without bf16 units.
    - threads: the count set_threads picks by default (one per usable core), written down, not
      measured (threads.ThreadChoice), since the order of a reduction, and so its rounding, can
      depend on how many threads share it.
    - a time budget picks the number of epochs (and small_cnn's width) from timed steps: refused.
    """
    t = cfg.train
    if t.time_budget is not None:
        raise ValueError(
            "--deterministic and --time-budget do not combine: a time budget chooses the number of epochs "
            "from timed training steps; give --epochs instead, or drop --deterministic"
        )
    precision = t.precision
    if precision == "auto":
        precision = "bf16" if resolve_precision("auto", resolve_device(t.device)) is not None else "fp32"
    threads = t.threads or default_threads()
    if (precision, threads) != (t.precision, t.threads):
        log(f"deterministic: precision {precision}, {threads} threads (fixed, not timed)")
    return dataclasses.replace(cfg, train=dataclasses.replace(t, precision=precision, threads=threads))


def start_process(t_cfg: TrainConfig, seed: int) -> tuple[torch.device, torch.dtype | None]:
    """Set torch's threads, seed and determinism for the run; its device and evaluation autocast dtype."""
    set_threads(t_cfg.threads)
    torch.manual_seed(seed)
    if t_cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = resolve_device(t_cfg.device)
    return device, resolve_precision(t_cfg.precision, device)


def final_splits(data: RunData, t_cfg: TrainConfig, keep_test: bool = False) -> dict[str, SplitData | None]:
    """The splits evaluated at the end with the recipe's TTA: val, and test unless there is a time
    budget. Under a budget the test split is left to `imgcls evaluate`, so the budget's seconds go
    to training (CIFAR-10's 10,000 test images with 6 TTA views took 34 s of a 4-minute budget on 2 cores).
    keep_test: evaluate it anyway (--model auto's default budget, which the user did not ask for;
    the plan keeps its seconds back)."""
    return {"val": data.val, "test": data.test if t_cfg.time_budget is None or keep_test else None}


def artifact_meta(cfg: RunConfig, data: RunData, setup: Setup, spec: PreprocessSpec, device: torch.device) -> dict[str, Any]:
    """model.json's common part (each save adds "training", the final one "metrics")."""
    index = data.index
    return {
        "arch": cfg.model.name,
        "model_kwargs": setup.model_kwargs,
        "class_names": data.class_names,
        # multi-label: 0.5 until the run's end fits each label's threshold on validation (training.multilabel)
        **({"task": MULTI_LABEL, "thresholds": [0.5] * len(data.class_names)} if data.index.multilabel else {}),
        "preprocess": spec.to_dict(),
        "augment": setup.data.aug.to_dict(),
        "strategy": setup.strategy,
        "config": cfg.to_dict(),
        "seed": cfg.data.seed,
        "split": {**data.split_info, "file": SPLIT_FILE},
        "dataset": {
            "root": str(index.root),
            "layout": index.layout,
            "fingerprint": data.fingerprint,
            "bad_files": len(data.failures),
            "excluded": data.excluded,  # left out as --exclude-from's audit.json asked (config.data.exclude_from)
            "ignored": dict(index.ignored),
        },
        "versions": package_versions(),
        "device": str(device),
        "precision": dtype_name(setup.options.amp_dtype),  # of the training steps
        "threads": torch.get_num_threads(),  # of the first epoch; thread_choice says how, and any later switch
        "thread_choice": {**setup.threads.to_dict(), "switches": []} if setup.threads else None,
        "recipe": setup.recipe.to_dict(),
        "tta": setup.recipe.tta,  # what `imgcls evaluate` and `predict` use unless told otherwise (--tta)
        "tta_select": setup.recipe.tta_select,  # share of the least confident images that get those views (runtime.tta_logits)
        "class_balance": setup.class_balance.to_dict() if setup.class_balance else None,  # --class-balance as resolved
        "world_size": setup.shard.world_size if setup.shard else 1,  # processes that trained it (torchrun), one global batch
    }


def probe_first(setup: Setup, data: RunData, ev: Evaluation, state: TrainState, folder: RunFolder, log: Log) -> None:
    """Step 4: fit the classifier on frozen features (finetune.linear_probe) and keep the model.
    For linear-probe that is the whole training (one history row); fine-tune goes on from it."""
    weights = setup.class_balance.probe_weights() if setup.class_balance else setup.pos_weight  # multi-label: BCE's positive weights
    row = linear_probe(setup.model, data.train, data.val, ev.spec, ev.device, ev.amp_dtype, ev.progress, log, weights)
    sweep = row.pop("probe_sweep")
    if not isinstance(folder, distributed.QuietFolder):
        write_probe_sweep(folder.path, sweep)  # probe.csv: the report's L2 sweep
    if setup.strategy == "linear-probe":
        state.history.append(row)
        folder.write_history(state.history)
        state.best_epoch = state.epoch = 0
    elif ev.val is not None and len(ev.val.paths):
        # The probe's head on the frozen backbone is a complete model: a fine-tune epoch is kept only
        # when it validates better (issue 11: cats vs dogs fell from the probe's 99.5% to 94.5%).
        state.best_acc, state.best_loss = row[setup.best_key], row["val_loss"]
    folder.save_model(setup.model, {"strategy": setup.strategy, "stage": "linear-probe"})


def kept_stage(strategy: str, state: TrainState, log: Log) -> str:
    """Which weights the run keeps, as model.json's training "kept" says it: "linear-probe" (the
    probe, also when no fine-tune epoch validated better than it) or "epoch N"."""
    probe_kept = (strategy == "fine-tune" and state.best_epoch < 0) or (strategy == "fine-tune-last" and state.best_epoch == 0)
    if strategy == "linear-probe" or probe_kept:
        if probe_kept:
            log(f"no fine-tune epoch validated better than the linear probe ({state.best_acc:.4f}): keeping the probe's model")
        return "linear-probe"
    return f"epoch {state.best_epoch + 1}"


def train_epochs(
    setup: Setup, schedule: Schedule, state: TrainState, folder: RunFolder, ev: Evaluation, t_cfg: TrainConfig, seed: int, log: Log
) -> bool:
    """Step 5: the epochs after state.epoch up to state.planned_epochs (which a time budget
    re-plans as it goes); True when early stopping ended them."""
    model, recipe, spe = setup.model, setup.recipe, schedule.steps_per_epoch
    epoch = state.epoch + 1
    # The lookahead EMA equals the weights at every epoch end, so a resumed run starts it from them.
    lookahead = Lookahead(model, last_step=epoch * spe - 1) if recipe.lookahead and state.planned_epochs > epoch else None
    whiten_bias = getattr(getattr(model, "whiten", None), "bias", None)
    # --compile: inductor on the training forward (same parameters). Off by default: on 2 CPU cores it
    # took 30 s to compile and then ran small_cnn slower than eager (bench/RESULTS.md).
    if setup.shard is not None:  # distributed: BatchNorm statistics over the global batch; each rank its own dropout masks
        model = distributed.sync_batchnorm(model, ev.device)
        setup.shard.seed_rank()
    train_model = torch.compile(model) if t_cfg.compile else model
    ddp = None  # distributed: train_model as DDP, built at the first epoch
    # A measured thread count is re-checked between epochs (not under --compile: inductor's kernels
    # keep the count they were compiled with).
    adaptive = setup.threads is not None and setup.threads.adaptive and not t_cfg.compile
    watch = watch_threads(setup.threads, setup.data.batch_size, setup.trial_step_s) if adaptive else None
    while epoch < state.planned_epochs:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)  # per-epoch stream: resume replays it
        if whiten_bias is not None:
            whiten_bias.requires_grad_(whiten_bias_trains(recipe, epoch, state.planned_epochs))
        if setup.shard is not None:
            ddp = setup.shard.wrap(train_model, ev.device, previous=ddp)  # again when the whitening bias froze
        planned_total = schedule.total_steps
        label = f"epoch {epoch + 1}/{state.planned_epochs}" if ev.progress else None
        size = train_size(recipe, epoch, state.planned_epochs, setup.data.spec.img_size)  # progressive resizing: smaller first
        data = setup.data if size is None else dataclasses.replace(setup.data, train_size=size)
        step_args = (setup.optimizer, setup.loss_fn, data, g, setup.options)
        stats = train_one_epoch(ddp or train_model, *step_args, schedule, epoch * spe, lookahead, label, setup.shard)
        out_of_time = schedule.total_steps < planned_total
        if out_of_time:  # behind the time budget: the schedule was shortened during this epoch
            if lookahead is not None and epoch * spe + stats.steps >= schedule.total_steps:
                lookahead.update(schedule.total_steps - 1, schedule.total_steps, True)  # the run's last step: the EMA is copied in
            log(f"time budget: schedule shortened to {schedule.total_steps} steps ({schedule.total_steps / spe:.2f} epochs)")
        row, improved = record_epoch(epoch, stats, setup, state, folder, ev)
        if schedule.budget_s is not None:
            full_epoch = schedule.total_steps >= (epoch + 1) * spe and not out_of_time
            replan_budget(schedule, state, epoch, full_epoch, ev, model)
        if watch is not None and epoch + 1 < state.planned_epochs:
            parts = (model, setup.optimizer, setup.loss_fn, setup.data, setup.options)
            switch = recheck_threads(watch, *parts, stats.images, stats.seconds, log)
            if switch is not None:  # model.json's record, written with the next kept model
                folder.meta["thread_choice"]["switches"].append({"after_epoch": epoch + 1, **switch.to_dict()})
        folder.save_checkpoint(model, setup.optimizer, state)
        log(
            f"epoch {epoch + 1}/{state.planned_epochs}  loss {stats.loss:.4f}  acc {stats.accuracy:.4f}  val_loss {row['val_loss']:.4f}  "
            f"val_acc {row['val_acc']:.4f}  lr {row['lr']:.2e}  {stats.seconds:.1f}s  {row['images_per_s']:.0f} img/s"
            + (f"  val_mAP {row['val_map']:.4f}" if "val_map" in row else "")
            + (f"  trained at {size} px" if size else "")
            + ("  *" if improved else "")
        )
        if ev.val is not None and t_cfg.patience and state.bad_epochs >= t_cfg.patience:
            log(f"early stop: no validation improvement for {t_cfg.patience} epochs; keeping epoch {state.best_epoch + 1}")
            return True
        epoch += 1
    return False


def record_epoch(
    epoch: int, stats: EpochStats, setup: Setup, state: TrainState, folder: RunFolder, ev: Evaluation
) -> tuple[dict[str, float], bool]:
    """After an epoch: validate, add its metrics.csv row, and keep the weights when they are the
    best so far; the row, and whether they were."""
    val = ev.val
    if val is not None and len(val.paths):
        how = (ev.spec, ev.device, ev.amp_dtype, ev.progress)
        if val.labels.ndim == 2:  # multi-label: (loss, label accuracy, macro mAP)
            val_loss, val_acc, val_bal = validate_multilabel(setup.model, val.images, val.labels, *how)
        else:  # distributed: each rank its share of the images
            val_loss, val_acc, val_bal = validate(setup.model, val.images, val.labels, *how, shard=setup.shard)
    else:
        val_loss, val_acc, val_bal = math.nan, math.nan, math.nan
    row = {
        "epoch": epoch + 1,
        "train_loss": stats.loss,
        "train_acc": stats.accuracy,
        "val_loss": val_loss,
        "val_acc": val_acc,
        "lr": setup.optimizer.param_groups[0]["lr"],
        "epoch_time_s": stats.seconds,
        "images_per_s": stats.images / max(stats.seconds, 1e-9),
        # kept in the checkpoint's history; metrics.csv writes HISTORY_FIELDS only. Multi-label: macro mAP
        "val_map" if setup.best_key == "val_map" else "val_balanced_acc": val_bal,
    }
    improved = state.record_epoch(epoch, row, has_val=val is not None, key=setup.best_key)  # rebalanced: judged on every class alike
    folder.write_history(state.history)
    if improved:
        folder.save_model(setup.model, {"best_epoch": epoch + 1, "epochs_run": epoch + 1})
    return row, improved


def replan_budget(schedule: Schedule, state: TrainState, epoch: int, full_epoch: bool, ev: Evaluation, model: nn.Module) -> None:
    """Under a time budget, after `epoch`: re-plan the rest from the pace so far when the epoch ran
    in full (a shortened one already fits), and record the plan in the state (and so the checkpoint)."""
    if full_epoch:
        done = (epoch + 1) * schedule.steps_per_epoch  # global steps trained so far
        per_step = schedule.seconds_per_step(done)
        if schedule.final_eval_s is None:  # a resumed run measures it now
            schedule.final_eval_s = ev.time_final(model)
        schedule.replan(done, per_step)
    state.planned_epochs, state.total_steps = schedule.epochs, schedule.total_steps
