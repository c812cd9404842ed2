"""`python bench/train_cifar10.py --ablate`: the fast recipe's options (issue 17) one at a time and
all together, against the baseline, at the same budget and seed, in one run.

Each variant is one `imgcls train` + `imgcls evaluate` (run_imgcls in train_cifar10.py) with its
flags added to the baseline's. Selective TTA changes only the evaluation, so its row evaluates a
copy of the baseline's trained model with model.json's "tta_select" set: the same weights, the
difference is the TTA alone. Rows go to bench/out/train_cifar10/ablate.jsonl and into one table.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from common import markdown_table

TTA_SELECT = 0.25  # the least confident quarter of each batch gets the 6 TTA views: 2.25 passes per image instead of 6
VARIANTS: list[tuple[str, list[str]]] = [
    ("baseline", []),
    ("muon", ["--optimizer", "muon"]),
    ("progressive resize 0.5", ["--progressive-resize", "0.5"]),
    (f"tta-select {TTA_SELECT:g}", ["--tta-select", f"{TTA_SELECT:g}"]),
    ("label smoothing 0.1", ["--label-smoothing", "0.1"]),
    ("silu", ["--activation", "silu"]),
    ("colour jitter 0.1", ["--color-jitter", "0.1"]),
]
ALL_FLAGS = [flag for _, flags in VARIANTS for flag in flags]


def evaluate_with_tta_select(baseline_run: Path, out: Path, select: float, cifar: Path, evaluate: Callable[[Path], dict]) -> dict:
    """Copy the baseline's run folder to `out`, set model.json's tta_select, evaluate it."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(baseline_run, out)
    meta_path = out / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["tta_select"] = select
    meta_path.write_text(json.dumps(meta, indent=2))
    return evaluate(out)


def run_ablation(
    cifar: Path,
    budget: float,
    seed: int,
    extra: list[str],
    run_imgcls: Callable[..., dict],
    evaluate_only: Callable[[Path, Path], dict],
    results: Path,
    only: list[str] | None = None,
) -> list[dict]:
    """Every variant (or those whose name starts with one of `only`) at `budget` minutes and `seed`;
    one dict per variant (as run_imgcls returns, plus "variant")."""
    rows = []
    baseline: dict | None = None
    for name, flags in [*VARIANTS, ("all", ALL_FLAGS)]:
        if only and name.split()[0] not in only:
            continue
        print(f"ablation {name}, budget {budget:g} min, seed {seed} ...", flush=True)
        if name.startswith("tta-select") and baseline is not None:
            out = results / f"ablate-b{budget:g}-s{seed}-tta-select"
            r = evaluate_with_tta_select(Path(baseline["run"]), out, TTA_SELECT, cifar, lambda run: evaluate_only(run, cifar))
            r = {**baseline, **r, "run": str(out), "total_wall_s": baseline["train_wall_s"] + r["eval_wall_s"]}
        else:
            slug = name.split()[0].replace("-", "")
            r = run_imgcls(cifar, budget, seed, [*extra, *flags], name=f"ablate-b{budget:g}-s{seed}-{slug}")
        r.update(kind="ablation", variant=name, flags=flags, time=time.strftime("%Y-%m-%d %H:%M:%S"))
        baseline = r if name == "baseline" else baseline
        print(f"  accuracy {r['accuracy']:.4f}, {r['epochs']} epochs, eval {r['eval_wall_s']:.0f} s", flush=True)
        with open(results / "ablate.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        rows.append(r)
    return rows


def ablation_table(rows: list[dict]) -> str:
    """One row per variant: test accuracy and its difference to the baseline of the same budget and seed."""
    base = {(r["budget_min"], r["seed"]): r["accuracy"] for r in rows if r["variant"] == "baseline"}
    return markdown_table(
        [
            "budget",
            "seed",
            "variant",
            "test acc",
            "vs baseline",
            "epochs",
            "widths",
            "train-loop img/s",
            "train wall s",
            "evaluate wall s",
            "load",
        ],
        [
            [
                f"{r['budget_min']:g} min",
                r["seed"],
                r["variant"],
                f"{r['accuracy']:.4f}",
                f"{(r['accuracy'] - base[(r['budget_min'], r['seed'])]) * 100:+.2f} pts" if (r["budget_min"], r["seed"]) in base else "n/a",
                r["epochs"],
                "/".join(map(str, r["widths"])),
                f"{r['loop_images_per_s']:.0f}",
                f"{r['train_wall_s']:.0f}",
                f"{r['eval_wall_s']:.0f}",
                f"{r['load_start']:.2f} / {r['load_end']:.2f}" + (" (noisy)" if r["noisy"] else ""),
            ]
            for r in rows
        ],
    )
