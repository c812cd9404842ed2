"""Decide how long a run trains (step 3 of fit): --epochs, a time budget, or the checkpoint being
resumed; and the `Schedule` that carries the decision through the epochs.

Under a time budget the measuring happens here (a few real training steps per candidate network,
a validation pass, the final evaluation) and the deciding in budget.py.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from torch import nn

from imgcls.config import TrainConfig
from imgcls.training import budget
from imgcls.training.build import Evaluation, Log, Setup, build_trainable, dtype_name
from imgcls.training.checkpoint import CHECKPOINT_FILE, TrainState, load_checkpoint
from imgcls.training.loop import StepOptions
from imgcls.training.measure import time_eval, time_train_steps
from imgcls.training.prepare import RunData, SplitData
from imgcls.training.recipes import BUDGET_WIDTHS, MIN_BUDGET_EPOCHS
from imgcls.training.schedule import Schedule

DEFAULT_EPOCHS = 30
LONG_RUN_S = 120.0  # a run estimated to take longer says so before it starts (issue 11)
FORWARD_SHARE = 1 / 3  # a forward pass (validation, the probe's features) costs about a third of a training step


def plan_run(
    t_cfg: TrainConfig, setup: Setup, ev: Evaluation, data: RunData, saved: TrainState | None, t_start: float, log: Log
) -> tuple[TrainState, Setup, float | None]:
    """Step 3: how long the run trains, as the TrainState it starts from: the resumed run's (its
    tensors loaded into setup's model and optimizer), or a fresh one planned from --epochs or the
    time budget. Also the seconds of the final evaluation when a time budget measured them."""
    spe = setup.steps_per_epoch
    if saved is not None:
        state = load_checkpoint(Path(t_cfg.out) / CHECKPOINT_FILE, setup.model, setup.optimizer)
        log(f"resumed after epoch {state.epoch + 1}/{state.planned_epochs}")
        return state, setup, None
    final_eval_s = None
    if setup.strategy in ("linear-probe", "fine-tune-last"):  # no epochs of the whole network (partial.py plans its own)
        epochs, total_steps = 0, spe
    elif t_cfg.time_budget is not None:
        final_eval_s = ev.time_final(setup.model)
        plan, setup = plan_time_budget(t_cfg, setup, ev, data, final_eval_s, t_start, log)
        epochs, total_steps = math.ceil(plan.total_steps / spe), plan.total_steps
    else:
        epochs = t_cfg.epochs or DEFAULT_EPOCHS
        total_steps = spe * epochs
        if setup.trial_step_s:  # measured by the precision trial; no extra steps are timed just for this
            forward_s = setup.trial_step_s * FORWARD_SHARE / setup.data.batch_size  # per image
            n_val = len(data.val.paths) if data.val is not None else 0
            probe_s = (len(data.train.paths) + n_val) * forward_s if setup.strategy == "fine-tune" else 0.0
            per_epoch = spe * setup.trial_step_s + n_val * forward_s
            announce_estimate(probe_s + epochs * per_epoch, epochs, per_epoch, log, "; --time-budget MINUTES caps it")
    return TrainState(epochs, total_steps, dtype_name(setup.options.amp_dtype), setup.model_kwargs), setup, final_eval_s


def plan_time_budget(
    t_cfg: TrainConfig, setup: Setup, ev: Evaluation, data: RunData, final_eval_s: float, t_start: float, log: Log
) -> tuple[budget.BudgetPlan, Setup]:
    """Measure the network (and narrower ones, when the planner asks) and plan the budget with
    budget.plan_budget; the setup to train, narrowed when the plan says so."""
    assert t_cfg.time_budget is not None
    # fine-tune starts with the linear probe: one feature pass over train and val, kept back too
    t_probe = (
        time_eval(setup.model, [s.images for s in (data.train, data.val) if s is not None], ev.spec, ev.device, ev.amp_dtype)
        if setup.strategy == "fine-tune"
        else 0.0
    )
    bp = setup.blueprint
    narrowable = bp.recipe.name == "fast" and bp.model.name in BUDGET_WIDTHS and not bp.model.starts_pretrained
    request = budget.BudgetRequest(
        setup.steps_per_epoch, final_eval_s, t_cfg.epochs, BUDGET_WIDTHS[bp.model.name] if narrowable else (), MIN_BUDGET_EPOCHS
    )
    deadline = t_start + t_cfg.time_budget * 60 - t_probe  # for the timings' "seconds left"
    # the precision trial's timing when there was one (the plan is redone after every epoch anyway)
    timings = [measure_candidate(setup, setup.model, setup.optimizer, None, deadline - time.perf_counter(), ev, data.val)]
    log(budget.describe(request, timings[-1]))
    built: dict[tuple[int, ...], tuple[nn.Module, torch.optim.Optimizer]] = {}
    while (plan := budget.plan_budget(request, timings)).time_next is not None:
        widths = plan.time_next
        built[widths] = build_trainable(bp, {**setup.model_kwargs, "widths": list(widths)})
        timings.append(measure_candidate(setup, *built[widths], widths, deadline - time.perf_counter(), ev, data.val))
        log(budget.describe(request, timings[-1]))
    chosen = next(t for t in timings if t.widths == plan.widths)
    per_epoch = chosen.step_s * setup.steps_per_epoch + chosen.val_s
    announce_estimate(time.perf_counter() - t_start + t_probe + plan.epochs * per_epoch + final_eval_s, plan.epochs, per_epoch, log)
    if plan.widths is not None:
        # Too few epochs for the full width: a narrower net trains more of them (see recipes.BUDGET_WIDTHS).
        model, optimizer = built[plan.widths]
        kwargs = {**setup.model_kwargs, "widths": list(plan.widths)}
        setup = dataclasses.replace(setup, model=model, optimizer=optimizer, model_kwargs=kwargs)
        log(f"time budget: {bp.model.name} narrowed to widths {list(plan.widths)} to train {plan.epochs:.1f} epochs")
    return plan, setup


def announce_estimate(total_s: float, epochs: float, per_epoch_s: float, log: Log, hint: str = "") -> None:
    """Log how long the run will take when that is over LONG_RUN_S, before it takes long."""
    if total_s > LONG_RUN_S:
        log(f"estimate: this run takes about {total_s / 60:.1f} minutes ({epochs:.1f} epochs of about {per_epoch_s:.0f}s){hint}")


def measure_candidate(
    setup: Setup,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    widths: tuple[int, ...] | None,
    left_s: float,
    ev: Evaluation,
    val: SplitData | None,
) -> budget.Timing:
    """Time one candidate network for the budget planner: seconds per training step (the
    precision trial's, for the configured network, when there was one) and per validation pass."""
    step_s = setup.trial_step_s if widths is None else None
    if not step_s:
        opts = StepOptions(setup.options.device, setup.options.amp_dtype, setup.options.channels_last)
        step_s = time_train_steps(model, optimizer, setup.loss_fn, setup.data, opts, min(setup.steps_per_epoch, 8))
    val_s = time_eval(model, [val.images] if val is not None else [], ev.spec, ev.device, ev.amp_dtype)
    return budget.Timing(widths, left_s, step_s, val_s)


def build_schedule(
    setup: Setup, state: TrainState, t_cfg: TrainConfig, t_start: float, final_eval_s: float | None, resumed: bool
) -> Schedule:
    """The learning-rate schedule over state.total_steps, with the time budget's deadline when there
    is one. Built just before the first epoch: its clock (the pace a budget re-plans with) starts there.
    A resumed run keeps its schedule: its clock restarted, so it is not cut short mid-epoch."""
    recipe, spe = setup.recipe, setup.steps_per_epoch
    return Schedule(
        recipe.schedule,
        recipe.warmup_epochs,
        recipe.warmup_fraction,
        spe,
        state.total_steps,
        first_step=(state.epoch + 1) * spe,
        t_start=t_start,
        budget_s=None if t_cfg.time_budget is None else t_cfg.time_budget * 60,
        final_eval_s=final_eval_s,
        cut_off=not resumed,
        max_steps=(t_cfg.epochs or 0) * spe or None,
    )
