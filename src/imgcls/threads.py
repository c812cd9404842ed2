"""How many intra-op threads torch runs with: the cores the process may use, and a measurement.

On a 2-core machine with one other busy process, torch's two intra-op threads made the small_cnn
training step 4x slower, not 2x (428 -> 108 img/s), while one thread kept its 240 img/s: every
parallel region ends at a barrier, and both threads wait there for the one that lost its core
(issue 19). So the thread count is not the core count alone:

- `usable_cores`: the CPUs the process may run on (affinity) within its cgroup's CPU quota;
- `pick_threads`: from images/s measured at each candidate count, the most threads unless fewer
  ran clearly faster (a quiet machine keeps every core);
- `ThreadChoice`: the decision, how it was made and what was measured, for the log and model.json;
- `ThreadWatch`: between training epochs, a cheap re-check that switches when the machine got
  busier or quieter (training.measure.recheck_threads runs it);
- `ThreadTuner`: the same for repeated inference calls (predict, evaluate, the server's
  inference thread), timed from the calls themselves.

An explicit thread count always wins and nothing is timed; --deterministic fixes it too. The
decision logic takes its clock and thread setter as arguments, so tests drive it with fake timings.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Fewer threads must run this much faster to be chosen over all of them: a quiet machine keeps
# every core (2 threads 1.8x one thread on the small_cnn step), a shared one loses the barrier
# waits (one thread 2.2x two); measurement noise between the two stays below it.
THREADS_MARGIN = 0.15
# ThreadWatch probes the other count when an epoch at all threads ran below this share of the
# rate expected there (a busier machine); at fewer threads it probes to see the machine got quieter.
SLOWDOWN = 0.7
# Re-checks cost at most this share of the time trained (or inferred) since the last one.
MAX_OVERHEAD = 0.05
RECHECK_S = 30.0  # ThreadTuner: inference re-checks at most this often

HOW_MEASURED, HOW_ASKED, HOW_DETERMINISTIC, HOW_ONE_CORE, HOW_DEFAULT = "measured", "asked", "deterministic", "one core", "default"

CGROUP_ROOT = Path("/sys/fs/cgroup")


# ---------------------------------------------------------------------------------- usable cores


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _cgroup_dirs(root: Path, rel: str, mounts: Iterable[str]) -> list[Path]:
    """The cgroup's folder under each candidate mount and its parents up to the mount (a quota
    on a parent limits the child too); inside a container the cgroup path may not exist under the
    mount, whose own files then describe the container."""
    out = []
    for mount in mounts:
        base = root / mount if mount else root
        parts = [p for p in rel.strip("/").split("/") if p]
        for i in range(len(parts), -1, -1):
            d = base.joinpath(*parts[:i])
            if d.is_dir() and d not in out:
                out.append(d)
    return out


def _ratio(quota: str | None, period: str | None) -> float | None:
    """quota / period in CPUs, or None for no limit ("max", -1) or an unreadable file."""
    try:
        q, p = int(quota or "-1"), int(period or "0")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs' worth of time the process's cgroup may use (cgroup v2 cpu.max, v1 cfs quota/period;
    the smallest along the path), or None without a limit."""
    text = _read(proc_cgroup) or "0::/"
    limits = []
    for line in text.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hier == "0" and controllers == "":  # cgroup v2 (also the unified half of a hybrid set-up)
            for d in _cgroup_dirs(root, rel, ("", "unified")):
                limits.append(_ratio(*((_read(d / "cpu.max") or "max").split(" ") + [""])[:2]))
        elif "cpu" in controllers.split(","):  # cgroup v1
            for d in _cgroup_dirs(root, rel, (controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu")):
                limits.append(_ratio(_read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")))
    found = [x for x in limits if x is not None]
    return min(found) if found else None


def usable_cores(affinity: set[int] | None = None, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """Cores the process can keep busy: the CPUs it may run on (os.sched_getaffinity), at most
    its cgroup's CPU quota rounded down (1.5 CPUs of quota: 1; a second thread would be throttled
    at every barrier), at least 1. The arguments stand in for the system's in tests."""
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):  # not on Linux
            affinity = set(range(os.cpu_count() or 1))
    cores = max(1, len(affinity))
    limit = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if limit is not None:
        cores = min(cores, max(1, math.floor(limit + 1e-6)))
    return cores


def decode_workers(usable: int, limit: int = 4) -> int:
    """Threads for a decode pool beside one inference thread: the cores it leaves (usable - 1),
    1 to `limit`. The inference thread's `ThreadTuner` drops to one thread when the decoding
    makes its barriers wait."""
    return max(1, min(limit, usable - 1))


# ---------------------------------------------------------------------------------- the decision


def pick_threads(rates: Mapping[int, float], margin: float = THREADS_MARGIN) -> int:
    """The thread count to run with, from images/s measured at each: the most threads unless
    another ran more than `margin` faster (then the fastest)."""
    if not rates:
        raise ValueError("no timings to choose threads from")
    most = max(rates)
    fastest = max(rates, key=lambda n: (rates[n], n))
    return fastest if rates[fastest] > rates[most] * (1 + margin) else most


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class ThreadChoice:
    """How many intra-op threads run, and why: how in (measured, asked, deterministic, one core,
    default); rates: images/s measured at each thread count tried (measured only)."""

    threads: int
    usable: int
    how: str
    rates: dict[int, float] = field(default_factory=dict)

    @property
    def adaptive(self) -> bool:
        """True when the count came from a timing, and so may be re-checked as the load changes."""
        return self.how == HOW_MEASURED

    def describe(self) -> str:
        """One log line, e.g. "threads: 1 (2 usable cores; 2 threads ran 110 img/s, 1 thread 240
        img/s: the cores are shared)"."""
        cores = _plural(self.usable, "usable core")
        if self.how == HOW_ASKED:
            return f"threads: {self.threads} (as asked; {cores})"
        if self.how == HOW_DETERMINISTIC:
            return f"threads: {self.threads} (fixed by --deterministic; {cores})"
        if not self.rates:
            return f"threads: {self.threads} ({cores})"
        ran = ", ".join(f"{_plural(n, 'thread')} ran {r:.0f} img/s" for n, r in sorted(self.rates.items(), reverse=True))
        shared = ": the cores are shared" if self.threads < max(self.rates) else ""
        return f"threads: {self.threads} ({cores}; {ran}{shared})"

    def to_dict(self) -> dict[str, Any]:
        """As model.json records it (thread_choice)."""
        return {
            "threads": self.threads,
            "usable_cores": self.usable,
            "how": self.how,
            "images_per_s": {str(n): round(r, 1) for n, r in sorted(self.rates.items(), reverse=True)},
        }


def fixed_choice(asked: int | None, usable: int, deterministic: bool = False) -> ThreadChoice | None:
    """The choice when no timing may make it: a count asked for (it always wins), --deterministic
    (all usable cores unless asked), a single usable core; None when it is to be measured."""
    if asked:
        return ThreadChoice(asked, usable, HOW_DETERMINISTIC if deterministic else HOW_ASKED)
    if deterministic:
        return ThreadChoice(usable, usable, HOW_DETERMINISTIC)
    if usable <= 1:
        return ThreadChoice(1, usable, HOW_ONE_CORE)
    return None


def candidates(usable: int) -> tuple[int, ...]:
    """Thread counts a measurement compares, most first: all usable cores and one."""
    return (usable, 1) if usable > 1 else (1,)


def measure_choice(usable: int, rate_at: Callable[[int], float], known: Mapping[int, float] | None = None) -> ThreadChoice:
    """Time `rate_at(threads)` (images/s) at each candidate count not already `known`, and choose
    (one usable core: nothing to compare, nothing timed)."""
    if usable <= 1:
        return ThreadChoice(1, usable, HOW_ONE_CORE)
    rates = dict(known or {})
    for n in candidates(usable):
        if n not in rates:
            rates[n] = rate_at(n)
    return ThreadChoice(pick_threads(rates), usable, HOW_MEASURED, rates)


# ---------------------------------------------------------------------------------- training: between epochs


class ThreadWatch:
    """Re-checks a measured thread count between training epochs, cheaply.

    At all threads, an epoch that ran below SLOWDOWN of the rate expected there (a neighbour took
    a core) probes one thread at once: it is already losing more than the probe costs. At fewer
    threads an epoch may probe all of them (the machine may have got quieter: one thread's rate
    does not show it), but only when the probe (a few timed steps, `probe(threads)` -> images/s)
    costs at most MAX_OVERHEAD of the time trained since the last one. A quiet machine that keeps
    all threads never probes.
    """

    def __init__(
        self,
        choice: ThreadChoice,
        clock: Callable[[], float] = time.perf_counter,
        max_overhead: float = MAX_OVERHEAD,
        probe_s: float = 0.0,
    ) -> None:
        self.choice, self.clock, self.max_overhead = choice, clock, max_overhead
        self.expected = choice.rates.get(choice.threads, 0.0)  # images/s at the current count
        self.trained_s = 0.0  # training seconds since the last probe
        self.probe_s = probe_s  # what the last probe took (at first: what one is expected to take)

    def after_epoch(self, rate: float, seconds: float, probe: Callable[[int], float]) -> ThreadChoice | None:
        """After an epoch that ran `rate` images/s for `seconds`: the new choice when it switches, else None."""
        self.trained_s += seconds
        current, most = self.choice.threads, max(candidates(self.choice.usable))
        if current == most:
            if rate >= SLOWDOWN * self.expected:
                self.expected = max(self.expected, rate)
                return None
        elif self.probe_s > self.max_overhead * self.trained_s:
            return None
        other = 1 if current == most else most
        t0 = self.clock()
        rates = {current: rate, other: probe(other)}
        self.probe_s, self.trained_s = self.clock() - t0, 0.0
        new = ThreadChoice(pick_threads(rates), self.choice.usable, HOW_MEASURED, rates)
        self.expected = rates[new.threads]
        if new.threads == current:
            return None
        self.choice = new
        return new


# ---------------------------------------------------------------------------------- inference: from the calls


class ThreadTuner:
    """Runs a repeated job (an inference forward pass) with the intra-op thread count its own
    timings say is faster, in the thread that calls it.

    A trial runs calls alternately at each candidate count (SAMPLES each, after one warm-up call)
    and keeps the lowest seconds per item of each. At all threads, a new trial starts at once when
    two calls in a row run below SLOWDOWN of their best since the last trial (a neighbour took a
    core); at one thread, every RECHECK_S, no more often than keeps its cost within MAX_OVERHEAD
    (one thread's speed does not show that the machine got quieter). Calls much smaller than the
    trial's (a last, partial batch) run at the chosen count, untimed. `fixed` (--threads) runs
    every call at that count and times nothing. torch's thread count is per thread (an OpenMP setting), so `run` sets it in the
    calling thread and puts the caller's count back afterwards. `frozen()` True after a call stops
    the trials at that call's count: the call compiled the model, and inductor's kernels keep the
    thread count they were generated for.
    """

    SAMPLES = 2

    def __init__(
        self,
        usable: int | None = None,
        fixed: int | None = None,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        get_threads: Callable[[], int] | None = None,
        set_threads: Callable[[int], None] | None = None,
        recheck_s: float = RECHECK_S,
    ) -> None:
        if get_threads is None or set_threads is None:
            import torch

            get_threads, set_threads = get_threads or torch.get_num_threads, set_threads or torch.set_num_threads
        usable = usable or usable_cores()
        self.choice = fixed_choice(fixed, usable) or ThreadChoice(usable, usable, HOW_DEFAULT)
        self.log, self.clock, self.get_threads, self.set_threads, self.recheck_s = log, clock, get_threads, set_threads, recheck_s
        self.warm = False
        self.plan: list[int] = []  # counts the trial still has to time, in order
        self.samples: dict[int, list[float]] = {}
        self.trial_n = 0  # items per call the trial times (the largest seen in it)
        self.trial_s = 0.0  # seconds the last trial's calls took
        self.settled_at: float | None = None
        self.best = math.inf  # lowest seconds per item at the chosen count since the trial
        self.slow = 0  # calls in a row at all threads slower than SLOWDOWN of `best`
        self.frozen = False  # the model was compiled: its kernels keep the count they were built with
        if self.choice.how == HOW_DEFAULT:
            self._start_trial()

    def _start_trial(self) -> None:
        order = candidates(self.choice.usable)
        self.plan = [n for _ in range(self.SAMPLES) for n in order]
        self.samples, self.trial_n, self.trial_s = {n: [] for n in order}, 0, 0.0

    def _due(self, now: float) -> bool:
        """Whether a trial at fewer than all threads is due to see if the machine got quieter."""
        if self.plan or self.settled_at is None or self.choice.how != HOW_MEASURED:
            return False
        if self.choice.threads == max(candidates(self.choice.usable)):
            return False  # all threads: `_watch` sees a busier machine from the calls themselves
        waited = now - self.settled_at
        return waited >= self.recheck_s and self.trial_s <= MAX_OVERHEAD * waited

    def _call(self, fn: Callable[[T], Any], x: T, threads: int) -> tuple[Any, float]:
        """(fn(x), its seconds) at `threads` in this thread; the count before is put back."""
        before = self.get_threads()
        if threads != before:
            self.set_threads(threads)
        try:
            t0 = self.clock()
            out = fn(x)
            return out, self.clock() - t0
        finally:
            if threads != before:
                self.set_threads(before)

    def run(self, fn: Callable[[T], Any], x: T, n: int, frozen: Callable[[], bool] | None = None) -> Any:
        """fn(x) over `n` items at the thread count the tuner chooses."""
        if self.frozen:
            return self._call(fn, x, self.choice.threads)[0]
        if self._due(self.clock()):
            self._start_trial()
        timed = bool(self.plan) and self.warm and 2 * n >= self.trial_n
        threads = self.plan[0] if timed else self.choice.threads
        out, seconds = self._call(fn, x, threads)
        if frozen is not None and frozen():  # this call compiled the model: its kernels keep this count
            self.frozen, self.plan, self.choice = True, [], ThreadChoice(threads, self.choice.usable, self.choice.how, self.choice.rates)
            return out
        if not self.warm:
            self.warm = True  # the first call builds oneDNN's kernels: not a timing
        elif timed:
            self._record(threads, seconds, n)
        elif self.settled_at is not None and threads == max(candidates(self.choice.usable)) and 2 * n >= self.trial_n:
            self._watch(seconds / max(n, 1))
        return out

    def _watch(self, per_item: float) -> None:
        """After a call at all threads: a new trial when two in a row ran SLOWDOWN below the best."""
        self.best = min(self.best, per_item)
        self.slow = self.slow + 1 if per_item * SLOWDOWN > self.best else 0
        if self.slow >= 2 and self.choice.how == HOW_MEASURED:
            self.slow = 0
            self._start_trial()

    def _record(self, threads: int, seconds: float, n: int) -> None:
        if n > 2 * self.trial_n and self.trial_n:  # larger calls than the trial timed so far: start over at their size
            self._start_trial()
            return
        self.trial_n = max(self.trial_n, n)
        self.samples[threads].append(seconds / max(n, 1))
        self.trial_s += seconds
        self.plan.pop(0)
        if self.plan:
            return
        rates = {t: 1.0 / max(min(s), 1e-12) for t, s in self.samples.items()}
        new = ThreadChoice(pick_threads(rates), self.choice.usable, HOW_MEASURED, rates)
        if self.log and (new.threads != self.choice.threads or self.choice.how == HOW_DEFAULT):
            self.log(new.describe())
        self.choice, self.settled_at = new, self.clock()
        self.best, self.slow = min(self.samples[new.threads]), 0

    def wrap(self, fn: Callable[[Any], T], frozen: Callable[[], bool] | None = None) -> Callable[[Any], T]:
        """fn as a callable of a batch (len(x) items) run through the tuner."""
        return lambda x: self.run(fn, x, len(x), frozen)


def with_threads(threads: int, fn: Callable[[], T]) -> T:
    """fn() at `threads` intra-op threads in this thread; the count before is put back."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)
