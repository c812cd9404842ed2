"""Throughput of `imgcls predict --engine ray` against the single-process path, on the same files.

    python bench/predict_ray.py
    python bench/predict_ray.py --images 300 --size 64 --workers 2

Writes --images generated --size px PNGs (synthetic shapes on noise) and a seeded, untrained
small_cnn model folder at --size px under bench/out/predict_ray/, then times, in images/s:

- the CLI end to end, `imgcls predict MODEL DIR --json` against `imgcls predict MODEL DIR --engine
  ray --workers N --out preds.parquet` (Ray's start, its actors' imports and model loads included);
- in this process with everything started: `Classifier.predict` on the paths (model loaded) against
  `predict_ray.predict_to_file` with Ray already running (the actor pool's start included, as each
  call builds a new one).

It checks that the Ray rows give the single-process labels. The load average (1 minute) is
printed at the start and the end: the benchmark machines are shared, a figure under load says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, load1, machine_summary, markdown_table, run_timed, wait_for_quiet  # noqa: E402

SHAPES = 4


def make_inputs(root: Path, n: int, size: int) -> tuple[Path, Path]:
    """(image folder, model folder): `n` PNGs of coloured shapes on noise, and a seeded small_cnn."""
    import torch
    from PIL import Image, ImageDraw

    from imgcls.artifact import save_artifact
    from imgcls.models import create_model
    from imgcls.transforms import PreprocessSpec

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = Image.fromarray(np.clip(rng.normal(120, 20, (size, size, 3)), 0, 255).astype(np.uint8))
        x, y = (int(v) for v in rng.integers(0, size // 2, 2))
        r = int(rng.integers(size // 6, size // 3))
        ImageDraw.Draw(img).ellipse((x, y, x + 2 * r, y + 2 * r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        img.save(images / f"{i:04d}.png")
    torch.manual_seed(0)
    model = create_model("small_cnn", SHAPES).eval()
    meta = {"arch": "small_cnn", "class_names": [f"shape{i}" for i in range(SHAPES)], "preprocess": PreprocessSpec(img_size=size).to_dict()}
    return images, save_artifact(root / "model", model, meta)


def cli_rows(model: Path, images: Path, n: int, workers: int, out: Path) -> tuple[list[list[object]], list[str], list[str]]:
    """End-to-end CLI runs: (table rows, local labels, Ray labels)."""
    from imgcls.predict_ray import read_predictions

    local = run_timed(["predict", str(model), str(images), "--json", "--compile", "off"])
    if local.returncode:
        raise SystemExit(f"local predict failed: {local.stderr[-2000:]}")
    ray_run = run_timed(["predict", str(model), str(images), "--engine", "ray", "--workers", str(workers), "--out", str(out)])
    if ray_run.returncode:
        raise SystemExit(f"ray predict failed: {ray_run.stderr[-2000:]}")
    rows = [
        ["CLI, single process (--json)", n, f"{local.seconds:.1f}", f"{n / local.seconds:.0f}"],
        [f"CLI, --engine ray, {workers} actors (Ray start included)", n, f"{ray_run.seconds:.1f}", f"{n / ray_run.seconds:.0f}"],
    ]
    return rows, [r["label"] for r in json.loads(local.stdout)], [r["label"] for r in read_predictions(out)]


def in_process_rows(model: Path, paths: list[str], workers: int, out: Path) -> list[list[object]]:
    """Warm runs in this process: Classifier.predict with the model loaded; predict_to_file with Ray running."""
    from imgcls.predict import Classifier
    from imgcls.predict_ray import predict_to_file, start_ray

    clf = Classifier.load(model, compile="off")
    clf.predict(paths[:64], errors="report")  # warm-up: thread choice, first allocations
    t0 = time.perf_counter()
    clf.predict(paths, errors="report")
    local_s = time.perf_counter() - t0
    started = start_ray(None, workers)
    try:
        t0 = time.perf_counter()
        predict_to_file(str(model), paths, out, num_workers=workers)
        ray_s = time.perf_counter() - t0
    finally:
        if started:
            import ray

            ray.shutdown()
    n = len(paths)
    return [
        ["in process, Classifier.predict (model loaded)", n, f"{local_s:.2f}", f"{n / local_s:.0f}"],
        [f"in process, predict_to_file, {workers} actors (Ray running)", n, f"{ray_s:.2f}", f"{n / ray_s:.0f}"],
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=300, help="generated images (default 300)")
    p.add_argument("--size", type=int, default=64, help="image and model input size in px (default 64)")
    p.add_argument("--workers", type=int, default=2, help="Ray actors (default 2)")
    p.add_argument("--max-wait", type=float, default=0.0, help="seconds to wait for a 1-minute load < 1.5 first (default 0: measure now)")
    a = p.parse_args()
    root = OUT_DIR / "predict_ray"
    images, model = make_inputs(root, a.images, a.size)
    paths = sorted(str(f) for f in images.glob("*.png"))
    print(machine_summary())
    if a.max_wait:
        wait_for_quiet(max_wait_s=a.max_wait)
    load_start = load1()
    rows, local_labels, ray_labels = cli_rows(model, images, len(paths), a.workers, root / "preds.parquet")
    rows += in_process_rows(model, paths, a.workers, root / "preds_warm.parquet")
    load_end = load1()
    print(markdown_table(["run", "images", "seconds", "images/s"], rows))
    same = sum(x == y for x, y in zip(local_labels, ray_labels))
    print(f"\nlabels equal in {same} of {len(local_labels)} rows; 1-minute load {load_start:.2f} at the start, {load_end:.2f} at the end")
    return 0 if same == len(local_labels) == len(ray_labels) else 1


if __name__ == "__main__":
    sys.exit(main())
