"""Tests for imgcls.training.checkpoint: the TrainState, its round trip through a checkpoint file
(with model and optimizer tensors), and reading checkpoints in the format earlier runs wrote."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from imgcls.artifact import atomic_save_tensors
from imgcls.config import DataConfig, RunConfig, TrainConfig
from imgcls.training.checkpoint import CHECKPOINT_FILE, TrainState, load_checkpoint, read_checkpoint, save_checkpoint

ROW = {"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 0.9, "val_acc": 0.6, "lr": 0.01}
ROW |= {"epoch_time_s": 2.0, "images_per_s": 9.0}


def model_and_optimizer(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    opt = torch.optim.AdamW([{"params": list(model.parameters()), "lr": 1e-3, "initial_lr": 1e-3, "weight_decay": 0.05}])
    return model, opt


def test_state_and_tensors_round_trip(tmp_path):
    model, opt = model_and_optimizer(0)
    model(torch.randn(6, 4)).sum().backward()
    opt.step()  # the optimizer now has state (exp_avg, exp_avg_sq, step)
    state = TrainState(planned_epochs=5, total_steps=40, train_precision="bfloat16", model_kwargs={"widths": [32, 128, 128]})
    assert state.record_epoch(0, dict(ROW), has_val=True)
    cfg = RunConfig(data=DataConfig(path="DATA"), train=TrainConfig(out=str(tmp_path), epochs=5))
    save_checkpoint(tmp_path / CHECKPOINT_FILE, model, opt, state, cfg.to_dict())

    fresh, fresh_opt = model_and_optimizer(1)
    loaded = load_checkpoint(tmp_path / CHECKPOINT_FILE, fresh, fresh_opt)
    assert loaded == state and loaded.best_loss == 0.9 and loaded.model_kwargs == {"widths": [32, 128, 128]}
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    a, b = opt.state_dict(), fresh_opt.state_dict()
    assert [g["lr"] for g in a["param_groups"]] == [g["lr"] for g in b["param_groups"]]
    for pid in a["state"]:
        for k, v in a["state"][pid].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][pid][k])), (pid, k)
    read_cfg, read_state = read_checkpoint(tmp_path)
    assert read_cfg == cfg and read_state == state


def test_a_fresh_state_survives_json_with_its_infinite_best_loss(tmp_path):
    model, opt = model_and_optimizer(0)
    state = TrainState(planned_epochs=3, total_steps=6, train_precision="float32")
    save_checkpoint(tmp_path / CHECKPOINT_FILE, model, opt, state, RunConfig(data=DataConfig(path="D")).to_dict())
    _, read = read_checkpoint(tmp_path)
    assert read == state and read.best_loss == math.inf and read.epoch == -1


def test_reads_a_checkpoint_as_earlier_versions_wrote_it(tmp_path):
    """The JSON keys the training code wrote before TrainState existed (a plain dict), read as a TrainState."""
    model, opt = model_and_optimizer(0)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    cfg = RunConfig(data=DataConfig(path="DATA"), train=TrainConfig(out=str(tmp_path), epochs=3))
    old = {
        "epoch": 1,
        "best_epoch": 1,
        "best_acc": 0.75,
        "best_loss": 0.5,
        "history": [ROW, {**ROW, "epoch": 2}],
        "bad_epochs": 0,
        "planned_epochs": 3,
        "total_steps": 12,
        "train_precision": "float32",
        "model_kwargs": {},
        "config": cfg.to_dict(),
        "param_groups": opt.state_dict()["param_groups"],
    }
    atomic_save_tensors(tmp_path / CHECKPOINT_FILE, tensors, metadata={"imgcls_checkpoint": json.dumps(old)})
    read_cfg, state = read_checkpoint(tmp_path)
    assert read_cfg == cfg
    assert (state.epoch, state.best_epoch, state.best_acc, state.planned_epochs, state.total_steps) == (1, 1, 0.75, 3, 12)
    assert [r["epoch"] for r in state.history] == [1, 2]
    fresh, fresh_opt = model_and_optimizer(1)
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE, fresh, fresh_opt) == state
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())


def test_record_epoch_keeps_the_best_and_counts_bad_epochs():
    s = TrainState(planned_epochs=4, total_steps=8, train_precision="float32")
    assert s.record_epoch(0, {**ROW, "val_acc": 0.6, "val_loss": 0.9}, has_val=True)
    assert not s.record_epoch(1, {**ROW, "val_acc": 0.5, "val_loss": 0.5}, has_val=True)  # lower accuracy: not kept
    assert s.record_epoch(2, {**ROW, "val_acc": 0.6, "val_loss": 0.8}, has_val=True)  # a tie, at a lower loss: kept
    assert (s.best_epoch, s.best_acc, s.best_loss, s.bad_epochs, s.epoch, len(s.history)) == (2, 0.6, 0.8, 0, 2, 3)
    assert not s.record_epoch(3, {**ROW, "val_acc": 0.6, "val_loss": 0.8}, has_val=True) and s.bad_epochs == 1
    no_val = TrainState(planned_epochs=2, total_steps=4, train_precision="float32")
    nan = {**ROW, "val_acc": math.nan, "val_loss": math.nan}
    assert no_val.record_epoch(0, nan, has_val=False) and no_val.record_epoch(1, {**nan, "train_acc": 0.2}, has_val=False)
    assert no_val.best_epoch == 1 and no_val.best_acc == 0.2  # without validation the last epoch is kept


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        read_checkpoint(tmp_path)
