"""Prepare a run: the run folder (refused when it holds another model, cleared of an earlier
run's files) and the data: index DATA (less the files an audit marked, --exclude-from), decode every split once
(the uint8 cache), split off validation when DATA has none, warn about duplicates across splits,
conflicting labels and imbalance (the audit's quick checks), and write what the run folder records
about it (split.json, bad_files.csv) with the dataset fingerprint for model.json."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls.artifact import META_FILE, WEIGHTS_FILE
from imgcls.atomic import atomic_write_text
from imgcls.audit.quick import drop_excluded, excluded_paths, quick_checks
from imgcls.config import RunConfig
from imgcls.data import DatasetIndex, dataset_fingerprint, index_dataset, load_split, stratified_split
from imgcls.decode import decoded_bytes, needs_spill
from imgcls.models import get_entry
from imgcls.multilabel import iterative_stratified_split, label_strings
from imgcls.report import HISTORY_FILE, PROBE_FILE
from imgcls.training.checkpoint import CHECKPOINT_FILE
from imgcls.transforms import PreprocessSpec

BAD_FILES = "bad_files.csv"
SPLIT_FILE = "split.json"
MODEL_FILES = (META_FILE, WEIGHTS_FILE, CHECKPOINT_FILE)  # a folder with any of them holds a model
# What imgcls writes into a run folder: training's files, and `imgcls export`'s model.onnx and
# model.int8.onnx (model.*), which would describe the earlier model. Not audit.json: it describes
# the data, and `imgcls audit DATA --out RUN` may have put it there for this run's report.
RUN_FILES = ("model.*", "checkpoint.*", "ood.*", HISTORY_FILE, PROBE_FILE, SPLIT_FILE, BAD_FILES)  # ood.*: inference.trust.OOD_FILE
RUN_DIRS = ("report", "evaluation")  # training's report, `imgcls evaluate`'s default output


class RunFolderError(ValueError):
    """The run folder cannot take the run as asked (it holds another model)."""


@dataclass
class SplitData:
    """One split, decoded."""

    images: torch.Tensor  # (N, S, S, 3) uint8
    labels: torch.Tensor  # (N,) int64, or multi-label (N, C) float32 multi-hot
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
    excluded: int = 0  # files left out because --exclude-from's audit.json marked them

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


def check_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse RUN_DIR when it holds a model (MODEL_FILES) and the run neither resumes it (`resume`)
    nor replaces it (`overwrite`): a new run would overwrite it epoch by epoch, and one killed after
    its first epoch would leave a one-epoch model of other data in its place."""
    if resume and overwrite:
        raise RunFolderError(f"{run_dir}: resume continues the run there and overwrite replaces it; choose one")
    held = [n for n in MODEL_FILES if os.path.lexists(run_dir / n)]
    if held and not (resume or overwrite):
        raise RunFolderError(
            f"{run_dir} already holds a model ({', '.join(held)}); train into another folder, continue that run with --resume, "
            f"or replace it with --overwrite (deletes its model, checkpoint, metrics, report and evaluations)"
        )


def clear_run_folder(run_dir: Path, resume: bool, overwrite: bool, log: Callable[[str], None]) -> None:
    """Before the run's first write: a new run (not resumed) removes what an earlier run left under
    the RUN_FILES names (bad_files.csv of a run that had bad files, a stale model.onnx...), and with
    `overwrite` the RUN_DIRS too, so the folder holds nothing its new model.json does not describe.
    Links are removed, never followed; a link planted at RUN_DIRS is removed in every case (writing
    into it would write wherever it points)."""
    check_run_folder(run_dir, resume, overwrite)
    # A resumed run keeps the files, but not the temp files of writes its killed run left half done.
    removed = remove_run_files(run_dir, with_dirs=False, temps_only=True) if resume else remove_run_files(run_dir, with_dirs=overwrite)
    for name in RUN_DIRS:
        if (run_dir / name).is_symlink():
            (run_dir / name).unlink()
            removed.append(name)
    if removed:
        log(f"removed from {run_dir} (left by an earlier run): {', '.join(sorted(set(removed)))}")


def remove_run_files(run_dir: Path, with_dirs: bool, temps_only: bool = False) -> list[str]:
    """Delete the files named by RUN_FILES in RUN_DIR (links themselves, not their targets), their
    atomic writes' temp files left by a killed run, and with `with_dirs` the RUN_DIRS; the names removed.
    temps_only: the temp files alone."""
    if not run_dir.is_dir():
        return []
    removed = []
    for pattern in RUN_FILES:
        files = [] if temps_only else run_dir.glob(pattern)
        for p in [*files, *run_dir.glob(f".{pattern}.*.tmp")]:  # imgcls.atomic's temp names
            if p.is_symlink() or p.is_file():
                p.unlink()
                removed.append(p.name)
    for name in RUN_DIRS if with_dirs else ():
        p = run_dir / name
        if p.is_symlink():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)  # removes links inside it, never what they point to
        else:
            continue
        removed.append(name + "/")
    return removed


def prepare_run(
    cfg: RunConfig,
    spec: PreprocessSpec,
    run_dir: Path,
    progress: bool,
    log: Callable[[str], None],
    resume: bool = False,
    overwrite: bool = False,
    write: bool = True,
) -> RunData:
    """Index and decode DATA, clear RUN_DIR of an earlier run's files (`clear_run_folder`), write
    RUN_DIR/split.json (and bad_files.csv when files were left out). write False (distributed
    ranks other than 0): touch nothing in RUN_DIR."""
    d = cfg.data
    index = index_dataset(d.path, allow_outside_root=d.allow_outside_root, task=d.task, label_sep=d.label_sep)
    log(index.summary())
    excluded = leave_out_excluded(index, cfg.data.exclude_from, log) if cfg.data.exclude_from else 0
    splits, failures, split_info = decode_splits(cfg, index, spec, progress, log, spill_dir=run_dir)
    # Only now that DATA indexed and decoded: a typo in DATA or --exclude-from must not cost the earlier model.
    if write:
        clear_run_folder(run_dir, resume, overwrite, log)
    warn_quick_checks(index, splits, log)
    if failures and write:
        buf = io.StringIO()
        csv.writer(buf).writerows([("path", "reason"), *failures])
        atomic_write_text(run_dir / BAD_FILES, buf.getvalue())
        log(f"{len(failures)} file(s) could not be decoded and were left out (list: {run_dir / BAD_FILES}):")
        for p, why in failures[:5]:
            log(f"  {p}: {why}")
    root = index.root.parent if index.root.is_file() else index.root
    if write:
        atomic_write_text(run_dir / SPLIT_FILE, json.dumps({k: [os.path.relpath(p, root) for p in v.paths] for k, v in splits.items()}))
    all_paths = [p for s in splits.values() for p in s.paths]
    all_hashes = [h for s in splits.values() for h in s.hashes]
    if index.multilabel:  # each image's label set as its "class": "a;b"
        names = [n for s in splits.values() for n in label_strings(s.labels.numpy(), index.class_names)]
        fingerprint = dataset_fingerprint(all_paths, list(range(len(names))), all_hashes, names, root)
    else:
        all_labels = [int(y) for s in splits.values() for y in s.labels]
        fingerprint = dataset_fingerprint(all_paths, all_labels, all_hashes, index.class_names, root)
    return RunData(index, splits, failures, split_info, fingerprint, excluded)


def leave_out_excluded(index: DatasetIndex, audit_json: str, log: Callable[[str], None]) -> int:
    """Drop from `index` (in place, before splitting and decoding) the files `audit_json` marks
    "exclude" (imgcls.audit.quick.excluded_paths); how many were dropped."""
    try:
        excluded = excluded_paths(audit_json)
    except (KeyError, TypeError, AttributeError) as e:  # JSON, but not an audit's (a missing file or bad JSON says so itself)
        raise ValueError(f"{audit_json}: not an audit.json from `imgcls audit` ({type(e).__name__}: {e})") from None
    total = 0
    for name, rows in index.splits.items():
        index.splits[name], dropped = drop_excluded(rows, excluded)
        total += dropped
    log(f"left out {total} file(s) that {audit_json} marks to exclude ({len(excluded)} listed)")
    if not any(index.splits.values()):
        raise ValueError(f"{index.root}: no images left after leaving out the files {audit_json} lists")
    return total


def warn_quick_checks(index: DatasetIndex, splits: dict[str, SplitData], log: Callable[[str], None]) -> None:
    """Log the audit's cheap checks (duplicates across splits, one image under two classes, class
    imbalance) on the splits as the run uses them: a validation split cut from DATA counts as a split,
    so a duplicate that lands in train and val is caught. Uses the decode step's content hashes;
    nothing is changed or left out."""
    if index.multilabel:  # duplicates across splits only: classes and their balance are single-label notions
        as_run = DatasetIndex(index.root, index.layout, ["image"], {name: [(p, 0) for p in s.paths] for name, s in splits.items()})
    else:
        as_run = DatasetIndex(
            index.root, index.layout, index.class_names, {name: list(zip(s.paths, s.labels.tolist())) for name, s in splits.items()}
        )
    hashes = {p: h for s in splits.values() for p, h in zip(s.paths, s.hashes)}
    for warning in quick_checks(as_run, hashes):
        log(f"warning: {warning}")


def plan_splits(index: DatasetIndex, val_fraction: float, seed: int) -> tuple[dict[str, list[tuple[str, int]]], dict[str, Any]]:
    """The file lists to decode by split name (train, val, test), and split.json's record of how:
    without a validation split in DATA, `val_fraction` of the training files, stratified by class."""
    splits = dict(index.splits)
    source = "train" if "train" in splits else "all"
    if not splits.get(source):
        raise ValueError(f"{index.root}: no usable training images")
    info: dict[str, Any] = {"layout": index.layout, "seed": seed}
    if "val" not in splits and val_fraction > 0:
        pool = splits.pop(source)
        labels = np.asarray([y for _, y in pool], dtype=np.int64)
        if index.multilabel:  # every label in both parts
            tr, va = iterative_stratified_split(index.targets[labels], val_fraction, seed, index.class_names)
        else:
            tr, va = stratified_split(labels, val_fraction, seed, index.class_names)
        splits["train"], splits["val"] = [pool[i] for i in tr], [pool[i] for i in va]
        info.update(method="iterative-stratified" if index.multilabel else "stratified", val_fraction=val_fraction)
    else:
        if source == "all":
            splits["train"] = splits.pop("all")
        info.update(method="folders" if index.layout != "csv" else "manifest", val_fraction=0.0 if "val" not in splits else None)
    return splits, info


def decode_splits(
    cfg: RunConfig, index: DatasetIndex, spec: PreprocessSpec, progress: bool, log: Callable[[str], None], spill_dir: Path | None = None
) -> tuple[dict[str, SplitData], list[tuple[str, str]], dict[str, Any]]:
    """Split off validation if DATA has none, then decode every split once and drop bad files.

    The file list is split before decoding: decoding the pool and then copying out its two parts
    held every image twice (MNIST's 60,000 at 224 px: 24 GB, killed for memory). A split whose
    images would not fit beside training (`needs_spill`) is decoded into a file in `spill_dir`."""
    d = cfg.data
    splits, split_info = plan_splits(index, d.val_fraction, d.seed)
    decoded: dict[str, SplitData] = {}
    failures: list[tuple[str, str]] = []
    for name, samples in splits.items():
        spill = None
        if d.cache_dir is None and spill_dir is not None and needs_spill(decoded_bytes(len(samples), spec)):
            spill = spill_dir
            log(
                f"decode {name}: {len(samples):,} images at {spec.cache_size} px take {decoded_bytes(len(samples), spec) / 1e9:.1f} GB, "
                f"more than half the memory available: decoded into a temporary file in {spill_dir} (--cache-dir keeps one)"
            )
        dec, labels = load_split(samples, spec, d.cache_dir, d.workers, d.max_pixels, progress, f"decode {name}", index.targets, spill)
        failures += dec.failures
        decoded[name] = SplitData(torch.from_numpy(np.ascontiguousarray(dec.images)), torch.from_numpy(labels), dec.paths, dec.hashes)
    if not decoded["train"].paths:
        raise ValueError(f"{index.root}: no usable training images")
    split_info["counts"] = {k: int(len(v.paths)) for k, v in decoded.items()}
    train_labels = decoded["train"].labels
    per_class = train_labels.sum(0) if index.multilabel else torch.bincount(train_labels, minlength=len(index.class_names))
    for c, name in enumerate(index.class_names):
        if int(per_class[c]) == 0:
            log(f"warning: {'label' if index.multilabel else 'class'} {name!r} has no training images")
    return decoded, failures, split_info
