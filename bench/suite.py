"""The default against the hand-picked configurations (issue 11), on every shared data set, in one run.

For each data set, through the public CLI (`imgcls train ... --quiet`, then `imgcls evaluate RUN
DATA --split test --json` where DATA has a test split), with the same time budget for every
configuration of a set:

- default: `imgcls train DATA --out RUN` and nothing else (--model auto);
- small_cnn: `--model small_cnn` (from scratch, the fast recipe);
- probe: `--model efficientnet_lite0 --pretrained --strategy linear-probe`;
- fine-tune-last: `--model efficientnet_lite0 --pretrained --strategy fine-tune-last` (the probe, then
  the last blocks on cached activations);
- fine-tune: `--model efficientnet_lite0 --pretrained --strategy fine-tune` (all layers).

Data sets (../shared/datasets, unpacked once into bench/data): flowers (Oxford 17, no split:
stratified 80/20 with seed 0, its 20% is the score), eurosat, cifar10, mnist; digits (scikit-learn's
8x8 scans as `imgcls demo` writes them); flowers-few (24 training images per class, a few dozen).
The issue's goals: flowers default >= 98% in under 2 minutes; EuroSAT >= 98% within
--time-budget 10; CIFAR-10 (--time-budget 4) and MNIST (--time-budget 3) no worse than 86.8% / 99.67%;
the default within a point of the best configuration and never more than 2x slower.

    python bench/suite.py                                     # everything (hours on 2 cores)
    python bench/suite.py --sets flowers digits --configs default probe
    python bench/suite.py --budget eurosat=10 cifar10=4 mnist=3 flowers=0     # 0: no --time-budget
    python bench/suite.py --subset 20 --sets mnist --configs default small_cnn --max-wait 0   # smoke run
    python bench/suite.py --table                             # the recorded results, nothing run

Each finished row is appended to bench/out/suite/results.jsonl (--subset runs to subset.jsonl).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS_DIR, OUT_DIR, load1, machine_summary, markdown_table, run_timed, shell_line, unpack, wait_for_quiet  # noqa: E402

SUITE_DIR = OUT_DIR / "suite"
CONFIGS: dict[str, list[str]] = {
    "default": [],
    "small_cnn": ["--model", "small_cnn"],
    "probe": ["--model", "efficientnet_lite0", "--pretrained", "--strategy", "linear-probe"],
    "fine-tune-last": ["--model", "efficientnet_lite0", "--pretrained", "--strategy", "fine-tune-last"],
    "fine-tune": ["--model", "efficientnet_lite0", "--pretrained", "--strategy", "fine-tune"],
}
# tarball (None: written here), extra train flags, default --time-budget minutes (None: none)
SETS: dict[str, tuple[str | None, list[str], float | None]] = {
    "flowers": ("oxford17-flowers.tar.gz", ["--val-fraction", "0.2", "--seed", "0"], None),
    "eurosat": ("eurosat-rgb.tar.gz", [], 10.0),
    "cifar10": ("cifar10-jpg.tar.gz", [], 4.0),
    "mnist": ("mnist-png.tar.gz", [], 3.0),
    "digits": (None, [], None),
    "flowers-few": ("oxford17-flowers.tar.gz", ["--val-fraction", "0.2", "--seed", "0"], None),
}
FEW_PER_CLASS = 30  # flowers-few: 30 images per class, 24 of them train after the 80/20 split


def dataset(name: str, subset: int | None) -> Path:
    """The data set's folder, unpacked once; a subset of it (links) with `subset` images per class and split."""
    tarball = SETS[name][0]
    if tarball is None:  # digits: written by imgcls itself
        from imgcls.demo import write_digits

        root = write_digits(SUITE_DIR / "data" / "digits")
    else:
        root = unpack(DATASETS_DIR / tarball)
    per_class = FEW_PER_CLASS if name == "flowers-few" else subset
    if per_class is None:
        return root
    return linked_subset(root, SUITE_DIR / "data" / f"{name}-{per_class}", per_class)


def linked_subset(root: Path, dest: Path, per_class: int) -> Path:
    """DEST mirrors ROOT's class folders (and train/valid/test folders) with the first `per_class`
    images of each class, as symbolic links: a small data set in seconds, for smoke runs."""
    if dest.exists():
        shutil.rmtree(dest)
    for folder, _, files in sorted(os.walk(root)):
        images = sorted(f for f in files if f.lower().endswith((".png", ".jpg", ".jpeg")))[:per_class]
        if not images:
            continue
        out = dest / Path(folder).relative_to(root)
        out.mkdir(parents=True, exist_ok=True)
        for f in images:
            (out / f).symlink_to(Path(folder, f).resolve())
    return dest


def has_test_split(data: Path) -> bool:
    return (data / "test").is_dir()


def run_config(set_name: str, config: str, data: Path, budget: float | None, opts: argparse.Namespace) -> dict:
    """One timed `imgcls train` (+ `imgcls evaluate --split test`): its row."""
    run_dir = SUITE_DIR / "runs" / f"{set_name}-{config}"
    args = ["train", str(data), "--out", str(run_dir), *CONFIGS[config], *SETS[set_name][1], "--overwrite", "--quiet"]
    if budget:
        args += ["--time-budget", f"{budget:g}"]
    print(f"\n== {set_name} / {config}", flush=True)
    _, waited, noisy = wait_for_quiet(opts.load_threshold, 15.0, opts.max_wait, max_busy=opts.max_busy)
    load_start = load1()
    t = run_timed(args)
    if t.returncode != 0:
        print(t.stdout[-3000:], t.stderr[-3000:], sep="\n")
        return record({"set": set_name, "config": config, "error": f"exit {t.returncode}", "train_cmd": shell_line(args)}, opts)
    print("\n".join("  | " + line for line in t.stdout.strip().splitlines() if line.startswith(("auto:", "estimate:"))), flush=True)
    meta = json.loads((run_dir / "model.json").read_text())
    row = {
        "set": set_name,
        "config": config,
        "arch": meta["arch"],
        "strategy": meta["strategy"],
        "kept": meta["training"].get("kept"),
        "auto": {k: meta["auto"][k] for k in ("chosen", "reason", "candidates")} if "auto" in meta else None,
        "img_size": meta["preprocess"]["img_size"],
        "val_acc": meta.get("metrics", {}).get("val", {}).get("accuracy"),
        "train_wall_s": round(t.seconds, 1),
        "time_budget": budget,
        "train_cmd": shell_line(args),
        "load_start": round(load_start, 2),
        "load_end": round(load1(), 2),
        "noisy": noisy,
        "load_wait_s": round(waited),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_summary(),
    }
    row["train_img_s"] = train_images_per_s(run_dir, meta["strategy"])
    row["score"], row["score_split"] = row["val_acc"], "val"
    if has_test_split(data):
        e = run_timed(["evaluate", str(run_dir), str(data), "--split", "test", "--json"])
        if e.returncode == 0:
            m = json.loads(e.stdout)
            row.update(score=m["accuracy"], score_split="test", eval_wall_s=round(e.seconds, 1))
    row["total_s"] = round(row["train_wall_s"] + row.get("eval_wall_s", 0.0), 1)
    print(
        f"  -> {row['score_split']} {row['score']}, {row['total_s']}s ({row['arch']}, {row['strategy']}, kept {row['kept']}, "
        f"{row['train_img_s']} train img/s)",
        flush=True,
    )
    return record(row, opts)


def train_images_per_s(run_dir: Path, strategy: str) -> float | None:
    """Mean training images/s over the epochs of metrics.csv (the probe's row, first for the
    fine-tune strategies, left out): full fine-tuning against the last blocks on cached activations."""
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    if strategy in ("fine-tune-last",):
        rows = rows[1:]
    if strategy == "linear-probe" or not rows:
        return None
    return round(sum(float(r["images_per_s"]) for r in rows) / len(rows), 1)


def results_file(opts: argparse.Namespace) -> Path:
    return SUITE_DIR / ("subset.jsonl" if opts.subset else "results.jsonl")


def record(row: dict, opts: argparse.Namespace) -> dict:
    """Append a finished row at once, so a later failure loses nothing."""
    path = results_file(opts)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def read_results(opts: argparse.Namespace) -> list[dict]:
    """Recorded rows, the latest per (set, config)."""
    path = results_file(opts)
    latest: dict[tuple[str, str], dict] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.strip():
            r = json.loads(line)
            latest[(r["set"], r["config"])] = r
    return list(latest.values())


def render(rows: list[dict]) -> str:
    """One row per data set: each configuration's score and seconds side by side, and what the default chose."""
    sets = list(dict.fromkeys(r["set"] for r in rows))
    by = {(r["set"], r["config"]): r for r in rows}

    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        if "error" in r:
            return r["error"]
        return f"{100 * r['score']:.2f}% {r['score_split']}, {r['total_s']:.0f}s" + (" (noisy)" if r.get("noisy") else "")

    table = []
    for s in sets:
        d = by.get((s, "default"))
        chose = f"{d['arch']} {d['strategy']} (kept {d['kept']})" if d and "error" not in d else "-"
        budget = next((r.get("time_budget") for r in rows if r["set"] == s), None)
        table.append([s, f"{budget:g} min" if budget else "none", *(cell(by.get((s, c))) for c in CONFIGS), chose])
    speed = []
    for s in sets:
        last, full = (by.get((s, c), {}).get("train_img_s") for c in ("fine-tune-last", "fine-tune"))
        if last and full:
            speed.append(f"{s}: training images/s, last blocks {last:.0f} against full fine-tune {full:.0f} ({last / full:.1f}x)")
    return "\n".join([markdown_table(["data", "time budget", *CONFIGS, "default chose"], table), *speed])


def parse_budgets(items: list[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {name: b for name, (_, _, b) in SETS.items()}
    for item in items:
        name, _, minutes = item.partition("=")
        if name not in SETS:
            raise SystemExit(f"--budget: unknown set {name!r}; sets: {', '.join(SETS)}")
        out[name] = float(minutes) or None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--budget", nargs="*", default=[], metavar="SET=MINUTES", help="per-set --time-budget (0: none); defaults: the goals'")
    p.add_argument("--subset", type=int, help="smoke run: this many images per class and split (links), results to subset.jsonl")
    p.add_argument("--load-threshold", type=float, default=1.5, help="wait for the 1-minute load average to drop below this")
    p.add_argument("--max-busy", type=float, default=0.3, help="and for at most this share of the cores to be busy right now")
    p.add_argument("--max-wait", type=float, default=600.0, help="most seconds to wait for a quiet machine, then go on (noisy)")
    p.add_argument("--table", action="store_true", help="print the table of recorded results and exit")
    opts = p.parse_args(argv)
    print(f"machine: {machine_summary()}", flush=True)
    budgets = parse_budgets(opts.budget)
    if not opts.table:
        for s in opts.sets:
            data = dataset(s, opts.subset)
            for c in opts.configs:
                run_config(s, c, data, budgets[s], opts)
    print("\n" + render(read_results(opts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
