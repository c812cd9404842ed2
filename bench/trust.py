"""Trust toolbox benchmarks: calibration, prediction sets, "unknown" detection (imgcls.calibration,
imgcls.ood) and class balance, on the shared data sets. Four modes; DATA defaults to a shared set,
unpacked into bench/data:

    python bench/trust.py ood [DATA] [--known 12] [--ood-data FOLDER ...] [--max-images 1000]
    python bench/trust.py ece [--sets cifar10,mnist,eurosat,oxford17] [--time-budget [SET=]MIN ...] [--epochs [SET=]N ...]
    python bench/trust.py imbalance [DATA] [--ratios 10 50] [--modes none,auto] [--time-budget 2]
    python bench/trust.py measure MODEL DATA [--ood-data FOLDER ...]

ood (issue 12's "unknown" benchmark): trains the pretrained default (efficientnet_lite0, linear
probe) on --known classes of DATA (default: 12 of the 17 Oxford flowers, drawn with --seed), then
`measure`s it: the other classes are the "held-out classes" unknowns, and every --ood-data folder
(default: the CIFAR-10 and EuroSAT test images) another unknown set. For each score (msp, energy,
mahalanobis, knn) and unknown set: AUROC and FPR@95TPR, the share of unknown images accepted when
95% of the known test images are. Goals: AUROC >= 0.9 against another data set, >= 0.8 against
held-out classes.

ece: for each data set of --sets (oxford17 with a seeded stratified 80/20 split written as a CSV
manifest), `imgcls train` with the default command (plus --time-budget / --epochs where given),
then `imgcls evaluate --json --coverage 0.9` on the test split: accuracy, ECE (calibrated),
ECE uncalibrated, coverage and mean set size. Goal: ECE <= 0.03.

imbalance: DATA's training split (default CIFAR-10) cut to a long tail: with C classes in a seeded
random order, class i keeps n_max * ratio^(-i / (C - 1)) images (Cui et al. 2019's exponential
profile; n_max: the smallest class's count, or --max-per-class). The test split stays balanced
(--test-per-class). For each ratio, one run per --class-balance mode in --modes (small_cnn, at
most --time-budget minutes each), then `evaluate`: accuracy, balanced accuracy, macro-F1, worst
recall, ECE, side by side.

measure: MODEL is a model folder written by `imgcls train` on DATA or on some of its classes; see
bench/trust_measure.py. Every mode prints its command and the expected time first, and writes
its output (MODE.log) and results (MODE.json) to --out (default bench/out/trust, git-ignored).
Nothing is timed, so the modes do not wait for a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS_DIR, OUT_DIR, machine_summary, unpack  # noqa: E402
from trust_measure import measure  # noqa: E402
from trust_runs import ece, imbalance, ood  # noqa: E402

MODES = ("measure", "imbalance", "ood", "ece")
TARBALLS = {  # shared data set -> (tarball, its folder once unpacked, the folder of its test images)
    "cifar10": ("cifar10-jpg.tar.gz", "cifar10", "test"),
    "mnist": ("mnist-png.tar.gz", "mnist_png", "test"),
    "eurosat": ("eurosat-rgb.tar.gz", "eurosat_rgb", "test"),
    "oxford17": ("oxford17-flowers.tar.gz", "oxford17_flowers", None),
}
# Minutes per data set that `ece` trains by default: enough for the default recipe's calibration to
# settle on 2 cores (cifar10: the 4-minute bench of bench/train_cifar10.py), bounded in all.
ECE_BUDGETS = {"cifar10": 4.0, "mnist": 2.0, "eurosat": 4.0, "oxford17": 3.0}


def shared(name: str) -> Path:
    """A shared data set's folder, unpacked into bench/data once."""
    tarball, top, _ = TARBALLS[name]
    return unpack(DATASETS_DIR / tarball, top=top)


def expected_minutes(args: argparse.Namespace) -> str:
    """What a run of this mode costs on 2 cores, from the runs made so far (rough: decoding and
    evaluation dominate beside the training budgets)."""
    if args.mode == "ood":
        unknown = len(args.ood_data or ("cifar10", "eurosat")) * args.max_images
        return f"about {3 + unknown // 400} minutes (decode and linear probe ~3, features of {unknown} unknown images ~{unknown // 400})"
    if args.mode == "ece":
        sets = list(args.set_paths)
        budgets = [args.budgets.get(s) for s in sets]
        if any(b is None for b in budgets):
            return "unbounded: a set trains without --time-budget (its --epochs, or imgcls train's default)"
        # decode the set's cache (~1 min for 60k small images) and evaluate its test split with TTA (~1-2 min)
        return f"about {sum(budgets) + 3 * len(sets):.0f} minutes ({' + '.join(f'{s} {b:g}' for s, b in zip(sets, budgets))} of training)"
    if args.mode == "imbalance":
        runs = len(args.ratios) * len(args.modes.split(","))
        if args.time_budget is None:
            return f"{runs} runs of {args.epochs} epochs each, not bounded by time (give --time-budget to bound them)"
        return f"about {runs * (args.time_budget + 1):.0f} minutes ({runs} runs x {args.time_budget:g} min + ~1 min decode and evaluation)"
    return "a few minutes: one forward pass over at most --max-images images per split and unknown set"


def parse_per_set(values: list[str], cast: type) -> dict[str, float | int | None]:
    """["4", "mnist=2", "oxford17=none"] -> {"*": 4, "mnist": 2, "oxford17": None}."""
    out: dict[str, float | int | None] = {}
    for v in values:
        key, _, x = v.rpartition("=")
        out[key or "*"] = None if x.lower() == "none" else cast(x)
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    from imgcls.config import CLASS_BALANCE_MODES, PRECISIONS, TTA_CHOICES, UNKNOWN_METHODS

    if argv and argv[0] not in MODES and not argv[0].startswith("-"):
        argv = ["measure", *argv]  # the mode before there were modes
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("measure", help="calibration, sets and OOD scores of a trained model")
    m.add_argument("model", help="model folder written by `imgcls train`")
    m.add_argument("data", help="the data the model was trained on (may hold more classes: those are the held-out set)")
    m.add_argument("--out", default=str(OUT_DIR / "trust"), help="where measure.log and measure.json go (default bench/out/trust)")
    im = sub.add_parser("imbalance", help="long-tailed subsets of DATA: --class-balance modes side by side")
    im.add_argument("data", nargs="?", help="a labeled dataset (default: the shared CIFAR-10)")
    im.add_argument("--ratios", type=float, nargs="+", default=[10.0, 50.0], help="largest over smallest class (default 10 50)")
    im.add_argument("--modes", default="none,auto", help=f"--class-balance values to compare, comma-separated, of {CLASS_BALANCE_MODES}")
    im.add_argument("--max-per-class", type=int, default=2000, help="training images of the largest class (default 2000)")
    im.add_argument("--test-per-class", type=int, default=200, help="balanced test images per class (default 200)")
    o = sub.add_parser("ood", help="train on some classes of DATA, then measure with the others (and --ood-data) unknown")
    o.add_argument("data", nargs="?", help="a labeled dataset (default: the shared Oxford 17 flowers)")
    o.add_argument("--known", type=int, default=12, help="how many classes to train on, drawn with --seed (default 12)")
    o.add_argument("--known-classes", help="or name them, comma-separated")
    o.add_argument("--class-balance", choices=CLASS_BALANCE_MODES, default="auto")
    o.add_argument("--unknown-method", choices=UNKNOWN_METHODS, default="msp", help="the rule training stores (the 'as stored' rows)")
    e = sub.add_parser("ece", help="default training on each shared data set, then calibration and sets on its test split")
    e.add_argument(
        "--sets", default=",".join(TARBALLS), help=f"comma-separated, of {', '.join(TARBALLS)} or NAME=FOLDER (default all shared sets)"
    )
    e.add_argument("--time-budget", action="append", default=[], help="[SET=]MINUTES or [SET=]none, repeatable (default per set)")
    e.add_argument("--epochs", action="append", default=[], help="[SET=]N, repeatable (default: imgcls train's)")
    e.add_argument("--out", default=str(OUT_DIR / "trust"), help="run folders (default bench/out/trust)")
    for x in (im, o):
        x.add_argument("--model", help="architecture (default: small_cnn for imbalance, efficientnet_lite0 pretrained for ood)")
        x.add_argument("--pretrained", action="store_true", help="start from the architecture's pretrained weights (ood: always)")
        x.add_argument("--strategy", default="auto", help="training strategy (default auto: a linear probe for ood)")
        x.add_argument("--epochs", type=int, help="training epochs (default: imgcls train's)")
        x.add_argument("--time-budget", type=float, help="minutes per training run (imbalance default 2)")
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
        x.add_argument("--max-images", type=int, default=1000, help="at most this many images per split and unknown set (default 1000)")
    for x in (m, im, o, e):
        x.add_argument("--seed", type=int, default=0)
        x.add_argument("--json", help="write the results here (default OUT/MODE.json)")
    return defaults(p.parse_args(argv))


def defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in each mode's defaults that depend on the mode (data sets, model, budgets)."""
    if args.mode == "ood":
        args.model, args.pretrained = args.model or "efficientnet_lite0", True
    elif args.mode == "imbalance":
        args.model = args.model or "small_cnn"
        if args.time_budget is None and args.epochs is None:
            args.time_budget = 2.0
    elif args.mode == "ece":
        budgets, epochs = parse_per_set(args.time_budget, float), parse_per_set(args.epochs, int)
        args.set_paths = dict((s.split("=", 1) + [""])[:2] for s in args.sets.split(","))  # name -> folder ("": the shared set)
        unknown = sorted(s for s, p in args.set_paths.items() if not p and s not in TARBALLS)
        if unknown:
            raise SystemExit(f"--sets: unknown {', '.join(unknown)}; choose from {', '.join(TARBALLS)} or give NAME=FOLDER")
        by_epochs = lambda s: s in epochs or "*" in epochs  # noqa: E731  (epochs given: no default budget)
        args.budgets = {s: budgets.get(s, budgets.get("*", None if by_epochs(s) else ECE_BUDGETS.get(s))) for s in args.set_paths}
        args.epoch_caps = {s: epochs.get(s, epochs.get("*")) for s in args.set_paths}
    args.json = args.json or str(Path(args.out) / f"{args.mode}.json")
    return args


class Tee:
    """Writes to the terminal and to a log file alike (the mode's output, kept beside its JSON)."""

    def __init__(self, path: Path, stream) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file, self.stream = open(path, "w", encoding="utf-8"), stream  # noqa: SIM115  (closed in main)

    def write(self, s: str) -> int:
        self.file.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    tee = Tee(Path(args.out) / f"{args.mode}.log", sys.stdout)
    sys.stdout = tee
    try:
        t0 = time.perf_counter()
        print(f"command: python bench/trust.py {shlex.join(argv)}")
        print(f"machine: {machine_summary()}")
        print(f"expected time: {expected_minutes(args)}", flush=True)
        if args.mode == "measure":
            result = measure(args, args.model, Path(args.data), args.ood_data)
        elif args.mode == "imbalance":
            result = imbalance(args, Path(args.data) if args.data else shared("cifar10"))
        elif args.mode == "ood":
            others = args.ood_data or [str(shared(s) / TARBALLS[s][2]) for s in ("cifar10", "eurosat")]
            result = ood(args, Path(args.data) if args.data else shared("oxford17"), others)
        else:
            result = ece(args, {s: Path(p) if p else shared(s) for s, p in args.set_paths.items()})
        print(f"\n{time.perf_counter() - t0:.0f} s; results: {args.json}, output: {tee.file.name}")
        from imgcls.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps({"machine": machine_summary(), "mode": args.mode, "argv": argv, **result}, indent=2))
    finally:
        sys.stdout = tee.stream
        tee.file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
