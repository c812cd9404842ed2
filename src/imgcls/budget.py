"""Time budgets (`imgcls train --time-budget MINUTES`): how many epochs fit, which width of a
network gets enough of them, and keeping the schedule inside the budget while the run goes.

`train.fit` measures (a few real training steps, an evaluation pass) and decides with these;
nothing here trains.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from imgcls.runtime import batched_logits
from imgcls.transforms import PreprocessSpec


def time_eval(model: nn.Module, image_sets: Sequence[torch.Tensor], spec: PreprocessSpec, device: torch.device, amp_dtype: torch.dtype | None, tta: str = "none") -> float:
    """Seconds for one evaluation pass over the uint8 image sets (each (N, S, S, 3)) with `tta`,
    extrapolated from up to 512 images."""
    total = sum(len(s) for s in image_sets)
    if total == 0:
        return 0.0
    sample = torch.cat([s[:512] for s in image_sets])[:512]
    batched_logits(model, sample[:64].numpy(), spec, device=device, amp_dtype=amp_dtype)  # warm-up
    seconds = []
    halves = [h for h in (sample[: len(sample) // 2], sample[len(sample) // 2 :]) if len(h)]
    for half in halves:  # the faster half: a shared machine has bursts
        t0 = time.perf_counter()
        batched_logits(model, half.numpy(), spec, device=device, amp_dtype=amp_dtype, tta=tta)
        seconds.append((time.perf_counter() - t0) / max(1, len(half)))
    return min(seconds) * total


def plan_epochs(budget_s: float, max_epochs: int | None, steps_per_epoch: int, step_seconds: Callable[[int], float], eval_seconds: Callable[[], tuple[float, float]],
                log: Callable[[str], None]) -> float:
    """How many epochs fit in what is left of the time budget (decoding already spent); the last
    one may be partial, so no budget is left unused.

    step_seconds(n) -> seconds per training step, timed over n steps. eval_seconds() ->
    (validation pass run after each epoch, final evaluation of val and test with the recipe's
    TTA). One epoch costs its steps plus a validation pass; the final evaluation and a 5% margin
    are kept back.
    """
    t_step = step_seconds(min(steps_per_epoch, 8))
    t_val, t_final = eval_seconds()
    per_epoch = t_step * steps_per_epoch + t_val
    usable = budget_s * 0.95 - t_final - 2.0
    epochs = max(1.0, usable / per_epoch)
    if max_epochs:
        epochs = min(epochs, float(max_epochs))
    log(f"time budget: {budget_s:.0f}s left, about {per_epoch:.1f}s per epoch ({t_step * 1000:.0f} ms/step, validation {t_val:.1f}s, final evaluation {t_final:.1f}s) -> {epochs:.2f} epochs")
    return epochs


def choose_width(widths: Sequence[tuple[int, ...]], planned_full: float, enough: float, plan_width: Callable[[tuple[int, ...]], float]) -> tuple[tuple[int, ...], float]:
    """The widest of `widths` (widest first) that a budget gives `enough` epochs, else the narrowest,
    and its planned epochs. planned_full: epochs planned for widths[0]; plan_width(w) builds and
    times the network at width w and returns its planned epochs.

    Compute falls at most with the width squared, so a width that could not reach `enough` even
    then is not worth the seconds of timing it (the narrowest is always timed).
    """
    full, *narrower = widths
    chosen, planned = full, planned_full
    for i, w in enumerate(narrower):
        if i < len(narrower) - 1 and planned_full * (full[-1] / w[-1]) ** 2 < enough:
            continue
        chosen, planned = w, plan_width(w)
        if planned >= enough:
            break
    return chosen, planned


@dataclass
class BudgetSchedule:
    """The length of the training schedule in global steps (`total_steps`, what the learning rate
    decays to zero over), kept inside a time budget while the run goes.

    budget_s None: no budget, total_steps never changes. Otherwise the run ends by
    t_start + budget_s, with final_eval_s kept back for the final evaluation.
    """

    total_steps: int
    steps_per_epoch: int
    first_step: int  # the global step this process started training at (after a resume, not 0)
    t_start: float  # time.perf_counter() when the run started, decoding included
    budget_s: float | None = None
    final_eval_s: float | None = None
    cut_off: bool = True  # shorten the decay mid-epoch when behind (off for a resumed run: its clock restarted)
    max_steps: int | None = None  # an --epochs cap
    t_loop: float = field(default_factory=lambda: time.perf_counter())  # when this process's first step started

    def keep_going(self, step: int) -> bool:
        """Before global step `step`: when the run is behind its time budget (a slower or busier
        machine than the plan measured), shorten the schedule so that the learning rate still
        decays to zero by the deadline; cutting the run off at a high learning rate would leave
        weights that are far from a minimum."""
        done_here = step - self.first_step
        if self.budget_s is not None and self.cut_off and done_here > 0 and step % 8 == 0:
            now = time.perf_counter()
            deadline = self.t_start + self.budget_s - (self.final_eval_s or 0.0) - 5.0
            fits = step + int(max(0.0, deadline - now) / ((now - self.t_loop) / done_here))
            if fits < self.total_steps:
                self.total_steps = max(step, fits)
        return step < self.total_steps

    def replan(self, done: int, final_eval_s: Callable[[], float]) -> None:
        """After a full epoch (`done` global steps): re-plan from the steps measured so far (the
        first estimate came from a few steps on a machine that may be shared). The schedule
        stretches or shrinks to the new length, and the last epoch may be partial so that the
        budget is used to the end. final_eval_s() measures the final evaluation if no one has."""
        if self.budget_s is None:
            return
        per_step = (time.perf_counter() - self.t_loop) / max(1, done - self.first_step)  # validation and checkpoints included
        if self.final_eval_s is None:
            self.final_eval_s = final_eval_s()
        left = self.budget_s * 0.95 - (time.perf_counter() - self.t_start) - self.final_eval_s - 0.1 * self.steps_per_epoch * per_step
        self.total_steps = max(done, min(self.max_steps or 10**12, done + int(max(0.0, left) / per_step)))

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)
