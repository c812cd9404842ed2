"""bench/trust.py imbalance, ood and ece: the modes that train (see bench/trust.py): data pools,
CSV manifests, training runs and their tables."""

from __future__ import annotations

import argparse
import csv
import io
import json
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import markdown_table
from trust_measure import Samples, measure, subsample

METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "worst_recall", "ece")  # the imbalance table's columns


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
        model=ModelConfig(name=args.model, pretrained=args.pretrained, strategy=args.strategy),
        train=TrainConfig(
            out=str(out),
            epochs=args.epochs,
            time_budget=args.time_budget,
            recipe=args.recipe,
            class_balance=class_balance,
            unknown_method=getattr(args, "unknown_method", "msp"),
        ),
    )
    print(
        f"    training {out}: {cfg.model.name}{' pretrained' if cfg.model.pretrained else ''}, epochs {args.epochs or 'default'}, "
        f"time budget {args.time_budget or 'none'} min, --class-balance {class_balance}",
        flush=True,
    )
    return fit(cfg, progress=False, log=lambda s: print(f"    {s}", flush=True), overwrite=True)


def imbalance(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """The imbalance mode: per ratio and --class-balance mode, fit and evaluate on balanced test images."""
    from imgcls.evaluate import evaluate

    names, train, test = data_pools(data, args.seed)
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
    budget = f"{args.time_budget:g} min" if args.time_budget else "no time budget"
    print(
        f"\n## Class imbalance ({args.model}, {args.epochs or 'default'} epochs, {budget} per run; balanced test images of {data.name})\n"
    )
    print(markdown_table(header, rows))
    print("\n## Side by side (balanced accuracy / macro-F1 per --class-balance)\n")
    modes = args.modes.split(",")
    side = [
        [
            f"{ratio:g}:1",
            *(
                f"{r['balanced_accuracy']:.4f} / {r['macro_f1']:.4f}"
                for m in modes
                for r in results
                if r["ratio"] == ratio and r["class_balance"] == m
            ),
        ]
        for ratio in args.ratios
    ]
    print(markdown_table(["ratio", *modes], side))
    return {"imbalance": results}


def ood(args: argparse.Namespace, data: Path, others: list[str]) -> dict[str, Any]:
    """The ood mode: train on the known classes, then `measure` with the other classes (all their
    images) and the `others` folders unknown."""
    names, train, test = data_pools(data, args.seed)
    if args.known_classes:
        known = args.known_classes.split(",")
        missing = sorted(set(known) - set(names))
        if missing:
            raise SystemExit(f"--known-classes: {', '.join(missing)} not in {data}")
    else:
        known = [names[i] for i in sorted(np.random.default_rng(args.seed).permutation(len(names))[: args.known])]
    if not 0 < len(known) < len(names):
        raise SystemExit(f"need between 1 and {len(names) - 1} known classes, got {len(known)}")
    folder = Path(args.out) / "ood" / f"{len(known)}_of_{len(names)}"
    cap = args.max_images
    rows = [(p, names[y], "train") for p, y in subsample(train, cap * 5, args.seed) if names[y] in known]
    rows += [(p, names[y], "test") for p, y in subsample(test, cap * 2, args.seed) if names[y] in known]
    manifest = write_manifest(folder / "known.csv", rows)
    held = [(p, names[y], "test") for p, y in subsample(train + test, cap * 2, args.seed + 1) if names[y] not in known]
    everything = write_manifest(folder / "all.csv", rows + held)  # beside known.csv: split.json's relative paths hold for both
    print(f"known classes: {', '.join(known)}; held out: {len(names) - len(known)} classes ({len(held)} test images)", flush=True)
    run = train_run(args, manifest, folder / "run", args.class_balance)
    print(f"unknown sets: held-out classes of {data.name}, {', '.join(others) or 'no other data set'}", flush=True)
    return measure(args, run, everything, others)


# ----------------------------------------------------------------------------- ece


def run_streamed(cmd: list[str], indent: str = "    ") -> str:
    """Run an imgcls command, echoing its output lines (through sys.stdout, so the mode's log has
    them); its stdout, or SystemExit with its tail when it fails."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "imgcls.cli", *cmd[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, in_json = [], False
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        in_json = in_json or line.startswith("{")  # evaluate --json prints its JSON last: kept out of the log
        if not in_json:
            print(indent + line.rstrip(), flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed (exit {proc.returncode}):\n{''.join(lines[-20:])}")
    return "".join(lines)


def split_manifest(data: Path, out: Path, seed: int) -> Path:
    """A CSV manifest of a data set without a test split: a seeded stratified 80/20 train/test split."""
    names, train, test = data_pools(data, seed)
    return write_manifest(out, [(p, names[y], "train") for p, y in train] + [(p, names[y], "test") for p, y in test])


def ece(args: argparse.Namespace, sets: dict[str, Path]) -> dict[str, Any]:
    """The ece mode: per data set, `imgcls train` (default command) then `imgcls evaluate --json` on the test split."""
    from imgcls.data import index_dataset

    results, rows = [], []
    for name, data in sets.items():
        folder = Path(args.out) / "ece" / name
        outside: list[str] = []
        if "test" not in index_dataset(data, allow_outside_root=True).splits:
            data, outside = split_manifest(data, folder / "split_80_20.csv", args.seed), ["--allow-outside-root"]
        budget, epochs = args.budgets.get(name), args.epoch_caps.get(name)
        limits = [*(["--time-budget", f"{budget:g}"] if budget else []), *(["--epochs", str(epochs)] if epochs else [])]
        run = folder / "run"
        train_cmd = ["imgcls", "train", str(data), "--out", str(run), "--overwrite", "--quiet", "--seed", str(args.seed), *limits, *outside]
        eval_cmd = ["imgcls", "evaluate", str(run), str(data), "--split", "test", "--json", "--coverage", "0.9", "--quiet", *outside]
        eval_cmd += ["--out", str(folder / "evaluation")]
        print(f"\n{name}: {shlex.join(train_cmd)}", flush=True)
        t0 = time.perf_counter()
        run_streamed(train_cmd)
        train_s = time.perf_counter() - t0
        print(f"{name}: {shlex.join(eval_cmd)}", flush=True)
        out = run_streamed(eval_cmd)
        m = json.loads(out[out.index("{") :])
        meta = json.loads((run / "model.json").read_text())
        tr = meta.get("training", {})
        r = {
            "set": name,
            "command": shlex.join(train_cmd),
            "arch": meta["arch"],
            "strategy": tr.get("strategy"),
            "epochs_run": tr.get("epochs_run"),
            "train_s": round(train_s, 1),
            "test_images": sum(c["support"] for c in m["per_class"].values()),
            **{k: m.get(k) for k in ("accuracy", "ece", "ece_uncalibrated", "temperature", "coverage", "mean_set_size")},
        }
        results.append(r)
        rows.append(
            [
                name,
                f"{r['arch']} ({r['strategy']}, {r['epochs_run']} ep, {train_s / 60:.1f} min)",
                r["test_images"],
                *(f"{r[k]:.4f}" for k in ("accuracy", "ece", "ece_uncalibrated")),
                f"{r['temperature']:.3f}",
                f"{r['coverage']:.3f}",
                f"{r['mean_set_size']:.2f}",
            ]
        )
        print(f"{name}: accuracy {r['accuracy']:.4f}, ECE {r['ece']:.4f} (uncalibrated {r['ece_uncalibrated']:.4f})", flush=True)
    print("\n## Calibration on the test split, default training command (goal: ECE <= 0.03; sets at coverage 0.9)\n")
    header = ["data set", "model (strategy, epochs, training time)", "test images", "accuracy", "ECE", "ECE uncalibrated", "T"]
    print(markdown_table([*header, "coverage", "mean set size"], rows))
    return {"ece": results}
