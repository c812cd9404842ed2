"""The HTTP API through a real client: uvicorn on 127.0.0.1 in a thread, httpx talking to it.

Each server gets a tiny small_cnn artifact (3 classes, 16 px) built here. Queue and batching
tests hold the inference thread on a `threading.Event` so what they count is deterministic.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx  # imgcls[test] installs httpx and imgcls[serve]
import numpy as np
import pytest
import uvicorn
from PIL import Image

from badfiles import png_header_only
from imgcls.artifact import WEIGHTS_FILE, save_artifact
from imgcls.cli import main
from imgcls.inference.answer import ANSWER_KEYS, answer
from imgcls.io import ImageDecodeError
from imgcls.models import create_model
from imgcls.predict import Classifier
from imgcls.serve import ServeSettings, create_app
from imgcls.transforms import PreprocessSpec

CLASS_NAMES = ["cat", "dog", "bird"]
TIMEOUT = 10.0


def make_artifact(path: Path) -> Path:
    """A random-weight small_cnn for CLASS_NAMES at 16 px (seeded, so runs agree)."""
    import torch

    torch.manual_seed(0)
    model = create_model("small_cnn", len(CLASS_NAMES))
    with torch.no_grad():  # fresh BN statistics make the features tiny: calibrate them, so answers differ by image
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the calibration batch
        model.train()(torch.randn(64, 3, 16, 16))
        model.fc.weight.normal_(0.0, 1.0)
    meta = {
        "arch": "small_cnn",
        "class_names": CLASS_NAMES,
        "preprocess": PreprocessSpec(img_size=16).to_dict(),
        "metrics": {"val": {"accuracy": 0.5}},
    }
    return save_artifact(path, model, meta)


def image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (24, 20)) -> bytes:
    """A noise image, so different seeds give different predictions."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


@contextlib.contextmanager
def serving(app, ready_timeout: float = TIMEOUT) -> Iterator[str]:
    """Run `app` with uvicorn on a free 127.0.0.1 port in a thread; yield its base URL once /v1/health
    answers (within `ready_timeout` s: the app's start-up may compile the model)."""
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it every answer written in two parts waited 40 ms for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                if httpx.get(f"{url}/v1/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()


class GatedInfer:
    """Wraps predict_arrays: counts calls and batch sizes; with `gate`, each call first waits for it."""

    def __init__(self, clf: Classifier, gated: bool = False) -> None:
        self.clf = clf
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.entered = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.sizes.append(len(images))
        self.entered.set()
        assert self.gate.wait(TIMEOUT), "test never opened the gate"
        return self.clf.predict_arrays(images)


def wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def clf(model_dir) -> Classifier:
    # fp32: batched and single forwards then agree to ~1e-7 (bf16 autocast would not, at 1e-5)
    return Classifier.load(model_dir, device="cpu", precision="fp32")


SETTINGS = ServeSettings(max_upload_mb=0.05, max_images=3, max_batch=8, batch_wait_ms=2, queue_size=8)


@pytest.fixture(scope="module")
def url(clf) -> Iterator[str]:
    with serving(create_app(clf, SETTINGS)) as u:
        yield u


def post_files(url: str, blobs: list[bytes], names: list[str] | None = None, **kw) -> httpx.Response:
    names = names or [f"img{i}.png" for i in range(len(blobs))]
    return httpx.post(f"{url}/v1/predict", files=[("file", (n, b, "image/png")) for n, b in zip(names, blobs)], timeout=TIMEOUT, **kw)


def assert_same(answer: dict, expected: dict) -> None:
    assert answer["label"] == expected["label"]
    assert answer["score"] == pytest.approx(expected["score"], abs=1e-5)
    assert [t["label"] for t in answer["top_k"]] == [t["label"] for t in expected["top_k"]]
    for a, e in zip(answer["top_k"], expected["top_k"]):
        assert a["score"] == pytest.approx(e["score"], abs=1e-5)


# ---------------------------------------------------------------------------------- predict


def test_predict_one_file_matches_classifier(url, clf, model_dir):
    blob = image_bytes(1)
    r = post_files(url, [blob], ["one.png"])
    assert r.status_code == 200, r.text
    body = r.json()
    digest = hashlib.sha256((model_dir / WEIGHTS_FILE).read_bytes()).hexdigest()[:12]
    assert body["model"] == {"name": "small_cnn", "version": digest}
    (p,) = body["predictions"]
    assert p["filename"] == p["path"] == "one.png"
    assert_same(p, clf.predict(blob))
    assert len(p["top_k"]) == 3  # default 5, clipped to the 3 classes


def test_cli_python_api_and_server_answer_with_the_same_keys(url, clf, model_dir, tmp_path, capsys):
    """inference.answer.answer builds every answer: the same keys (and values) from all three front ends."""
    blob = image_bytes(8)
    (tmp_path / "one.png").write_bytes(blob)
    probs = clf.predict_arrays(clf.prepare(blob)[None])[0]
    reference = answer(probs, CLASS_NAMES, 2, "one.png", probabilities=False)
    assert tuple(reference) == ANSWER_KEYS == ("path", "label", "score", "top_k")

    api = clf.predict(str(tmp_path / "one.png"), top_k=2)
    assert set(api) == {*ANSWER_KEYS, "probabilities"}  # the Python API adds every class's probability
    assert main(["predict", str(model_dir), str(tmp_path / "one.png"), "--json", "--top-k", "2", "--compile", "off"]) == 0
    (cli,) = json.loads(capsys.readouterr().out)
    (server,) = post_files(url, [blob], ["one.png"], params={"top_k": 2}).json()["predictions"]
    assert set(server) == {*ANSWER_KEYS, "filename"}  # "filename": the HTTP API's documented name for "path"
    assert tuple(cli) == ANSWER_KEYS
    for got in (api, server):
        assert_same(got, reference)
    # the CLI has no --precision: compare with the default precision (bf16 where the CPU has it)
    assert_same(cli, Classifier.load(model_dir, device="cpu").predict(str(tmp_path / "one.png"), top_k=2))
    assert all(len(got["top_k"]) == 2 for got in (api, cli, server))
    assert cli["path"] == api["path"] == str(tmp_path / "one.png") and server["path"] == "one.png"


def test_predict_several_files_in_order(url, clf):
    blobs = [image_bytes(10), image_bytes(11, "JPEG"), image_bytes(12, "BMP")]
    r = post_files(url, blobs, ["a.png", "b.jpg", "c.bmp"])
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["filename"] for p in preds] == ["a.png", "b.jpg", "c.bmp"]
    for p, expected in zip(preds, clf.predict(blobs)):
        assert_same(p, expected)


@pytest.mark.parametrize("content_type", ["image/jpeg", "application/octet-stream", None])
def test_predict_raw_body(url, clf, content_type):
    blob = image_bytes(2, "JPEG")
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(f"{url}/v1/predict", content=blob, headers=headers, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    (p,) = r.json()["predictions"]
    assert p["filename"] is None
    assert_same(p, clf.predict(blob))


def test_top_k_in_query_and_form(url):
    blob = image_bytes(3)
    r = post_files(url, [blob], params={"top_k": 1})
    assert [len(p["top_k"]) for p in r.json()["predictions"]] == [1]
    r = httpx.post(f"{url}/v1/predict", files=[("file", ("x.png", blob, "image/png"))], data={"top_k": "2"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    (p,) = r.json()["predictions"]
    assert len(p["top_k"]) == 2 and p["top_k"][0]["label"] == p["label"]
    assert p["top_k"][0]["score"] >= p["top_k"][1]["score"]
    assert httpx.post(f"{url}/v1/predict?top_k=0", content=blob, timeout=TIMEOUT).status_code == 422
    r = httpx.post(f"{url}/v1/predict", files=[("file", ("x.png", blob, "image/png"))], data={"top_k": "many"}, timeout=TIMEOUT)
    assert r.status_code == 422 and "top_k" in r.json()["detail"]


# ---------------------------------------------------------------------------------- info endpoints


def test_health_model_openapi_docs(url):
    h = httpx.get(f"{url}/v1/health").json()
    assert h["status"] == "ok" and h["model"]["name"] == "small_cnn" and h["queue"]["capacity"] == 8
    m = httpx.get(f"{url}/v1/model").json()
    assert m["class_names"] == CLASS_NAMES and m["num_classes"] == 3
    assert m["preprocess"]["img_size"] == 16
    assert m["metrics"] == {"val": {"accuracy": 0.5}}
    assert m["version"] == h["model"]["version"]
    assert m["limits"]["max_images"] == 3
    spec = httpx.get(f"{url}/openapi.json").json()
    assert {"/v1/predict", "/v1/health", "/v1/model"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert "swagger" in httpx.get(f"{url}/docs").text.lower()


def test_web_page(url):
    r = httpx.get(f"{url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert '<form id="upload-form"' in html and 'type="file"' in html and 'name="file"' in html
    assert 'id="overlay"' in html  # the empty layer an explanation view will draw into
    assert "http://" not in html and "https://" not in html  # nothing loaded from elsewhere
    for name in ("app.js", "style.css"):
        s = httpx.get(f"{url}/static/{name}")
        assert s.status_code == 200 and len(s.content) > 100
        assert "http://" not in s.text and "https://" not in s.text
    assert httpx.get(f"{url}/static/..%2f..%2fpyproject.toml").status_code == 404
    assert httpx.get(f"{url}/static/index.htm").status_code == 404


# ---------------------------------------------------------------------------------- bad input


def test_upload_over_limit_is_413(url):
    big = np.random.default_rng(0).integers(0, 256, 80_000, dtype=np.uint8).tobytes()  # > 0.05 MB
    r = httpx.post(f"{url}/v1/predict", content=big, headers={"content-type": "image/png"}, timeout=TIMEOUT)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    r = httpx.post(f"{url}/v1/predict", files=[("file", ("big.png", big, "image/png"))], timeout=TIMEOUT)
    assert r.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming too
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    r = httpx.post(f"{url}/v1/predict", content=chunks(), headers={"content-type": "application/octet-stream"}, timeout=TIMEOUT)
    assert r.status_code == 413


def test_text_file_is_415(url):
    r = post_files(url, [b"hello, I am not an image\n" * 4], ["notes.txt"])
    assert r.status_code == 415
    assert "notes.txt" in r.json()["detail"] and "not a recognised image format" in r.json()["detail"]
    r = httpx.post(f"{url}/v1/predict", content=b"just text", headers={"content-type": "text/plain"}, timeout=TIMEOUT)
    assert r.status_code == 415 and "content type" in r.json()["detail"]


def test_decompression_bomb_is_413(url):
    bomb = png_header_only(100_000, 100_000)
    r = post_files(url, [image_bytes(4), bomb], ["ok.png", "bomb.png"])
    assert r.status_code == 413
    detail = r.json()["detail"]
    assert "bomb.png" in detail and "pixels" in detail
    assert httpx.post(f"{url}/v1/predict", content=bomb, headers={"content-type": "image/png"}, timeout=TIMEOUT).status_code == 413


@pytest.mark.parametrize(("kind", "status"), [("unsupported", 415), ("too_large", 413), ("corrupt", 400), ("unreadable", 400)])
def test_decode_error_status_follows_its_kind_not_its_message(url, clf, monkeypatch, kind, status):
    """The status comes from ImageDecodeError.kind: the same wording under every kind gets each kind's status."""

    def prepare(data: bytes, name: str | None = None) -> np.ndarray:
        raise ImageDecodeError(name or "image", "not a recognised image format (possible decompression bomb)", kind)

    monkeypatch.setattr(clf, "prepare", prepare)
    r = post_files(url, [image_bytes(9)], ["x.png"])
    assert r.status_code == status
    assert r.json()["detail"] == "x.png: not a recognised image format (possible decompression bomb)"


def test_corrupt_and_empty_are_400(url):
    blob = image_bytes(5)
    r = post_files(url, [blob[: len(blob) // 2]], ["cut.png"])
    assert r.status_code == 400 and "cut.png" in r.json()["detail"]
    assert httpx.post(f"{url}/v1/predict", content=b"", timeout=TIMEOUT).status_code == 400
    r = httpx.post(f"{url}/v1/predict", data={"top_k": "1"}, files=[("other", ("x.png", blob, "image/png"))], timeout=TIMEOUT)
    assert r.status_code == 400 and "other" in r.json()["detail"]


def test_too_many_images_is_400(url):
    r = post_files(url, [image_bytes(i) for i in range(4)])  # max_images=3
    assert r.status_code == 400 and "too many images" in r.json()["detail"]
    r = post_files(url, [image_bytes(i) for i in range(20)])
    assert r.status_code in (400, 413)


def test_one_log_line_per_request(url, caplog):
    with caplog.at_level(logging.INFO, logger="imgcls.serve"):
        post_files(url, [image_bytes(6), image_bytes(7)])
        httpx.get(f"{url}/v1/health")
        wait_for(lambda: sum(r.name == "imgcls.serve" for r in caplog.records) >= 2, "log lines")
    lines = [r.getMessage() for r in caplog.records if r.name == "imgcls.serve"]
    assert any(line.startswith("POST /v1/predict 200 2 img ") and line.endswith(" ms") for line in lines), lines
    assert any(line.startswith("GET /v1/health 200 0 img") for line in lines), lines


# ---------------------------------------------------------------------------------- queue and batching


def test_full_queue_answers_503_at_once(clf):
    infer = GatedInfer(clf, gated=True)
    settings = ServeSettings(queue_size=1, batch_wait_ms=0)
    with serving(create_app(clf, settings, infer=infer)) as u, ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(post_files, u, [image_bytes(1)])
            assert infer.entered.wait(TIMEOUT)  # the inference thread holds request 1
            second = pool.submit(post_files, u, [image_bytes(2)])
            wait_for(lambda: httpx.get(f"{u}/v1/health").json()["queue"]["waiting"] == 1, "request 2 to queue")
            t0 = time.monotonic()
            third = post_files(u, [image_bytes(3)])
            assert third.status_code == 503 and "busy" in third.json()["detail"]
            assert third.headers["retry-after"] == "1"
            assert time.monotonic() - t0 < 2.0
        finally:
            infer.gate.set()
        assert first.result(TIMEOUT).status_code == 200
        assert second.result(TIMEOUT).status_code == 200


@pytest.mark.parametrize("batching", [True, False])
def test_dynamic_batching_batches_waiting_requests(clf, batching):
    """Hold request 1 in the model, queue 5 more; batching runs them as one forward, else as 5."""
    infer = GatedInfer(clf, gated=True)
    settings = ServeSettings(max_batch=8, batch_wait_ms=5, queue_size=16, batching=batching)
    blobs = [image_bytes(100 + i) for i in range(6)]
    with serving(create_app(clf, settings, infer=infer)) as u, ThreadPoolExecutor(6) as pool:
        try:
            futures = [pool.submit(post_files, u, [blobs[0]])]
            assert infer.entered.wait(TIMEOUT)
            futures += [pool.submit(post_files, u, [b]) for b in blobs[1:]]
            wait_for(lambda: httpx.get(f"{u}/v1/health").json()["queue"]["ready"] == 5, "5 decoded, queued requests")
        finally:
            infer.gate.set()
        answers = [f.result(TIMEOUT) for f in futures]
    assert infer.sizes == ([1, 5] if batching else [1] * 6)
    for r, blob in zip(answers, blobs):  # batched or not, each request gets its own image's answer
        assert r.status_code == 200
        assert_same(r.json()["predictions"][0], clf.predict(blob))


def test_concurrent_requests_share_forward_passes(clf):
    """Without a gate: 16 requests from 8 threads still need fewer forward passes than requests."""
    infer = GatedInfer(clf)
    settings = ServeSettings(max_batch=16, batch_wait_ms=20, queue_size=32)
    with serving(create_app(clf, settings, infer=infer)) as u, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: post_files(u, [image_bytes(i)]), range(16)))
    assert all(r.status_code == 200 for r in answers)
    assert sum(infer.sizes) == 16 and len(infer.sizes) < 16, infer.sizes


def test_settings_are_validated():
    with pytest.raises(ValueError, match="queue_size"):
        ServeSettings(queue_size=0)
    with pytest.raises(ValueError, match="max_upload_mb"):
        ServeSettings(max_upload_mb=0)
    with pytest.raises(ValueError, match="body_timeout_s"):
        ServeSettings(body_timeout_s=0)
    with pytest.raises(ValueError, match="max_client_requests"):
        ServeSettings(max_client_requests=-1)
    with pytest.raises(ValueError, match="max_decoded_mb"):
        ServeSettings(max_decoded_mb=0)
