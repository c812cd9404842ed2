"""The server under abuse: slow uploads, memory bombs, overload and clients that leave (issue 18).

Each test reproduces a measured failure against a real uvicorn server on 127.0.0.1 (the helpers of
test_serve.py): raw sockets play the slow or vanishing clients, bounded in count and in time, and
the server's own thread shares this process, so its resident memory is this process's.
"""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import select
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

import imgcls.serve
from badfiles import png_chunk
from imgcls.predict import Classifier
from imgcls.serve import ServeSettings, create_app
from imgcls.uploads import FormSplitter, RequestError
from test_serve import TIMEOUT, GatedInfer, image_bytes, make_artifact, post_files, serving, wait_for


@pytest.fixture(scope="module")
def clf(tmp_path_factory) -> Classifier:
    return Classifier.load(make_artifact(tmp_path_factory.mktemp("hardening") / "model"), device="cpu", precision="fp32")


def health(url: str) -> dict:
    return httpx.get(f"{url}/v1/health", timeout=TIMEOUT).json()


class RawClient:
    """A POST /v1/predict over a raw socket from `source` (a 127.x.y.z address): headers that
    declare `length` body bytes, then whatever the test sends, and the server's answer as it comes."""

    def __init__(self, url: str, length: int, source: str = "127.0.0.1") -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT, source_address=(source, 0))
        head = f"POST /v1/predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\nContent-Length: {length}\r\n\r\n"
        self.sock.sendall(head.encode())
        self.started = time.monotonic()
        self.answer = b""
        self.answered_after: float | None = None  # seconds from the headers to the first byte of the answer
        self.closed_by_server = False

    @property
    def status(self) -> int | None:
        return int(self.answer.split(b" ", 2)[1]) if self.answer.startswith(b"HTTP/1.1 ") else None

    def trickle(self, until: float, every: float = 0.2, chunk: bytes = b"xyz") -> None:
        """Send `chunk` every `every` seconds (3 bytes each 0.2 s: 15 bytes a second) until the
        server answers and closes the connection, or `until` (time.monotonic)."""
        while time.monotonic() < until and not self.closed_by_server:
            readable, _, _ = select.select([self.sock], [], [], every)
            if readable:
                self._read()
            elif not self.answer:
                try:
                    self.sock.send(chunk)
                except OSError:  # the server closed: read what it said
                    self._read()

    def _read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        if data and not self.answer:
            self.answered_after = time.monotonic() - self.started
        self.answer += data
        self.closed_by_server = not data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_clients() -> Iterator[Callable[..., RawClient]]:
    made: list[RawClient] = []

    def make(*args, **kwargs) -> RawClient:
        made.append(RawClient(*args, **kwargs))
        return made[-1]

    yield make
    for c in made:
        c.close()


# ---------------------------------------------------------------------------------- 1. slow uploads


def test_slow_uploads_hold_no_queue_place_and_end_with_408(clf, raw_clients):
    """Issue 18.1: clients trickling 15 bytes/s of a declared 100 kB body took every queue place
    (counted from before the body was read, with no time limit), so every normal request got 503.
    Now a place is taken only once the body is in, and the body must arrive within body_timeout_s."""
    settings = ServeSettings(queue_size=2, body_timeout_s=1.5, max_client_requests=0)
    with serving(create_app(clf, settings)) as url, ThreadPoolExecutor(4) as pool:
        slow = [raw_clients(url, 100_000) for _ in range(4)]  # twice the queue
        until = time.monotonic() + 4.0
        trickling = [pool.submit(c.trickle, until) for c in slow]
        wait_for(lambda: health(url)["clients"]["requests"] == 4, "the slow requests to be in progress")
        t0 = time.monotonic()
        normal = post_files(url, [image_bytes(1)])
        assert normal.status_code == 200, normal.text
        assert time.monotonic() - t0 < 1.0
        assert not any(c.answer for c in slow)  # answered while every slow upload was still going
        for f in trickling:
            f.result(TIMEOUT)
    for c in slow:
        assert c.status == 408, c.answer[:200]
        assert b"request body not complete after 1.5 s" in c.answer
        assert 1.4 <= c.answered_after < 2.5  # by the timeout, not when the body (never) completed
        assert c.closed_by_server  # Connection: close, so the trickle holds nothing afterwards
        assert b"connection: close" in c.answer.lower()


def test_one_client_gets_429_beyond_its_limit_and_others_are_served(clf, raw_clients):
    settings = ServeSettings(queue_size=8, body_timeout_s=5.0, max_client_requests=2)
    try:  # a second loopback address plays another client
        socket.create_connection(("127.0.0.1", 9), timeout=0.5, source_address=("127.0.0.2", 0)).close()
    except ConnectionRefusedError:
        pass
    except OSError as e:
        pytest.skip(f"cannot use 127.0.0.2 as a source address here: {e}")
    with serving(create_app(clf, settings)) as url:
        slow = [raw_clients(url, 100_000) for _ in range(2)]
        for c in slow:
            c.sock.sendall(b"x" * 10)
        wait_for(lambda: health(url)["clients"]["requests"] == 2, "two requests in progress")
        r = post_files(url, [image_bytes(2)])
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1" and "at most 2" in r.json()["detail"]
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=TIMEOUT) as other:
            r = other.post(f"{url}/v1/predict", content=image_bytes(3), headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
        for c in slow:  # they leave: their places come back
            c.close()
        wait_for(lambda: health(url)["clients"]["requests"] == 0, "the places of the clients that left")
        assert post_files(url, [image_bytes(4)]).status_code == 200


# ---------------------------------------------------------------------------------- 11. client leaves


def test_client_leaving_mid_upload_is_one_499_line_without_traceback(clf, raw_clients, caplog):
    """Issue 18.11: a client that disconnected mid-upload was logged as a 500 with a traceback."""
    with caplog.at_level(logging.INFO), serving(create_app(clf, ServeSettings())) as url:
        c = raw_clients(url, 10_000)
        c.sock.sendall(b"x" * 5_000)
        time.sleep(0.05)
        c.close()
        wait_for(lambda: any(" 499 " in r.getMessage() for r in caplog.records), "the access log line")
        assert post_files(url, [image_bytes(5)]).status_code == 200  # and the server carries on
    ours = [r.getMessage() for r in caplog.records if r.name == "imgcls.serve" and r.getMessage().startswith("POST")]
    assert ours[0] == ours[0].split(" ms")[0] + " ms: client closed the connection during the upload (5000 of 10000 bytes received)"
    assert ours[0].startswith("POST /v1/predict 499 0 img ")
    assert [line.split(" ")[2] for line in ours] == ["499", "200"]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


# ---------------------------------------------------------------------------------- 2. memory bombs


def deep_png(width: int, height: int) -> bytes:
    """A real 16-bit greyscale PNG of zeros: tiny on disk, width x height x 2 bytes once decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    z = zlib.compressobj(9)
    row = bytes(1 + 2 * width)  # filter byte 0, then the row's samples
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRss:
    """The most resident memory above the start, sampled every millisecond while the block runs."""

    def __enter__(self) -> PeakRss:
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_deep_png_is_refused_from_its_header_without_taking_the_memory(clf):
    """Issue 18.2: a 16-bit PNG well under the pixel limit took 22 bytes a pixel to decode (2.2 GB
    for 9999x9999, from 200 kB); at the 10 it takes now, this 6000x6000 one (70 kB) would still
    take 343 MB, over the default limit: refused from its header, the memory never taken."""
    data = deep_png(6000, 6000)
    assert len(data) < 100_000
    with serving(create_app(clf, ServeSettings())) as url:  # the default limit, 256 MB
        post_files(url, [image_bytes(6)])  # warm up the request path first
        with PeakRss() as mem:
            r = post_files(url, [data], ["deep.png"])
    assert r.status_code == 413, r.text
    assert r.json()["detail"] == (
        "deep.png: decoding this 6000x6000 PNG image (mode I;16) would take about 343 MB, "
        "over the limit of 256 MB (possible decompression bomb)"
    )
    assert mem.growth < 64 * 2**20, f"resident memory grew {mem.growth / 2**20:.0f} MB"


def test_decoded_memory_limits_are_settings_and_listed(clf):
    big = io.BytesIO()
    Image.new("RGB", (800, 600), (10, 20, 30)).save(big, "PNG")  # 800 x 600 x 4 bytes = 1.8 MB decoded
    settings = ServeSettings(max_decoded_mb=1, decode_budget_mb=2)
    with serving(create_app(clf, settings)) as url:
        r = post_files(url, [image_bytes(7), big.getvalue()], ["small.png", "big.png"])
        assert r.status_code == 413
        assert r.json()["detail"].startswith(
            "big.png: decoding this 800x600 PNG image (mode RGB) would take about 1.83 MB, over the limit of 1 MB"
        )
        assert post_files(url, [image_bytes(7)]).status_code == 200
        limits = httpx.get(f"{url}/v1/model", timeout=TIMEOUT).json()["limits"]
    assert limits["max_decoded_mb"] == 1 and limits["decode_budget_mb"] == 2
    assert limits["max_pixels"] == clf.max_pixels and limits["body_timeout_s"] == settings.body_timeout_s
    assert limits["max_client_requests"] == settings.max_client_requests
    with pytest.raises(ValueError, match="decode_budget_mb"):
        ServeSettings(max_decoded_mb=64, decode_budget_mb=32)


def test_images_wait_for_the_decode_budget_then_get_503(clf, monkeypatch):
    """Decoding memory across the pool is bounded: an image that does not fit waits DECODE_WAIT_S, then 503."""
    monkeypatch.setattr(imgcls.serve, "DECODE_WAIT_S", 0.3)
    buf = io.BytesIO()
    Image.new("RGB", (500, 400), (200, 10, 10)).save(buf, "PNG")
    blob = buf.getvalue()  # 500 x 400 x 4 = 0.8 MB decoded: two do not fit in 1 MB
    release, inside = threading.Event(), threading.Event()
    real_prepare = clf.prepare

    def held_prepare(data, name=None):
        if name == "held.png":
            inside.set()
            assert release.wait(TIMEOUT)
        return real_prepare(data, name)

    monkeypatch.setattr(clf, "prepare", held_prepare)
    settings = ServeSettings(max_decoded_mb=1, decode_budget_mb=1, decode_workers=2)
    with serving(create_app(clf, settings)) as url, ThreadPoolExecutor(1) as pool:
        try:
            held = pool.submit(post_files, url, [blob], ["held.png"])
            assert inside.wait(TIMEOUT)
            assert health(url)["decoding"]["bytes"] == 500 * 400 * 4
            t0 = time.monotonic()
            r = post_files(url, [blob], ["waits.png"])
            assert r.status_code == 503 and "decoding other images" in r.json()["detail"]
            assert 0.25 <= time.monotonic() - t0 < 2.0
        finally:
            release.set()
        assert held.result(TIMEOUT).status_code == 200
        assert post_files(url, [blob], ["now.png"]).status_code == 200
        assert health(url)["decoding"] == {"bytes": 0, "peak_bytes": 500 * 400 * 4, "budget_bytes": 2**20}


# ---------------------------------------------------------------------------------- 10. a free event loop


def timed(fn: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0


def test_health_and_503_stay_fast_while_requests_decode_and_infer(clf, monkeypatch):
    """Issue 18.10: with the model busy, the queue full and a slow decode in progress, /v1/health
    and the refusals answer in milliseconds: nothing waits for the model or a decode thread."""
    infer = GatedInfer(clf, gated=True)
    decoding, finish_decode = threading.Event(), threading.Event()
    real_prepare = clf.prepare

    def slow_prepare(data, name=None):
        if name == "slow.png":
            decoding.set()
            assert finish_decode.wait(TIMEOUT)
        return real_prepare(data, name)

    monkeypatch.setattr(clf, "prepare", slow_prepare)
    settings = ServeSettings(queue_size=3, batch_wait_ms=0, decode_workers=1)
    with serving(create_app(clf, settings, infer=infer)) as url, ThreadPoolExecutor(4) as pool:
        try:
            futures = [pool.submit(post_files, url, [image_bytes(10)])]
            assert infer.entered.wait(TIMEOUT)  # request 1 is in the model, held
            futures += [pool.submit(post_files, url, [image_bytes(11 + i)]) for i in range(2)]
            wait_for(lambda: health(url)["queue"]["ready"] == 2, "two decoded requests queued")
            futures.append(pool.submit(post_files, url, [image_bytes(13)], ["slow.png"]))
            assert decoding.wait(TIMEOUT)  # request 4 is being decoded: the queue is full
            with httpx.Client(timeout=TIMEOUT) as client:  # one client: a new one costs ~30 ms of its own set-up
                checks = [timed(lambda: client.get(f"{url}/v1/health")) for _ in range(10)]
                blobs = [image_bytes(20 + i) for i in range(5)]
                refusals = [
                    timed(lambda b=b: client.post(f"{url}/v1/predict", content=b, headers={"content-type": "image/png"})) for b in blobs
                ]
        finally:
            finish_decode.set()
            infer.gate.set()
        assert [f.result(TIMEOUT).status_code for f in futures] == [200] * 4
    assert all(r.status_code == 200 and r.json()["queue"]["waiting"] == 3 for r, _ in checks)
    assert max(t for _, t in checks) < 0.1, [round(t, 3) for _, t in checks]
    assert all(r.status_code == 503 and r.headers["retry-after"] == "1" for r, _ in refusals)
    assert max(t for _, t in refusals) < 0.1, [round(t, 3) for _, t in refusals]


class LoopWatch:
    """ASGI wrapper that watches the event loop's thread: the CPU time it spends between two wake-ups
    of a 2 ms timer. CPU time, not wall time, so waiting for the GIL (the test's client shares this
    process) or for a core on a busy machine does not count: only work done on the loop."""

    def __init__(self, app) -> None:
        self.app = app
        self.busy: list[float] = []  # seconds of loop-thread CPU per timer interval
        self._task = None

    async def __call__(self, scope, receive, send) -> None:
        if self._task is None:  # the lifespan call, on the server's loop
            self._task = asyncio.ensure_future(self._beat())
        await self.app(scope, receive, send)

    async def _beat(self) -> None:
        while True:
            t0 = time.thread_time()
            await asyncio.sleep(0.002)
            self.busy.append(time.thread_time() - t0)


def raw_post(url: str, content_type: str, body: bytes) -> bytes:
    """POST /v1/predict over a plain socket (sendall waits for the kernel, not the GIL); the raw answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT) as sock:
        sock.sendall(
            f"POST /v1/predict HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_large_upload_does_not_hold_the_event_loop(clf):
    """A 48 MB multipart body used to be joined and split in one step on the event loop, which
    computed for 60-120 ms without a break (and every other request waited); now the body is split
    a chunk at a time as it arrives and the loop never computes for long at a stretch."""
    rng = np.random.default_rng(0)
    content_type, body = multipart([("file", f"noise{i}.bin", rng.bytes(3 * 2**20)) for i in range(16)])
    watch = LoopWatch(create_app(clf, ServeSettings(max_upload_mb=64, max_images=16)))
    with serving(watch) as url:
        raw_post(url, "image/png", b"not an image")  # warm up: first-use imports and caches
        gc.collect()  # a full collection is loop-thread CPU too, but not this test's subject
        time.sleep(0.05)  # let the timer interval that saw the warm-up end before counting
        start = len(watch.busy)
        answer = raw_post(url, content_type, body)
        busy = watch.busy[start:]
    assert answer.startswith(b"HTTP/1.1 415") and b"noise0.bin: not a recognised image format" in answer
    assert len(busy) >= 5  # the loop went round all the while
    assert max(busy) < 0.03, sorted(round(t, 3) for t in busy)[-5:]


# ---------------------------------------------------------------------------------- the multipart splitter


def multipart(fields: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> tuple[str, bytes]:
    body = b""
    for name, filename, data in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("chunk", [1, 7, 4096, 10**9])
def test_form_splitter_gives_the_same_parts_however_the_body_is_cut(chunk):
    blobs = [bytes(range(256)) * 9, b"\r\n--b0undar" * 50, b""]
    content_type, body = multipart(
        [("file", "a.png", blobs[0]), ("top_k", None, b"3"), ("file", "b.png", blobs[1]), ("file", "", blobs[2])]
    )
    form = FormSplitter(content_type, max_images=3)
    for i in range(0, len(body), chunk):
        form.write(body[i : i + chunk])
    uploads, top_k = form.finish()
    assert [(name, bytes(data)) for name, data in uploads] == [("a.png", blobs[0]), ("b.png", blobs[1]), (None, b"")]
    assert top_k == "3"


def test_form_splitter_refusals():
    content_type, body = multipart([("file", f"{i}.png", b"x") for i in range(3)])
    with pytest.raises(RequestError, match="too many images: at most 2"):
        FormSplitter(content_type, 2).write(body)
    form = FormSplitter(content_type, 3)
    form.write(body[:-20])
    with pytest.raises(RequestError, match="ends before its closing boundary"):
        form.finish()
    with pytest.raises(RequestError, match="no boundary"):
        FormSplitter("multipart/form-data", 3)
    for fields, words in ((["other", "x.png"], "unexpected form field 'other'"), (["file", None], "must be a file upload")):
        content_type, body = multipart([(fields[0], fields[1], b"x")])
        with pytest.raises(RequestError, match=words) as info:
            FormSplitter(content_type, 3).write(body)
        assert info.value.status == 400
    content_type, body = multipart([("top_k", None, b"9" * 100)])
    with pytest.raises(RequestError) as info:
        FormSplitter(content_type, 3).write(body)
    assert info.value.status == 422


# ---------------------------------------------------------------------------------- the command line


def test_every_setting_has_a_cli_flag_with_the_same_default_and_reaches_the_server(monkeypatch):
    import dataclasses

    from imgcls.cli import build_parser, main

    args = build_parser().parse_args(["serve", "model"])
    for f in dataclasses.fields(ServeSettings):
        flag_value = (not args.no_batching) if f.name == "batching" else getattr(args, f.name)
        assert flag_value == f.default, f.name
    seen = {}
    monkeypatch.setattr(imgcls.serve, "run_server", lambda clf, settings, host, port: seen.update(settings=settings))
    monkeypatch.setattr(Classifier, "load", classmethod(lambda cls, *args, **kwargs: None))
    argv = ["serve", "model", "--body-timeout-s", "3", "--max-client-requests", "5", "--max-decoded-mb", "7", "--decode-budget-mb", "9"]
    assert main(argv) == 0
    s = seen["settings"]
    assert (s.body_timeout_s, s.max_client_requests, s.max_decoded_mb, s.decode_budget_mb) == (3, 5, 7, 9)
