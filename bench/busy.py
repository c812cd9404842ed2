"""Throughput on a shared machine (issue 19): training and prediction images/s on a quiet machine
and beside one and two competing busy processes, with the adaptive thread choice and with fixed
thread counts (1, and every usable core: the default before issue 19), side by side in one run.

    python bench/busy.py                        # about 3 minutes
    python bench/busy.py --seconds 1 --loads 0  # smoke run

Training: small_cnn at 32 px, batch 64, bf16 autocast where the CPU has AMX/AVX512-BF16,
channels_last, through imgcls's own `train_one_epoch` on random uint8 images in epochs of
--epoch-images. "adaptive" is what `imgcls train` does: the thread trial
(`training.measure.faster_thread_count`, its seconds reported apart, as a run pays it once)
and the re-check after every epoch (`recheck_threads`), which the timed window includes.
Prediction: `Classifier.predict_arrays` (bf16 weights, batches of 256, compile off) over
--predict-images prepared images per call; "adaptive" is the Classifier's `threads.ThreadTuner`,
its first trial inside an untimed warm-up call (a long job amortises it), its re-checks timed.

A busy process is a pure-Python loop spinning on one core, started with `multiprocessing` before
the measurements of its load level and stopped after them (each also stops by itself after
--max-busy-s). The row "1, after the choice" starts the neighbour only once adaptive has chosen
on the quiet machine: the re-checks must notice it. Every row gives the 1-minute load average at
its start and end; the goal of issue 19: with one busy process, adaptive keeps >= 50% of the quiet
throughput, and on a quiet machine it is within 5% of the fixed all-threads figure.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load1, machine_summary, markdown_table, wait_for_quiet  # noqa: E402

AFTER = "after"  # the load level whose neighbour starts once adaptive has chosen


def spin(deadline: float) -> None:
    """A busy neighbour: pure Python on one core until `deadline` (time.time())."""
    x = 0
    while time.time() < deadline:
        for _ in range(100_000):
            x += 1


class Neighbours:
    """`n` busy processes from `start()` (or the `with` block's start) to `stop()` (its end);
    each stops by itself after max_s seconds."""

    def __init__(self, n: int, max_s: float) -> None:
        self.n, self.max_s, self.procs = n, max_s, []

    def __enter__(self) -> Neighbours:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        deadline = time.time() + self.max_s
        self.procs = [ctx.Process(target=spin, args=(deadline,), daemon=True) for _ in range(self.n)]
        for p in self.procs:
            p.start()
        time.sleep(0.3 if self.n else 0.0)  # let them reach their cores

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.join(5)
        self.procs = []


# ---------------------------------------------------------------------------------- training


def train_setup(a: argparse.Namespace):
    """(model, optimizer, loss, TrainData, StepOptions) for small_cnn on random images."""
    import torch

    from imgcls.config import AugmentSpec
    from imgcls.models import create_model, get_entry
    from imgcls.runtime import cpu_has_fast_bf16
    from imgcls.training.loop import StepOptions, TrainData

    g = torch.Generator().manual_seed(0)
    spec = get_entry("small_cnn").default_spec
    images = torch.randint(0, 256, (a.epoch_images, spec.img_size, spec.img_size, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (a.epoch_images,), generator=g)
    model = create_model("small_cnn", num_classes=10).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    data = TrainData(images, labels, spec, AugmentSpec(crop="translate"), a.batch_size)
    options = StepOptions(torch.device("cpu"), torch.bfloat16 if cpu_has_fast_bf16() else None, True)
    return model, optimizer, torch.nn.CrossEntropyLoss(), data, options


def train_window(parts, seconds: float, recheck: Callable | None = None) -> tuple[float, int]:
    """Epochs of `train_one_epoch` for at least `seconds`; (images/s, epochs). recheck(images,
    seconds) runs after each epoch, inside the window (adaptive's re-check)."""
    import torch

    from imgcls.training.loop import train_one_epoch

    model, optimizer, loss_fn, data, options = parts
    images, epochs, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        stats = train_one_epoch(model, optimizer, loss_fn, data, torch.Generator().manual_seed(epochs), options)
        images, epochs = images + stats.images, epochs + 1
        if recheck is not None:
            recheck(stats.images, stats.seconds)
    return images / (time.perf_counter() - t0), epochs


def train_row(a: argparse.Namespace, mode: str, neighbours: Neighbours | None = None) -> dict:
    """One training measurement: mode "adaptive", or a fixed thread count as a string."""
    import torch

    from imgcls.threads import usable_cores
    from imgcls.training.measure import faster_thread_count, recheck_threads, time_train_steps, watch_threads

    parts = train_setup(a)
    notes: list[str] = []
    if mode == "adaptive":
        torch.set_num_threads(usable_cores())
        t0 = time.perf_counter()
        choice, step_s = faster_thread_count(*parts, usable_cores(), notes.append)
        trial_s = time.perf_counter() - t0
        watch = watch_threads(choice, a.batch_size, step_s)
        if neighbours is not None:
            neighbours.start()

        def recheck(images: int, seconds: float) -> None:
            recheck_threads(watch, *parts, images, seconds, notes.append)

        rate, epochs = train_window(parts, a.seconds * (2 if neighbours else 1), recheck)
        chosen = f"{choice.threads}" + "".join(f" -> {c.split()[1]}" for c in notes[1:])
        return {"rate": rate, "threads": chosen, "trial_s": trial_s, "epochs": epochs}
    torch.set_num_threads(int(mode))
    time_train_steps(*parts, n_steps=1, passes=1, warm_up_steps=2)  # warm-up at this count
    rate, epochs = train_window(parts, a.seconds)
    return {"rate": rate, "threads": mode, "trial_s": None, "epochs": epochs}


# ---------------------------------------------------------------------------------- prediction


def predict_row(a: argparse.Namespace, mode: str, neighbours: Neighbours | None = None) -> dict:
    """One prediction measurement: `Classifier.predict_arrays` calls for at least --seconds."""
    import numpy as np
    import torch

    from imgcls.models import create_model, get_entry
    from imgcls.predict import Classifier
    from imgcls.threads import usable_cores

    torch.set_num_threads(usable_cores())
    spec = get_entry("small_cnn").default_spec
    meta = {"arch": "small_cnn", "class_names": [str(i) for i in range(10)], "preprocess": spec.to_dict()}
    notes: list[str] = []
    threads = None if mode == "adaptive" else int(mode)
    clf = Classifier(create_model("small_cnn", num_classes=10), meta, compile="off", threads=threads, log=notes.append)
    s = spec.cache_size
    x = np.random.default_rng(0).integers(0, 256, (a.predict_images, s, s, 3), dtype=np.uint8)
    for _ in range(3):  # warm-up; adaptive: its first trial (one call to warm up, two at each count)
        clf.predict_arrays(x, batch_size=256)
    first = clf.runner.threads.choice.threads
    if neighbours is not None:
        neighbours.start()
    window = a.seconds * (2 if neighbours else 1)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < window:
        clf.predict_arrays(x, batch_size=256)
        n += len(x)
    rate = n / (time.perf_counter() - t0)
    last = clf.runner.threads.choice.threads
    return {"rate": rate, "threads": f"{first}" + (f" -> {last}" if last != first else ""), "trial_s": None, "epochs": None}


# ---------------------------------------------------------------------------------- the table


def measure_level(a: argparse.Namespace, level: str, modes: list[str]) -> list[list[object]]:
    """Every task and mode at one load level ("0", "1", "2" busy processes, or AFTER)."""
    rows = []
    for task, measure in (("train", train_row), ("predict", predict_row)):
        for mode in modes if level != AFTER else ["adaptive"]:
            la0 = load1()
            if level == AFTER:
                nb = Neighbours(1, a.max_busy_s)  # started by `measure` once adaptive has chosen
                try:
                    r = measure(a, mode, nb)
                finally:
                    nb.stop()
            else:
                with Neighbours(int(level), a.max_busy_s):
                    r = measure(a, mode)
            la1 = load1()
            label = "1, after the choice" if level == AFTER else level
            trial = f"{r['trial_s']:.1f}" if r["trial_s"] is not None else ""
            rows.append([task, label, mode, f"{r['rate']:.0f}", r["threads"], trial, f"{la0:.2f} / {la1:.2f}"])
            print(f"  {task:7s} busy {label:20s} {mode:8s} {r['rate']:7.0f} img/s  threads {r['threads']}", flush=True)
    return rows


def summary(rows: list[list[object]], most: str) -> list[str]:
    """The goal's two checks, per task: adaptive under one neighbour against the quiet figure at
    `most` threads (all usable cores), and adaptive against it when quiet."""
    rate = {(r[0], r[1], r[2]): float(r[3]) for r in rows}
    out = []
    for task in ("train", "predict"):
        quiet_all = rate.get((task, "0", most)) or max((v for (t, lv, _), v in rate.items() if t == task and lv == "0"), default=None)
        if quiet_all:
            if (task, "0", "adaptive") in rate:
                out.append(f"{task}: quiet, adaptive {rate[(task, '0', 'adaptive')] / quiet_all:.0%} of all threads (goal >= 95%)")
            for lv in ("1", "1, after the choice"):
                if (task, lv, "adaptive") in rate:
                    out.append(
                        f"{task}: busy {lv}, adaptive {rate[(task, lv, 'adaptive')] / quiet_all:.0%} of quiet all threads (goal >= 50%)"
                    )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="timed window per measurement (twice that for 'after'; default 5)")
    p.add_argument(
        "--loads", default="0,1,2,after", help="busy processes per level, comma-separated; 'after': one, started after the choice"
    )
    p.add_argument("--modes", default="", help="comma-separated: adaptive and fixed counts (default adaptive,1,<usable cores>)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch (default 64)")
    p.add_argument("--epoch-images", type=int, default=256, help="images per training epoch: the re-check runs after each (default 256)")
    p.add_argument("--predict-images", type=int, default=512, help="images per predict_arrays call (default 512)")
    p.add_argument("--max-busy-s", type=float, default=120.0, help="a busy process stops by itself after this long (default 120)")
    p.add_argument("--max-wait", type=float, default=60.0, help="seconds to wait for a quiet machine first (load < 1.5; default 60)")
    a = p.parse_args()
    import torch

    from imgcls.threads import usable_cores

    usable = usable_cores()
    modes = a.modes.split(",") if a.modes else ["adaptive", "1", str(usable)]
    print(f"machine: {machine_summary()}; usable cores {usable}; torch {torch.__version__}", flush=True)
    la, waited, noisy = wait_for_quiet(max_wait_s=a.max_wait)
    print(f"load {la:.2f} at the start{' (noisy: did not get quiet)' if noisy else ''}", flush=True)
    t0 = time.perf_counter()
    rows = []
    for level in a.loads.split(","):
        rows += measure_level(a, level.strip(), modes)
    print()
    header = ["task", "busy processes", "threads asked", "img/s", "threads used", "trial s", "load start / end"]
    print(markdown_table(header, rows))
    print()
    for line in summary(rows, str(usable)):
        print(line)
    print(f"\nmachine: {machine_summary()}; {time.perf_counter() - t0:.0f} s of measuring")
    return 0


if __name__ == "__main__":
    sys.exit(main())
