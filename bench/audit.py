"""Audit benchmark (issue 14): `imgcls audit` on a real data set with planted label errors and copies.

A fraction of the labels is flipped to another class (--flip-fraction, default 0.05) and, with
--plant-copies N, N images get a resized + re-encoded copy and N a slightly cropped copy, each
placed in another split (test) than its original; the data set is handed to the audit as a CSV
manifest (path,label,split) so nothing in the unpacked data is touched. Reported:

- label errors: recall and precision of the flipped files among the top 2 x (number flipped) of
  the audit's ranking (fewer if it flags fewer), and among everything it flags;
- planted copies: the share found in one near- or exact-duplicate group with their original;
- the number of findings of each kind, the probe's out-of-fold accuracy, and the time per phase.

    python bench/audit.py --set flowers --per-class 20           # 340 photos, a quick look
    python bench/audit.py --set cifar10 --plant-copies 100       # all 60,000 images
    python bench/audit.py --set eurosat --no-features            # the fast audit

Results are appended to bench/out/audit/results.jsonl; the reports go to bench/out/audit/<set>/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS_DIR, OUT_DIR, load1, machine_summary, unpack, wait_for_quiet  # noqa: E402

SETS = {  # name: (tarball, folder inside it)
    "flowers": ("oxford17-flowers.tar.gz", "oxford17_flowers"),
    "eurosat": ("eurosat-rgb.tar.gz", "eurosat_rgb"),
    "cifar10": ("cifar10-jpg.tar.gz", "cifar10"),
    "mnist": ("mnist-png.tar.gz", "mnist_png"),
}


def choose_samples(root: Path, per_class: int | None, rng: np.random.Generator) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(class names, [(absolute path, class, split)]) with at most `per_class` images per class and split."""
    from imgcls.data import index_dataset

    index = index_dataset(root)
    rows = []
    for split, samples in index.splits.items():
        by_class: dict[int, list[str]] = {}
        for p, y in samples:
            by_class.setdefault(y, []).append(p)
        for y, paths in sorted(by_class.items()):
            if per_class is not None and len(paths) > per_class:
                paths = [paths[i] for i in sorted(rng.choice(len(paths), per_class, replace=False))]
            rows += [(os.path.abspath(p), index.class_names[y], split if split != "all" else "") for p in paths]
    return index.class_names, rows


def plant_copies(rows: list[tuple[str, str, str]], n: int, folder: Path, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Write n resized + re-encoded copies and n centre crops (90 % of each side) of random images;
    return (copy path, original path, kind) and add the copies to `rows` (in split "test")."""
    from PIL import Image

    from imgcls.io import load_image

    folder.mkdir(parents=True, exist_ok=True)
    planted = []
    picks = rng.choice(len(rows), min(2 * n, len(rows)), replace=False)
    for t, i in enumerate(picks):
        path, label, split = rows[i]
        img = load_image(path)
        w, h = img.size
        if t % 2 == 0:
            copy, kind = img.resize((max(8, round(w * 0.8)), max(8, round(h * 0.8))), Image.Resampling.BICUBIC), "resized+jpeg"
        else:
            dx, dy = round(w * 0.05), round(h * 0.05)
            copy, kind = img.crop((dx, dy, w - dx, h - dy)), "cropped"
        out = folder / f"copy{t:05d}.jpg"
        copy.save(out, quality=80)
        rows.append((str(out), label, "test" if split else ""))
        planted.append((str(out), path, kind))
    return planted


def flip_labels(rows: list[tuple[str, str, str]], class_names: list[str], fraction: float, rng: np.random.Generator) -> set[str]:
    """Give `fraction` of the rows another class, in place; return their paths."""
    flipped = set()
    for i in rng.choice(len(rows), int(round(fraction * len(rows))), replace=False):
        path, label, split = rows[i]
        others = [c for c in class_names if c != label]
        rows[i] = (path, others[int(rng.integers(len(others)))], split)
        flipped.add(path)
    return flipped


def write_manifest(rows: list[tuple[str, str, str]], path: Path) -> None:
    with_split = any(s for _, _, s in rows)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"] + (["split"] if with_split else []))
        w.writerows([[p, y] + ([s or "train"] if with_split else []) for p, y, s in rows])


def score_labels(report: dict, flipped: set[str]) -> dict:
    root = Path(report["root"])
    ranked = [os.path.normpath(root / e["paths"][0]) for e in report["findings"]["label_issues"]]
    top = ranked[: 2 * len(flipped)]
    hit_top, hit_all = sum(p in flipped for p in top), sum(p in flipped for p in ranked)
    return {
        "flipped": len(flipped),
        "flagged": len(ranked),
        "top2x_recall": round(hit_top / max(1, len(flipped)), 3),
        "top2x_precision": round(hit_top / max(1, len(top)), 3),
        "flagged_recall": round(hit_all / max(1, len(flipped)), 3),
        "flagged_precision": round(hit_all / max(1, len(ranked)), 3),
    }


def score_copies(report: dict, planted: list[tuple[str, str, str]]) -> dict:
    root = Path(report["root"])
    group_of = {}
    for kind in ("exact_duplicates", "near_duplicates"):
        for g, e in enumerate(report["findings"][kind]):
            for p in e["paths"]:
                group_of.setdefault(os.path.normpath(root / p), set()).add((kind, g))
    out = {}
    for kind in sorted({k for _, _, k in planted}):
        pairs = [(c, o) for c, o, k in planted if k == kind]
        found = sum(bool(group_of.get(os.path.normpath(c), set()) & group_of.get(os.path.normpath(o), set())) for c, o in pairs)
        out[kind] = f"{found}/{len(pairs)}"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=sorted(SETS), default="flowers")
    ap.add_argument("--per-class", type=int, help="at most this many images per class and split (default: all)")
    ap.add_argument("--flip-fraction", type=float, default=0.05)
    ap.add_argument("--plant-copies", type=int, default=0, help="plant this many resized+re-encoded and as many cropped copies")
    ap.add_argument("--no-features", action="store_true")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--feature-size", type=int, help="default: chosen from the images' size (audit.features.choose_feature_size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    a = ap.parse_args()

    from imgcls.audit import AuditOptions, format_summary, run_audit, write_report

    tarball, top = SETS[a.set]
    root = unpack(DATASETS_DIR / tarball, top=top)
    out = OUT_DIR / "audit" / a.set
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    class_names, rows = choose_samples(root, a.per_class, rng)
    planted = plant_copies(rows, a.plant_copies, out / "planted", rng) if a.plant_copies else []
    flipped = flip_labels(rows, class_names, a.flip_fraction, rng)
    manifest = out / "manifest.csv"
    write_manifest(rows, manifest)
    print(f"{machine_summary()}\n{a.set}: {len(rows)} images, {len(flipped)} labels flipped, {len(planted)} copies planted", flush=True)

    load_start = wait_for_quiet()[0] if not a.no_wait else load1()
    options = AuditOptions(features="none" if a.no_features else a.model, feature_size=a.feature_size, seed=a.seed, allow_outside_root=True)
    t0 = time.perf_counter()
    report = run_audit(manifest, options, progress=True, log=lambda s: print(s, flush=True))
    seconds = time.perf_counter() - t0
    write_report(report, out)
    print(format_summary(report))
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_summary(),
        "set": a.set,
        "images": len(rows),
        "per_class": a.per_class,
        "flip_fraction": a.flip_fraction,
        "plant_copies": a.plant_copies,
        "features": report["settings"]["features"],
        "feature_size": report["settings"].get("feature_size"),
        "seconds": round(seconds, 1),
        "timings": report["timings"],
        "load_start": round(load_start, 2),
        "load_end": round(load1(), 2),
        "probe_accuracy": report["probe_accuracy"],
        "counts": {k: len(v) for k, v in report["findings"].items()},
        "labels": score_labels(report, flipped) if flipped and not a.no_features else None,
        "copies": score_copies(report, planted) if planted else None,
    }
    print(json.dumps({k: result[k] for k in ("seconds", "timings", "probe_accuracy", "counts", "labels", "copies")}, indent=1))
    with open(OUT_DIR / "audit" / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
