"""Helpers shared by the benchmark scripts: unpack a dataset, wait for a quiet machine, time a command.

The benchmark machines have 2 cores and other jobs (test suites) run beside the benchmarks, so
every timed run first waits for the 1-minute load average to drop and records the load at its
start and end: a figure measured under load is then visible as such in the results table.
"""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DATA_DIR = BENCH_DIR / "data"  # git-ignored
OUT_DIR = BENCH_DIR / "out"  # git-ignored
DATASETS_DIR = Path(os.environ.get("IMGCLS_DATASETS", "/work/shared/datasets"))


def unpack(tarball: str | os.PathLike, dest: str | os.PathLike = DATA_DIR, top: str | None = None) -> Path:
    """Extract `tarball` into `dest` once and return the folder it holds (`top`, else its first entry).

    A marker file beside the folder records a finished extraction, so an interrupted one is redone.
    """
    tarball, dest = Path(tarball), Path(dest)
    with tarfile.open(tarball) as tf:
        first = top or next(m.name for m in tf).split("/")[0]
        root, marker = dest / first, dest / f".{first}.unpacked"
        if marker.exists() and root.is_dir() and marker.read_text() == str(tarball.stat().st_size):
            return root
        if root.exists():
            shutil.rmtree(root)
        dest.mkdir(parents=True, exist_ok=True)
        tf.extractall(dest, filter="data")
    marker.write_text(str(tarball.stat().st_size))
    return root


def machine_summary() -> str:
    """CPU model, cores and the units that decide bf16 speed, e.g. "AMD EPYC, 2 cores, AVX512-BF16, no AMX".

    Figures from a machine with AMX and one without differ by 2x or more for the same code, so
    every benchmark prints this line and RESULTS.md records it beside the figures.
    """
    model, flags = "unknown CPU", ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    units = ["AMX" if "amx_bf16" in flags else "no AMX", "AVX512-BF16" if "avx512_bf16" in flags else "no AVX512-BF16"]
    return f"{model}, {os.cpu_count()} cores, {', '.join(units)}"


def load1() -> float:
    return os.getloadavg()[0]


def cpu_busy(seconds: float = 2.0) -> float:
    """Share of all cores busy over the next `seconds` (from /proc/stat; 0 where unavailable).

    The load average trails by about a minute; this sees a neighbour that has just started.
    """

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        return sum(v), idle

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError):
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_for_quiet(
    threshold: float = 1.5, poll_s: float = 15.0, max_wait_s: float = 600.0, log=print, max_busy: float | None = None
) -> tuple[float, float, bool]:
    """Wait until the 1-minute load average is below `threshold` (and, with `max_busy`, until at
    most that share of the cores is busy right now: the load average trails by a minute).

    Returns (load when the wait ended, seconds waited, whether the wait timed out). On a time-out
    the caller goes on anyway and should mark the figure as measured under load.
    """
    t0 = time.monotonic()
    while True:
        la = load1()
        busy = cpu_busy() if max_busy is not None else 0.0
        waited = time.monotonic() - t0
        if la < threshold and (max_busy is None or busy <= max_busy):
            return la, waited, False
        if waited >= max_wait_s:
            log(
                f"  load {la:.2f}"
                + (f", {busy:.0%} busy" if max_busy is not None else "")
                + f" after {waited:.0f}s: going on anyway (noisy)"
            )
            return la, waited, True
        log(
            f"  load {la:.2f} (wait for < {threshold})"
            + (f", cores {busy:.0%} busy (wait for <= {max_busy:.0%})" if max_busy is not None else "")
            + f": waiting ({waited:.0f}s so far)"
        )
        time.sleep(poll_s)


@dataclass
class Timed:
    cmd: list[str]
    returncode: int
    seconds: float
    stdout: str
    stderr: str
    cpu_s: float = 0.0  # user + system CPU seconds of the command (and its decode workers)


def imgcls_cmd() -> list[str]:
    """The `imgcls` console script if installed, else `python -m imgcls.cli`."""
    exe = shutil.which("imgcls")
    return [exe] if exe else [sys.executable, "-m", "imgcls.cli"]


def run_timed(args: list[str], echo: bool = True) -> Timed:
    """Run `imgcls ARGS...`, return its exit code, wall time and output."""
    cmd = imgcls_cmd() + args
    if echo:
        print("  $ " + shell_line(args), flush=True)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return Timed(cmd, p.returncode, seconds, p.stdout, p.stderr, cpu)


def shell_line(args: list[str]) -> str:
    """The command as a user would type it (`imgcls ...`), paths relative to the cwd when shorter."""

    def short(a: str) -> str:
        if os.path.isabs(a):
            try:
                rel = os.path.relpath(a)
                return rel if len(rel) < len(a) else a
            except ValueError:
                return a
        return a

    return "imgcls " + " ".join(shlex.quote(short(a)) for a in args)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
