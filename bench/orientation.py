"""The turn test of `--model auto` (imgcls.training.orientation) on each shared data set: does the
pretrained probe keep its validation accuracy when the images are turned by quarter turns?

For each set, `imgcls train DATA --model efficientnet_lite0 --pretrained --strategy linear-probe
--img-size S --time-budget B` (the probe auto trains as a candidate, at auto's input size for the
set), then `turn_test` on its validation split; prints upright and turned accuracy and the verdict.

    python bench/orientation.py                          # eurosat flowers cifar10 mnist
    python bench/orientation.py --sets eurosat --sample 2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS_DIR, OUT_DIR, load1, machine_summary, markdown_table, run_timed, unpack  # noqa: E402

# tarball, input size (auto's probe size for the set's native size), extra train flags
SETS = {
    "eurosat": ("eurosat-rgb.tar.gz", 96, []),
    "flowers": ("oxford17-flowers.tar.gz", 224, ["--val-fraction", "0.2", "--seed", "0"]),
    "cifar10": ("cifar10-jpg.tar.gz", 96, []),
    "mnist": ("mnist-png.tar.gz", 96, []),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--sample", type=int, default=2000, help="validation images the test predicts")
    ap.add_argument("--time-budget", type=float, default=2.0, help="minutes for each probe (a budget subset on large sets)")
    opts = ap.parse_args()

    from imgcls.data import index_dataset
    from imgcls.training.orientation import turn_test, validation_rows

    print(machine_summary())
    rows = []
    for name in opts.sets:
        tarball, size, flags = SETS[name]
        data = unpack(DATASETS_DIR / tarball)
        run_dir = OUT_DIR / "orientation" / name
        args = ["train", str(data), "--out", str(run_dir), "--model", "efficientnet_lite0", "--pretrained"]
        args += ["--strategy", "linear-probe", "--img-size", str(size), "--time-budget", f"{opts.time_budget:g}", *flags]
        args += ["--overwrite", "--quiet"]
        load0 = load1()
        t = run_timed(args)
        if t.returncode != 0:
            print(t.stdout[-2000:], t.stderr[-2000:], sep="\n")
            continue
        index = index_dataset(data)
        t0 = time.perf_counter()
        res = turn_test(run_dir, validation_rows(run_dir, index), sample=opts.sample)
        secs = time.perf_counter() - t0
        rows.append([name, size, res.images, f"{res.upright_acc:.3f}", f"{res.turned_acc:.3f}", "yes" if res.no_upright else "no"])
        rows[-1] += [f"{secs:.1f}", f"{load0:.2f} / {load1():.2f}"]
        print(rows[-1], flush=True)
    print(markdown_table(["data", "probe px", "images", "upright acc", "turned acc (90/180/270)", "no upright", "test s", "load"], rows))


if __name__ == "__main__":
    main()
