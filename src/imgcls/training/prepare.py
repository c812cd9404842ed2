"""Prepare a run's data: index DATA, decode every split once (the uint8 cache), split off
validation when DATA has none, and write what the run folder records about it (split.json,
bad_files.csv) with the dataset fingerprint for model.json."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls.atomic import atomic_write_text
from imgcls.config import RunConfig
from imgcls.data import DatasetIndex, dataset_fingerprint, index_dataset, load_split, stratified_split
from imgcls.models import get_entry
from imgcls.transforms import PreprocessSpec

BAD_FILES = "bad_files.csv"
SPLIT_FILE = "split.json"


@dataclass
class SplitData:
    """One split, decoded."""

    images: torch.Tensor  # (N, S, S, 3) uint8
    labels: torch.Tensor  # (N,) int64
    paths: list[str]
    hashes: list[str]


@dataclass
class RunData:
    """What a run trains and evaluates on, and what the run folder says about it."""

    index: DatasetIndex
    splits: dict[str, SplitData]  # "train", and "val" / "test" when there are any
    failures: list[tuple[str, str]]  # (path, reason) of the files that could not be decoded
    split_info: dict[str, Any]  # model.json "split": method, seed, counts...
    fingerprint: str

    @property
    def train(self) -> SplitData:
        return self.splits["train"]

    @property
    def val(self) -> SplitData | None:
        return self.splits.get("val")

    @property
    def test(self) -> SplitData | None:
        return self.splits.get("test")

    @property
    def class_names(self) -> list[str]:
        return self.index.class_names


def resolve_spec(cfg: RunConfig) -> PreprocessSpec:
    """The model entry's default preprocessing, with the user's size/resize/crop overrides."""
    spec = get_entry(cfg.model.name).default_spec
    changes = {
        k: v
        for k, v in (("img_size", cfg.data.img_size), ("resize_mode", cfg.data.resize_mode), ("crop_pct", cfg.data.crop_pct))
        if v is not None
    }
    return spec.replace(**changes) if changes else spec


def prepare_run(cfg: RunConfig, spec: PreprocessSpec, run_dir: Path, progress: bool, log: Callable[[str], None]) -> RunData:
    """Index and decode DATA, write RUN_DIR/split.json (and bad_files.csv when files were left out)."""
    index = index_dataset(cfg.data.path, allow_outside_root=cfg.data.allow_outside_root)
    log(index.summary())
    splits, failures, split_info = decode_splits(cfg, index, spec, progress, log)
    if failures:
        buf = io.StringIO()
        csv.writer(buf).writerows([("path", "reason"), *failures])
        atomic_write_text(run_dir / BAD_FILES, buf.getvalue())
        log(f"{len(failures)} file(s) could not be decoded and were left out (list: {run_dir / BAD_FILES}):")
        for p, why in failures[:5]:
            log(f"  {p}: {why}")
    root = index.root.parent if index.root.is_file() else index.root
    atomic_write_text(run_dir / SPLIT_FILE, json.dumps({k: [os.path.relpath(p, root) for p in v.paths] for k, v in splits.items()}))
    all_paths = [p for s in splits.values() for p in s.paths]
    all_labels = [int(y) for s in splits.values() for y in s.labels]
    fingerprint = dataset_fingerprint(all_paths, all_labels, [h for s in splits.values() for h in s.hashes], index.class_names, root)
    return RunData(index, splits, failures, split_info, fingerprint)


def decode_splits(
    cfg: RunConfig, index: DatasetIndex, spec: PreprocessSpec, progress: bool, log: Callable[[str], None]
) -> tuple[dict[str, SplitData], list[tuple[str, str]], dict[str, Any]]:
    """Decode every split once, drop bad files, and split off validation if DATA has none."""
    d = cfg.data
    decoded: dict[str, SplitData] = {}
    failures: list[tuple[str, str]] = []
    for name, samples in index.splits.items():
        dec, labels = load_split(samples, spec, d.cache_dir, d.workers, d.max_pixels, progress, f"decode {name}")
        failures += dec.failures
        decoded[name] = SplitData(torch.from_numpy(np.ascontiguousarray(dec.images)), torch.from_numpy(labels), dec.paths, dec.hashes)
    source = "train" if "train" in decoded else "all"
    if source not in decoded or len(decoded[source].paths) == 0:
        raise ValueError(f"{index.root}: no usable training images")
    split_info: dict[str, Any] = {"layout": index.layout, "seed": d.seed}
    if "val" not in decoded and d.val_fraction > 0:
        full = decoded.pop(source)
        tr, va = stratified_split(full.labels.numpy(), d.val_fraction, d.seed, index.class_names)
        for name, idx in (("train", tr), ("val", va)):
            ti = torch.from_numpy(idx)
            decoded[name] = SplitData(full.images[ti], full.labels[ti], [full.paths[i] for i in idx], [full.hashes[i] for i in idx])
        split_info.update(method="stratified", val_fraction=d.val_fraction)
    else:
        if source == "all":
            decoded["train"] = decoded.pop("all")
        split_info.update(method="folders" if index.layout != "csv" else "manifest", val_fraction=0.0 if "val" not in decoded else None)
    split_info["counts"] = {k: int(len(v.paths)) for k, v in decoded.items()}
    for c, name in enumerate(index.class_names):
        if int((decoded["train"].labels == c).sum()) == 0:
            log(f"warning: class {name!r} has no training images")
    return decoded, failures, split_info
