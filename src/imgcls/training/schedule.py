"""The learning-rate schedule and its length in optimizer steps: one object, `Schedule`, that the
training loop asks for the rate of each step and, under a time budget, whether to go on.

The steps-per-epoch rule lives here too (`steps_per_epoch`), since the schedule counts in steps
and the loop in batches.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from imgcls.training import budget


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Optimizer steps in one pass over `num_images`: one per full batch, plus the remainder as a
    last batch when it holds at least two images (a batch of one breaks batch norm)."""
    return num_images // batch_size + (1 if num_images % batch_size >= 2 else 0)


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


@dataclass
class Schedule:
    """The learning rate at every global step, over a run `total_steps` long.

    Without a time budget (budget_s None) total_steps never changes. With one, the run ends by
    t_start + budget_s with final_eval_s kept back for the final evaluation: `keep_going` shortens
    the schedule mid-epoch when the run falls behind, `replan` stretches or shrinks it after a full
    epoch. The warmup is warmup_epochs long, or warmup_fraction of total_steps when that is None,
    so it follows a schedule that changes length.
    """

    kind: str  # a SCHEDULES name: cosine, onecycle, constant, triangle
    warmup_epochs: float | None
    warmup_fraction: float
    steps_per_epoch: int
    total_steps: int
    first_step: int = 0  # the global step this process started training at (after a resume, not 0)
    t_start: float = 0.0  # time.perf_counter() when the run started, decoding included
    budget_s: float | None = None
    final_eval_s: float | None = None  # measured before the run, or after its first epoch (resume)
    cut_off: bool = True  # shorten the decay mid-epoch when behind (off for a resumed run: its clock restarted)
    max_steps: int | None = None  # an --epochs cap on a re-planned schedule
    t_loop: float = field(default_factory=lambda: time.perf_counter())  # this process's first step (the clock read when built)

    @property
    def warmup_steps(self) -> int:
        if self.warmup_epochs is not None:
            return int(round(self.warmup_epochs * self.steps_per_epoch))
        return int(self.total_steps * self.warmup_fraction)

    @property
    def epochs(self) -> int:
        """Epochs the schedule spans; the last may be partial."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def factor(self, step: int) -> float:
        """The learning-rate multiplier at global step `step`."""
        return lr_factor(step, self.total_steps, self.warmup_steps, self.kind)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set every parameter group's rate for `step`: its own base rate ("initial_lr") times the factor."""
        f = self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * f

    def keep_going(self, step: int) -> bool:
        """Before global step `step`: when the run is behind its time budget (a slower or busier
        machine than the plan measured), shorten the schedule so that the learning rate still
        decays to zero by the deadline; cutting the run off at a high learning rate would leave
        weights that are far from a minimum. Checked every 8 steps."""
        done_here = step - self.first_step
        if self.budget_s is not None and self.cut_off and done_here > 0 and step % 8 == 0:
            now = time.perf_counter()
            deadline = self.t_start + self.budget_s - (self.final_eval_s or 0.0)
            fits = budget.steps_before_deadline(step, deadline - now, (now - self.t_loop) / done_here)
            if fits < self.total_steps:
                self.total_steps = max(step, fits)
        return step < self.total_steps

    def seconds_per_step(self, done: int) -> float:
        """The pace of this process so far, `done` global steps in; validation and checkpoints included."""
        return (time.perf_counter() - self.t_loop) / max(1, done - self.first_step)

    def replan(self, done: int, per_step: float) -> None:
        """After a full epoch (`done` global steps, at `per_step` seconds a step): re-plan the rest of
        the budget from the pace measured so far (the first plan came from a few steps on a machine
        that may be shared). final_eval_s must be known by now."""
        if self.budget_s is None:
            return
        assert self.final_eval_s is not None, "measure the final evaluation before re-planning"
        elapsed_s = time.perf_counter() - self.t_start
        self.total_steps = budget.replanned_steps(
            done, self.budget_s, elapsed_s, per_step, self.final_eval_s, self.steps_per_epoch, self.max_steps
        )
