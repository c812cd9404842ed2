"""Training checkpoints (model + optimizer + JSON state in one safetensors file) and the
per-epoch history CSV, both written atomically so a killed run never leaves half a file."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgcls.artifact import atomic_save_tensors
from imgcls.atomic import atomic_write_text
from imgcls.config import RunConfig
from imgcls.report import HISTORY_FIELDS, HISTORY_FILE

CHECKPOINT_FILE = "checkpoint.safetensors"


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Model and optimizer tensors plus JSON state in one safetensors file, written atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, pstate in opt["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
    groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
    atomic_save_tensors(path, tensors, metadata={"imgcls_checkpoint": json.dumps({**state, "param_groups": groups})})


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        state = json.loads(f.metadata()["imgcls_checkpoint"])
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    return state


def read_checkpoint_state(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The JSON state stored in RUN_DIR's checkpoint (epoch, plan, config, model_kwargs...)."""
    from safetensors import safe_open

    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["imgcls_checkpoint"])


def read_checkpoint_config(run_dir: str | os.PathLike) -> RunConfig:
    """The resolved config stored in RUN_DIR's checkpoint (what `--resume` continues with)."""
    return RunConfig.from_dict(read_checkpoint_state(run_dir)["config"])


def write_history(run_dir: Path, history: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in HISTORY_FIELDS})
    atomic_write_text(run_dir / HISTORY_FILE, buf.getvalue())
