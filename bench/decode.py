"""Decode + resize rate: imgcls.data.decode_images (worker processes, JPEG draft mode) against
plain Pillow in a loop (Image.open(p).convert("RGB").resize((S, S))).

    python bench/decode.py

Data: the 10,000 CIFAR-10 test JPEGs (32x32, to small_cnn's 32 px) and the 1,360 Oxford-17
flower photos (about 500x666, to efficientnet_lite0's cache size). Files are read once before
timing so both sides meet a warm page cache. Waits for a quiet machine (1-minute load < 1.5)
and records the load at start and end of each measurement.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
MAX_WAIT = [600.0]  # seconds to wait for a quiet machine before measuring anyway (marked noisy)
from common import DATASETS_DIR, load1, machine_summary, markdown_table, unpack, wait_for_quiet  # noqa: E402


def pillow_loop(paths: list[str], size: int) -> float:
    from PIL import Image

    t0 = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            im.convert("RGB").resize((size, size))
    return time.perf_counter() - t0


def imgcls_decode(paths: list[str], spec) -> float:
    from imgcls.data import decode_images

    t0 = time.perf_counter()
    out = decode_images(paths, spec, cache_dir=None, workers=0, progress=False)
    seconds = time.perf_counter() - t0
    assert len(out.paths) == len(paths), out.failures[:3]
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for load < 1.5 (default 600)")
    MAX_WAIT[0] = p.parse_args().max_wait
    print(f"machine: {machine_summary()}", flush=True)
    from imgcls.data import index_dataset
    from imgcls.models import get_entry

    cifar = unpack(DATASETS_DIR / "cifar10-jpg.tar.gz")
    flowers = unpack(DATASETS_DIR / "oxford17-flowers.tar.gz")
    sets = [
        ("CIFAR-10 test JPEGs, 32x32", [p for p, _ in index_dataset(cifar / "test").splits["all"]], get_entry("small_cnn").default_spec),
        (
            "Oxford-17 flower photos, ~500x666",
            [p for p, _ in index_dataset(flowers).splits["all"]],
            get_entry("efficientnet_lite0").default_spec,
        ),
    ]
    rows = []
    for name, paths, spec in sets:
        for p in paths:  # warm the page cache for both contestants
            Path(p).read_bytes()
        la0, _, noisy = wait_for_quiet(max_wait_s=MAX_WAIT[0])
        t_pil = pillow_loop(paths, spec.cache_size)
        t_img = imgcls_decode(paths, spec)
        la1 = load1()
        n = len(paths)
        rows.append(
            [
                name,
                n,
                spec.cache_size,
                f"{n / t_pil:.0f}",
                f"{n / t_img:.0f}",
                f"{t_pil / t_img:.1f}x",
                f"{la0:.2f} / {la1:.2f}" + (" (noisy)" if noisy else ""),
            ]
        )
        print(f"{name}: Pillow {n / t_pil:.0f}/s, imgcls {n / t_img:.0f}/s", flush=True)
    print()
    print(markdown_table(["images", "n", "to px", "Pillow loop img/s", "imgcls decode_images img/s", "speed-up", "load start/end"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
