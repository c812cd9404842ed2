"""Time budgets (`imgcls train --time-budget MINUTES`): how many epochs fit, which width of a
network gets enough of them, and how many steps still fit while the run goes.

Numbers in, numbers out. The training code measures (a few real training steps per candidate
network, an evaluation pass, the clock) and asks `plan_budget`; the running `Schedule` asks
`steps_before_deadline` and `replanned_steps`. Nothing here trains, times or imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MARGIN = 0.95  # share of the budget planned for; the rest absorbs a shared machine's noise
SLACK_S = 2.0  # seconds kept back at the first plan (checkpoint writes, the report)
DEADLINE_MARGIN_S = 5.0  # the schedule ends this long before the final evaluation must start
REPLAN_TAIL = 0.1  # a re-plan keeps back a tenth of an epoch of steps


@dataclass(frozen=True)
class Timing:
    """What one candidate network measured."""

    widths: tuple[int, ...] | None  # None: the network as configured
    left_s: float  # seconds of the budget left when its timing began (decoding, a probe's pass already taken off)
    step_s: float  # seconds per training step
    val_s: float  # seconds per validation pass (one after every epoch)


@dataclass(frozen=True)
class BudgetRequest:
    """The question: the run's shape and what may change.

    widths: narrower networks the run may train instead, widest (the configured one) first; empty
    when the architecture has none. A narrower one is wanted when the configured network gets
    fewer than min_epochs (or the --epochs cap, when lower).
    """

    steps_per_epoch: int
    final_eval_s: float  # the final evaluation (val, test with TTA), kept back from the budget
    max_epochs: int | None = None  # an --epochs cap
    widths: tuple[tuple[int, ...], ...] = ()
    min_epochs: float = 0.0  # with widths: recipes.MIN_BUDGET_EPOCHS


@dataclass(frozen=True)
class BudgetPlan:
    """The answer. When time_next is set the plan is not final yet: time the network at that width,
    add its Timing and ask again (epochs and total_steps are then the configured network's)."""

    epochs: float  # the last one may be partial, so that no budget is left unused
    total_steps: int
    widths: tuple[int, ...] | None = None  # a narrower network to train; None: the configured one
    time_next: tuple[int, ...] | None = None


def epochs_that_fit(request: BudgetRequest, timing: Timing) -> float:
    """How many epochs fit in what was left of the budget: each costs its steps plus a validation
    pass; the final evaluation and a 5% margin are kept back. At least one, at most --epochs."""
    per_epoch = timing.step_s * request.steps_per_epoch + timing.val_s
    usable = timing.left_s * MARGIN - request.final_eval_s - SLACK_S
    epochs = max(1.0, usable / per_epoch)
    if request.max_epochs:
        epochs = min(epochs, float(request.max_epochs))
    return epochs


def describe(request: BudgetRequest, timing: Timing) -> str:
    """The log line for one timing: what was measured and what it buys."""
    per_epoch = timing.step_s * request.steps_per_epoch + timing.val_s
    return (
        f"time budget: {timing.left_s:.0f}s left, about {per_epoch:.1f}s per epoch ({timing.step_s * 1000:.0f} ms/step, "
        f"validation {timing.val_s:.1f}s, final evaluation {request.final_eval_s:.1f}s) -> {epochs_that_fit(request, timing):.2f} epochs"
    )


def plan_budget(request: BudgetRequest, timings: Sequence[Timing]) -> BudgetPlan:
    """The plan for `timings` (the configured network's first, then the widths asked for, in order).

    Under `enough` epochs the widest narrower network that gets enough is chosen, else the
    narrowest. Compute falls at most with the width squared, so a width that could not reach
    `enough` even then is not worth the seconds of timing it (the narrowest is always timed).
    """
    full_epochs = epochs_that_fit(request, timings[0])
    enough = min(request.min_epochs, request.max_epochs or math.inf)  # an --epochs cap that binds leaves the width alone
    if not request.widths or full_epochs >= enough:
        return _plan(request, full_epochs, None)
    timed = {t.widths: epochs_that_fit(request, t) for t in timings[1:]}
    full, *narrower = request.widths
    for i, w in enumerate(narrower):
        last = i == len(narrower) - 1
        if not last and full_epochs * (full[-1] / w[-1]) ** 2 < enough:
            continue
        if w not in timed:
            return BudgetPlan(full_epochs, _plan(request, full_epochs, None).total_steps, None, time_next=w)
        if timed[w] >= enough or last:
            return _plan(request, timed[w], w)
    return _plan(request, full_epochs, None)  # only one width listed: nothing narrower to try


def _plan(request: BudgetRequest, epochs: float, widths: tuple[int, ...] | None) -> BudgetPlan:
    return BudgetPlan(epochs, max(1, int(epochs * request.steps_per_epoch)), widths)


def steps_before_deadline(step: int, seconds_left: float, per_step: float) -> int:
    """The global step count reachable from `step` at `per_step` seconds a step with
    `seconds_left` until the final evaluation must start (less a margin)."""
    return step + int(max(0.0, seconds_left - DEADLINE_MARGIN_S) / per_step)


def replanned_steps(
    done: int, budget_s: float, elapsed_s: float, per_step: float, final_eval_s: float, steps_per_epoch: int, max_steps: int | None
) -> int:
    """The schedule's new length after `done` steps and `elapsed_s` seconds of a `budget_s` run,
    at the measured `per_step`: the margin, the final evaluation and a tenth of an epoch kept back;
    never shorter than `done`, never past an --epochs cap (`max_steps`)."""
    left = budget_s * MARGIN - elapsed_s - final_eval_s - REPLAN_TAIL * steps_per_epoch * per_step
    return max(done, min(max_steps or 10**12, done + int(max(0.0, left) / per_step)))
