"""MNIST from PNG files: test accuracy and wall time of `imgcls train` with the default recipe.

    python bench/train_mnist.py                 # seeds 0 1 2, 3-minute budget
    python bench/train_mnist.py --seeds 0 --budget 2

Each run, timed end to end (decoding included):
    imgcls train MNIST --out RUN --val-fraction 0 --img-size 28 --no-hflip --time-budget B --seed S --quiet
    imgcls evaluate RUN MNIST/test --json --quiet
Digits are handed, so no flips (the recipe then recommends translate-only TTA); 28 px is MNIST's
own size. Waits for a quiet machine (1-minute load < 1.5) and records the load at start and end.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS_DIR, OUT_DIR, load1, machine_summary, markdown_table, run_timed, shell_line, unpack, wait_for_quiet  # noqa: E402

MAX_WAIT = [600.0]  # seconds to wait for a quiet machine before measuring anyway (marked noisy)
RESULTS = OUT_DIR / "train_mnist"


def run_one(mnist: Path, budget: float, seed: int) -> dict:
    run = RESULTS / f"run-b{budget:g}-s{seed}"
    la0, _, noisy = wait_for_quiet(max_wait_s=MAX_WAIT[0])
    # --overwrite: a rerun of the benchmark replaces its earlier run of the same budget and seed
    train_args = [
        "train",
        str(mnist),
        "--out",
        str(run),
        "--overwrite",
        "--val-fraction",
        "0",
        "--img-size",
        "28",
        "--no-hflip",
        "--time-budget",
        f"{budget:g}",
        "--seed",
        str(seed),
        "--quiet",
    ]
    tr = run_timed(train_args)
    run.mkdir(parents=True, exist_ok=True)
    (run / "train.log").write_text(tr.stdout + tr.stderr)  # the planner's and each epoch's lines
    if tr.returncode != 0:
        raise SystemExit(f"imgcls train failed:\n{tr.stderr[-3000:]}")
    eval_args = ["evaluate", str(run), str(mnist / "test"), "--json", "--quiet"]
    ev = run_timed(eval_args)
    if ev.returncode != 0:
        raise SystemExit(f"imgcls evaluate failed:\n{ev.stderr[-3000:]}")
    m = json.loads(ev.stdout)
    meta = json.loads((run / "model.json").read_text())
    with open(run / "metrics.csv", newline="") as f:
        hist = list(csv.DictReader(f))
    images = sum(float(r["images_per_s"]) * float(r["epoch_time_s"]) for r in hist)
    n_train = meta["split"]["counts"]["train"]
    epochs = round(images / n_train, 2)  # the last epoch of a budgeted run may be partial
    return {
        "budget_min": budget,
        "seed": seed,
        "accuracy": m["accuracy"],
        "tta": m.get("tta"),
        "epochs": epochs,
        "train_wall_s": tr.seconds,
        "eval_wall_s": ev.seconds,
        "loop_images_per_s": images / sum(float(r["epoch_time_s"]) for r in hist),
        "load_start": round(la0, 2),
        "load_end": round(load1(), 2),
        "noisy": noisy,
        "commands": [shell_line(train_args), shell_line(eval_args)],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=float, default=3.0, help="imgcls train --time-budget in minutes (default 3)")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for load < 1.5 before each run (default 600)")
    a = p.parse_args()
    print(f"machine: {machine_summary()}", flush=True)
    MAX_WAIT[0] = a.max_wait
    RESULTS.mkdir(parents=True, exist_ok=True)
    log_path = RESULTS / "runs.jsonl"
    if not a.table_only:
        mnist = unpack(DATASETS_DIR / "mnist-png.tar.gz")
        with open(log_path, "a") as log:
            for seed in a.seeds:
                print(f"seed {seed} ...", flush=True)
                r = run_one(mnist, a.budget, seed)
                print(f"  accuracy {r['accuracy']:.4f}, {r['epochs']} epochs, {r['train_wall_s'] + r['eval_wall_s']:.0f} s", flush=True)
                log.write(json.dumps(r) + "\n")
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    print(
        markdown_table(
            [
                "budget",
                "seed",
                "test acc",
                "TTA",
                "epochs",
                "train wall s",
                "evaluate wall s",
                "total s",
                "train-loop img/s",
                "load start/end",
            ],
            [
                [
                    f"{r['budget_min']:g} min",
                    r["seed"],
                    f"{r['accuracy']:.4f}",
                    r["tta"],
                    r["epochs"],
                    f"{r['train_wall_s']:.0f}",
                    f"{r['eval_wall_s']:.0f}",
                    f"{r['train_wall_s'] + r['eval_wall_s']:.0f}",
                    f"{r['loop_images_per_s']:.0f}",
                    f"{r['load_start']:.2f} / {r['load_end']:.2f}" + (" (noisy)" if r["noisy"] else ""),
                ]
                for r in rows
            ],
        )
    )
    for b in sorted({r["budget_min"] for r in rows}):
        acc = [r["accuracy"] for r in rows if r["budget_min"] == b]
        wall = [r["train_wall_s"] + r["eval_wall_s"] for r in rows if r["budget_min"] == b]
        print(
            f"\n{b:g} min budget, {len(acc)} seeds: test accuracy mean {statistics.mean(acc):.4f}"
            + (f" (std {statistics.stdev(acc):.4f}, min {min(acc):.4f}, max {max(acc):.4f})" if len(acc) > 1 else "")
            + f", mean wall time {statistics.mean(wall):.0f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
