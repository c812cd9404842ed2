"""Overload test of `imgcls serve` (issue 16): offer 4x what the server can serve and watch it refuse.

    python bench/overload.py                     # 30 s at 4x capacity, small_cnn 96 px built here
    python bench/overload.py --seconds 5         # smoke run
    python bench/overload.py --model runs/x/model --factor 4 --seconds 30 --queue-size 64 --max-batch 16

First the server's capacity is measured: requests/s served closed-loop at a modest concurrency
(`--concurrency`, for `--capacity-seconds`), and its unloaded latency from one request at a time.
Then requests arrive open-loop at `--factor` x that rate (fixed arrival times: a slow answer does
not slow the arrivals, as with real clients), bounded in count and duration, while /v1/health is
polled every 200 ms on its own connection and the server's resident memory (/proc/PID/status
VmRSS) is sampled. A server that bounds its queue answers the excess with 503 in milliseconds,
keeps the accepted requests' latency within what its queue allows, keeps /v1/health answering
and its memory flat. The table gives the counts, latencies and memory.

`overload`, `closed_loop` and `summarize` are importable: tests/test_serve_overload.py runs the
same check for a few seconds against an in-process server. The client shares this machine's
cores with the server: the table records how late the client sent (send lag) and the rate it
actually offered, so a client that could not keep up is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

HEALTH_EVERY_S = 0.2
REFUSED = 503
TIMEOUT_S = 30.0  # a request unanswered after this counts as status 0
IDLE_S = 2.0  # a connection idle longer is not reused: uvicorn closes idle ones after 5 s


@dataclass
class Shot:
    """One request: when it was due and sent (s from the run's start), its status (0: no answer) and latency (s)."""

    due: float
    sent: float
    status: int
    latency: float
    error: str = ""


@dataclass
class Run:
    """What one open-loop overload run saw."""

    rate: float  # arrivals per second asked for
    shots: list[Shot] = field(default_factory=list)
    health: list[Shot] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (s from start, bytes)
    wall_s: float = 0.0
    client_cpu_s: float = 0.0  # CPU this process spent (with an in-process server: the server's too)
    connections: int = 0  # connections the client opened


def rss_bytes(pid: int | None = None) -> int:
    """Resident memory of process `pid` (this one when None), from /proc/PID/status VmRSS; 0 without /proc."""
    try:
        with open(f"/proc/{pid or 'self'}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def payloads(n: int = 8, size: int = 128) -> list[bytes]:
    """`n` noise PNGs of `size` px: each decode and resize costs the server a little, as a real upload does."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


class Connections:
    """A minimal HTTP/1.1 client on asyncio streams: keep-alive connections to one host, reused.

    httpx could not offer the rate here: asked for 590 requests/s (4x a small_cnn at 96 px), its
    AsyncClient offered 266, sent up to 3.5 s late and took most of this 2-core machine, so the
    excess queued in the client, not the server (0 refusals, 12 s latencies). This client offered
    the full rate with ~10 ms lag at ~0.1 ms of CPU a request.
    """

    def __init__(self, url: str, limit: int = 1000) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []  # and when last used
        self.slots = asyncio.Semaphore(limit)
        self.opened = 0

    async def request(self, method: str, path: str, body: bytes = b"", content_type: str = "image/png") -> int:
        """Send one request and read its whole answer; its status."""
        async with self.slots:
            reader, writer = None, None
            while self.idle and reader is None:
                reader, writer, since = self.idle.pop()
                if reader.at_eof() or time.monotonic() - since > IDLE_S:  # the server may have closed it
                    writer.close()
                    reader = None
            if reader is None:
                reader, writer = await asyncio.open_connection(self.host, self.port)
                self.opened += 1
            try:
                head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                if body or method == "POST":
                    head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                writer.write(head.encode() + b"\r\n" + body)
                status, keep = await _read_answer(reader)
            except BaseException:
                writer.close()
                raise
            if keep:
                self.idle.append((reader, writer, time.monotonic()))
            else:
                writer.close()
            return status

    async def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, whether the connection stays open) of one answer, its body read and dropped."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    headers = {k.strip().lower(): v.strip().lower() for k, v in headers.items()}
    await reader.readexactly(int(headers.get("content-length", "0")))  # the server always sends a length
    return status, headers.get("connection") != "close"


async def _send(conns: Connections, method: str, path: str, body: bytes, due: float, t0: float) -> Shot:
    sent = time.perf_counter() - t0
    try:
        status, error = await asyncio.wait_for(conns.request(method, path, body), TIMEOUT_S), ""
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as e:  # counted: a finding, not a crash
        status, error = 0, type(e).__name__
    return Shot(due, sent, status, time.perf_counter() - t0 - sent, error)


async def closed_loop(url: str, blobs: list[bytes], seconds: float, concurrency: int, max_requests: int = 10_000) -> list[Shot]:
    """`concurrency` workers, each sending its next request when the last is answered, for `seconds`."""
    shots: list[Shot] = []
    conns = Connections(url, concurrency)
    t0 = time.perf_counter()

    async def worker() -> None:
        while time.perf_counter() - t0 < seconds and len(shots) < max_requests:
            now = time.perf_counter() - t0
            shots.append(await _send(conns, "POST", "/v1/predict", blobs[len(shots) % len(blobs)], now, t0))

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await conns.close()
    return shots


async def _watch(url: str, run: Run, t0: float, stop: asyncio.Event, rss: Callable[[], int], every: float) -> None:
    """Poll /v1/health every `every` s on its own connection and sample the resident memory, until `stop`."""
    conns = Connections(url, 1)
    try:
        while not stop.is_set():
            due = time.perf_counter() - t0
            run.rss.append((due, rss()))
            shot = await _send(conns, "GET", "/v1/health", b"", due, t0)
            run.health.append(shot)
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, every - shot.latency))
            except asyncio.TimeoutError:
                pass
    finally:
        await conns.close()
    run.rss.append((time.perf_counter() - t0, rss()))


async def overload(
    url: str,
    blobs: list[bytes],
    rate: float,
    seconds: float,
    max_requests: int,
    rss: Callable[[], int] = rss_bytes,
    health_every: float = HEALTH_EVERY_S,
    connections: int = 1000,
) -> Run:
    """Open-loop load: request i is due at i / `rate` s, sent then whatever the earlier ones' answers
    (at most `max_requests`, for at most `seconds`), while /v1/health is polled and `rss` sampled.
    A client that falls behind sends the late requests at once (`Shot.sent` - `Shot.due` records it)."""
    n = min(max_requests, int(rate * seconds))
    run = Run(rate)
    stop = asyncio.Event()
    conns = Connections(url, connections)
    t0, cpu0 = time.perf_counter(), time.process_time()
    watcher = asyncio.create_task(_watch(url, run, t0, stop, rss, health_every))
    tasks = []
    try:
        for i in range(n):
            due = i / rate
            delay = due - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            elif time.perf_counter() - t0 > seconds:  # a client too slow for the rate stops on time all the same
                break
            tasks.append(asyncio.create_task(_send(conns, "POST", "/v1/predict", blobs[i % len(blobs)], due, t0)))
        run.shots = list(await asyncio.gather(*tasks))
    finally:
        stop.set()
        await watcher
        await conns.close()
    run.wall_s = time.perf_counter() - t0
    run.client_cpu_s = time.process_time() - cpu0
    run.connections = conns.opened
    return run


def summarize(run: Run, unloaded: list[Shot]) -> dict:
    """The run's figures: counts by status, latencies (s) of the refused and the accepted, health, memory (bytes)."""
    ok = [s.latency for s in run.shots if s.status == 200]
    refused = [s for s in run.shots if s.status == REFUSED]
    base = [s.latency for s in unloaded if s.status == 200]
    sends = [s.sent for s in run.shots]
    rss = [b for _, b in run.rss]
    half = run.wall_s / 2
    span = max(sends) - min(sends) if len(sends) > 1 else float("nan")
    return {
        "sent": len(run.shots),
        "connections": run.connections,
        "client_cpu_s": run.client_cpu_s,
        "accepted": len(ok),
        "refused": len(refused),
        "statuses": dict(sorted(Counter(s.status for s in run.shots).items())),
        "errors": dict(Counter(s.error for s in run.shots if s.error)),
        "rate_asked": run.rate,
        "rate_offered": (len(sends) - 1) / span if len(sends) > 1 and span > 0 else float("nan"),
        "send_lag_max": max((s.sent - s.due for s in run.shots), default=float("nan")),
        "served_per_s": len(ok) / run.wall_s if run.wall_s else float("nan"),
        "first_refusal_s": min((s.sent for s in refused), default=float("nan")),
        "refused_p50": percentile([s.latency for s in refused], 50),
        "refused_p99": percentile([s.latency for s in refused], 99),
        "refused_max": max((s.latency for s in refused), default=float("nan")),
        "accepted_p50": percentile(ok, 50),
        "accepted_p99": percentile(ok, 99),
        "accepted_max": max(ok, default=float("nan")),
        "unloaded_p50": percentile(base, 50),
        "unloaded_p99": percentile(base, 99),
        "health_polls": len(run.health),
        "health_ok": sum(h.status == 200 for h in run.health),
        "health_max": max((h.latency for h in run.health), default=float("nan")),
        "rss_start": rss[0] if rss else 0,
        "rss_max": max(rss, default=0),
        "rss_max_first_half": max((b for t, b in run.rss if t <= half), default=0),  # flat: the second half adds ~nothing
        "rss_end": rss[-1] if rss else 0,
    }


def report_table(s: dict) -> str:
    """The summary as a markdown table (milliseconds, MB)."""

    def ms(x: float) -> str:
        return f"{x * 1000:.1f}"

    def mb(x: int) -> str:
        return f"{x / 2**20:.1f}"

    rows = [
        ["requests sent / accepted (200) / refused (503)", f"{s['sent']} / {s['accepted']} / {s['refused']}"],
        [
            "statuses (0: no answer)",
            ", ".join(f"{k}: {v}" for k, v in s["statuses"].items()) + (f" ({s['errors']})" if s["errors"] else ""),
        ],
        ["arrivals req/s: asked / offered", f"{s['rate_asked']:.1f} / {s['rate_offered']:.1f}"],
        ["client send lag max ms, connections opened, CPU s", f"{ms(s['send_lag_max'])}, {s['connections']}, {s['client_cpu_s']:.1f}"],
        ["served under overload req/s", f"{s['served_per_s']:.1f}"],
        ["first 503 after s", f"{s['first_refusal_s']:.2f}"],
        ["503 latency ms p50 / p99 / max", f"{ms(s['refused_p50'])} / {ms(s['refused_p99'])} / {ms(s['refused_max'])}"],
        ["accepted latency ms unloaded p50 / p99", f"{ms(s['unloaded_p50'])} / {ms(s['unloaded_p99'])}"],
        ["accepted latency ms overload p50 / p99 / max", f"{ms(s['accepted_p50'])} / {ms(s['accepted_p99'])} / {ms(s['accepted_max'])}"],
        ["accepted latency ms the queue allows (`queue_bound`)", ms(s["queue_bound"]) if "queue_bound" in s else "-"],
        ["/v1/health polls: 200 / all, max ms", f"{s['health_ok']} / {s['health_polls']}, {ms(s['health_max'])}"],
        [
            "server RSS MB start / max in first half / max / end",
            f"{mb(s['rss_start'])} / {mb(s['rss_max_first_half'])} / {mb(s['rss_max'])} / {mb(s['rss_end'])}",
        ],
    ]
    out = ["| measure | value |", "| --- | --- |"]
    return "\n".join(out + [f"| {a} | {b} |" for a, b in rows])


def measure_capacity(url: str, blobs: list[bytes], seconds: float, concurrency: int, warmup: int = 0) -> tuple[float, list[Shot]]:
    """(requests/s served closed-loop at `concurrency`, the unloaded shots: one request at a time).
    Half of `seconds` each, after a warm-up at `warmup` (default `concurrency`) for a quarter of it:
    first-use kernels, the thread tuner's trial, and, at 2 x max_batch, the memory of full batches,
    so that the resident memory measured next starts from the server's working set."""
    asyncio.run(closed_loop(url, blobs, min(1.0, seconds / 4), warmup or concurrency))
    unloaded = asyncio.run(closed_loop(url, blobs, seconds / 2, 1))
    shots = asyncio.run(closed_loop(url, blobs, seconds / 2, concurrency))
    served = [s for s in shots if s.status == 200]
    span = max(s.sent + s.latency for s in shots) - min(s.sent for s in shots)
    return len(served) / span, unloaded


def server_side_ms(log_path: Path, prefix: str) -> list[float]:
    """Milliseconds the server's own access log (serve.AccessLog) gives for lines starting `prefix`,
    e.g. "POST /v1/predict 503": from when the app got the request to its answer, so the client's
    figure minus this is time the request waited before the server's event loop took it up."""
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        head, _, tail = line.partition("imgcls.serve: ")
        if tail.startswith(prefix) and " ms" in tail:
            out.append(float(tail.split(" ms")[0].rsplit(" ", 1)[1]))
    return out


def queue_bound(unloaded_p99: float, queue_size: int, per_forward: float, passes_s: list[float]) -> float:
    """The latency an accepted request can reach when at most `queue_size` wait in front of it (s).

    It is admitted only while fewer than `queue_size` requests wait, which are taken in order,
    `per_forward` at a time: it waits for the forward pass in progress, then is in one of the next
    ceil(queue_size / per_forward) passes. Those k passes take at most the k longest of `passes_s`
    (the passes' durations, or their mean repeated); plus what it took unloaded (HTTP, decode,
    its own forward again: a margin of one pass).
    """
    k = 1 + math.ceil(queue_size / max(per_forward, 1.0))
    return unloaded_p99 + sum(sorted(passes_s, reverse=True)[:k])


def build_model(out: Path, img_size: int) -> Path:
    """A small_cnn artifact (3 classes, seeded random weights): it costs the server what a trained one does."""
    import torch

    from imgcls.artifact import META_FILE, save_artifact
    from imgcls.models import create_model
    from imgcls.transforms import PreprocessSpec

    if (out / META_FILE).exists():
        return out
    torch.manual_seed(0)
    model = create_model("small_cnn", 3)
    meta = {"arch": "small_cnn", "class_names": ["a", "b", "c"], "preprocess": PreprocessSpec(img_size=img_size).to_dict()}
    return save_artifact(out, model, meta)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model folder to serve (default: a small_cnn built in --out)")
    p.add_argument(
        "--img-size", type=int, default=96, help="the built model's input size (default 96: a capacity the client can outrun 4x)"
    )
    p.add_argument("--seconds", type=float, default=30.0, help="overload duration (default 30)")
    p.add_argument("--factor", type=float, default=4.0, help="arrival rate as a multiple of the measured capacity (default 4)")
    p.add_argument("--max-requests", type=int, default=50_000, help="most requests sent in the overload (default 50000)")
    p.add_argument("--capacity-seconds", type=float, default=6.0, help="seconds measuring capacity and unloaded latency (default 6)")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop concurrency of the capacity measurement (default 8)")
    p.add_argument("--queue-size", type=int, default=64, help="server --queue-size (default 64)")
    p.add_argument("--max-batch", type=int, default=16, help="server --max-batch (default 16)")
    p.add_argument("--compile", default="off", choices=["auto", "on", "off"], help="server --compile (default off: a quick start)")
    p.add_argument("--rate", type=float, default=0.0, help="arrivals per second (default: --factor x the measured capacity)")
    p.add_argument("--server-arg", action="append", default=[], help="more `imgcls serve` flags, e.g. --server-arg=--threads=1")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "overload", help="model, log, results.md")
    a = p.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import load1, machine_summary
    from serve import Server

    a.out.mkdir(parents=True, exist_ok=True)
    model = a.model or build_model(a.out / f"small_cnn-{a.img_size}px", a.img_size)
    blobs = payloads()
    # One client address plays every client here: no per-client limit, so the queue is what refuses.
    flags = [
        "--queue-size",
        str(a.queue_size),
        "--max-batch",
        str(a.max_batch),
        "--max-client-requests",
        "0",
        "--compile",
        a.compile,
        *a.server_arg,
    ]
    print(f"machine: {machine_summary()}, load {load1():.2f}", flush=True)
    server = Server(model, flags, a.out / "server.log")
    try:
        server.wait_ready()
        capacity, unloaded = measure_capacity(server.url, blobs, a.capacity_seconds, a.concurrency, warmup=2 * a.max_batch)
        rate = a.rate or a.factor * capacity
        print(f"  capacity {capacity:.1f} req/s at concurrency {a.concurrency}: offering {rate:.1f} req/s for {a.seconds:g} s", flush=True)
        calls0, images0 = server.counters()
        cpu0 = server.cpu_seconds()
        run = asyncio.run(overload(server.url, blobs, rate, a.seconds, a.max_requests, rss=lambda: rss_bytes(server.proc.pid)))
        server_cpu = server.cpu_seconds() - cpu0
        calls, images = server.counters()
        after = asyncio.run(closed_loop(server.url, blobs, 1.0, 1))
        waiting = server.health()["queue"]["waiting"]
    finally:
        server.stop()
    s = summarize(run, unloaded)
    passes = max(1, calls - calls0)
    per_forward = (images - images0) / passes
    s["queue_bound"] = queue_bound(s["unloaded_p99"], a.queue_size, per_forward, [run.wall_s / passes] * passes)
    print(f"  server CPU {server_cpu:.1f} s in {run.wall_s:.1f} s; {passes} forward passes, {per_forward:.1f} images each", flush=True)
    for prefix in ("POST /v1/predict 503", "POST /v1/predict 200", "GET /v1/health 200"):
        ms = server_side_ms(a.out / "server.log", prefix)
        if ms:
            print(f"  server-side {prefix}: p50 {percentile(ms, 50):.1f} p99 {percentile(ms, 99):.1f} max {max(ms):.1f} ms", flush=True)
    recovered = f"after the overload: queue waiting {waiting}, one at a time p50 {percentile([x.latency for x in after], 50) * 1000:.1f} ms"
    intro = (
        f"`imgcls serve {model.name}` {' '.join(flags)}; capacity {capacity:.1f} req/s (closed loop, concurrency {a.concurrency}); "
        f"{rate / capacity:.1f}x ({rate:.0f} req/s) for {a.seconds:g} s open-loop; client on the same {os.cpu_count()}-core machine, "
        f"load {load1():.2f} at end; {recovered}."
    )
    text = intro + "\n\n" + report_table(s)
    print("\n" + text)
    (a.out / "results.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
