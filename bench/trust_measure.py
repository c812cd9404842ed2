"""bench/trust.py measure: calibration, prediction sets and "unknown" scores of one trained model
(see bench/trust.py for the modes; `ood` trains a model and then runs this).

MODEL is a model folder written by `imgcls train` on DATA, or on some of DATA's classes. Known
classes are split as the model saw them (MODEL/split.json, else DATA's split folders): train ->
the feature statistics (Mahalanobis class means and shared covariance, the k-NN bank); val -> the
temperature, the conformal quantile and the OOD thresholds, refitted here; test -> every figure
(without a test split, val is halved: one half fits, the other measures). Images of DATA's
classes that the model does not know form the "held-out classes" unknown set; every --ood-data
folder (any images, any layout) is one more. Reports, on the known test images: NLL and ECE
before and after temperature scaling; coverage, mean set size and share of single-class sets for
APS, randomised APS and RAPS; for each OOD score and unknown set: AUROC, FPR at 95% TPR, and the
shares of known and unknown images accepted at the threshold picked on validation. Each table has
a row "as stored": what model.json's own calibration (and ood.safetensors) gives, as predict
applies it. Features and logits come from one forward pass (pooled pre-logit features, then the
head), with the model's test-time augmentation, as predict runs it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from common import markdown_table

Samples = list[tuple[str, int]]
Rows = list[list[object]]


class Outputs(NamedTuple):
    features: np.ndarray  # (N, F) pooled pre-logit features
    logits: np.ndarray  # (N, C)
    labels: np.ndarray  # (N,) (0 for unknown images)


# ----------------------------------------------------------------------------- measure


def _split_json(model_dir: Path, data: Path) -> dict[str, str] | None:
    """normalised path -> split name from MODEL/split.json (paths relative to DATA, or to a CSV's folder)."""
    f = model_dir / "split.json"
    if not f.is_file():
        return None
    base = data.parent if data.suffix.lower() == ".csv" else data
    return {os.path.normpath(base / rel): name for name, rels in json.loads(f.read_text()).items() for rel in rels}


def split_samples(model_dir: Path, data: Path, class_names: list[str], seed: int) -> tuple[dict[str, Samples], Samples, str]:
    """(known samples per split train/val/test, held-out-class samples, how the split was found)."""
    from imgcls.data import index_dataset, stratified_split

    index = index_dataset(data, allow_outside_root=True)  # every class in DATA, not only the model's
    label_of = {name: i for i, name in enumerate(class_names)}
    by_path = _split_json(model_dir, data)
    known: dict[str, Samples] = {"train": [], "val": [], "test": []}
    held_out: Samples = []
    for split, samples in index.splits.items():
        for path, y in samples:
            name = index.class_names[y]
            if name not in label_of:
                held_out.append((path, 0))
                continue
            where = by_path.get(os.path.normpath(path)) if by_path is not None else split
            if where in known:
                known[where].append((path, label_of[name]))
    how = "MODEL/split.json" if by_path is not None else f"{index.layout} of {data}"
    if not known["val"] and not known["test"]:
        raise SystemExit(f"no validation or test images of the model's classes found ({how}); pass the data the model was trained on")
    if not known["test"] or not known["val"]:
        pool = known["val"] or known["test"]
        labels = np.asarray([y for _, y in pool])
        a, b = stratified_split(labels, 0.5, seed, class_names)
        known["val"], known["test"] = [pool[i] for i in a], [pool[i] for i in b]
        how += ", validation halved into val and test"
    return known, held_out, how


def subsample(samples: Samples, n: int, seed: int) -> Samples:
    if len(samples) <= n:
        return samples
    keep = np.sort(np.random.default_rng(seed).choice(len(samples), n, replace=False))
    return [samples[i] for i in keep]


def image_files(folder: Path) -> Samples:
    from imgcls.io import is_image_path

    return [(str(p), 0) for p in sorted(folder.rglob("*")) if p.is_file() and is_image_path(p)]


def features_and_logits(model, meta: dict, samples: Samples, dev, amp_dtype, tta: str, desc: str) -> Outputs:
    """Features, logits and labels of the samples that decode, TTA views averaged as predict does."""
    import torch

    from imgcls.artifact import spec_of
    from imgcls.config import DEFAULT_MAX_PIXELS
    from imgcls.data import load_split
    from imgcls.runtime import batched_logits

    if not samples:
        return Outputs(np.zeros((0, 0)), np.zeros((0, len(meta["class_names"]))), np.zeros(0, dtype=np.int64))
    spec = spec_of(meta)
    decoded, labels = load_split(samples, spec, None, 0, DEFAULT_MAX_PIXELS, False, desc)

    def forward(x: torch.Tensor) -> torch.Tensor:
        feats = model.forward_features(x)
        return torch.cat([model.forward_head(feats, pre_logits=True), model.forward_head(feats)], dim=1)  # (B, F + C)

    out = batched_logits(model, decoded.images, spec, device=dev, amp_dtype=amp_dtype, forward=forward, desc=desc, tta=tta).numpy()
    c = len(meta["class_names"])
    return Outputs(out[:, :-c].astype(np.float64), out[:, -c:].astype(np.float64), labels)


def calibration_rows(val: Outputs, test: Outputs, stored_t: float) -> tuple[Rows, dict, float]:
    from imgcls import calibration as cal

    t = cal.fit_temperature(val.logits, val.labels)
    acc = float(np.mean(test.logits.argmax(1) == test.labels))
    rows, rep = [], {}
    for name, temp in (("refitted on val", t), ("as stored (model.json)", stored_t)):
        rep[name] = r = cal.temperature_report(test.logits, test.labels, temp)
        figures = [r[k] for k in ("nll_before", "nll_after", "ece_before", "ece_after")]
        rows.append([name, len(test.labels), f"{acc:.3f}", f"{temp:.3f}", *(f"{v:.4f}" for v in figures)])
    return rows, rep, t


def conformal_rows(
    val: Outputs, test: Outputs, t: float, coverage: float, penalty: float, k_reg: int, seed: int, trust: Any
) -> tuple[Rows, list[dict]]:
    from imgcls import calibration as cal

    pv, pt = cal.softmax(val.logits, t), cal.softmax(test.logits, t)
    rows, out = [], []
    variants = (("APS", False, 0.0), ("APS randomised", True, 0.0), (f"RAPS (penalty {penalty}, k_reg {k_reg})", False, penalty))
    for name, randomized, lam in variants:
        try:
            qhat = cal.fit_conformal(pv, val.labels, coverage, randomized, lam, k_reg, seed)
        except ValueError as e:
            rows.append([name, coverage, f"({e})", "", "", ""])
            continue
        out.append(_set_row(rows, name, coverage, qhat, test.labels, cal.prediction_sets(pt, qhat, randomized, lam, k_reg, seed + 1)))
    try:  # model.json's scores with its own temperature: what `imgcls predict --coverage` gives
        qhat = trust.qhat(coverage)
        out.append(
            _set_row(
                rows,
                "APS as stored (model.json)",
                coverage,
                qhat,
                test.labels,
                trust.sets(cal.softmax(test.logits, trust.temperature), qhat),
            )
        )
    except ValueError as e:
        rows.append(["APS as stored (model.json)", coverage, f"({e})", "", "", ""])
    return rows, out


def _set_row(rows: Rows, name: str, coverage: float, qhat: float, labels: np.ndarray, sets: list[list[int]]) -> dict:
    covered = float(np.mean([y in s for y, s in zip(labels, sets)]))
    sizes = np.array([len(s) for s in sets])
    rows.append([name, coverage, f"{qhat:.4f}", f"{covered:.3f}", f"{sizes.mean():.2f}", f"{np.mean(sizes == 1):.3f}"])
    return {"method": name, "qhat": qhat, "coverage_target": coverage, "coverage": covered, "mean_set_size": float(sizes.mean())}


def ood_rows(
    train: Outputs, val: Outputs, test: Outputs, unknown: dict[str, Outputs], accept: float, k: int, bank_size: int, trust: Any
) -> tuple[Rows, list[dict]]:
    from imgcls.config import OOD_METHODS
    from imgcls.ood import fit_ood_detector

    rows, out = [], []
    for method in OOD_METHODS:
        if method in ("mahalanobis", "knn") and len(train.labels) == 0:
            rows.append([method, "(no training images: skipped)", "", "", "", "", ""])
            continue
        det = fit_ood_detector(method, val.logits, val.features, train.features, train.labels, accept=accept, k=k, bank_size=bank_size)
        s_known = det.score(test.logits, test.features)
        for name, unk in unknown.items():
            out.append(_ood_row(rows, method, name, s_known, det.score(unk.logits, unk.features), det.threshold))
    if trust.unknown_threshold is not None:  # model.json's rule, with its temperature: what predict answers
        label = f"{trust.unknown_method} as stored (model.json)"
        for name, unk in unknown.items():
            s_known, s_unk = trust.known_scores(test.logits, test.features), trust.known_scores(unk.logits, unk.features)
            out.append(_ood_row(rows, label, name, s_known, s_unk, trust.unknown_threshold))
    return rows, out


def _ood_row(rows: Rows, method: str, name: str, s_known: np.ndarray, s_unk: np.ndarray, threshold: float) -> dict:
    from imgcls.ood import auroc, fpr_at_tpr

    r = {
        "score": method,
        "unknown": name,
        "n": len(s_unk),
        "auroc": auroc(s_known, s_unk),
        "fpr95": fpr_at_tpr(s_known, s_unk),
        "known_accepted": float(np.mean(s_known >= threshold)),
        "unknown_accepted": float(np.mean(s_unk >= threshold)),
    }
    rows.append([method, name, r["n"], *(f"{r[k]:.3f}" for k in ("auroc", "fpr95", "known_accepted", "unknown_accepted"))])
    return r


def print_ood_summary(results: list[dict], sets: list[str]) -> None:
    """One row per score: AUROC and the false-accept rate at 95% of the known test images accepted
    (FPR@95TPR), per unknown set."""
    scores = list(dict.fromkeys(r["score"] for r in results))
    by = {(r["score"], r["unknown"]): r for r in results}
    rows = [[s, *(f"{by[s, u]['auroc']:.3f} / {by[s, u]['fpr95']:.3f}" if (s, u) in by else "" for u in sets)] for s in scores]
    print("\n## Unknown detection: AUROC / false accepts at 95% of known images accepted\n")
    print("Goals: AUROC >= 0.9 against another data set, >= 0.8 against held-out classes of the same one.\n")
    print(markdown_table(["score", *sets], rows))


def measure(args: argparse.Namespace, model_path: str | Path, data: Path, ood_data: list[str]) -> dict[str, Any]:
    """The measure mode on one model; prints the tables and returns the results."""
    from imgcls.artifact import load_artifact, resolve_artifact_dir
    from imgcls.inference.trust import Trust, read_ood_stats
    from imgcls.runtime import prepare_inference_model, resolve_device, resolve_precision, resolve_tta

    model_dir = resolve_artifact_dir(model_path)
    dev = resolve_device("auto")
    model, meta = load_artifact(model_dir, device=dev)
    model, amp_dtype = prepare_inference_model(model, dev, resolve_precision(args.precision, dev))
    trust, tta = Trust.from_meta(meta, stats=read_ood_stats(model_dir, meta)), resolve_tta(args.tta, meta)
    known, held_out, how = split_samples(model_dir, data, list(meta["class_names"]), args.seed)
    print(f"model: {model_dir} ({meta['arch']}, {len(meta['class_names'])} classes, TTA {tta}); splits from {how}")

    def run(samples: Samples, desc: str) -> Outputs:
        return features_and_logits(model, meta, subsample(samples, args.max_images, args.seed), dev, amp_dtype, tta, desc)

    train, val, test = (run(known[s], s) for s in ("train", "val", "test"))
    unknown = {"held-out classes": run(held_out, "held-out")} if held_out else {}
    for folder in ood_data:
        f = Path(folder).resolve()
        unknown[f"{f.parent.name}/{f.name}"] = run(image_files(f), f.name)
    unknown = {k: v for k, v in unknown.items() if len(v.labels)}
    sizes = {"train": len(train.labels), "val": len(val.labels), "test": len(test.labels), **{k: len(v.labels) for k, v in unknown.items()}}
    print("images: " + ", ".join(f"{k} {n}" for k, n in sizes.items()))

    cal_rows, cal_rep, t = calibration_rows(val, test, trust.temperature)
    print("\n## Calibration (test images; temperature refitted on val, and model.json's)\n")
    print(markdown_table(["temperature", "images", "accuracy", "T", "NLL before", "NLL after", "ECE before", "ECE after"], cal_rows))
    conf_rows, conf_out = conformal_rows(val, test, t, args.coverage, args.raps_penalty, args.raps_k, args.seed, trust)
    print("\n## Prediction sets (split conformal on temperature-scaled probabilities; qhat from val)\n")
    print(markdown_table(["method", "target", "qhat", "coverage", "mean set size", "single-class sets"], conf_rows))
    ood_out: list[dict] = []
    if unknown:
        rows, ood_out = ood_rows(train, val, test, unknown, args.accept, args.knn_k, args.bank_size, trust)
        print(f"\n## Unknown inputs (thresholds accept {args.accept:.0%} of known val images)\n")
        print(markdown_table(["score", "unknown set", "images", "AUROC", "FPR@95TPR", "known accepted", "unknown accepted"], rows))
        print_ood_summary(ood_out, list(unknown))
    else:
        print("\n(no unknown images: give DATA classes the model does not know, or --ood-data)")
    return {
        "model": str(model_dir),
        "data": str(data),
        "splits": how,
        "images": sizes,
        "calibration": cal_rep,
        "conformal": conf_out,
        "ood": ood_out,
    }
