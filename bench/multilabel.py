"""Multi-label benchmark (issue 15): MIML natural scenes (2,000 photos, 5 labels, 1.24 per image).

A seeded 80/20 split of the images (iterative stratification, imgcls.multilabel, seed 0) goes
into a manifest `path,labels,split` next to the data (train / test); each run trains on the 80 %
(from which `imgcls train` holds out its own validation images for the thresholds) and is scored
on the 20 % with `imgcls evaluate RUN MANIFEST --split test --json`. Through the public CLI:

- default:   imgcls train MANIFEST --out RUN                     (whatever the default chooses)
- probe:     ... --model efficientnet_lite0 --pretrained --strategy linear-probe
- fine-tune: ... --model efficientnet_lite0 --pretrained --strategy fine-tune --epochs E

Side by side: macro mAP, macro F1, Hamming loss, subset accuracy and the wall time of `imgcls
train` (start-up, decoding, training, thresholds). The issue's goal with pretrained features:
Hamming loss <= 0.08 and macro mAP >= 0.90 in under 2 minutes on 2 cores; published
multi-instance methods of 2006-2010 report a Hamming loss of about 0.16-0.20 on this data.

    python bench/multilabel.py                               # the three runs (several minutes)
    python bench/multilabel.py --runs probe --img-size 160   # one run, another input size
    python bench/multilabel.py --tag=-pw --train-args --pos-weight auto  # positive weights (against the runs without)
    python bench/multilabel.py --subset 60 --ft-epochs 1 --tag=-smoke     # a smoke run on 60 images
    python bench/multilabel.py --table                       # the table of bench/out/multilabel/results.jsonl

Each finished row is appended to bench/out/multilabel/results.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS_DIR, OUT_DIR, load1, machine_summary, markdown_table, run_timed, shell_line, unpack, wait_for_quiet  # noqa: E402

from imgcls.multilabel import iterative_stratified_split, split_label_cell  # noqa: E402

RESULTS = OUT_DIR / "multilabel" / "results.jsonl"
RUNS = ("default", "probe", "fine-tune")
PRETRAINED = ["--model", "efficientnet_lite0", "--pretrained"]
COLUMNS = ("name", "macro_map", "macro_f1", "hamming_loss", "subset_accuracy", "train_wall_s", "load_start", "train_cmd")


def write_manifest(root: Path, seed: int, subset: int | None) -> Path:
    """root/split80-seedS[-nN].csv: labels.csv's images with a `split` column, a seeded 80/20
    iterative stratified split (every label in both parts); `subset`: the first N images of a
    seeded shuffle only (smoke runs)."""
    with open(root / "labels.csv", newline="") as f:
        rows = [(r["path"], split_label_cell(r["labels"])) for r in csv.DictReader(f)]
    if subset:
        keep = np.random.default_rng(seed).permutation(len(rows))[:subset]
        rows = [rows[i] for i in sorted(keep)]
    names = sorted({lab for _, labs in rows for lab in labs})
    y = np.array([[lab in labs for lab in names] for _, labs in rows], dtype=np.uint8)
    _, test = iterative_stratified_split(y, 0.2, seed, names)
    is_test = np.zeros(len(rows), dtype=bool)
    is_test[test] = True
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "labels", "split"])
    w.writerows([p, ";".join(labs), "test" if t else "train"] for (p, labs), t in zip(rows, is_test))
    out = root / (f"split80-seed{seed}" + (f"-n{subset}" if subset else "") + ".csv")
    out.write_text(buf.getvalue())
    print(f"{out}: {len(rows)} images, {int(is_test.sum())} test; labels {names}", flush=True)
    return out


def run_args(run: str, opts: argparse.Namespace) -> list[str]:
    """The `imgcls train` flags of one run beyond DATA and --out."""
    size = ["--img-size", str(opts.img_size)] if opts.img_size else []
    if run == "default":
        return []
    if run == "probe":
        return [*PRETRAINED, "--strategy", "linear-probe", *size]
    return [*PRETRAINED, "--strategy", "fine-tune", "--epochs", str(opts.ft_epochs), *size]


def train_and_score(run: str, manifest: Path, opts: argparse.Namespace) -> dict:
    """One timed `imgcls train` on the manifest's train split and `imgcls evaluate --split test`."""
    name = f"miml-{run}{opts.tag}"
    run_dir = OUT_DIR / "multilabel" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    train_args = ["train", str(manifest), "--out", str(run_dir), *run_args(run, opts), *opts.train_args, "--quiet"]
    print(f"\n== {name}", flush=True)
    _, waited, timed_out = wait_for_quiet(opts.load_threshold, 15.0, opts.max_wait)
    load_start = load1()
    t = run_timed(train_args)
    load_end = load1()
    if t.returncode != 0:
        print(t.stdout[-3000:], t.stderr[-3000:], sep="\n")
        raise SystemExit(f"{name}: imgcls train failed with exit code {t.returncode}")
    print("\n".join("  | " + line for line in t.stdout.strip().splitlines()[-8:]), flush=True)
    eval_args = ["evaluate", str(run_dir), str(manifest), "--split", "test", "--json", "--quiet"]
    e = run_timed(eval_args)
    if e.returncode != 0:
        print(e.stdout[-3000:], e.stderr[-3000:], sep="\n")
        raise SystemExit(f"{name}: imgcls evaluate failed with exit code {e.returncode}")
    m = json.loads(e.stdout)
    meta = json.loads((run_dir / "model.json").read_text())
    row = {
        "name": name,
        "arch": meta["arch"],
        "strategy": meta["strategy"],
        "img_size": meta["preprocess"]["img_size"],
        **{k: round(m[k], 4) for k in ("macro_map", "micro_map", "macro_f1", "micro_f1", "hamming_loss", "subset_accuracy")},
        "label_cardinality": round(m["label_cardinality"], 3),
        "label_cardinality_true": round(m["label_cardinality_true"], 3),
        "test_images": m["num_samples"],
        "thresholds": [round(x, 3) for x in meta["thresholds"]],
        "train_wall_s": round(t.seconds, 1),
        "train_cpu_s": round(t.cpu_s, 1),
        "load_start": round(load_start, 2),
        "load_end": round(load_end, 2),
        "load_wait_s": round(waited),
        "load_wait_timed_out": timed_out,
        "train_cmd": shell_line(train_args),
        "eval_cmd": shell_line(eval_args),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_summary(),
    }
    print(
        f"  -> macro mAP {row['macro_map']}, macro F1 {row['macro_f1']}, Hamming loss {row['hamming_loss']}, "
        f"{row['train_wall_s']}s (load {load_start:.2f} -> {load_end:.2f})",
        flush=True,
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def table(rows: list[dict]) -> str:
    return markdown_table(list(COLUMNS), [[r.get(k, "") for k in COLUMNS] for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), help="which runs (default all three)")
    p.add_argument("--img-size", type=int, help="input size of the pretrained runs (default: the model's, 224)")
    p.add_argument("--ft-epochs", type=int, default=3, help="epochs of the fine-tune after its probe (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the 80/20 split (default 0)")
    p.add_argument("--subset", type=int, help="use only this many images (a smoke run)")
    p.add_argument("--tag", default="", help="suffix for the run names (e.g. --tag=-pw)")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[], help="more `imgcls train` flags for every run (last)")
    p.add_argument("--load-threshold", type=float, default=1.5, help="wait for a 1-minute load average below this")
    p.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for a quiet machine before going on")
    p.add_argument("--table", action="store_true", help="print the table of every recorded row and stop")
    opts = p.parse_args()
    if opts.table:
        rows = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []
        print(table(rows))
        return
    root = unpack(DATASETS_DIR / "miml-scenes.tar.gz")
    manifest = write_manifest(root, opts.seed, opts.subset)
    print(f"machine: {machine_summary()}", flush=True)
    rows = [train_and_score(run, manifest, opts) for run in opts.runs]
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
