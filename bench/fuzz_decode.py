"""Fuzz the one image decoder (imgcls.io.load_image) with mutated files and count what happens.

Each case is a small valid image in one of the formats imgcls reads (PNG 8/16-bit, JPEG, GIF, WebP,
TIFF, BMP) that is then truncated, bit-flipped, overwritten with random bytes, or given a header
that claims a huge size. Every case must end in a decoded image or an ImageDecodeError: any other
exception is a crash, a case over --case-timeout seconds is a hang. The cases run in one worker
process (bytes and a file path alternately); its peak RSS above its start bounds what any single
image cost.

    python bench/fuzz_decode.py --cases 2400
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import random
import resource
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_summary, markdown_table  # noqa: E402

FORMATS = ("PNG", "PNG16", "JPEG", "GIF", "WEBP", "TIFF", "BMP")
MUTATIONS = ("truncate", "bitflip", "random_tail", "huge_header", "random_bytes")


def base_image(fmt: str, rng: random.Random) -> bytes:
    """A small real image of `fmt`, 8-96 px a side, random content."""
    w, h = rng.randint(8, 96), rng.randint(8, 96)
    a = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    if fmt == "PNG16":
        Image.fromarray(a[..., 0].astype(np.uint16) * 257).save(buf, format="PNG")  # 16-bit grey
    else:
        img = Image.fromarray(a)
        img = img.convert("P") if fmt == "GIF" else img
        img.save(buf, format=fmt)
    return buf.getvalue()


def _png_huge(data: bytes, rng: random.Random) -> bytes:
    """Rewrite the IHDR's width and height (with a valid CRC) to a size the header claims."""
    w, h = rng.choice([(9999, 9999), (16383, 16383), (65535, 65535), (100_000, 2), (1, 10**7)])
    ihdr = data[12:16] + struct.pack(">II", w, h) + data[24:29]
    return data[:8] + data[8:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def _generic_huge(data: bytes, rng: random.Random) -> bytes:
    """Overwrite bytes near the start (where size fields live) with 0xFF runs."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randint(4, min(40, len(b) - 2))
        b[i : i + 2] = b"\xff\xff"
    return bytes(b)


def mutate(data: bytes, fmt: str, kind: str, rng: random.Random) -> bytes:
    if kind == "truncate":
        return data[: rng.randint(0, max(1, len(data) - 1))]
    if kind == "bitflip":
        b = bytearray(data)
        for _ in range(rng.randint(1, 24)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == "random_tail":
        cut = rng.randint(8, max(9, len(data) // 2))
        return data[:cut] + rng.randbytes(rng.randint(1, 4096))
    if kind == "huge_header":
        return _png_huge(data, rng) if fmt.startswith("PNG") else _generic_huge(data, rng)
    return rng.randbytes(rng.randint(0, 4096))


def make_cases(n: int, seed: int) -> list[tuple[str, str, bytes]]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        fmt, kind = FORMATS[i % len(FORMATS)], MUTATIONS[(i // len(FORMATS)) % len(MUTATIONS)]
        cases.append((fmt, kind, mutate(base_image(fmt, rng), fmt, kind, rng)))
    return cases


def _worker(conn, folder: str) -> None:
    import warnings

    from imgcls.io import ImageDecodeError, load_image

    warnings.simplefilter("ignore")  # Pillow warns on odd TIFF tags; the outcome is what counts

    start_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    conn.send(("ready", start_kb))
    while True:
        msg = conn.recv()
        if msg is None:
            break
        i, data = msg
        source: object = data
        if i % 2:  # every other case through a file path, as training and the CLI read them
            p = Path(folder) / f"case{i}.png"
            p.write_bytes(data)
            source = str(p)
        try:
            img = load_image(source)
            out = ("ok", f"{img.size[0]}x{img.size[1]}")
        except ImageDecodeError as e:
            out = ("error", getattr(e, "kind", "?"))
        except Exception as e:  # a crash: what the fuzzing is looking for
            out = ("crash", f"{type(e).__name__}: {e}"[:200])
        conn.send((out, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def run(cases: list[tuple[str, str, bytes]], timeout: float) -> dict:
    results: Counter = Counter()
    crashes, hangs = [], []
    peak_kb = start_kb = 0
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        i = 0
        while i < len(cases):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, folder), daemon=True)
            proc.start()
            _, start_kb = parent.recv()
            while i < len(cases):
                fmt, kind, data = cases[i]
                parent.send((i, data))
                if not parent.poll(timeout):
                    hangs.append((i, fmt, kind))
                    proc.kill()
                    i += 1
                    break  # a fresh worker for the rest
                (status, detail), peak_kb = parent.recv()
                results[(status, detail if status == "error" else "")] += 1
                if status == "crash":
                    crashes.append((i, fmt, kind, detail))
                i += 1
            else:
                parent.send(None)
            proc.join(5)
    return {"results": results, "crashes": crashes, "hangs": hangs, "peak_mb": (peak_kb - start_kb) / 1024, "start_mb": start_kb / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=2400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case-timeout", type=float, default=10.0)
    a = ap.parse_args()
    print(machine_summary())
    t0 = time.perf_counter()
    cases = make_cases(a.cases, a.seed)
    out = run(cases, a.case_timeout)
    seconds = time.perf_counter() - t0
    rows = [[status, detail or "-", n] for (status, detail), n in sorted(out["results"].items())]
    print(markdown_table(["outcome", "error kind", "cases"], rows))
    print(
        f"\n{a.cases} cases ({len(FORMATS)} formats x {len(MUTATIONS)} mutations), {seconds:.1f} s; "
        f"crashes {len(out['crashes'])}, hangs (> {a.case_timeout:g} s) {len(out['hangs'])}; "
        f"decoder process peak RSS {out['start_mb'] + out['peak_mb']:.0f} MB ({out['peak_mb']:.0f} MB above its start)"
    )
    for c in out["crashes"][:10]:
        print("crash:", c)
    for h in out["hangs"][:10]:
        print("hang:", h)


if __name__ == "__main__":
    main()
