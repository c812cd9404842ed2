"""Tests for transfer learning (imgcls.training.finetune and the fit steps around it) on
EfficientNet-Lite0 with random weights given as a weights file (no download): the linear probe
alone, and fine-tuning after the probe."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from imgcls.artifact import load_artifact
from imgcls.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from imgcls.models import create_model
from imgcls.report import read_history
from imgcls.training.checkpoint import read_checkpoint
from imgcls.training.finetune import resolve_strategy
from imgcls.training.fit import fit
from synth import make_split_folders

ARCH = "efficientnet_lite0"


@pytest.fixture(scope="module")
def transfer_data(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(data folder: 3 classes, 4 train and 2 valid images each; weights file of a fresh model)."""
    base = tmp_path_factory.mktemp("transfer")
    data = make_split_folders(base / "data", per_split={"train": 4, "valid": 2}, size=32, seed=4)
    torch.manual_seed(0)
    weights = base / "random_lite0.safetensors"
    save_file({k: v.contiguous() for k, v in create_model(ARCH, num_classes=3).state_dict().items()}, str(weights))
    return data, weights


def transfer_cfg(data: pathlib.Path, weights: pathlib.Path, out: pathlib.Path, strategy: str, epochs: int | None = None) -> RunConfig:
    return RunConfig(
        data=DataConfig(path=str(data), img_size=32, seed=0),
        model=ModelConfig(name=ARCH, weights=str(weights), strategy=strategy),
        train=TrainConfig(out=str(out), epochs=epochs, precision="fp32"),  # fp32: no precision trial, seconds saved
    )


def test_linear_probe_fits_only_the_head_in_one_history_row(transfer_data, tmp_path):
    data, weights = transfer_data
    lines: list[str] = []
    run = fit(transfer_cfg(data, weights, tmp_path / "probe", "linear-probe"), progress=False, log=lines.append)
    rows = read_history(run)
    assert len(rows) == 1 and rows[0]["epoch"] == 1 and rows[0]["lr"] == 0.0  # the probe's row: no optimizer steps
    assert 0.0 <= rows[0]["train_acc"] <= 1.0 and 0.0 <= rows[0]["val_acc"] <= 1.0
    assert any(s.startswith("linear probe: L2") for s in lines) and not any(s.startswith("epoch ") for s in lines)
    meta = json.loads((run / "model.json").read_text())
    assert meta["strategy"] == "linear-probe" and meta["training"]["best_epoch"] == 1 and meta["training"]["epochs_run"] == 1
    assert meta["metrics"]["val"]["num_samples"] == 6
    assert meta["unknown"]["method"] == "knn" and (run / meta["unknown"]["file"]).is_file()  # auto: knn for a network given weights
    model, _ = load_artifact(run)
    start, kept = load_file(str(weights)), model.state_dict()
    head = model.classifier_name + "."
    assert all(torch.equal(kept[k], v) for k, v in start.items() if not k.startswith(head))  # frozen backbone, BN statistics too
    assert not torch.equal(kept[head + "weight"], start[head + "weight"])  # the fitted head


def test_fine_tune_trains_every_layer_after_the_probe(transfer_data, tmp_path):
    data, weights = transfer_data
    lines: list[str] = []
    run = fit(transfer_cfg(data, weights, tmp_path / "ft", "fine-tune", epochs=2), progress=False, log=lines.append)
    probe = next(i for i, s in enumerate(lines) if s.startswith("linear probe: L2"))
    epochs = [i for i, s in enumerate(lines) if s.startswith("epoch ")]
    assert len(epochs) == 2 and probe < epochs[0]  # the probe first, then the epochs
    assert [r["epoch"] for r in read_history(run)] == [1, 2]  # the probe adds no row of its own to fine-tuning's
    cfg, state = read_checkpoint(run)
    assert state.epoch == 1 and cfg.model.strategy == "fine-tune"
    with open(run / "model.json") as f:
        meta = json.load(f)
    assert meta["strategy"] == "fine-tune" and meta["training"]["epochs_run"] == 2
    model, _ = load_artifact(run)
    start = load_file(str(weights))
    first_conv = next(k for k in start if k.endswith("weight") and start[k].ndim == 4)
    # the backbone trained too, at its small rate: the last epoch's weights (the kept model.safetensors is the
    # best on validation, which may be the probe's: training.kept)
    last = load_file(str(run / "checkpoint.safetensors"))
    assert not torch.equal(last["model." + first_conv], start[first_conv])
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_fine_tune_optimizer_has_discriminative_rates(transfer_data, tmp_path):
    """The checkpoint's parameter groups: rates from lr / 100 up to lr at the head, no decay on 1-D tensors."""
    from safetensors import safe_open

    data, weights = transfer_data
    cfg = transfer_cfg(data, weights, tmp_path / "ft1", "fine-tune", epochs=1)
    run = fit(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1e-3)), progress=False, log=lambda _: None)
    with safe_open(str(run / "checkpoint.safetensors"), framework="pt") as f:
        groups = json.loads(f.metadata()["imgcls_checkpoint"])["param_groups"]
    assert sorted({g["initial_lr"] for g in groups}) == pytest.approx([1e-5, 1e-3 / 100 ** (2 / 3), 1e-3 / 100 ** (1 / 3), 1e-3])
    assert {g["weight_decay"] for g in groups} == {0.05, 0.0}


def test_auto_strategy_from_the_dataset_size():
    assert resolve_strategy("auto", pretrained=False, n_train=10) == "full"
    assert resolve_strategy("auto", pretrained=True, n_train=10) == "linear-probe"
    assert resolve_strategy("auto", pretrained=True, n_train=5000) == "fine-tune"
    with pytest.raises(ValueError):
        resolve_strategy("sideways", pretrained=True, n_train=10)


@pytest.mark.parametrize("strategy", ["linear-probe", "fine-tune"])
def test_probe_strategies_without_pretrained_weights_are_an_error(tmp_path, strategy):
    """A head fitted on a random backbone validates at chance: refused, with the flags that fix it."""
    from imgcls.training.finetune import resolve_strategy

    with pytest.raises(ValueError, match="--pretrained") as e:
        resolve_strategy(strategy, pretrained=False, n_train=100)
    assert "--strategy full" in str(e.value)
    assert resolve_strategy(strategy, pretrained=True, n_train=100) == strategy


@pytest.mark.parametrize("strategy", ["linear-probe", "fine-tune-last"])
def test_time_budget_trains_on_the_images_the_frozen_pass_can_cover(tmp_path, monkeypatch, strategy):
    """Under --time-budget, where the pretrained network's first pass over every image would not fit
    (a pace of 1 image/s here), a stratified subset is trained and validated on, and the log and
    model.json say how many (MNIST's 54,000 at 224 px took 9 minutes of a 3-minute budget)."""
    from imgcls.training import budget_data

    data = make_split_folders(tmp_path / "data", per_split={"train": 12, "valid": 6}, size=32, seed=4)
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in create_model(ARCH, num_classes=3).state_dict().items()}, str(weights))
    monkeypatch.setattr(budget_data, "pass_rate", lambda *a: 1.0)
    cfg = transfer_cfg(data, weights, tmp_path / "run", strategy, epochs=1)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, time_budget=0.5))
    lines: list[str] = []
    run = fit(cfg, progress=False, log=lines.append)
    meta = json.loads((run / "model.json").read_text())
    kept = meta["split"]["budget_subset"]
    assert kept["of"] == {"train": 36, "val": 18}
    assert 6 <= kept["train"] < 36 and 6 <= kept["val"] < 18  # at least 2 of each of the 3 classes
    assert meta["split"]["counts"]["train"] == kept["train"] and meta["metrics"]["val"]["num_samples"] == kept["val"]
    assert any(s.startswith("time budget: the pretrained network's passes") and "stratified" in s for s in lines)


def test_time_budget_keeps_every_image_when_the_pass_fits(transfer_data, tmp_path):
    data, weights = transfer_data
    cfg = transfer_cfg(data, weights, tmp_path / "run", "linear-probe")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, time_budget=2.0))
    run = fit(cfg, progress=False, log=lambda s: None)
    meta = json.loads((run / "model.json").read_text())
    assert "budget_subset" not in meta["split"] and meta["split"]["counts"]["train"] == 12
