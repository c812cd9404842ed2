"""Load test of `imgcls serve`: requests/s and p50/p99 latency at several concurrencies, batched and not.

    python bench/serve.py                       # efficientnet_lite0, 224 px, 200 requests per level
    python bench/serve.py --precision bf16 fp32 --levels 1 8 32 --requests 200 --time-cap 900

For each precision it starts `imgcls serve` twice on 127.0.0.1 (dynamic batching, and
--no-batching); at each concurrency, alternating between the two, it sends --requests POSTs of
real JPEG photos (scikit-image's, 300-600 px) with an asyncio httpx client, and prints a markdown
table with the batched/unbatched ratio. Images per forward pass come from the server's own
/v1/health counters. Server CPU time per request (all its threads, from /proc) shows the cost
of a request when requests/s is limited by other jobs on the machine. The model is
EfficientNet-Lite0 with its pretrained ImageNet weights (imgcls[pretrained]), saved as an artifact
with the 1000 ImageNet class names. Everything runs on this machine: the client shares the CPU
with the server.
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

    def counters(self) -> tuple[int, int]:
        import httpx

        h = httpx.get(f"{self.url}/v1/health", timeout=10).json()
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200, help="requests per concurrency level (default 200)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="concurrencies (default 1 8 32)")
    p.add_argument(
        "--precision",
        nargs="+",
        default=["bf16", "fp32"],
        choices=["auto", "bf16", "fp32"],
        help="server precisions to compare (default bf16 fp32)",
    )
    p.add_argument("--max-batch", type=int, default=16, help="server --max-batch for the batched runs (default 16)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="server --batch-wait-ms (default 5)")
    p.add_argument("--threads", type=int, default=0, help="server --threads (0: one per core)")
    p.add_argument("--time-cap", type=float, default=900.0, help="stop sending after this many seconds in all (default 900)")
    p.add_argument("--out", type=Path, default=OUT_DIR / "serve", help="model, logs and results.md (default bench/out/serve)")
    a = p.parse_args()
    print(f"machine: {machine_summary()}", flush=True)

    a.out.mkdir(parents=True, exist_ok=True)
    model = build_model(a.out / "model")
    blobs = payloads()
    load_start, _, noisy = wait_for_quiet(max_wait_s=120)
    deadline = time.monotonic() + a.time_cap
    rows, rps, cpu = [], {}, {}
    for precision in a.precision:
        # Both servers run side by side (an idle one costs no CPU) and the levels alternate between
        # them, so a change in the machine's load hits both columns of a ratio alike.
        flags = [
            "--precision",
            precision,
            "--queue-size",
            "512",
            "--threads",
            str(a.threads),
            "--max-batch",
            str(a.max_batch),
            "--batch-wait-ms",
            str(a.batch_wait_ms),
        ]
        servers = {
            batching: Server(
                model,
                flags + ([] if batching else ["--no-batching"]),
                a.out / f"server-{precision}-{'batched' if batching else 'unbatched'}.log",
            )
            for batching in (True, False)
        }
        try:
            for server in servers.values():
                server.wait_ready()
                asyncio.run(load(server.url, blobs, 4 * max(a.levels), max(a.levels), time.monotonic() + 60))  # warm-up: every batch shape
            for c in a.levels:
                for batching, server in servers.items():
                    name = f"{precision}, {'batched' if batching else 'unbatched'}"
                    calls0, images0 = server.counters()
                    cpu0 = server.cpu_seconds()
                    r = asyncio.run(load(server.url, blobs, a.requests, c, deadline))
                    cpu_ms = (server.cpu_seconds() - cpu0) * 1000 / max(1, r["n"])
                    calls, images = server.counters()
                    per_forward = (images - images0) / max(1, calls - calls0)
                    rps[(precision, batching, c)] = r["rps"]
                    cpu[(precision, batching, c)] = cpu_ms
                    capped = " (time cap)" if r["n"] < a.requests else ""
                    err = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "0"
                    rows.append(
                        [
                            name,
                            c,
                            f"{r['n']}{capped}",
                            f"{r['rps']:.1f}",
                            f"{r['p50']:.0f}",
                            f"{r['p99']:.0f}",
                            f"{per_forward:.1f}",
                            f"{cpu_ms:.1f}",
                            err,
                            f"{load1():.1f}",
                        ]
                    )
                    print(
                        f"  {name:<16} c={c:<3} {r['rps']:7.1f} req/s  p50 {r['p50']:6.0f} ms  p99 {r['p99']:6.0f} ms  "
                        f"{per_forward:4.1f} img/forward  {cpu_ms:5.1f} server CPU ms/req  errors {err}  load {load1():.1f}",
                        flush=True,
                    )
        finally:
            for server in servers.values():
                server.stop()
    ratios = []
    for precision in a.precision:
        for c in a.levels:
            if (precision, True, c) in rps and (precision, False, c) in rps:
                ratios.append(
                    [
                        precision,
                        c,
                        f"{rps[(precision, True, c)] / rps[(precision, False, c)]:.2f}x",
                        f"{cpu[(precision, False, c)] / max(1e-9, cpu[(precision, True, c)]):.2f}x",
                    ]
                )
    cpu = os.cpu_count()
    text = "\n".join(
        [
            f"`imgcls serve` {ARCH} 224 px, {a.requests} requests per level, JPEG photos, client on the same {cpu}-core machine; "
            f"batched: --max-batch {a.max_batch} --batch-wait-ms {a.batch_wait_ms:g}. Load average "
            f"{load_start:.2f} at start, {load1():.2f} at end{' (noisy)' if noisy else ''}.",
            "",
            markdown_table(
                [
                    "server",
                    "concurrency",
                    "requests",
                    "req/s",
                    "p50 ms",
                    "p99 ms",
                    "images/forward",
                    "server CPU ms/request",
                    "errors",
                    "load after",
                ],
                rows,
            ),
            "",
            markdown_table(["precision", "concurrency", "batched / unbatched req/s", "unbatched / batched server CPU per request"], ratios),
        ]
    )
    print("\n" + text)
    (a.out / "results.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
