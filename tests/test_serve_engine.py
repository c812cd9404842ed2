"""Tests for imgcls.serve_engine: batches padded to bucket sizes, compiled at start-up, never leaking padded rows.

The model is test_serve.py's tiny small_cnn (3 classes, 16 px, fp32). Most tests run the buckets
eagerly or with a stand-in compiler; one compiles the model for real through the server.
"""

from __future__ import annotations

import logging

import httpx
import numpy as np
import pytest

import imgcls.serve_engine
from imgcls.predict import Classifier
from imgcls.serve import ServeSettings, create_app
from imgcls.serve_engine import Engine, bucket_for, pad_rows
from imgcls.serve_schema import default_buckets
from test_serve import TIMEOUT, image_bytes, make_artifact, post_files, serving


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("engine") / "model")


def load(model_dir, **kw) -> Classifier:
    # a fresh Classifier per test: compile_for changes its runner's forward
    return Classifier.load(model_dir, device="cpu", precision="fp32", **kw)


def prepared(clf: Classifier, *seeds: int) -> np.ndarray:
    """uint8 (n, S, S, 3): noise images decoded and resized as the server does."""
    return np.stack([clf.prepare(image_bytes(s), f"{s}.png") for s in seeds])


class FakeCompiler:
    """Stands in for torch.compile: the model itself, recording each shape it was called with; `fail` raises."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.shapes = fail, []

    def __call__(self, model):
        if self.fail:
            raise RuntimeError("no C++ compiler\nlong traceback")

        def run(x):
            self.shapes.append(tuple(x.shape))
            return model(x)

        return run


def test_default_buckets_and_the_settings_that_refuse_bad_ones():
    assert default_buckets(16) == (1, 4, 8, 16) and default_buckets(12) == (1, 4, 8, 12) and default_buckets(1) == (1,)
    assert ServeSettings().buckets is None and ServeSettings().compile == "auto"
    assert [bucket_for(n, (1, 4, 8)) for n in (1, 2, 4, 5, 8)] == [1, 4, 4, 8, 8]
    a = np.full((3, 2, 2, 3), 7, np.uint8)
    assert pad_rows(a, 3) is a and pad_rows(a, 4).shape == (4, 2, 2, 3) and not pad_rows(a, 4)[3].any()
    with pytest.raises(ValueError, match=r"the largest bucket \(8\) must equal max_batch \(16\)"):
        ServeSettings(buckets=(1, 8))
    with pytest.raises(ValueError, match="increasing integers"):
        ServeSettings(max_batch=4, buckets=(4, 1, 4))
    with pytest.raises(ValueError, match="compile 'on' needs batch buckets"):
        ServeSettings(buckets=(), compile="on")


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_padded_rows_never_reach_the_answers(model_dir, tta):
    """3 images padded to 4, 6 cut into 4 + 2 (padded to 4), 1 alone: the unpadded eager probabilities, within 1e-4."""
    clf = load(model_dir, tta=tta)
    engine = Engine(clf, (1, 4), max_batch=4, compile="off")
    assert engine.start().startswith("eager, batch shapes 1, 4 in ")
    images = prepared(clf, *range(6))
    expected = clf.infer_arrays(images)  # one unpadded forward
    for rows in (slice(0, 3), slice(0, 6), slice(5, 6)):
        out = engine(images[rows])
        assert out.probs.shape == expected.probs[rows].shape
        np.testing.assert_allclose(out.probs, expected.probs[rows], atol=1e-4, rtol=0)
        assert (out.known == expected.known[rows]).all()
    assert engine.padded == 1 + 2 and engine.images == 10  # 3 -> 4, 6 -> 4 + (2 -> 4), 1 -> 1
    assert engine.describe()["buckets"] == [1, 4] and engine.name == "eager"


def test_auto_serves_a_tiny_model_eagerly_unpadded_and_says_why(model_dir):
    messages = []
    engine = Engine(load(model_dir), None, max_batch=4, compile="auto", log=messages.append)
    engine.start()
    assert engine.name == "eager" and engine.buckets == () and "compiling would not pay" in engine.note
    assert messages == [f"eager, unpadded: warmed up in {engine.startup_s:.1f} s ({engine.note})"]


def test_compiled_buckets_are_compiled_at_start_and_no_request_compiles(model_dir, monkeypatch):
    clf = load(model_dir)
    compiler = FakeCompiler()
    clf.runner.forward.compiler = compiler
    engine = Engine(clf, None, max_batch=8, compile="on")
    assert engine.start().startswith("compiled batch shapes 1, 4, 8 in ")
    started = list(compiler.shapes)
    assert started == [(1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16)]  # one forward per bucket, compiled
    assert clf.runner.forward.shapes == set(started)
    images = prepared(clf, *range(11))
    out = engine(images)  # 8, then 3 padded to 4: both compiled shapes, no new compile
    assert compiler.shapes[len(started) :] == [(8, 3, 16, 16), (4, 3, 16, 16)]
    np.testing.assert_allclose(out.probs, clf.infer_arrays(images).probs, atol=1e-4, rtol=0)
    assert engine.describe() == {
        "name": "compiled",
        "buckets": [1, 4, 8],
        "startup_s": round(engine.startup_s, 2),
        "note": "",
        "images": 11,
        "padded_images": 1,
    }


def test_a_failing_compiler_falls_back_to_eager_with_the_reason_or_stops_the_start(model_dir, monkeypatch):
    monkeypatch.setattr(imgcls.serve_engine, "AUTO_COMPILE_MIN_FLOPS", 0.0)  # "auto" then compiles even the tiny model
    clf = load(model_dir)
    clf.runner.forward.compiler = FakeCompiler(fail=True)
    engine = Engine(clf, None, max_batch=4, compile="auto")
    line = engine.start()
    assert engine.name == "eager" and engine.buckets == ()
    assert line.endswith("(torch.compile failed, serving eagerly: RuntimeError: no C++ compiler)") and line.startswith("eager, unpadded")
    assert clf.runner.forward.compiled is None and not clf.runner.forward.shapes
    assert engine(prepared(clf, 1, 2)).probs.shape == (2, 3)
    with pytest.raises(RuntimeError, match=r"torch.compile failed for batch shapes \[1, 4\]: RuntimeError: no C\+\+ compiler"):
        Engine(clf, None, max_batch=4, compile="on").start()


def test_health_reports_the_engine_and_answers_match_unpadded(model_dir, caplog):
    clf = load(model_dir)
    settings = ServeSettings(max_batch=4, buckets=(1, 4), compile="off", batch_wait_ms=0)
    seeds = (11, 12, 13)
    expected = clf.predict([image_bytes(s) for s in seeds], top_k=3)
    with caplog.at_level(logging.INFO, logger="imgcls.serve"), serving(create_app(clf, settings)) as url:
        r = post_files(url, [image_bytes(s) for s in seeds])  # one forward of 3 images, padded to 4
        health = httpx.get(f"{url}/v1/health", timeout=TIMEOUT).json()
        runtime = httpx.get(f"{url}/v1/model", timeout=TIMEOUT).json()["runtime"]
    assert r.status_code == 200
    for got, want in zip(r.json()["predictions"], expected):
        assert got["label"] == want["label"]
        assert got["score"] == pytest.approx(want["score"], abs=1e-4)
    engine = health["engine"]
    assert (engine["name"], engine["buckets"], engine["images"], engine["padded_images"]) == ("eager", [1, 4], 3, 1)
    assert runtime["engine"] == "eager"
    assert any(m.startswith("eager, batch shapes 1, 4 in ") and m.endswith(" s (--compile off)") for m in caplog.messages)


@pytest.mark.slow
def test_the_server_really_compiles_its_buckets_at_start_up(model_dir, caplog):
    """torch.compile (inductor, frozen weights) for buckets 1 and 2 of the tiny model: 74 s on a
    2-core machine at load 10 (warm inductor cache); `-m 'not slow'` leaves it out. Requests then run the compiled
    shapes without compiling anything more, and answer as the eager model does."""
    from torch._dynamo.utils import counters

    clf = load(model_dir)
    settings = ServeSettings(max_batch=2, buckets=(1, 2), compile="on", batch_wait_ms=0)
    blobs = [image_bytes(s) for s in (21, 22)]
    expected = load(model_dir, compile="off").predict(blobs, top_k=3)
    with caplog.at_level(logging.INFO, logger="imgcls.serve"), serving(create_app(clf, settings), ready_timeout=300) as url:
        graphs = counters["stats"]["unique_graphs"]
        answers = [post_files(url, blobs).json()["predictions"], post_files(url, blobs[:1]).json()["predictions"]]
        health = httpx.get(f"{url}/v1/health", timeout=TIMEOUT).json()
        assert counters["stats"]["unique_graphs"] == graphs  # no request compiled
    assert health["engine"]["name"] == "compiled" and health["engine"]["buckets"] == [1, 2]
    assert clf.runner.forward.shapes == {(1, 3, 16, 16), (2, 3, 16, 16)}
    assert any(m.startswith("compiled batch shapes 1, 2 in ") for m in caplog.messages)
    for got, want in zip(answers[0] + answers[1], expected + expected[:1]):
        assert got["label"] == want["label"]
        assert got["score"] == pytest.approx(want["score"], abs=1e-4)


def test_cli_flags_reach_the_settings(monkeypatch):
    import imgcls.serve
    from imgcls.cli import build_parser, main

    seen = {}
    monkeypatch.setattr(imgcls.serve, "run_server", lambda clf, settings, host, port: seen.update(settings=settings))
    monkeypatch.setattr(Classifier, "load", classmethod(lambda cls, *args, **kwargs: None))
    assert main(["serve", "model", "--max-batch", "4", "--buckets", "1,2,4", "--compile", "off"]) == 0
    assert (seen["settings"].buckets, seen["settings"].compile) == ((1, 2, 4), "off")
    parse = build_parser().parse_args
    assert parse(["serve", "m", "--buckets", "off"]).buckets == () and parse(["serve", "m", "--buckets", "auto"]).buckets is None
    with pytest.raises(SystemExit):
        parse(["serve", "m", "--buckets", "1,x"])
