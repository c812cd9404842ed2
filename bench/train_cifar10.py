"""CIFAR-10 from JPEG files: test accuracy and speed of `imgcls train` under a time budget,
against the standard PyTorch pipeline on the same network.

    python bench/train_cifar10.py                       # budgets 4 and 8 min, seeds 0 1 2, reference
    python bench/train_cifar10.py --budgets 4 --seeds 0 --skip-reference
    python bench/train_cifar10.py --table-only          # print the tables from the saved runs
    python bench/train_cifar10.py --ablate --budgets 4 --seeds 0   # the fast recipe's options, one at a time and together

Each imgcls run is two commands, timed end to end (decoding included):
    imgcls train CIFAR --out RUN --val-fraction 0 --time-budget B --seed S --quiet
    imgcls evaluate RUN CIFAR/test --json --quiet      (the model's recommended TTA)
The reference is what most PyTorch code does: torch.utils.data.DataLoader with 2 worker processes
decoding each JPEG with PIL for every step, per-image RandomCrop(32, padding=4) + horizontal
flip + ToTensor + Normalize written with NumPy, fp32 NCHW, the same small_cnn network and
optimizer; it runs a fixed number of steps and gives images/s. Every run first waits for the
machine to be quiet (1-minute load < 1.5) and records the load at its start and end.
Runs are appended to bench/out/train_cifar10/runs.jsonl, so seeds can be added later.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS_DIR, OUT_DIR, load1, machine_summary, markdown_table, run_timed, shell_line, unpack, wait_for_quiet  # noqa: E402

MAX_WAIT = [600.0]  # seconds to wait for a quiet machine before measuring anyway (marked noisy)
RESULTS = OUT_DIR / "train_cifar10"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# ----------------------------------------------------------------------------- the reference pipeline


class JpegFolder:
    """A map-style dataset like torchvision's ImageFolder + transforms, decoding on every access."""

    def __init__(self, root: Path, train: bool, seed: int = 0) -> None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.samples = [(str(f), i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())]
        self.train = train
        self.mean = np.asarray(CIFAR_MEAN, dtype=np.float32)
        self.std = np.asarray(CIFAR_STD, dtype=np.float32)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        import torch
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.uint8)  # (32, 32, 3)
        if self.train:
            # RandomCrop(32, padding=4): zero-pad, random 32x32 window; RandomHorizontalFlip(0.5)
            p = np.pad(a, ((4, 4), (4, 4), (0, 0)))
            y, x = self.rng.integers(0, 9, size=2)
            a = p[y : y + 32, x : x + 32]
            if self.rng.random() < 0.5:
                a = a[:, ::-1]
        t = (a.astype(np.float32) / 255.0 - self.mean) / self.std  # ToTensor + Normalize
        return torch.from_numpy(np.ascontiguousarray(t.transpose(2, 0, 1))), label


def _worker_init(worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)
    info = torch.utils.data.get_worker_info()
    info.dataset.rng = np.random.default_rng(info.seed % 2**32)


FULL_WIDTHS = [64, 256, 256]


def reference_images_per_s(cifar: Path, steps: int, warmup: int, batch_size: int, widths: list[int] = FULL_WIDTHS) -> dict:
    """Train small_cnn (at `widths`) in fp32 from a DataLoader(num_workers=2) for `steps` steps; images/s."""
    import torch
    from torch import nn

    from imgcls.models import create_model

    torch.manual_seed(0)
    model = create_model("small_cnn", 10, widths=widths)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.85, nesterov=True, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2)
    loader = torch.utils.data.DataLoader(
        JpegFolder(cifar / "train", train=True),
        batch_size=batch_size,
        shuffle=True,
        num_workers=2,
        drop_last=True,
        persistent_workers=True,
        worker_init_fn=_worker_init,
    )
    model.train()
    it = iter(loader)
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        x, y = next(it)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    return {
        "steps": steps,
        "batch_size": batch_size,
        "seconds": seconds,
        "images_per_s": steps * batch_size / seconds,
        "widths": list(widths),
    }


def compile_check(cifar: Path, batch_size: int, steps: int) -> list[list[object]]:
    """Training step images/s of small_cnn (bf16 autocast, channels_last, batched augmentation on
    the decoded uint8 images), eager against torch.compile (inductor); the first step (which
    compiles) is timed apart."""
    import torch
    from torch import nn

    from imgcls.data import decode_images, index_dataset
    from imgcls.models import create_model, get_entry
    from imgcls.training.loop import StepOptions, TrainData, train_one_epoch
    from imgcls.training.recipes import init_whitening
    from imgcls.transforms import AugmentSpec

    spec = get_entry("small_cnn").default_spec
    paths = [p for p, _ in index_dataset(cifar / "train").splits["all"]][: batch_size * steps]
    images = torch.from_numpy(np.ascontiguousarray(decode_images(paths, spec, progress=False).images))
    labels = torch.zeros(len(images), dtype=torch.long)
    rows = []
    for name in ("eager", "torch.compile (inductor)"):
        torch.manual_seed(0)
        model = create_model("small_cnn", 10).to(memory_format=torch.channels_last)
        init_whitening(model, images, spec)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.85, nesterov=True)
        run = torch.compile(model) if name != "eager" else model
        g = torch.Generator().manual_seed(0)
        loss_fn, aug, options = (
            nn.CrossEntropyLoss(label_smoothing=0.2),
            AugmentSpec().resolve(32),
            StepOptions(torch.device("cpu"), torch.bfloat16),
        )
        t0 = time.perf_counter()
        train_one_epoch(
            run, opt, loss_fn, TrainData(images[:batch_size], labels[:batch_size], spec, aug, batch_size), g, options
        )  # first step: compiles
        first = time.perf_counter() - t0
        la0 = load1()
        stats = train_one_epoch(run, opt, loss_fn, TrainData(images, labels, spec, aug, batch_size), g, options)
        rows.append([name, f"{first:.1f}", f"{stats.images / stats.seconds:.0f}", f"{la0:.2f} / {load1():.2f}"])
        print(f"  {name}: first step {first:.1f} s, {stats.images / stats.seconds:.0f} img/s", flush=True)
    return rows


# ----------------------------------------------------------------------------- imgcls runs


def run_imgcls(cifar: Path, budget: float, seed: int, extra: list[str], name: str | None = None) -> dict:
    run = RESULTS / (name or f"run-b{budget:g}-s{seed}")
    la0, waited, noisy = wait_for_quiet(max_wait_s=MAX_WAIT[0])
    # --overwrite: a rerun of the benchmark replaces its earlier run of the same budget and seed
    train_args = [
        "train",
        str(cifar),
        "--out",
        str(run),
        "--overwrite",
        "--val-fraction",
        "0",
        "--time-budget",
        f"{budget:g}",
        "--seed",
        str(seed),
        "--quiet",
        *extra,
    ]
    tr = run_timed(train_args)
    run.mkdir(parents=True, exist_ok=True)
    (run / "train.log").write_text(tr.stdout + tr.stderr)  # the planner's and each epoch's lines
    if tr.returncode != 0:
        raise SystemExit(f"imgcls train failed:\n{tr.stderr[-3000:]}")
    eval_args = ["evaluate", str(run), str(cifar / "test"), "--json", "--quiet"]
    ev = run_timed(eval_args)
    if ev.returncode != 0:
        raise SystemExit(f"imgcls evaluate failed:\n{ev.stderr[-3000:]}")
    la1 = load1()
    m = json.loads(ev.stdout)
    meta = json.loads((run / "model.json").read_text())
    n_train = meta["split"]["counts"]["train"]
    images, train_s = history_images(run)
    epochs = round(images / n_train, 2)  # the last epoch of a budgeted run may be partial
    return {
        "budget_min": budget,
        "seed": seed,
        "accuracy": m["accuracy"],
        "tta": m.get("tta"),
        "epochs": epochs,
        "widths": meta.get("model_kwargs", {}).get("widths", FULL_WIDTHS),  # a time budget may narrow the network
        "train_wall_s": tr.seconds,
        "eval_wall_s": ev.seconds,
        "total_wall_s": tr.seconds + ev.seconds,
        "loop_images_per_s": images / train_s,
        "e2e_images_per_s": images / (tr.seconds + ev.seconds),
        "fit_test_accuracy": meta.get("metrics", {}).get("test", {}).get("accuracy"),
        "load_start": round(la0, 2),
        "load_end": round(la1, 2),
        "waited_s": round(waited),
        "noisy": noisy,
        "commands": [shell_line(train_args), shell_line(eval_args)],
        "extra": extra,
        "run": str(run),
        "machine": machine_summary(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def evaluate_only(run: Path, cifar: Path) -> dict:
    """`imgcls evaluate RUN CIFAR/test` alone (an ablation that changes only the evaluation)."""
    eval_args = ["evaluate", str(run), str(cifar / "test"), "--json", "--quiet"]
    ev = run_timed(eval_args)
    if ev.returncode != 0:
        raise SystemExit(f"imgcls evaluate failed:\n{ev.stderr[-3000:]}")
    m = json.loads(ev.stdout)
    return {"accuracy": m["accuracy"], "tta": m.get("tta"), "eval_wall_s": ev.seconds, "load_end": round(load1(), 2)}


def history_images(run: Path) -> tuple[float, float]:
    """(images trained, seconds in the training loop) from RUN/metrics.csv."""
    with open(run / "metrics.csv", newline="") as f:
        hist = list(csv.DictReader(f))
    return sum(float(r["images_per_s"]) * float(r["epoch_time_s"]) for r in hist), sum(float(r["epoch_time_s"]) for r in hist)


def read_runs() -> list[dict]:
    path = RESULTS / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def tables(rows: list[dict]) -> str:
    all_runs = [r for r in rows if r["kind"] == "imgcls"]
    latest = {(r["budget_min"], r["seed"]): r for r in all_runs}  # a re-run of a (budget, seed) replaces the earlier one
    runs = list(latest.values())
    earlier = [r for r in all_runs if latest[(r["budget_min"], r["seed"])] is not r]
    refs = [r for r in rows if r["kind"] == "reference"]
    out = []
    ref_by_widths = {tuple(r.get("widths", FULL_WIDTHS)): r["images_per_s"] for r in refs}  # the latest per network
    if runs:
        out.append(
            markdown_table(
                [
                    "budget",
                    "seed",
                    "widths",
                    "test acc",
                    "TTA",
                    "epochs",
                    "train wall s",
                    "evaluate wall s",
                    "total s",
                    "train-loop img/s",
                    "end-to-end img/s",
                    "load start/end",
                ],
                [
                    [
                        f"{r['budget_min']:g} min",
                        r["seed"],
                        "/".join(map(str, r.get("widths", FULL_WIDTHS))),
                        f"{r['accuracy']:.4f}",
                        r["tta"],
                        r["epochs"],
                        f"{r['train_wall_s']:.0f}",
                        f"{r['eval_wall_s']:.0f}",
                        f"{r['total_wall_s']:.0f}",
                        f"{r['loop_images_per_s']:.0f}",
                        f"{r['e2e_images_per_s']:.0f}",
                        f"{r['load_start']:.2f} / {r['load_end']:.2f}" + (" (noisy)" if r["noisy"] else ""),
                    ]
                    for r in runs + earlier
                ],
            )
        )
        if earlier:
            out.append(
                f"\nThe last {len(earlier)} row(s) are earlier runs of the same "
                "budget and seed, replaced by the re-run above them in the summary."
            )
        summary = []
        for b in sorted({r["budget_min"] for r in runs}):
            rs = [r for r in runs if r["budget_min"] == b]
            acc = [r["accuracy"] for r in rs]
            loop = statistics.mean(r["loop_images_per_s"] for r in rs)
            e2e = statistics.mean(r["e2e_images_per_s"] for r in rs)
            nets = {tuple(r.get("widths", FULL_WIDTHS)) for r in rs}
            ref = ref_by_widths.get(next(iter(nets))) if len(nets) == 1 else None  # like for like: the same network
            summary.append(
                [
                    f"{b:g} min",
                    len(rs),
                    f"{statistics.mean(acc):.4f}",
                    f"{statistics.stdev(acc):.4f}" if len(acc) > 1 else "n/a",
                    f"{min(acc):.4f} - {max(acc):.4f}",
                    f"{statistics.mean(r['total_wall_s'] for r in rs):.0f}",
                    f"{loop:.0f}",
                    f"{e2e:.0f}",
                    f"{loop / ref:.1f}x / {e2e / ref:.1f}x" if ref else "n/a",
                ]
            )
        out.append("")
        out.append(
            markdown_table(
                [
                    "budget",
                    "seeds",
                    "mean test acc",
                    "std",
                    "min - max",
                    "mean total s",
                    "train-loop img/s",
                    "end-to-end img/s",
                    "vs reference (loop / end-to-end)",
                ],
                summary,
            )
        )
    if refs:
        latest = {tuple(r.get("widths", FULL_WIDTHS)): r for r in refs}
        out.append("")
        out.append(
            markdown_table(
                ["pipeline", "small_cnn widths", "images/s", "steps x batch", "load start/end"],
                [
                    [
                        "reference: DataLoader(2 workers) + PIL per image + NumPy transforms, fp32",
                        "/".join(map(str, w)),
                        f"{r['images_per_s']:.0f}",
                        f"{r['steps']} x {r['batch_size']}",
                        f"{r['load_start']:.2f} / {r['load_end']:.2f}" + (" (noisy)" if r["noisy"] else ""),
                    ]
                    for w, r in latest.items()
                ],
            )
        )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[4, 8], help="time budgets in minutes (default 4 8)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--reference-only", action="store_true")
    p.add_argument("--ref-steps", type=int, default=20, help="timed reference steps after 3 warm-up steps (default 20)")
    p.add_argument("--ref-batch", type=int, default=512, help="reference batch size (default 512, as imgcls's fast recipe)")
    p.add_argument(
        "--ref-widths",
        default="64/256/256",
        help="small_cnn widths of the reference (default the full 64/256/256; 32/128/128 to match a run a time budget narrowed)",
    )
    p.add_argument("--table-only", action="store_true", help="print the tables from bench/out/train_cifar10/runs.jsonl")
    p.add_argument("--extra", default="", help="extra flags for imgcls train, e.g. '--batch-size 256'")
    p.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for load < 1.5 before each run (default 600)")
    p.add_argument(
        "--ablate",
        action="store_true",
        help="the fast recipe's options (muon, progressive resizing, selective TTA, label smoothing 0.1, silu, colour jitter) one at "
        "a time and all together against the baseline, for each budget and seed; a table (bench/train_cifar10_ablate.py)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        help="with --ablate: only these variants (first word of the name: baseline muon progressive tta-select all ...)",
    )
    p.add_argument("--data", help="a folder with train/ and test/ class folders instead of CIFAR-10 (smoke runs)")
    p.add_argument("--compile-check", action="store_true", help="only compare eager and torch.compile training steps (batch 256, 40 steps)")
    a = p.parse_args()
    print(f"machine: {machine_summary()}", flush=True)
    MAX_WAIT[0] = a.max_wait
    RESULTS.mkdir(parents=True, exist_ok=True)
    if a.compile_check:
        cifar = unpack(DATASETS_DIR / "cifar10-jpg.tar.gz")
        wait_for_quiet(max_wait_s=a.max_wait)
        print(
            markdown_table(
                ["small_cnn training step (batch 256, bf16, 40 steps)", "first step s (compile)", "steady img/s", "load start/end"],
                compile_check(cifar, 256, 40),
            )
        )
        return 0
    if not a.table_only:
        cifar = Path(a.data) if a.data else unpack(DATASETS_DIR / "cifar10-jpg.tar.gz")
        if a.ablate:
            from train_cifar10_ablate import ablation_table, run_ablation

            rows = [
                r
                for b in a.budgets
                for s in a.seeds
                for r in run_ablation(cifar, b, s, a.extra.split(), run_imgcls, evaluate_only, RESULTS, a.variants)
            ]
            print(ablation_table(rows))
            return 0
        log = open(RESULTS / "runs.jsonl", "a")
        if not a.skip_reference:
            print("reference pipeline ...", flush=True)
            la0, _, noisy = wait_for_quiet(max_wait_s=MAX_WAIT[0])
            r = reference_images_per_s(cifar, a.ref_steps, 3, a.ref_batch, [int(w) for w in a.ref_widths.split("/")])
            r.update(
                kind="reference",
                load_start=round(la0, 2),
                load_end=round(load1(), 2),
                noisy=noisy,
                time=time.strftime("%Y-%m-%d %H:%M:%S"),
                machine=machine_summary(),
            )
            print(f"  {r['images_per_s']:.0f} images/s", flush=True)
            log.write(json.dumps(r) + "\n")
            log.flush()
        if not a.reference_only:
            for budget in a.budgets:
                for seed in a.seeds:
                    print(f"imgcls, budget {budget:g} min, seed {seed} ...", flush=True)
                    r = run_imgcls(cifar, budget, seed, a.extra.split())
                    r["kind"] = "imgcls"
                    print(f"  accuracy {r['accuracy']:.4f}, {r['epochs']} epochs, {r['total_wall_s']:.0f} s", flush=True)
                    log.write(json.dumps(r) + "\n")
                    log.flush()
        log.close()
    print(tables(read_runs()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
