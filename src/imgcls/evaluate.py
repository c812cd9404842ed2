"""Evaluation: a trained model folder on a labeled dataset -> metrics, plots and an HTML report."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from imgcls.artifact import load_artifact, resolve_artifact_dir, spec_of
from imgcls.config import DEFAULT_MAX_PIXELS
from imgcls.data import DatasetError, DatasetIndex, DecodedImages, index_dataset, load_split
from imgcls.inference.answer import postprocess
from imgcls.inference.runners import FeaturesAndLogits, split_features
from imgcls.inference.trust import Trust, read_ood_stats, trust_metrics
from imgcls.metrics import classification_metrics
from imgcls.multilabel import multilabel_metrics
from imgcls.report import MultiLabelPredictions, Predictions, read_history, read_probe_sweep, write_report
from imgcls.runtime import (
    CompiledForward,
    batched_logits,
    prepare_inference_model,
    resolve_device,
    resolve_precision,
    resolve_tta,
    tta_view_count,
)
from imgcls.threads import ThreadTuner


def choose_split(index: DatasetIndex, split: str | None) -> str:
    """The split to evaluate: the one asked for, else test, else val, else everything."""
    if split:
        if split not in index.splits:
            raise DatasetError(f"{index.root}: no {split!r} split (found: {', '.join(index.splits)})")
        return split
    for name in ("test", "val", "all"):
        if name in index.splits:
            return name
    return next(iter(index.splits))


def _check_classes(data_path: str | os.PathLike, class_names: list[str], allow_outside_root: bool = False, **how: str) -> None:
    """Every class folder / label in the data must be one the model knows. how: index_dataset's
    task and label_sep (a multi-label model's)."""
    probe = index_dataset(data_path, allow_outside_root=allow_outside_root, **how)
    unknown = sorted(set(probe.class_names) - set(class_names))
    if unknown:
        raise DatasetError(
            f"{data_path}: classes not known to the model: {', '.join(unknown[:10])} (the model has "
            f"{len(class_names)}: {', '.join(class_names[:10])}{'...' if len(class_names) > 10 else ''})"
        )


def data_name(data_path: str | os.PathLike) -> str:
    """The data's folder (or manifest) name, of the resolved path: `imgcls evaluate run ..` names
    the parent folder, not '..'; "data" for the file-system root."""
    return Path(data_path).resolve().name or "data"


def default_out_dir(model_dir: Path, data_path: str | os.PathLike) -> Path:
    """MODEL/evaluation/<data name>: one folder inside MODEL/evaluation whatever the data path (a
    resolved path's name is never '.', '..' or empty, and holds no separator). The name as given was
    used before: for '..' that was MODEL itself, whose files the report then overwrote."""
    return model_dir / "evaluation" / data_name(data_path)


def evaluate(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    split: str | None = None,
    out_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    workers: int = 0,
    top_losses: int = 20,
    tta: str | None = "auto",
    compile: str = "auto",
    allow_outside_root: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    report_file: str | os.PathLike | None = None,
    audit: str | os.PathLike | None = None,
    coverage: float | None = None,
    unknown_threshold: float | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Metrics of the model in `model_path` on `data_path` (any dataset layout).

    Probabilities are calibrated with the model's temperature (`inference.trust`), as predict's
    are: "ece" is after it, "ece_uncalibrated" before. With an "unknown" threshold (model.json's,
    or unknown_threshold; 0: off), "unknown" gives the share of images accepted and the accuracy
    on them; accuracy and the other metrics count every image by its top class. coverage (e.g.
    0.9): the conformal prediction sets' empirical "coverage" and "mean_set_size".

    Images go through the model's saved preprocessing. tta="auto" uses the test-time augmentation
    that model.json recommends (as predict does), or give none/flip/translate/flip-translate.
    compile: torch.compile the model when the pass is long enough to pay ("auto"), "on" or "off"
    (`runtime.CompiledForward`). threads: torch intra-op threads (None: one or every usable
    core, whichever the first batches ran faster; `threads.ThreadTuner`). allow_outside_root: a CSV manifest may name files outside its
    folder (see `data.index_dataset`). Writes metrics.json, confusion matrix
    (text and PNG), training curves and report.html to `out_dir` (default `default_out_dir`);
    report_file: write only the self-contained report page, to this path (`imgcls report`).
    audit: an audit.json to summarise in the report (default MODEL/audit.json when there is one).
    The report's gallery shows the `top_losses` worst mistakes.
    """
    model_dir = resolve_artifact_dir(model_path)
    dev = resolve_device(device)
    model, meta = load_artifact(model_dir, device=dev)
    trust = Trust.from_meta(meta, unknown_threshold, read_ood_stats(model_dir, meta))
    if coverage is not None:
        trust.qhat(coverage)  # a model without conformal scores fails before any image is decoded
    class_names = meta["class_names"]
    name, decoded, labels = _decode_split(data_path, meta, split, workers, allow_outside_root, progress, log)
    tta_mode = resolve_tta(tta, meta)
    out = _forward(model, trust, decoded.images, meta, dev, precision, tta_mode, compile, threads, batch_size, progress, log)
    features, logits = split_features(out, len(class_names)) if trust.uses_features else (None, out)
    probs = postprocess(logits, trust, features).probs  # (N, C) calibrated, as predict answers
    if trust.multilabel:  # a sigmoid per label, each decided by its threshold in model.json
        metrics = multilabel_metrics(probs, labels, trust.thresholds, class_names)
        predictions: Predictions | MultiLabelPredictions = MultiLabelPredictions(probs, labels, decoded.paths, trust.thresholds)
    else:
        metrics = {**classification_metrics(probs, labels, class_names), **trust_metrics(logits, labels, trust, coverage, features)}
        predictions = Predictions(probs, labels, decoded.paths)
    metrics.update(split=name, data=str(data_path), model=str(model_dir), skipped_files=len(decoded.failures), tta=tta_mode)
    skipped = len(decoded.failures) or None
    facts = {"model": f"{meta['arch']} ({model_dir})", "data": f"{data_path} ({name} split)", "TTA": tta_mode, "skipped files": skipped}
    report = write_report(
        Path(out_dir) if out_dir else default_out_dir(model_dir, data_path),
        metrics,
        class_names,
        read_history(model_dir),
        title=f"{meta['arch']} on {data_name(data_path)} ({name})",
        predictions=predictions,
        model_dir=model_dir,
        probe_sweep=read_probe_sweep(model_dir),
        audit=audit,
        top_losses=top_losses,
        facts=facts,
        html_path=report_file,
        files=report_file is None,
        log=log,
    )
    metrics["report"] = str(report)
    predicted = (probs >= np.asarray(trust.thresholds)[None, :]).astype(int) if trust.multilabel else probs.argmax(1)  # (N, C) or (N,)
    metrics["predictions"] = {"paths": decoded.paths, "predicted": predicted.tolist(), "labels": labels.astype(int).tolist()}
    return metrics


def _forward(
    model: Any,
    trust: Trust,
    images: np.ndarray,
    meta: dict[str, Any],
    dev: Any,
    precision: str,
    tta_mode: str,
    compile: str,
    threads: int | None,
    batch_size: int | None,
    progress: bool,
    log: Callable[[str], None],
) -> Any:
    """The model over the decoded images (N, S, S, 3) as predict runs it (inference precision, TTA,
    compiled when it pays, threads chosen by timing): logits (N, C), or (N, F + C) with the pooled
    features first when the "unknown" rule needs them."""
    model, amp_dtype = prepare_inference_model(model, dev, resolve_precision(precision, dev))  # as predict does
    forward = CompiledForward(FeaturesAndLogits(model) if trust.uses_features else model, compile, log)  # mahalanobis/knn: features too
    forward.expect(len(images) * tta_view_count(tta_mode))
    # intra-op threads: `threads`, else one or every usable core, timed on the first batches (CPU only: CUDA's are asynchronous)
    tuned = forward
    if dev.type == "cpu":
        tuned = ThreadTuner(fixed=threads or None, log=log).wrap(forward, lambda: forward.compiled is not None)
    return batched_logits(
        model,
        images,
        spec_of(meta),
        batch_size=batch_size,
        device=dev,
        amp_dtype=amp_dtype,
        progress=progress,
        tta=tta_mode,
        forward=tuned,
        tta_select=float(meta.get("tta_select", 1.0)),  # selective TTA as the model was trained to use it (--tta-select)
        logit_cols=len(meta["class_names"]) if trust.uses_features else None,
    )


def _decode_split(
    data_path: str | os.PathLike,
    meta: dict[str, Any],
    split: str | None,
    workers: int,
    allow_outside_root: bool,
    progress: bool,
    log: Callable[[str], None],
) -> tuple[str, DecodedImages, np.ndarray]:
    """The chosen split of `data_path` decoded with the model's preprocessing: (split name,
    DecodedImages, labels (N,), or a multi-label model's multi-hot targets (N, C)); files that
    cannot be decoded are logged and left out. A multi-label model reads DATA as a multi-label
    manifest (either form, with the separator it was trained with)."""
    class_names = meta["class_names"]
    data_cfg = meta.get("config", {}).get("data", {})
    how = {"task": "multi-label", "label_sep": data_cfg.get("label_sep", ";")} if meta.get("task") == "multi-label" else {}
    _check_classes(data_path, class_names, allow_outside_root, **how)
    index = index_dataset(data_path, class_names=class_names, allow_outside_root=allow_outside_root, **how)
    name = choose_split(index, split)
    max_pixels = data_cfg.get("max_pixels", DEFAULT_MAX_PIXELS)
    samples = index.splits[name]
    decoded, labels = load_split(samples, spec_of(meta), None, workers, max_pixels, progress, f"decode {name}", index.targets)
    for path, why in decoded.failures:
        log(f"skipped {path}: {why}")
    if len(labels) == 0:
        raise DatasetError(f"{data_path}: no image could be decoded in split {name!r}")
    return name, decoded, labels
