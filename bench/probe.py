"""Probe `imgcls serve` under abuse: slow uploads, overload and memory-bomb images (issue 18).

    python bench/probe.py                       # small_cnn trained here (`imgcls demo --epochs 1`), full lengths
    python bench/probe.py --quick               # a few seconds per part, small counts: a smoke run
    python bench/probe.py --model runs/exp1     # serve this model folder instead

(a) slow clients: --slow-clients raw connections, each from its own loopback address (127.0.0.2,
    127.0.0.3, ...: many clients, so the per-client limit cannot be what saves the server), declare
    a 100 kB body and send 3 bytes a second for --slow-seconds, while one normal client
    (127.0.0.1) sends requests one after another: the normal client's 200/503/429 counts and
    latency, and how the slow connections ended (408, and after how long).
(b) overload: capacity first (requests/s at concurrency 1, 2, 4, ... until it stops growing), then
    requests at 4x that rate, open loop, for --overload-seconds (the server runs with
    --max-client-requests 0: one client address sends them all): answers by status, the 503s'
    latency inside the server (its access log) and at the client, /v1/health latency from a
    separate client process, and the server's resident memory at start, peak and end.
(c) memory bombs: a 16-bit greyscale PNG of 9999x9999 (about 200 kB), a lossless WebP of
    16383x6000 (34 bytes), and four such PNGs in one request: the status and the server's peak
    resident memory above what it held before the request.

Every part starts its own server on 127.0.0.1. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, imgcls_cmd, load1, machine_summary, markdown_table  # noqa: E402
from serve import Server  # noqa: E402  (bench/serve.py: `imgcls serve` in a subprocess)

SLOW_BODY = 100_000  # bytes the slow clients declare
ACCESS_LINE = re.compile(r"POST /v1/predict (\d{3}) \d+ img ([\d.]+) ms")


# ---------------------------------------------------------------------------------- helpers


def build_model(out: Path) -> Path:
    """small_cnn trained one epoch on scikit-learn's 8x8 digits (`imgcls demo`), once."""
    model = out / "demo" / "model"
    if not (model / "model.json").exists():
        cmd = imgcls_cmd() + ["demo", "--out", str(out / "demo"), "--epochs", "1", "--quiet"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return model


def photo_jpeg(seed: int, size: tuple[int, int] = (640, 480)) -> bytes:
    """A smooth synthetic photo-like JPEG (decoding cost like a real photo's, no download)."""
    from PIL import Image

    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    rgb = np.stack([(x * (seed + 1)) % 256, (y * 2 + seed * 40) % 256, (x + y) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def deep_png(width: int, height: int) -> bytes:
    """A real 16-bit greyscale PNG of zeros: tiny on the wire, width x height x 2 bytes decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(1 + 2 * width)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)  # 16-bit, colour type 0: grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def lossless_webp(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, "WEBP", lossless=True, quality=0, method=0)
    return buf.getvalue()


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssWatch:
    """Samples a process's resident memory every 5 ms in a thread: start, peak, end (MB)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.start = pid, rss_mb(pid)
        self.peak = self.end = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb(self.pid))

    def stop(self) -> RssWatch:
        self._stop.set()
        self._thread.join()
        self.end = rss_mb(self.pid)
        self.peak = max(self.peak, self.end)
        return self


def pct(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q):.0f}" if values else "-"


def start_server(model: Path, flags: list[str], log: Path) -> Server:
    server = Server(model, flags, log)
    server.wait_ready()
    return server


# ---------------------------------------------------------------------------------- (a) slow clients


def slow_clients(url: str, n: int, seconds: float, grace: float) -> list[dict]:
    """`n` connections, each from 127.0.0.(2+i), sending 3 bytes a second of a declared 100 kB body
    for `seconds` (answers collected for `grace` more); per connection its status and seconds to it."""
    port = int(url.rsplit(":", 1)[1])
    socks, out = {}, []
    for i in range(n):
        s = socket.socket()
        try:
            s.bind((f"127.0.0.{2 + i % 250}", 0))
        except OSError:  # no 127/8 beyond 127.0.0.1 here: every slow client shares one address
            s.bind(("127.0.0.1", 0))
        s.connect(("127.0.0.1", port))
        s.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: probe\r\nContent-Type: image/png\r\nContent-Length: {SLOW_BODY}\r\n\r\n".encode())
        socks[s] = {"t0": time.monotonic(), "answer": b"", "after": None}
    end_send, end_all, next_send = time.monotonic() + seconds, time.monotonic() + seconds + grace, 0.0
    while socks and time.monotonic() < end_all:
        readable, _, _ = select.select(list(socks), [], [], 0.1)
        for s in readable:
            st = socks[s]
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if data and st["after"] is None:
                st["after"] = time.monotonic() - st["t0"]
            st["answer"] += data
            if not data or b"\r\n\r\n" in st["answer"]:
                out.append(st)
                del socks[s]
                s.close()
        if time.monotonic() >= next_send and time.monotonic() < end_send:
            next_send = time.monotonic() + 1.0
            for s in list(socks):
                try:
                    s.send(b"xyz")
                except OSError:
                    pass
    for s, st in socks.items():  # still open at the end: never answered
        out.append(st)
        s.close()
    for st in out:
        st["status"] = int(st["answer"].split(b" ", 2)[1]) if st["answer"].startswith(b"HTTP/1.1 ") else None
    return out


def normal_client(url: str, blob: bytes, seconds: float, max_requests: int = 100_000) -> tuple[dict[int, int], list[float]]:
    """Requests one after another from 127.0.0.1 for `seconds`: counts by status, latencies (ms)."""
    import httpx

    counts: dict[int, int] = {}
    latencies: list[float] = []
    end = time.monotonic() + seconds
    with httpx.Client(timeout=30.0) as client:
        for _ in range(max_requests):
            if time.monotonic() >= end:
                break
            t0 = time.perf_counter()
            try:
                status = client.post(f"{url}/v1/predict", content=blob, headers={"content-type": "image/jpeg"}).status_code
            except httpx.HTTPError:
                status = 0
            latencies.append((time.perf_counter() - t0) * 1000)
            counts[status] = counts.get(status, 0) + 1
            time.sleep(0.05)
    return counts, latencies


def part_slow(model: Path, out: Path, a: argparse.Namespace, blob: bytes) -> list[list[object]]:
    flags = ["--body-timeout-s", str(a.body_timeout_s)] if a.body_timeout_s else []
    server = start_server(model, flags, out / "server-slow.log")
    try:
        result: dict = {}
        slow = threading.Thread(target=lambda: result.update(slow=slow_clients(server.url, a.slow_clients, a.slow_seconds, a.slow_grace)))
        slow.start()
        time.sleep(1.0)  # let every slow connection send its headers first
        counts, latencies = normal_client(server.url, blob, a.slow_seconds - 1.0)
        slow.join()
    finally:
        server.stop()
    ended: dict[object, int] = {}
    for st in result["slow"]:
        ended[st["status"]] = ended.get(st["status"], 0) + 1
    after = [st["after"] for st in result["slow"] if st["status"] == 408]
    return [
        [
            f"{a.slow_clients} slow clients x {a.slow_seconds:g} s",
            ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
            pct(latencies, 50),
            pct(latencies, 99),
            ", ".join(f"{k}: {v}" for k, v in sorted(ended.items(), key=str)),
            f"{np.median(after):.1f}" if after else "-",
        ]
    ]


# ---------------------------------------------------------------------------------- (b) overload


async def closed_loop(url: str, blob: bytes, concurrency: int, seconds: float) -> float:
    """Requests/s answered 200 by `concurrency` clients sending one after another for `seconds`."""
    import httpx

    done, end = 0, time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=30.0, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < end:
                r = await client.post(f"{url}/v1/predict", content=blob, headers={"content-type": "image/jpeg"})
                done += r.status_code == 200

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - t0)


async def open_loop(url: str, blob: bytes, rate: float, seconds: float, max_in_flight: int = 1000) -> dict:
    """Requests started at `rate` per second for `seconds`, whatever the answers: statuses, latencies by status (ms)."""
    import httpx

    results: list[tuple[int, float]] = []
    skipped = 0
    async with httpx.AsyncClient(timeout=60.0, limits=httpx.Limits(max_connections=max_in_flight)) as client:

        async def one() -> None:
            t0 = time.perf_counter()
            try:
                status = (await client.post(f"{url}/v1/predict", content=blob, headers={"content-type": "image/jpeg"})).status_code
            except httpx.HTTPError:
                status = 0
            results.append((status, (time.perf_counter() - t0) * 1000))

        tasks: set[asyncio.Task] = set()
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            if len(tasks) >= max_in_flight:
                skipped += 1
                continue
            task = asyncio.ensure_future(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    return {"results": results, "skipped": skipped}


def poll(url: str, seconds: float, out: Path, blob_path: Path) -> None:
    """(Run as a separate process, a client that is not itself overloaded.) Every 50 ms for
    `seconds`: GET /v1/health, then POST the image; {"health": [ms], "<status>": [ms]} to `out`."""
    import httpx

    blob, times = blob_path.read_bytes(), {"health": []}
    end = time.monotonic() + seconds
    with httpx.Client(timeout=30.0) as client:
        for _ in range(100_000):
            if time.monotonic() >= end:
                break
            for kind in ("health", "predict"):
                t0 = time.perf_counter()
                try:
                    if kind == "health":
                        client.get(f"{url}/v1/health")
                    else:
                        kind = str(client.post(f"{url}/v1/predict", content=blob, headers={"content-type": "image/jpeg"}).status_code)
                except httpx.HTTPError:
                    kind = "error"
                times.setdefault(kind, []).append((time.perf_counter() - t0) * 1000)
            time.sleep(0.05)
    out.write_text(json.dumps(times))


def part_overload(model: Path, out: Path, a: argparse.Namespace, blob: bytes) -> tuple[list[list[object]], list[list[object]]]:
    log = out / "server-overload.log"
    server = start_server(model, ["--max-client-requests", "0"], log)
    try:
        capacity, rows, c = 0.0, [], 1
        while c <= 64:
            rps = asyncio.run(closed_loop(server.url, blob, c, a.capacity_seconds))
            rows.append([c, f"{rps:.1f}"])
            print(f"  capacity at concurrency {c}: {rps:.1f} req/s", flush=True)
            if rps < capacity * 1.1:
                capacity = max(capacity, rps)
                break
            capacity, c = max(capacity, rps), c * 2
        offset = log.stat().st_size
        poll_out, blob_path = out / "poll.json", out / "probe.jpg"
        blob_path.write_bytes(blob)
        poller = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--poll",
                server.url,
                "--poll-seconds",
                str(a.overload_seconds),
                "--poll-out",
                str(poll_out),
                "--poll-image",
                str(blob_path),
            ]
        )
        watch = RssWatch(server.proc.pid)
        r = asyncio.run(open_loop(server.url, blob, 4 * capacity, a.overload_seconds))
        mem = watch.stop()
        poller.wait(a.overload_seconds + 60)
    finally:
        server.stop()
    with open(log, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        inside = [float(m.group(2)) for m in map(ACCESS_LINE.search, f) if m and m.group(1) == "503"]
    statuses: dict[int, int] = {}
    for status, _ in r["results"]:
        statuses[status] = statuses.get(status, 0) + 1
    at_client = [ms for status, ms in r["results"] if status == 503]
    ok = [ms for status, ms in r["results"] if status == 200]
    polled = json.loads(poll_out.read_text())
    answers = ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())) + (f", not sent: {r['skipped']}" if r["skipped"] else "")
    return rows, [
        [
            f"{4 * capacity:.0f} req/s for {a.overload_seconds:g} s",
            answers,
            f"{pct(inside, 50)} / {pct(inside, 99)}",
            f"{pct(at_client, 50)} / {pct(at_client, 99)}",
            f"{pct(ok, 50)} / {pct(ok, 99)}",
            f"{pct(polled['health'], 50)} / {pct(polled['health'], 99)}",
            ", ".join(f"{k}: {len(v)}, {pct(v, 50)} / {pct(v, 99)}" for k, v in sorted(polled.items()) if k != "health"),
            f"{mem.start:.0f} / {mem.peak:.0f} / {mem.end:.0f}",
        ]
    ]


# ---------------------------------------------------------------------------------- (c) memory bombs


def part_bombs(model: Path, out: Path, a: argparse.Namespace) -> list[list[object]]:
    import httpx

    side = 9999 if not a.quick else 6000
    png = deep_png(side, side)
    webp = lossless_webp(16383, 6000) if not a.quick else lossless_webp(8000, 6000)
    webp_size = "16383x6000" if not a.quick else "8000x6000"
    cases = [
        (f"16-bit PNG {side}x{side} ({len(png) // 1024} kB)", [png]),
        (f"lossless WebP {webp_size} ({len(webp)} B)", [webp]),
        (f"4 of the PNGs in one request ({4 * len(png) // 1024} kB)", [png] * 4),
    ]
    server = start_server(model, [], out / "server-bombs.log")
    rows = []
    try:
        for name, blobs in cases:
            time.sleep(0.5)
            watch = RssWatch(server.proc.pid)
            t0 = time.perf_counter()
            files = [("file", (f"bomb{i}", b, "application/octet-stream")) for i, b in enumerate(blobs)]
            r = httpx.post(f"{server.url}/v1/predict", files=files, timeout=120)
            seconds = time.perf_counter() - t0
            mem = watch.stop()
            detail = r.json().get("detail", "") if r.status_code != 200 else ""
            rows.append(
                [
                    name,
                    r.status_code,
                    f"{seconds * 1000:.0f}",
                    f"{mem.start:.0f}",
                    f"{mem.peak:.0f}",
                    f"{mem.peak - mem.start:.0f}",
                    detail[:100],
                ]
            )
            print(f"  {name}: {r.status_code} in {seconds:.2f} s, RSS {mem.start:.0f} -> peak {mem.peak:.0f} MB", flush=True)
    finally:
        server.stop()
    return rows


# ---------------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model folder to serve (default: small_cnn trained here on the digits)")
    p.add_argument("--parts", default="abc", help="which parts to run (default abc)")
    p.add_argument("--quick", action="store_true", help="a few seconds per part, small counts")
    p.add_argument("--slow-clients", type=int, help="slow connections (default 66; --quick 8)")
    p.add_argument("--slow-seconds", type=float, help="how long the slow clients trickle (default 20; --quick 5)")
    p.add_argument("--slow-grace", type=float, help="seconds more to collect the slow clients' answers (default 10; --quick 3)")
    p.add_argument("--body-timeout-s", type=float, help="the server's --body-timeout-s (default: the server's; --quick 3)")
    p.add_argument("--capacity-seconds", type=float, help="seconds per concurrency when measuring capacity (default 5; --quick 1)")
    p.add_argument("--overload-seconds", type=float, help="seconds at 4x capacity (default 30; --quick 3)")
    p.add_argument("--out", type=Path, default=OUT_DIR / "probe", help="model, logs and results.md (default bench/out/probe)")
    p.add_argument("--poll", help=argparse.SUPPRESS)  # the probe process of part (b)
    p.add_argument("--poll-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--poll-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--poll-image", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.poll:
        poll(a.poll, a.poll_seconds, a.poll_out, a.poll_image)
        return 0
    defaults = {
        "slow_clients": (66, 8),
        "slow_seconds": (20.0, 5.0),
        "slow_grace": (10.0, 3.0),
        "body_timeout_s": (None, 3.0),
        "capacity_seconds": (5.0, 1.0),
        "overload_seconds": (30.0, 3.0),
    }
    for name, (full, quick) in defaults.items():
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine_summary()}; load {load1():.1f}", flush=True)
    model = a.model or build_model(a.out)
    blob = photo_jpeg(0)
    text = [f"`imgcls serve` {model}, client on the same machine ({machine_summary()}); load {load1():.1f} at start."]
    if "a" in a.parts:
        print("(a) slow clients", flush=True)
        rows = part_slow(model, a.out, a, blob)
        text += [
            "",
            "(a) slow clients (each from its own 127.0.0.x) while a normal client sends a 640x480 JPEG after another",
            markdown_table(
                ["scenario", "normal client: answers", "p50 ms", "p99 ms", "slow clients ended with", "408 after s (median)"], rows
            ),
        ]
    if "b" in a.parts:
        print("(b) overload", flush=True)
        capacity, rows = part_overload(model, a.out, a, blob)
        text += [
            "",
            "(b) capacity (closed loop)",
            markdown_table(["concurrency", "req/s (200)"], capacity),
            "",
            "(b) overload at 4x capacity, open loop (latencies p50 / p99 ms; server RSS MB)",
            markdown_table(
                [
                    "load",
                    "answers",
                    "503 inside server",
                    "503 at load client",
                    "200 at load client",
                    "/v1/health (probe process)",
                    "predict (probe process): status: n, p50 / p99",
                    "RSS start / peak / end",
                ],
                rows,
            ),
            "The load client is itself overloaded on a small machine (its latencies include its own event loop's lag); "
            "the probe process sends one health check and one image every 50 ms.",
        ]
    if "c" in a.parts:
        print("(c) memory bombs", flush=True)
        rows = part_bombs(model, a.out, a)
        header = ["upload", "status", "ms", "RSS before", "RSS peak", "growth", "detail"]
        text += ["", "(c) memory bombs (server RSS MB)", markdown_table(header, rows)]
    text.append(f"\nload {load1():.1f} at end")
    print("\n" + "\n".join(text))
    (a.out / "results.md").write_text("\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
