"""Tests for imgcls.training.budget (the time-budget planner: numbers in, a plan out) and the
running Schedule's deadline logic, on fake clocks and made-up timings (fit's end-to-end budget
runs are in test_recipe.py and test_train.py)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import imgcls.training.schedule as schedule_mod
from imgcls.training import budget
from imgcls.training.budget import BudgetRequest, Timing, epochs_that_fit, plan_budget
from imgcls.training.measure import time_eval
from imgcls.training.schedule import Schedule
from imgcls.transforms import PreprocessSpec

WIDTHS = ((64, 256, 256), (48, 192, 192), (32, 128, 128))
REQUEST = BudgetRequest(steps_per_epoch=10, final_eval_s=0.0, max_epochs=None, widths=WIDTHS, min_epochs=8.0)


def timing(widths: tuple[int, ...] | None, epochs: float) -> Timing:
    """A timing that buys `epochs` under REQUEST: 1 s a step, 10 steps an epoch, no validation."""
    return Timing(widths, left_s=(epochs * 10 + budget.SLACK_S) / budget.MARGIN + 1e-6, step_s=1.0, val_s=0.0)


def test_plan_keeps_the_widest_width_that_gets_enough_epochs():
    # 5 epochs at full width: 48/192/192 could reach 5 * (256/192)^2 = 8.9 >= 8, so it is timed first
    plan = plan_budget(REQUEST, [timing(None, 5.0)])
    assert plan.time_next == (48, 192, 192)
    plan = plan_budget(REQUEST, [timing(None, 5.0), timing((48, 192, 192), 9.0)])
    assert plan.time_next is None and plan.widths == (48, 192, 192)
    assert plan.epochs == pytest.approx(9.0) and plan.total_steps == 90  # the narrowest was never asked for


def test_plan_skips_widths_that_cannot_reach_enough_and_falls_back_to_the_narrowest():
    # 2 epochs at full width: 48/192/192 could give at most 2 * (256/192)^2 = 3.6 < 8, not timed
    assert plan_budget(REQUEST, [timing(None, 2.0)]).time_next == (32, 128, 128)
    plan = plan_budget(REQUEST, [timing(None, 2.0), timing((32, 128, 128), 4.0)])
    assert plan.time_next is None and plan.widths == (32, 128, 128) and plan.total_steps == 40  # not enough, but the most there is


def test_plan_leaves_the_width_alone_when_it_gets_enough_or_cannot_narrow():
    plan = plan_budget(REQUEST, [timing(None, 8.5)])
    assert (plan.widths, plan.time_next, plan.total_steps) == (None, None, 85)
    capped = BudgetRequest(10, 0.0, max_epochs=3, widths=WIDTHS, min_epochs=8.0)  # an --epochs cap that binds: 3 is enough
    plan = plan_budget(capped, [timing(None, 5.0)])
    assert (plan.widths, plan.time_next, plan.epochs) == (None, None, 3.0)
    plain = BudgetRequest(10, 0.0)  # an architecture without narrower widths
    assert plan_budget(plain, [timing(None, 1.5)]).widths is None


def test_epochs_keep_back_the_final_evaluation_and_a_margin():
    # 10 steps an epoch at 1 s + 5 s validation = 15 s an epoch; 100 s * 0.95 - 20 - 2 = 73 s -> 4.87 epochs
    t = Timing(None, left_s=100.0, step_s=1.0, val_s=5.0)
    assert epochs_that_fit(BudgetRequest(10, 20.0), t) == pytest.approx(73 / 15)
    assert epochs_that_fit(BudgetRequest(10, 20.0, max_epochs=3), t) == 3.0  # --epochs caps
    assert epochs_that_fit(BudgetRequest(10, 20.0), Timing(None, 10.0, 1.0, 5.0)) == 1.0  # at least one
    line = budget.describe(BudgetRequest(10, 20.0), t)
    assert line.startswith("time budget: 100s left") and "-> 4.87 epochs" in line


def test_replan_stretches_or_shrinks_to_the_measured_pace(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(schedule_mod.time, "perf_counter", lambda: now[0])
    s = Schedule("cosine", None, 0.0, steps_per_epoch=10, total_steps=100, first_step=0, t_start=990.0, budget_s=300.0, final_eval_s=15.0)
    assert s.t_loop == 1000.0  # decoding took the first 10 s
    now[0] = 1020.0  # the first epoch (10 steps) took 20 s: 2 s a step
    assert s.seconds_per_step(10) == 2.0
    s.replan(10, 2.0)
    # left: 300 * 0.95 - 30 - 15 - 0.1 * 10 * 2 = 238 s -> 119 more steps
    assert s.total_steps == 10 + 119 and s.epochs == 13
    s.max_steps = 50
    s.replan(10, 2.0)
    assert s.total_steps == 50  # the --epochs cap binds
    assert budget.replanned_steps(10, 300.0, 30.0, 2.0, 15.0, 10, None) == 129  # the same arithmetic, without a clock


def test_keep_going_shortens_the_decay_when_behind_and_never_without_a_budget(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(schedule_mod.time, "perf_counter", lambda: now[0])
    s = Schedule("cosine", None, 0.0, 100, total_steps=1000, t_start=0.0, budget_s=100.0, final_eval_s=15.0)
    now[0] = 16.0  # 16 steps in 16 s: 1 s a step, 64 s left before the deadline (100 - 15 - 5)
    assert s.keep_going(16) and s.total_steps == 16 + 64
    assert s.keep_going(17) and s.total_steps == 80  # checked every 8 steps only
    now[0] = 80.0
    assert not s.keep_going(80)  # the shortened schedule has run out
    free = Schedule("cosine", None, 0.0, 100, total_steps=1000)
    now[0] = 1e6
    assert free.keep_going(16) and free.total_steps == 1000
    free.replan(100, 1.0)
    assert free.total_steps == 1000
    resumed = Schedule("cosine", None, 0.0, 100, total_steps=1000, t_start=0.0, budget_s=100.0, final_eval_s=15.0, cut_off=False)
    assert resumed.keep_going(16) and resumed.total_steps == 1000
    assert budget.steps_before_deadline(16, 69.0, 1.0) == 16 + 64


def test_time_eval_scales_to_the_whole_set():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    images = torch.zeros(40, 8, 8, 3, dtype=torch.uint8)  # (N, S, S, 3)
    t0 = time.perf_counter()
    est = time_eval(model, [images, images[:10]], PreprocessSpec(img_size=8), torch.device("cpu"), None)
    assert 0 < est < 10 * (time.perf_counter() - t0 + 1)
    assert time_eval(model, [], PreprocessSpec(img_size=8), torch.device("cpu"), None) == 0.0
