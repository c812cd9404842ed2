"""What a run folder records about its training, read back for the report: metrics.csv (one row
per epoch) and probe.csv (the linear probe's L2 sweep, one row per strength tried)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imgcls.atomic import atomic_write_text

HISTORY_FILE = "metrics.csv"
HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "images_per_s"]
PROBE_FILE = "probe.csv"
PROBE_FIELDS = ["l2", "train_loss", "train_acc", "val_loss", "val_acc", "chosen"]


def _read_rows(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else float("nan")) for k, v in row.items()} for row in csv.DictReader(f)]


def read_history(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """RUN_DIR/metrics.csv as one dict of floats per epoch ([] when there is none)."""
    return _read_rows(Path(run_dir) / HISTORY_FILE)


def read_probe_sweep(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """RUN_DIR/probe.csv: per L2 strength tried, train/val loss and accuracy, chosen 1.0 or 0.0."""
    return _read_rows(Path(run_dir) / PROBE_FILE)


def write_probe_sweep(run_dir: str | os.PathLike, sweep: Sequence[dict[str, Any]]) -> Path:
    """RUN_DIR/probe.csv from the probe's candidates ({"reg", "train_loss", "train_acc",
    "val_loss", "val_acc", "chosen"} each; chosen: the L2 strength the probe kept)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=PROBE_FIELDS)
    w.writeheader()
    for row in sweep:
        values = {"l2": row["reg"], **{k: row[k] for k in PROBE_FIELDS[1:-1]}, "chosen": int(bool(row.get("chosen")))}
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items()})
    path = Path(run_dir) / PROBE_FILE
    atomic_write_text(path, buf.getvalue())
    return path
