"""Trust toolbox benchmarks: calibration, prediction sets, "unknown" detection (imgcls.calibration, imgcls.ood)
and class balance, on real data. Three modes:

    python bench/trust.py measure MODEL DATA [--ood-data OTHER_IMAGES] [--max-images 2000] [--json trust.json]
    python bench/trust.py imbalance DATA [--ratios 10 50] [--epochs 10] [--modes auto,none]
    python bench/trust.py ood DATA --known 5 [--ood-data OTHER_IMAGES] [--epochs 10]

(`python bench/trust.py MODEL DATA` is `measure`.)

measure: MODEL is a model folder written by `imgcls train` on DATA, or on some of DATA's classes.
Known classes are split as the model saw them (MODEL/split.json, else DATA's split folders):
train -> the feature statistics (Mahalanobis class means and shared covariance, the k-NN bank);
val -> the temperature, the conformal quantile and the OOD thresholds, refitted here; test ->
every figure (without a test split, val is halved: one half fits, the other measures). Images of
DATA's classes that the model does not know form the "held-out classes" unknown set; every
--ood-data folder (any images, any layout) is one more unknown set. Reports, on the known test
images: NLL and ECE before and after temperature scaling; coverage, mean set size and share of
single-class sets for APS, randomised APS and RAPS at --coverage; for each OOD score and unknown
set: AUROC, FPR at 95% TPR, and the shares of known and unknown images accepted at the threshold
picked on validation (--accept of known val images accepted). Each table has a row "as stored":
what model.json's own calibration (the temperature, the "unknown" threshold and the conformal
scores that `imgcls train` fitted, and predict applies) gives on the same test images.
Features and logits come from one forward pass (pooled pre-logit features, then the head), with
the model's test-time augmentation (--tta auto), as predict runs it.

imbalance: DATA's training split (folders or train/test folders) is cut to a long tail: with C
classes in a seeded random order, class i keeps n_max * ratio^(-i / (C - 1)) images (Cui et al.
2019's exponential profile; n_max: the smallest class's count, or --max-per-class). The test
split (DATA's test, else val, else a held-out fifth) stays balanced (--test-per-class). For each
ratio, one `fit` per --class-balance mode in --modes, then `evaluate` on the test images:
accuracy, balanced accuracy, macro-F1, the worst class's recall and ECE, side by side.

ood: trains on --known classes of DATA (the first K in a seeded random order, or --known-classes),
then runs `measure` on that model: DATA's other classes and every --ood-data folder are the
unknown sets.

imbalance and ood write CSV manifests (absolute paths, so fit and evaluate run with
allow_outside_root) and run folders under --out (default bench/out/trust). Nothing is timed, so
they do not wait for a quiet machine; the machine line is printed anyway.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, machine_summary, markdown_table  # noqa: E402

Samples = list[tuple[str, int]]
Rows = list[list[object]]
MODES = ("measure", "imbalance", "ood")
METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "worst_recall", "ece")  # the imbalance table's columns


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
            s_known, s_unk = trust.known_scores(test.logits), trust.known_scores(unk.logits)
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


def measure(args: argparse.Namespace, model_path: str | Path, data: Path, ood_data: list[str]) -> dict[str, Any]:
    """The measure mode on one model; prints the tables and returns the results."""
    from imgcls.artifact import load_artifact, resolve_artifact_dir
    from imgcls.inference.trust import Trust
    from imgcls.runtime import prepare_inference_model, resolve_device, resolve_precision, resolve_tta

    model_dir = resolve_artifact_dir(model_path)
    dev = resolve_device("auto")
    model, meta = load_artifact(model_dir, device=dev)
    model, amp_dtype = prepare_inference_model(model, dev, resolve_precision(args.precision, dev))
    trust, tta = Trust.from_meta(meta), resolve_tta(args.tta, meta)
    known, held_out, how = split_samples(model_dir, data, list(meta["class_names"]), args.seed)
    print(f"model: {model_dir} ({meta['arch']}, {len(meta['class_names'])} classes, TTA {tta}); splits from {how}")

    def run(samples: Samples, desc: str) -> Outputs:
        return features_and_logits(model, meta, subsample(samples, args.max_images, args.seed), dev, amp_dtype, tta, desc)

    train, val, test = (run(known[s], s) for s in ("train", "val", "test"))
    unknown = {f"held-out classes of {data.name}": run(held_out, "held-out")} if held_out else {}
    for folder in ood_data:
        unknown[f"images in {Path(folder).name}"] = run(image_files(Path(folder)), Path(folder).name)
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


# ----------------------------------------------------------------------------- imbalance and ood: data and training


def data_pools(data: Path, seed: int) -> tuple[list[str], Samples, Samples]:
    """(class names, training samples, test samples) of DATA: its train (or all) split and its
    test (else val) split, or a stratified fifth of the training images when it has neither."""
    from imgcls.data import index_dataset, stratified_split

    index = index_dataset(data, allow_outside_root=True)
    train = index.splits.get("train") or index.splits.get("all") or []
    test = index.splits.get("test") or index.splits.get("val")
    if not test:
        a, b = stratified_split(np.asarray([y for _, y in train]), 0.2, seed, index.class_names)
        train, test = [train[i] for i in a], [train[i] for i in b]
    return index.class_names, [(str(Path(p).resolve()), y) for p, y in train], [(str(Path(p).resolve()), y) for p, y in test]


def per_class(samples: Samples, num_classes: int) -> list[Samples]:
    out: list[Samples] = [[] for _ in range(num_classes)]
    for s in samples:
        out[s[1]].append(s)
    return out


def write_manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A CSV manifest path,label,split (absolute paths)."""
    from imgcls.atomic import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label", "split"])
    w.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buf.getvalue())
    return path


def long_tail(counts: list[int], ratio: float, max_per_class: int | None) -> list[int]:
    """Images kept per class (in the given order): n_max * ratio^(-i / (C - 1))."""
    n_max = min(min(counts), max_per_class or min(counts))
    c = len(counts)
    return [max(1, int(round(n_max * ratio ** (-i / max(1, c - 1))))) for i in range(c)]


def train_run(args: argparse.Namespace, manifest: Path, out: Path, class_balance: str) -> Path:
    from imgcls.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from imgcls.training.fit import fit

    cfg = RunConfig(
        data=DataConfig(path=str(manifest), img_size=args.img_size, seed=args.seed, allow_outside_root=True, cache_dir=args.cache_dir),
        model=ModelConfig(name=args.model, pretrained=args.pretrained),
        train=TrainConfig(out=str(out), epochs=args.epochs, time_budget=args.time_budget, recipe=args.recipe, class_balance=class_balance),
    )
    return fit(cfg, progress=False, log=lambda s: print(f"    {s}", flush=True), overwrite=True)


def imbalance(args: argparse.Namespace) -> dict[str, Any]:
    """The imbalance mode: per ratio and --class-balance mode, fit and evaluate on balanced test images."""
    from imgcls.evaluate import evaluate

    names, train, test = data_pools(Path(args.data), args.seed)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(names))  # which class gets how many
    pools, tests = per_class(train, len(names)), per_class(test, len(names))
    header = ["ratio", "--class-balance", "applied", "train images", "accuracy", "balanced acc", "macro-F1", "worst recall", "ECE"]
    rows, results = [], []
    for ratio in args.ratios:
        keep = long_tail([len(pools[c]) for c in order], ratio, args.max_per_class)
        picked = {int(c): subsample(pools[c], n, args.seed + int(c)) for c, n in zip(order, keep)}
        test_rows = [(p, names[c], "test") for c in range(len(names)) for p, _ in subsample(tests[c], args.test_per_class, 0)]
        manifest = write_manifest(
            Path(args.out) / "imbalance" / f"ratio_{ratio:g}" / "data.csv",
            [(p, names[c], "train") for c in sorted(picked) for p, _ in picked[c]] + test_rows,
        )
        print(f"\nratio {ratio:g}: {min(keep)} to {max(keep)} training images per class ({sum(keep)} in all); {manifest}", flush=True)
        for mode in args.modes.split(","):
            run = train_run(args, manifest, manifest.parent / mode, mode)
            m = evaluate(run, manifest, split="test", allow_outside_root=True, progress=False, log=lambda s: None)
            applied = json.loads((run / "model.json").read_text()).get("class_balance", {}).get("mode", "?")
            worst = min(c["recall"] for c in m["per_class"].values() if c["support"])
            r = {
                "ratio": ratio,
                "class_balance": mode,
                "applied": applied,
                "train_images": sum(keep),
                "accuracy": m["accuracy"],
                "balanced_accuracy": m["balanced_accuracy"],
                "macro_f1": m["macro_f1"],
                "worst_recall": worst,
                "ece": m["ece"],
            }
            results.append(r)
            rows.append([f"{ratio:g}:1", mode, applied, sum(keep), *(f"{r[k]:.4f}" for k in METRIC_KEYS)])
            print(f"  {mode}: balanced accuracy {r['balanced_accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f}", flush=True)
    print(f"\n## Class imbalance ({args.model}, {args.epochs or 'default'} epochs; balanced test images of {Path(args.data).name})\n")
    print(markdown_table(header, rows))
    return {"imbalance": results}


def ood(args: argparse.Namespace) -> dict[str, Any]:
    """The ood mode: train on the known classes, then `measure` with the other classes unknown."""
    names, train, test = data_pools(Path(args.data), args.seed)
    if args.known_classes:
        known = args.known_classes.split(",")
        missing = sorted(set(known) - set(names))
        if missing:
            raise SystemExit(f"--known-classes: {', '.join(missing)} not in {args.data}")
    else:
        known = [names[i] for i in sorted(np.random.default_rng(args.seed).permutation(len(names))[: args.known])]
    if not 0 < len(known) < len(names):
        raise SystemExit(f"need between 1 and {len(names) - 1} known classes, got {len(known)}")
    folder = Path(args.out) / "ood" / f"{len(known)}_of_{len(names)}"
    cap = args.max_images
    rows = [(p, names[y], "train") for p, y in subsample(train, cap * 5, args.seed) if names[y] in known]
    rows += [(p, names[y], "test") for p, y in subsample(test, cap * 2, args.seed) if names[y] in known]
    manifest = write_manifest(folder / "known.csv", rows)
    held = [(p, names[y], "test") for p, y in subsample(test, cap * 2, args.seed + 1) if names[y] not in known]
    everything = write_manifest(folder / "all.csv", rows + held)  # beside known.csv: split.json's relative paths hold for both
    print(f"known classes: {', '.join(known)}; held out: {len(names) - len(known)} classes ({len(held)} test images)", flush=True)
    run = train_run(args, manifest, folder / "run", args.class_balance)
    return measure(args, run, everything, args.ood_data)


# ----------------------------------------------------------------------------- main


def parse(argv: list[str]) -> argparse.Namespace:
    from imgcls.config import CLASS_BALANCE_MODES, PRECISIONS, TTA_CHOICES

    if argv and argv[0] not in MODES and not argv[0].startswith("-"):
        argv = ["measure", *argv]  # the mode before there were modes
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("measure", help="calibration, sets and OOD scores of a trained model")
    m.add_argument("model", help="model folder written by `imgcls train`")
    m.add_argument("data", help="the data the model was trained on (may hold more classes: those are the held-out set)")
    im = sub.add_parser("imbalance", help="long-tailed subsets of DATA: --class-balance modes side by side")
    im.add_argument("data", help="a labeled dataset (class folders, train/test folders or a CSV)")
    im.add_argument("--ratios", type=float, nargs="+", default=[10.0, 50.0], help="largest over smallest class (default 10 50)")
    im.add_argument("--modes", default="auto,none", help=f"--class-balance values to compare, comma-separated, of {CLASS_BALANCE_MODES}")
    im.add_argument("--max-per-class", type=int, help="training images of the largest class (default: the smallest class's count)")
    im.add_argument("--test-per-class", type=int, default=100, help="balanced test images per class (default 100)")
    o = sub.add_parser("ood", help="train on some classes of DATA, then measure with the others (and --ood-data) unknown")
    o.add_argument("data", help="a labeled dataset (class folders, train/test folders or a CSV)")
    o.add_argument("--known", type=int, default=5, help="how many classes to train on, drawn with --seed (default 5)")
    o.add_argument("--known-classes", help="or name them, comma-separated")
    o.add_argument("--class-balance", choices=CLASS_BALANCE_MODES, default="auto")
    for x in (im, o):
        x.add_argument("--model", default="small_cnn", help="architecture (default small_cnn)")
        x.add_argument("--pretrained", action="store_true", help="start from the architecture's pretrained weights")
        x.add_argument("--epochs", type=int, help="training epochs (default: imgcls train's)")
        x.add_argument("--time-budget", type=float, help="minutes per training run instead of --epochs")
        x.add_argument("--img-size", type=int, help="input size (default: the model's)")
        x.add_argument("--recipe", default="auto", help="training recipe (default auto)")
        x.add_argument("--cache-dir", help="decoded-image cache shared by the runs (imgcls train --cache-dir)")
        x.add_argument("--out", default=str(OUT_DIR / "trust"), help="manifests and run folders (default bench/out/trust)")
    for x in (m, o):
        x.add_argument("--ood-data", action="append", default=[], help="a folder of images from elsewhere (repeatable)")
        x.add_argument("--coverage", type=float, default=0.9, help="conformal coverage target (default 0.9)")
        x.add_argument("--raps-penalty", type=float, default=0.01)
        x.add_argument("--raps-k", type=int, default=2)
        x.add_argument("--accept", type=float, default=0.95, help="share of known val images each OOD threshold accepts (default 0.95)")
        x.add_argument("--knn-k", type=int, default=10)
        x.add_argument("--bank-size", type=int, default=2048, help="training features kept for k-NN (default 2048)")
        x.add_argument("--precision", choices=PRECISIONS, default="auto")
        x.add_argument("--tta", choices=TTA_CHOICES, default="auto", help="test-time augmentation (default: the model's, as predict)")
    for x in (m, im, o):
        x.add_argument("--max-images", type=int, default=2000, help="at most this many images per split and unknown set (default 2000)")
        x.add_argument("--seed", type=int, default=0)
        x.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    print(f"machine: {machine_summary()}")
    if args.mode == "measure":
        result = measure(args, args.model, Path(args.data), args.ood_data)
    elif args.mode == "imbalance":
        result = imbalance(args)
    else:
        result = ood(args)
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if args.json:
        from imgcls.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps({"machine": machine_summary(), "mode": args.mode, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
