"""Tests for imgcls.training.schedule: the steps-per-epoch rule and the Schedule object (the
learning-rate shapes themselves, lr_factor, are tested in test_train.py and test_recipe.py)."""

from __future__ import annotations

import pytest
import torch

from imgcls.training.schedule import Schedule, lr_factor, steps_per_epoch


def test_steps_per_epoch_drops_only_a_last_batch_of_one():
    assert steps_per_epoch(8, 4) == 2
    assert steps_per_epoch(9, 4) == 2  # a last batch of one image would break batch norm
    assert steps_per_epoch(10, 4) == 3  # a last batch of two is kept
    assert steps_per_epoch(1, 1) == 1 and steps_per_epoch(3, 2) == 1


@pytest.mark.parametrize("kind", ["cosine", "onecycle", "constant", "triangle"])
def test_schedule_is_lr_factor_over_its_length(kind):
    s = Schedule(kind, warmup_epochs=1.0, warmup_fraction=0.0, steps_per_epoch=7, total_steps=35)
    assert s.warmup_steps == 7 and s.epochs == 5
    assert [s.factor(i) for i in range(40)] == [lr_factor(i, 35, 7, kind) for i in range(40)]


def test_fractional_warmup_follows_a_schedule_that_changes_length():
    s = Schedule("triangle", warmup_epochs=None, warmup_fraction=0.23, steps_per_epoch=10, total_steps=100)
    assert s.warmup_steps == 23 and s.factor(23) == pytest.approx(1.0)
    s.total_steps = 50  # shortened by a time budget
    assert s.warmup_steps == 11 and s.factor(50) == pytest.approx(0.07) and s.epochs == 5


def test_apply_scales_every_groups_own_base_rate():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1, "initial_lr": 0.1}, {"params": [b], "lr": 6.4, "initial_lr": 6.4}])
    s = Schedule("cosine", warmup_epochs=0.0, warmup_fraction=0.0, steps_per_epoch=10, total_steps=20)
    s.apply(opt, 10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 3.2])  # halfway down the cosine
    assert [g["initial_lr"] for g in opt.param_groups] == [0.1, 6.4]
