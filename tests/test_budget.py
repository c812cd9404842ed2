"""Tests for imgcls.budget: the width choice and the schedule kept inside a time budget, on
fake clocks and fake timings (fit's end-to-end budget runs are in test_recipe.py)."""

from __future__ import annotations

import time

import pytest

from imgcls import budget
from imgcls.budget import BudgetSchedule, choose_width, plan_epochs

WIDTHS = ((64, 256, 256), (48, 192, 192), (32, 128, 128))


def test_choose_width_keeps_the_widest_that_gets_enough_epochs():
    timed: list[tuple[int, ...]] = []
    epochs = {(48, 192, 192): 9.0, (32, 128, 128): 15.0}

    def plan_width(w):
        timed.append(w)
        return epochs[w]

    assert choose_width(WIDTHS, 5.0, 8.0, plan_width) == ((48, 192, 192), 9.0)
    assert timed == [(48, 192, 192)]  # the narrowest is not timed once a wider one is enough


def test_choose_width_skips_widths_that_cannot_reach_enough_and_falls_back_to_the_narrowest():
    timed: list[tuple[int, ...]] = []

    def plan_width(w):
        timed.append(w)
        return 4.0

    # 2 epochs at full width: 48/192/192 could give at most 2 * (256/192)^2 = 3.6 < 8, not timed
    assert choose_width(WIDTHS, 2.0, 8.0, plan_width) == ((32, 128, 128), 4.0)
    assert timed == [(32, 128, 128)]


def test_plan_epochs_keeps_back_the_final_evaluation_and_a_margin():
    logs: list[str] = []
    # 10 steps an epoch at 1 s + 5 s validation = 15 s an epoch; 100 s * 0.95 - 20 - 2 = 73 s -> 4.87 epochs
    e = plan_epochs(100.0, None, 10, lambda n: 1.0, lambda: (5.0, 20.0), logs.append)
    assert e == pytest.approx(73 / 15)
    assert plan_epochs(100.0, 3, 10, lambda n: 1.0, lambda: (5.0, 20.0), logs.append) == 3.0  # --epochs caps
    assert plan_epochs(10.0, None, 10, lambda n: 1.0, lambda: (5.0, 20.0), logs.append) == 1.0  # at least one
    assert "time budget" in logs[0]


def test_replan_stretches_or_shrinks_to_the_measured_pace(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: now[0])
    s = BudgetSchedule(total_steps=100, steps_per_epoch=10, first_step=0, t_start=990.0, budget_s=300.0, final_eval_s=None)
    assert s.t_loop == 1000.0  # decoding took the first 10 s
    now[0] = 1020.0  # the first epoch (10 steps) took 20 s: 2 s a step
    s.replan(10, lambda: 15.0)
    assert s.final_eval_s == 15.0
    # left: 300 * 0.95 - 30 - 15 - 0.1 * 10 * 2 = 238 s -> 119 more steps
    assert s.total_steps == 10 + 119 and s.epochs == 13
    s.max_steps = 50
    s.replan(10, lambda: 99.0)
    assert s.total_steps == 50 and s.final_eval_s == 15.0  # the cap binds; the evaluation is measured once


def test_keep_going_shortens_the_decay_when_behind_and_never_without_a_budget(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: now[0])
    s = BudgetSchedule(total_steps=1000, steps_per_epoch=100, first_step=0, t_start=0.0, budget_s=100.0, final_eval_s=15.0)
    now[0] = 16.0  # 16 steps in 16 s: 1 s a step, 64 s left before the deadline (100 - 15 - 5)
    assert s.keep_going(16) and s.total_steps == 16 + 64
    now[0] = 80.0
    assert not s.keep_going(80)  # the shortened schedule has run out
    free = BudgetSchedule(total_steps=1000, steps_per_epoch=100, first_step=0, t_start=0.0)
    now[0] = 1e6
    assert free.keep_going(16) and free.total_steps == 1000
    free.replan(100, lambda: 1.0)
    assert free.total_steps == 1000
    resumed = BudgetSchedule(total_steps=1000, steps_per_epoch=100, first_step=0, t_start=0.0, budget_s=100.0, final_eval_s=15.0, cut_off=False)
    assert resumed.keep_going(16) and resumed.total_steps == 1000


def test_time_eval_scales_to_the_whole_set():
    import torch
    from torch import nn

    from imgcls.transforms import PreprocessSpec

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    images = torch.zeros(40, 8, 8, 3, dtype=torch.uint8)
    t0 = time.perf_counter()
    est = budget.time_eval(model, [images, images[:10]], PreprocessSpec(img_size=8), torch.device("cpu"), None)
    assert 0 < est < 10 * (time.perf_counter() - t0 + 1)
    assert budget.time_eval(model, [], PreprocessSpec(img_size=8), torch.device("cpu"), None) == 0.0
