"""Load test of `imgcls serve`: the unbatched eager server against the bucketed compiled one (and onnxruntime).

    python bench/serve.py                       # efficientnet_lite0, 224 px, concurrency 32, 200 requests
    python bench/serve.py --servers eager-unbatched eager-batched compiled onnx --levels 1 8 32 --requests 200
    python bench/serve.py --requests 10 --warmup 4 --max-batch 4 --quiet-wait 0   # smoke run: buckets 1,4

One server per --servers entry (`SERVERS`: the flags each adds) is started on 127.0.0.1, one after
the other so that their start-ups (a compile of every bucket shape for "compiled", from
`imgcls serve`'s own start-up line) do not overlap, and timed from launch to the first answer of
/v1/health. At each concurrency, alternating between the servers so that a change in the
machine's load hits every column alike, --requests POSTs of real JPEG photos (scikit-image's,
300-600 px) are sent with an asyncio httpx client. Each row gives requests/s, p50/p99 latency,
images per forward pass (the server's /v1/health counters), the server's CPU per request (all its
threads, from /proc), the start-up time, and served images/s as a fraction of offline
`Classifier.iter_predict` images/s on the same photos (decoding included, as in the server),
measured in this process before the servers start. The summary says whether the bucketed servers
reach the goal of issue 17: >= 3x the unbatched eager server's requests/s and p99 < 400 ms at
concurrency 32. "onnx" needs the model folder's model.onnx: `imgcls export` writes it first (with
its parity check). The model is EfficientNet-Lite0 with its pretrained ImageNet weights
(imgcls[pretrained]), saved as an artifact with the 1000 ImageNet class names. Everything runs on
this machine: the client shares the CPU with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, imgcls_cmd, load1, machine_summary, markdown_table, wait_for_quiet  # noqa: E402

ARCH = "efficientnet_lite0"


def build_model(out: Path) -> Path:
    """EfficientNet-Lite0 with its ImageNet weights as an imgcls artifact (once)."""
    from imgcls.artifact import META_FILE, save_artifact
    from imgcls.models import create_model, get_entry
    from imgcls.models.imagenet import imagenet_class_names

    if (out / META_FILE).exists():
        return out
    entry = get_entry(ARCH)
    model = create_model(ARCH, num_classes=1000, pretrained=True)
    meta = {
        "arch": ARCH,
        "class_names": imagenet_class_names(),
        "preprocess": entry.default_spec.to_dict(),
        "weights": entry.pretrained_source,
    }
    return save_artifact(out, model, meta)


def payloads() -> list[bytes]:
    """A few real photos as JPEG bytes (scikit-image ships them), else smooth synthetic images."""
    from PIL import Image

    try:
        from skimage import data

        arrays = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    except ImportError:
        y, x = np.mgrid[0:375, 0:500]
        arrays = [np.stack([(x * k) % 256, (y * 2) % 256, (x + y) % 256], -1).astype(np.uint8) for k in (1, 2, 3, 5)]
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).convert("RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`imgcls serve` in a subprocess; its log goes to a file."""

    def __init__(self, model: Path, flags: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        cmd = imgcls_cmd() + ["serve", str(model), "--port", str(self.port), *flags]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout:.0f}s; see {self.log.name}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def health(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/v1/health", timeout=10).json()

    def counters(self) -> tuple[int, int]:
        h = self.health()
        return h["forward_calls"], h["images"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def load(url: str, blobs: list[bytes], n: int, concurrency: int, deadline: float) -> dict:
    """`n` POSTs from `concurrency` workers; latency of each, wall time, non-200 count."""
    import httpx

    latencies: list[float] = []
    errors: dict[int, int] = {}
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:

        async def worker() -> None:
            nonlocal sent
            while sent < n and time.monotonic() < deadline:
                blob = blobs[sent % len(blobs)]
                sent += 1
                t0 = time.perf_counter()
                r = await client.post(f"{url}/v1/predict", content=blob, headers={"content-type": "image/jpeg"})
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors[r.status_code] = errors.get(r.status_code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "n": len(lat),
        "wall": wall,
        "rps": len(lat) / wall,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "errors": errors,
    }


# The servers a run can compare: the flags each adds to the shared ones (precision, threads, queue).
SERVERS = {
    "eager-unbatched": ["--no-batching", "--compile", "off", "--buckets", "off"],  # the baseline: one eager forward per request
    "eager-batched": ["--compile", "off", "--buckets", "off"],  # dynamic batching alone
    "compiled": ["--compile", "on"],  # dynamic batching, padded to buckets compiled at start-up
    "onnx": ["--backend", "onnx"],  # dynamic batching, padded to the same buckets, onnxruntime (fp32)
}
BASELINE = "eager-unbatched"
GOAL_RATIO, GOAL_P99_MS, GOAL_CONCURRENCY = 3.0, 400.0, 32  # issue 17


def offline_rate(model: Path, blobs: list[bytes], n: int, precision: str, threads: int) -> float:
    """Images/s of `Classifier.iter_predict` on `n` of the photos (decoding included): the second of two
    passes, since the first builds oneDNN's kernels for each batch shape (a new one costs seconds)."""
    from imgcls.predict import Classifier
    from imgcls.runtime import set_threads

    set_threads(threads or None)
    clf = Classifier.load(model, precision=precision, threads=threads or None)
    items = [blobs[i % len(blobs)] for i in range(n)]
    for _ in clf.iter_predict(items, probabilities=False):
        pass
    t0 = time.perf_counter()
    done = sum(1 for _ in clf.iter_predict(items, probabilities=False))
    return done / (time.perf_counter() - t0)


def export_onnx_model(model: Path) -> str | None:
    """Write model.onnx into the model folder once (`imgcls export`); None, or why it could not."""
    from imgcls.inference.runners import ONNX_FILE, BackendError, load_onnx_runner

    try:
        load_onnx_runner(model)  # up to date already
        return None
    except BackendError:
        pass
    print(f"  exporting {model / ONNX_FILE} (imgcls export, with its parity check)", flush=True)
    r = subprocess.run(imgcls_cmd() + ["export", str(model)], capture_output=True, text=True)
    return None if r.returncode == 0 else f"imgcls export failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"


def start_servers(
    model: Path, names: list[str], flags: list[str], out: Path, timeout: float, servers: dict[str, Server]
) -> dict[str, dict]:
    """Each server started (into `servers`, so the caller stops them whatever happens) and ready in
    turn; {name: its start-up facts: wall_s from launch to ready, and /v1/health's "engine"}."""
    startup = {}
    for name in names:
        t0 = time.perf_counter()
        server = Server(model, flags + SERVERS[name], out / f"server-{name}.log")
        servers[name] = server
        server.wait_ready(timeout)
        engine = server.health().get("engine", {})
        startup[name] = {"wall_s": time.perf_counter() - t0, **engine}
        note = f" ({engine['note']})" if engine.get("note") else ""
        print(
            f"  {name:<16} ready in {startup[name]['wall_s']:.1f} s: engine {engine.get('name')}, buckets {engine.get('buckets')}, "
            f"engine start-up {engine.get('startup_s', 0):.1f} s{note}",
            flush=True,
        )
    return startup


def measure(server: Server, name: str, blobs: list[bytes], n: int, c: int, deadline: float) -> dict:
    """One load level against one server: the load's figures, with images/forward and server CPU per request."""
    calls0, images0 = server.counters()
    cpu0 = server.cpu_seconds()
    r = asyncio.run(load(server.url, blobs, n, c, deadline))
    r["cpu_ms"] = (server.cpu_seconds() - cpu0) * 1000 / max(1, r["n"])
    calls, images = server.counters()
    r["per_forward"] = (images - images0) / max(1, calls - calls0)
    r["load"] = load1()
    err = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "0"
    print(
        f"  {name:<16} c={c:<3} {r['rps']:7.1f} req/s  p50 {r['p50']:6.0f} ms  p99 {r['p99']:6.0f} ms  "
        f"{r['per_forward']:4.1f} img/forward  {r['cpu_ms']:5.1f} server CPU ms/req  errors {err}  load {r['load']:.1f}",
        flush=True,
    )
    return r


def result_table(results: dict[tuple[str, int], dict], startup: dict[str, dict], offline: float, requests: int) -> str:
    """One row per server and level: its engine, the load's figures, its start-up and served / offline images/s."""
    rows = []
    for (name, c), r in results.items():
        s = startup[name]
        capped = " (time cap)" if r["n"] < requests else ""
        err = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "0"
        engine = f"{s.get('name')} {','.join(map(str, s.get('buckets') or [])) or 'unpadded'}"
        figures = [f"{r['rps']:.1f}", f"{r['p50']:.0f}", f"{r['p99']:.0f}", f"{r['per_forward']:.1f}"]
        started = f"{s['wall_s']:.1f} ({s.get('startup_s', 0):.1f})"
        rows.append(
            [
                name,
                engine,
                c,
                f"{r['n']}{capped}",
                *figures,
                started,
                f"{r['rps'] / offline:.2f}",
                f"{r['cpu_ms']:.1f}",
                err,
                f"{r['load']:.1f}",
            ]
        )
    header = ["server", "engine", "concurrency", "requests", "req/s", "p50 ms", "p99 ms", "images/forward"]
    header += ["start-up s (engine s)", "served / offline img/s", "server CPU ms/request", "errors", "load after"]
    return markdown_table(header, rows)


def goal_table(results: dict[tuple[str, int], dict], names: list[str], levels: list[int]) -> str:
    """Per level and batched server: its req/s over the baseline's and its p99, against issue 17's goal."""
    rows = []
    for c in levels:
        base = results.get((BASELINE, c))
        for name in names:
            r = results.get((name, c))
            if name == BASELINE or r is None or base is None:
                continue
            ratio = r["rps"] / max(1e-9, base["rps"])
            met = ratio >= GOAL_RATIO and r["p99"] < GOAL_P99_MS
            goal = ("met" if met else "missed") if c == GOAL_CONCURRENCY else "-"
            rows.append([name, c, f"{ratio:.2f}x", f"{r['p99']:.0f}", goal])
    header = ["server", "concurrency", f"req/s / {BASELINE}", "p99 ms", f"goal (>= {GOAL_RATIO:g}x, p99 < {GOAL_P99_MS:g} ms)"]
    return markdown_table(header, rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", nargs="+", default=[BASELINE, "compiled", "onnx"], choices=list(SERVERS), help="servers to compare")
    p.add_argument("--requests", type=int, default=200, help="requests per server and concurrency level (default 200)")
    p.add_argument("--levels", type=int, nargs="+", default=[GOAL_CONCURRENCY], help=f"concurrencies (default {GOAL_CONCURRENCY})")
    p.add_argument("--warmup", type=int, default=0, help="warm-up requests per server at the top level (default 4 x the top level)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="torch servers' precision (onnx: fp32)")
    p.add_argument("--max-batch", type=int, default=16, help="server --max-batch, the largest bucket (default 16: buckets 1,4,8,16)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="server --batch-wait-ms (default 5)")
    p.add_argument("--threads", type=int, default=0, help="server --threads (0: one per core)")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to start (compiling; default 900)")
    p.add_argument("--quiet-wait", type=float, default=120.0, help="seconds to wait for a quiet machine first (default 120)")
    p.add_argument("--time-cap", type=float, default=900.0, help="stop sending after this many seconds in all (default 900)")
    p.add_argument("--out", type=Path, default=OUT_DIR / "serve", help="model, logs and results.md (default bench/out/serve)")
    a = p.parse_args()
    print(f"machine: {machine_summary()}", flush=True)

    a.out.mkdir(parents=True, exist_ok=True)
    model = build_model(a.out / "model")
    blobs = payloads()
    names = list(dict.fromkeys(a.servers))
    skipped = export_onnx_model(model) if "onnx" in names else None
    if skipped:
        print(f"  onnx left out: {skipped}", flush=True)
        names.remove("onnx")
    load_start, _, noisy = wait_for_quiet(max_wait_s=a.quiet_wait)
    offline = offline_rate(model, blobs, a.requests, a.precision, a.threads)
    print(f"  offline Classifier.iter_predict: {offline:.1f} img/s", flush=True)
    flags = ["--precision", a.precision, "--queue-size", "512", "--threads", str(a.threads)]
    flags += ["--max-batch", str(a.max_batch), "--batch-wait-ms", str(a.batch_wait_ms)]
    results: dict[tuple[str, int], dict] = {}
    servers: dict[str, Server] = {}
    try:
        startup = start_servers(model, names, flags, a.out, a.start_timeout, servers)
        top = max(a.levels)
        for server in servers.values():  # warm-up: oneDNN's kernels for every batch size, the thread tuner's trial
            asyncio.run(load(server.url, blobs, a.warmup or 4 * top, top, time.monotonic() + 120))
        deadline = time.monotonic() + a.time_cap
        for c in a.levels:
            for name, server in servers.items():
                results[(name, c)] = measure(server, name, blobs, a.requests, c, deadline)
    finally:
        for server in servers.values():
            server.stop()
    intro = (
        f"`imgcls serve` {ARCH} 224 px, precision {a.precision}, {a.requests} requests per server and level, JPEG photos, client on "
        f"the same {os.cpu_count()}-core machine; batched servers: --max-batch {a.max_batch} --batch-wait-ms {a.batch_wait_ms:g}. "
        f"Offline `Classifier.iter_predict` on the same photos: {offline:.1f} img/s. Load average {load_start:.2f} at start, "
        f"{load1():.2f} at end{' (noisy)' if noisy else ''}." + (f" onnx left out: {skipped}." if skipped else "")
    )
    text = "\n\n".join([intro, result_table(results, startup, offline, a.requests), goal_table(results, names, a.levels)])
    print("\n" + text)
    (a.out / "results.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
