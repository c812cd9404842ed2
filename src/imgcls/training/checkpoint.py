"""What a run writes while it trains: the training state (`TrainState`), checkpoints (model +
optimizer + JSON state in one safetensors file), the per-epoch history CSV and the kept model,
all written atomically so a killed run never leaves half a file (`RunFolder`)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgcls.artifact import atomic_save_tensors, save_artifact
from imgcls.atomic import atomic_write_text
from imgcls.config import RunConfig
from imgcls.report import HISTORY_FIELDS, HISTORY_FILE

CHECKPOINT_FILE = "checkpoint.safetensors"
_META_KEY = "imgcls_checkpoint"


@dataclass
class TrainState:
    """Where a run stands after an epoch: everything --resume continues from besides the tensors.

    Epochs are 0-based here (metrics.csv and the log count from 1). planned_epochs and
    total_steps are the schedule's length, which a time budget re-plans after every epoch;
    train_precision is the autocast dtype the run chose ("float32" for none); model_kwargs are
    the builder's arguments beyond num_classes (a time budget may narrow small_cnn).
    """

    planned_epochs: int
    total_steps: int
    train_precision: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epoch: int = -1  # the last finished epoch; -1 before the first
    best_epoch: int = -1
    best_acc: float = -1.0
    best_loss: float = math.inf
    bad_epochs: int = 0  # epochs since the last improvement (early stopping counts them)
    history: list[dict[str, float]] = field(default_factory=list)  # one metrics.csv row per epoch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        """Read a checkpoint's JSON (keys other than the state's, such as "config", are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def record_epoch(self, epoch: int, row: dict[str, float], has_val: bool, key: str = "val_acc") -> bool:
        """Add `epoch`'s metrics.csv row; True when its weights are the best so far: the higher
        validation accuracy (row[key]: "val_balanced_acc" while classes are rebalanced), the lower
        validation loss on a tie; every epoch without validation."""
        val_loss, val_acc = row["val_loss"], row[key]
        improved = not has_val or val_acc > self.best_acc or (val_acc == self.best_acc and val_loss < self.best_loss)
        self.history.append(row)
        if improved:
            self.best_epoch, self.best_acc, self.best_loss, self.bad_epochs = epoch, val_acc if has_val else row["train_acc"], val_loss, 0
        else:
            self.bad_epochs += 1
        self.epoch = epoch
        return improved


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, config: dict[str, Any]) -> None:
    """Model and optimizer tensors, the state and the run's config as JSON, in one safetensors file."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, pstate in opt["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
    groups = [dict(g) for g in opt["param_groups"]]
    atomic_save_tensors(path, tensors, metadata={_META_KEY: json.dumps({**state.to_dict(), "config": config, "param_groups": groups})})


def _read_json(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[_META_KEY])


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Put the checkpoint's tensors into `model` and `optimizer` (built as the run built them); its state."""
    from safetensors.torch import load_file

    saved = _read_json(path)
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": saved["param_groups"]})
    return TrainState.from_dict(saved)


def read_checkpoint(run_dir: str | os.PathLike) -> tuple[RunConfig, TrainState]:
    """The config stored in RUN_DIR's checkpoint (what `--resume` continues with) and its state."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    saved = _read_json(path)
    return RunConfig.from_dict(saved["config"]), TrainState.from_dict(saved)


def write_history(run_dir: Path, history: list[dict[str, float]]) -> None:
    """RUN_DIR/metrics.csv, one row per epoch."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in HISTORY_FIELDS})
    atomic_write_text(run_dir / HISTORY_FILE, buf.getvalue())


@dataclass(frozen=True)
class RunFolder:
    """The run folder as training writes it: the model kept so far (model.safetensors +
    model.json, `meta` plus what the call adds), the checkpoint and metrics.csv."""

    path: Path
    meta: dict[str, Any]  # model.json's common part: arch, class names, preprocess, config, dataset...
    config: dict[str, Any]  # RunConfig.to_dict(), stored in the checkpoint for --resume

    def save_model(
        self, model: nn.Module, training: dict[str, Any], metrics: dict[str, Any] | None = None, sections: dict[str, Any] | None = None
    ) -> None:
        """model.safetensors + model.json: `meta`, `sections` (the final save's calibration...), metrics, training."""
        extra = {"metrics": metrics} if metrics is not None else {}
        save_artifact(self.path, model, {**self.meta, **(sections or {}), **extra, "training": training})

    def save_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> None:
        save_checkpoint(self.path / CHECKPOINT_FILE, model, optimizer, state, self.config)

    def write_history(self, history: list[dict[str, float]]) -> None:
        write_history(self.path, history)
