"""Step 6 of `fit` (fit.py), once the best weights are kept: calibrate them on the validation split,
evaluate them on the final splits, write the final model.json (`finish_run`; multi-label data:
training.multilabel.finish_multilabel), and the run's report (`report_run`)."""

from __future__ import annotations

import copy
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgcls.config import FEATURE_OOD_METHODS, OOD_FIT_MAX_IMAGES
from imgcls.inference.answer import postprocess
from imgcls.inference.runners import FeaturesAndLogits, split_features
from imgcls.inference.trust import (
    OOD_FILE,
    Trust,
    describe_fit,
    fit_feature_rule,
    fit_trust,
    trust_metrics,
    uncalibrated,
    write_ood_stats,
)
from imgcls.metrics import classification_metrics
from imgcls.report import MultiLabelPredictions, Predictions, read_probe_sweep, write_report
from imgcls.runtime import prepare_inference_model
from imgcls.training.build import Evaluation, Log
from imgcls.training.checkpoint import RunFolder
from imgcls.training.finetune import extract_features
from imgcls.training.loop import final_logits
from imgcls.training.prepare import RunData, SplitData


def finish_run(
    folder: RunFolder,
    ev: Evaluation,
    training: dict[str, Any],
    t_start: float,
    log: Log = print,
    unknown_method: str = "msp",
    train: SplitData | None = None,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Step 6, once the best weights are kept: calibrate them on the validation split
    (`inference.trust.fit_trust`: temperature, "unknown" threshold, conformal scores), evaluate
    them on the final splits with that calibration, and write the final model.json (with the
    calibration, `training` and the run's wall time); return the metrics and the calibrated
    probabilities (N, num_classes) per split (the report draws from them). A mahalanobis or knn
    `unknown_method` also reads the pooled features of the final splits and of (at most
    OOD_FIT_MAX_IMAGES of) the `train` split, and saves its statistics as inference.trust.OOD_FILE.
    """
    from imgcls.artifact import load_artifact

    best, _ = load_artifact(folder.path, device=ev.device)  # the kept (best) epoch, as saved
    # prepare_inference_model converts a model to bf16 in place where bf16 pays, so it gets a copy:
    # `best` stays as trained, for the artifact saved below.
    best_eval, eval_dtype = prepare_inference_model(copy.deepcopy(best), ev.device, ev.amp_dtype)  # what evaluate and predict run
    logits, labels, feats = {}, {}, {}
    with_features = unknown_method in FEATURE_OOD_METHODS and train is not None and len(train.paths) > 0
    final = final_logits(FeaturesAndLogits(best_eval) if with_features else best_eval, ev, eval_dtype)
    for name, (z, y) in final.items():  # z: (N, num_classes), or (N, F + num_classes) with the pooled features first
        logits[name], labels[name] = z, y.numpy()
        if with_features:
            feats[name], logits[name] = split_features(z, len(folder.meta["class_names"]))
    # Calibrated on the logits evaluate and predict compute (the kept weights, their precision, the TTA).
    method = "msp" if unknown_method in FEATURE_OOD_METHODS else unknown_method  # a feature rule keeps msp as its fallback
    sections = fit_trust(logits["val"], labels["val"], method) if "val" in logits else uncalibrated("no validation split")
    stats = None
    if with_features and "unknown" in sections:
        train_feats, train_labels = ood_train_features(best_eval, train, ev, eval_dtype, seed)
        sections, stats = fit_feature_rule(sections, unknown_method, feats["val"], train_feats, train_labels, seed)
        write_ood_stats(folder.path, stats)  # before model.json, which names it
        log(f"'unknown' rule: {unknown_method} on the pooled features of {len(train_labels)} training images ({OOD_FILE})")
    elif unknown_method != method and "unknown" in sections:
        log(f"--unknown-method {unknown_method}: no training images to fit it on; the 'unknown' rule stays msp")
    log(describe_fit(sections))
    trust = Trust.from_meta(sections, stats=stats)
    probs = {name: postprocess(z, trust, feats.get(name)).probs for name, z in logits.items()}
    metrics: dict[str, Any] = {
        name: {
            **classification_metrics(probs[name], labels[name], folder.meta["class_names"]),
            **trust_metrics(z, labels[name], trust, features=feats.get(name)),
        }
        for name, z in logits.items()
    }
    training = {
        **training,
        "wall_time_s": round(time.perf_counter() - t_start, 2),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    folder.save_model(best, training, metrics, sections)
    return metrics, probs


def ood_train_features(
    model: nn.Module, train: SplitData, ev: Evaluation, amp_dtype: torch.dtype | None, seed: int
) -> tuple[torch.Tensor, np.ndarray]:
    """Pooled features (n, F) and labels (n,) of at most OOD_FIT_MAX_IMAGES training images (a
    seeded random subset beyond), for a feature-space "unknown" rule. One view per image, no TTA:
    they are the reference statistics, the validation images that set the threshold get the TTA."""
    idx = np.arange(len(train.paths))
    if len(idx) > OOD_FIT_MAX_IMAGES:
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), OOD_FIT_MAX_IMAGES, replace=False))
    images = train.images[torch.from_numpy(idx)].numpy()  # (n, S, S, 3) uint8
    return extract_features(model, images, ev.spec, ev.device, amp_dtype, progress=ev.progress), train.labels.numpy()[idx]


def report_run(
    run_dir: Path,
    metrics: dict[str, Any],
    probs: dict[str, np.ndarray],
    data: RunData,
    history: list[dict[str, float]],
    arch: str,
    log: Log,
    ev: Evaluation,
) -> None:
    """report/ (plots and report.html) on the validation split, else the test split, from the
    calibrated probabilities finish_run computed (per-image sections: top losses with Grad-CAM,
    confused pairs, reliability diagram)."""
    split = "val" if "val" in metrics else ("test" if "test" in metrics else None)
    if split:
        s = data.splits[split]
        labels, m = s.labels.numpy(), metrics[split]
        if labels.ndim == 2:  # multi-label: (N, C) targets, each label decided by its threshold
            pred: Predictions | MultiLabelPredictions = MultiLabelPredictions(
                probs[split], labels, s.paths, np.array([p["threshold"] for p in m["per_label"]])
            )
        else:
            pred = Predictions(probs[split], labels, s.paths)
        write_report(
            run_dir / "report",
            metrics[split],
            data.class_names,
            history,
            title=f"{arch} on {split} ({data.index.root.name})",
            predictions=pred,
            model_dir=run_dir,
            probe_sweep=read_probe_sweep(run_dir),
            facts={"model": f"{arch} ({run_dir})", "data": f"{data.index.root} ({split} split)", "TTA": ev.tta},
            log=log,
        )
        score = f"macro mAP {m['macro_map']:.4f}" if labels.ndim == 2 else f"accuracy {m['accuracy']:.4f}"
        log(f"{split}: {score}  macro-F1 {m['macro_f1']:.4f}  report: {run_dir / 'report' / 'report.html'}")
    log(f"model saved to {run_dir}")
