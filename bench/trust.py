"""Trust toolbox on a trained model: calibration, prediction sets and "unknown" detection (imgcls.calibration).

    python bench/trust.py MODEL DATA
    python bench/trust.py MODEL DATA --ood-data OTHER_IMAGES --max-images 2000 --json trust.json

MODEL is a model folder written by `imgcls train` on DATA, or on some of DATA's classes. Known
classes are split as the model saw them (MODEL/split.json, else DATA's split folders):
train -> the feature statistics (Mahalanobis class means and shared covariance, the k-NN bank);
val -> the temperature, the conformal quantile and the OOD thresholds; test -> every figure below
(without a test split, val is halved: one half fits, the other measures). Images of DATA's
classes that the model does not know form the "held-out classes" unknown set; every --ood-data
folder (any images, any layout) is one more unknown set.

Reports, on the known test images: NLL and ECE before and after temperature scaling; coverage,
mean set size and share of single-class sets for APS, randomised APS and RAPS at --coverage; for
each OOD score and unknown set: AUROC, FPR at 95% TPR, and the shares of known and unknown images
accepted at the threshold picked on validation (--accept of known val images accepted).
Features and logits come from one forward pass (pooled pre-logit features, then the head).
Nothing is timed, so it does not wait for a quiet machine; the machine line is printed anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_summary, markdown_table  # noqa: E402

Samples = list[tuple[str, int]]
Rows = list[list[object]]


class Outputs(NamedTuple):
    features: np.ndarray  # (N, F) pooled pre-logit features
    logits: np.ndarray  # (N, C)
    labels: np.ndarray  # (N,) (0 for unknown images)


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

    index = index_dataset(data)  # every class in DATA, not only the model's
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


def features_and_logits(model, meta: dict, samples: Samples, dev, amp_dtype, desc: str) -> Outputs:
    """Features, logits and labels of the samples that decode."""
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

    out = batched_logits(model, decoded.images, spec, device=dev, amp_dtype=amp_dtype, forward=forward, desc=desc).numpy()
    c = len(meta["class_names"])
    return Outputs(out[:, :-c].astype(np.float64), out[:, -c:].astype(np.float64), labels)


def calibration_rows(val: Outputs, test: Outputs) -> tuple[Rows, dict, float]:
    from imgcls import calibration as cal

    t = cal.fit_temperature(val.logits, val.labels)
    rep = cal.temperature_report(test.logits, test.labels, t)
    acc = float(np.mean(test.logits.argmax(1) == test.labels))
    figures = [rep[k] for k in ("nll_before", "nll_after", "ece_before", "ece_after")]
    return [[len(test.labels), f"{acc:.3f}", f"{t:.3f}", *(f"{v:.4f}" for v in figures)]], rep, t


def conformal_rows(val: Outputs, test: Outputs, t: float, coverage: float, penalty: float, k_reg: int,
                   seed: int) -> tuple[Rows, list[dict]]:
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
        sets = cal.prediction_sets(pt, qhat, randomized, lam, k_reg, seed + 1)
        covered = float(np.mean([y in s for y, s in zip(test.labels, sets)]))
        sizes = np.array([len(s) for s in sets])
        rows.append([name, coverage, f"{qhat:.4f}", f"{covered:.3f}", f"{sizes.mean():.2f}", f"{np.mean(sizes == 1):.3f}"])
        out.append({"method": name, "qhat": qhat, "coverage_target": coverage, "coverage": covered, "mean_set_size": float(sizes.mean())})
    return rows, out


def ood_rows(train: Outputs, val: Outputs, test: Outputs, unknown: dict[str, Outputs], accept: float, k: int,
             bank_size: int) -> tuple[Rows, list[dict]]:
    from imgcls import calibration as cal
    from imgcls.config import OOD_METHODS

    rows, out = [], []
    for method in OOD_METHODS:
        if method in ("mahalanobis", "knn") and len(train.labels) == 0:
            rows.append([method, "(no training images: skipped)", "", "", "", "", ""])
            continue
        det = cal.fit_ood_detector(method, val.logits, val.features, train.features, train.labels, accept=accept, k=k, bank_size=bank_size)
        s_known = det.score(test.logits, test.features)
        for name, unk in unknown.items():
            s_unk = det.score(unk.logits, unk.features)
            r = {"score": method, "unknown": name, "n": len(s_unk), "auroc": cal.auroc(s_known, s_unk),
                 "fpr95": cal.fpr_at_tpr(s_known, s_unk), "known_accepted": float(np.mean(s_known >= det.threshold)),
                 "unknown_accepted": float(np.mean(s_unk >= det.threshold))}
            out.append(r)
            rows.append([method, name, r["n"], *(f"{r[k]:.3f}" for k in ("auroc", "fpr95", "known_accepted", "unknown_accepted"))])
    return rows, out


def main() -> int:
    from imgcls.config import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder written by `imgcls train`")
    p.add_argument("data", help="the data the model was trained on (may hold more classes: those are the held-out set)")
    p.add_argument("--ood-data", action="append", default=[], help="a folder of images from elsewhere (repeatable)")
    p.add_argument("--max-images", type=int, default=2000, help="at most this many images per split and per unknown set (default 2000)")
    p.add_argument("--coverage", type=float, default=0.9, help="conformal coverage target (default 0.9)")
    p.add_argument("--raps-penalty", type=float, default=0.01)
    p.add_argument("--raps-k", type=int, default=2)
    p.add_argument("--accept", type=float, default=0.95, help="share of known validation images each OOD threshold accepts (default 0.95)")
    p.add_argument("--knn-k", type=int, default=10)
    p.add_argument("--bank-size", type=int, default=2048, help="training features kept for k-NN (default 2048)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    from imgcls.artifact import load_artifact, resolve_artifact_dir
    from imgcls.runtime import prepare_inference_model, resolve_device, resolve_precision

    t0 = time.perf_counter()
    model_dir, data = resolve_artifact_dir(args.model), Path(args.data)
    dev = resolve_device("auto")
    model, meta = load_artifact(model_dir, device=dev)
    model, amp_dtype = prepare_inference_model(model, dev, resolve_precision(args.precision, dev))
    known, held_out, how = split_samples(model_dir, data, list(meta["class_names"]), args.seed)
    print(f"machine: {machine_summary()}")
    print(f"model: {model_dir} ({meta['arch']}, {len(meta['class_names'])} classes); splits from {how}")

    def run(samples: Samples, desc: str) -> Outputs:
        return features_and_logits(model, meta, subsample(samples, args.max_images, args.seed), dev, amp_dtype, desc)

    train, val, test = (run(known[s], s) for s in ("train", "val", "test"))
    unknown = {f"held-out classes of {data.name}": run(held_out, "held-out")} if held_out else {}
    for folder in args.ood_data:
        unknown[f"images in {Path(folder).name}"] = run(image_files(Path(folder)), Path(folder).name)
    unknown = {k: v for k, v in unknown.items() if len(v.labels)}
    sizes = {"train": len(train.labels), "val": len(val.labels), "test": len(test.labels), **{k: len(v.labels) for k, v in unknown.items()}}
    print("images: " + ", ".join(f"{k} {n}" for k, n in sizes.items()))

    cal_rows, cal_rep, t = calibration_rows(val, test)
    print("\n## Calibration (test images; temperature fitted on val)\n")
    print(markdown_table(["images", "accuracy", "temperature", "NLL before", "NLL after", "ECE before", "ECE after"], cal_rows))
    conf_rows, conf_out = conformal_rows(val, test, t, args.coverage, args.raps_penalty, args.raps_k, args.seed)
    print("\n## Prediction sets (split conformal on temperature-scaled probabilities; qhat from val)\n")
    print(markdown_table(["method", "target", "qhat", "coverage", "mean set size", "single-class sets"], conf_rows))
    ood_out: list[dict] = []
    if unknown:
        rows, ood_out = ood_rows(train, val, test, unknown, args.accept, args.knn_k, args.bank_size)
        print(f"\n## Unknown inputs (thresholds accept {args.accept:.0%} of known val images)\n")
        print(markdown_table(["score", "unknown set", "images", "AUROC", "FPR@95TPR", "known accepted", "unknown accepted"], rows))
    else:
        print("\n(no unknown images: give DATA classes the model does not know, or --ood-data)")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if args.json:
        from imgcls.atomic import atomic_write_text

        result = {"machine": machine_summary(), "model": str(model_dir), "data": str(data), "splits": how, "images": sizes,
                  "calibration": cal_rep, "conformal": conf_out, "ood": ood_out}
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
