"""Tests for imgcls.evaluate, imgcls.predict and imgcls.artifact on one small trained model
(the session fixture `trained_run` in conftest.py)."""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from badfiles import make_bad_files, png_header_only
from imgcls.artifact import ArtifactError, load_artifact, load_meta, spec_of
from imgcls.data import DatasetError
from imgcls.evaluate import evaluate
from imgcls.io import DECODE_ERROR_KINDS, ImageDecodeError, load_image
from imgcls.predict import Classifier, expand_inputs
from imgcls.transforms import eval_transform, resize_image, to_batch
from synth import make_class_folders

CLASSES = ["circle", "square", "triangle"]


def quiet(_: str) -> None:
    """evaluate()'s log callback, silenced."""


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory) -> tuple[dict, pathlib.Path]:
    run, data = trained_run
    out = tmp_path_factory.mktemp("eval_report")
    m = evaluate(run, data, split="val", out_dir=out, precision="fp32", progress=False, log=quiet)
    return m, out


@pytest.fixture(scope="module")
def clf(trained_run) -> Classifier:
    return Classifier.load(trained_run[0], precision="fp32")


def val_files(data: pathlib.Path) -> list[str]:
    return sorted(str(p) for p in (data / "valid").rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_metrics(evaluated):
    m, _ = evaluated
    assert m["split"] == "val" and m["num_samples"] == 18 and m["skipped_files"] == 0
    for key in ("accuracy", "top5_accuracy", "balanced_accuracy", "macro_f1"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["top5_accuracy"] == 1.0  # 3 classes: the target is always in the top 5
    assert m["accuracy"] >= 0.6  # chance is 1/3
    assert set(m["per_class"]) == set(CLASSES)
    for c in m["per_class"].values():
        assert set(c) == {"precision", "recall", "f1", "support"} and c["support"] == 6
    cm = np.asarray(m["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == 18 and (cm.sum(1) == 6).all()
    assert m["accuracy"] == pytest.approx(np.trace(cm) / 18)
    json.dumps({k: v for k, v in m.items() if k != "predictions"})  # JSON-ready


def test_evaluate_writes_the_report(evaluated):
    m, out = evaluated
    assert pathlib.Path(m["report"]) == out / "report.html"
    for name in ("confusion_matrix.png", "training_curves.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    text = (out / "confusion_matrix.txt").read_text()
    assert all(c in text for c in CLASSES)
    html = (out / "report.html").read_text()
    assert "confusion_matrix.png" in html and "training_curves.png" in html and "circle" in html
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == m["accuracy"]


def test_evaluate_default_split_is_test(trained_run, tmp_path):
    run, data = trained_run
    m = evaluate(run, data, out_dir=tmp_path, progress=False, log=quiet)
    assert m["split"] == "test" and m["num_samples"] == 18
    assert all("/test/" in p for p in m["predictions"]["paths"])


def test_evaluate_on_class_folders_with_a_bad_file(trained_run, tmp_path):
    run, _ = trained_run
    data = make_class_folders(tmp_path / "d", classes=("square", "circle"), per_class=4, size=24, seed=9)  # a subset of classes
    (data / "square" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    logged: list[str] = []
    m = evaluate(run, data, out_dir=tmp_path / "r", progress=False, log=logged.append)
    assert m["split"] == "all" and m["num_samples"] == 8 and m["skipped_files"] == 1
    assert any("broken.png" in line for line in logged)
    assert m["per_class"]["triangle"]["support"] == 0
    # labels use the model's class order, not the data's
    labels = dict(zip(m["predictions"]["paths"], m["predictions"]["labels"]))
    assert {labels[p] for p in labels if "/square/" in p} == {CLASSES.index("square")}


def test_evaluate_rejects_a_class_the_model_does_not_know(trained_run, tmp_path):
    run, _ = trained_run
    data = make_class_folders(tmp_path / "d", classes=("circle", "hexagon"), per_class=2, size=16)
    with pytest.raises(DatasetError, match="hexagon"):
        evaluate(run, data, out_dir=tmp_path / "r", progress=False, log=quiet)


def test_evaluate_unknown_split(trained_run, tmp_path):
    run, data = trained_run
    with pytest.raises(DatasetError, match="'all'"):
        evaluate(run, data, split="all", out_dir=tmp_path, progress=False, log=quiet)


# ----------------------------------------------------------------------------- parity


def direct_probs(run: pathlib.Path, paths: list[str]) -> np.ndarray:
    """Probabilities computed by hand from the artifact: decode, resize, crop+normalise, forward
    (averaging the logits over the test-time augmentation views model.json asks for, if any)."""
    model, meta = load_artifact(run)
    spec = spec_of(meta)
    x = to_batch([resize_image(load_image(p), spec) for p in paths])  # (N, 3, S, S) uint8
    views, weights = [x], [1.0]
    if meta.get("tta", "none") != "none":
        from imgcls.runtime import tta_views

        views, weights = tta_views(x, meta["tta"])
    with torch.no_grad():
        logits = sum(w * model(eval_transform(v, spec)).double() for v, w in zip(views, weights))
    return torch.softmax(logits, 1).numpy()


def test_predict_matches_evaluate_and_a_direct_computation(trained_run, evaluated, clf):
    run, data = trained_run
    m, _ = evaluated
    paths = m["predictions"]["paths"]
    assert sorted(paths) == val_files(data)
    results = clf.predict(paths)
    assert [r["label"] for r in results] == [CLASSES[i] for i in m["predictions"]["predicted"]]
    probs = np.array([[r["probabilities"][c] for c in CLASSES] for r in results])
    assert np.abs(probs - direct_probs(run, paths)).max() < 1e-4
    assert [r["path"] for r in results] == paths


def test_predict_with_default_precision_agrees_with_evaluate(trained_run, evaluated):
    run, _ = trained_run
    m, _ = evaluated
    paths = m["predictions"]["paths"]
    default = Classifier.load(run).predict(paths)
    agree = np.mean([r["label"] == CLASSES[i] for r, i in zip(default, m["predictions"]["predicted"])])
    assert agree >= 0.9  # bf16 autocast where the CPU has it: near-ties may differ, no more


# ----------------------------------------------------------------------------- predict inputs and outputs


def check_result(r: dict, k: int) -> None:
    assert r["label"] in CLASSES
    assert set(r["probabilities"]) == set(CLASSES)
    assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert len(r["top_k"]) == k
    scores = [t["score"] for t in r["top_k"]]
    assert scores == sorted(scores, reverse=True)
    assert r["top_k"][0] == {"label": r["label"], "score": r["score"]}
    assert r["score"] == pytest.approx(max(r["probabilities"].values()))


def test_predict_accepts_every_input_kind(trained_run, clf):
    _, data = trained_run
    path = val_files(data)[0]
    raw = pathlib.Path(path).read_bytes()
    pil = Image.open(path)
    arr = np.asarray(load_image(path))
    by_path = clf.predict(path, top_k=2)
    assert isinstance(by_path, dict) and by_path["path"] == path
    check_result(by_path, 2)
    for source in (pathlib.Path(path), raw, bytearray(raw), pil, arr):
        r = clf.predict(source, top_k=2)
        check_result(r, 2)
        assert r["label"] == by_path["label"]
        for c in CLASSES:
            assert r["probabilities"][c] == pytest.approx(by_path["probabilities"][c], abs=1e-5)
    many = clf.predict([path, raw, pil, arr], top_k=3)
    assert isinstance(many, list) and len(many) == 4
    for r in many:
        check_result(r, 3)
        assert r["label"] == by_path["label"]
    assert many[0]["path"] == path and many[3]["path"] == "<input 3>"


def test_top_k_is_capped_at_the_number_of_classes(trained_run, clf):
    r = clf.predict(val_files(trained_run[1])[0], top_k=10)
    check_result(r, 3)
    assert clf.predict(val_files(trained_run[1])[0], top_k=1)["top_k"][0]["label"] == r["label"]


def test_bad_inputs_raise_or_are_reported(tmp_path, trained_run, clf):
    corpus = tmp_path / "corpus"
    expect = make_bad_files(corpus)
    bad = [str(corpus / n) for n, e in sorted(expect.items()) if e == "error"]
    good = val_files(trained_run[1])[0]
    with pytest.raises(ImageDecodeError) as e:
        clf.predict(bad[0])
    assert e.value.path == bad[0]
    with pytest.raises(ImageDecodeError):
        clf.predict([good, bad[1]], errors="raise")
    with pytest.raises(ImageDecodeError):
        clf.predict(b"definitely not an image")
    results = clf.predict([good, *bad, str(tmp_path / "missing.png")], errors="report")
    assert len(results) == len(bad) + 2
    check_result(results[0], 3)
    for path, r in zip([*bad, str(tmp_path / "missing.png")], results[1:]):
        assert set(r) == {"path", "error"} and r["path"] == path and r["error"]
    assert "not found" in results[-1]["error"]
    with pytest.raises(ValueError, match="errors"):
        clf.predict(good, errors="ignore")


def test_decode_errors_carry_a_kind_that_survives_pickling(tmp_path, clf):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    cases = {
        "unsupported": b"hello, I am not an image\n" * 4,
        "corrupt": png[: len(png) // 2],
        "too_large": png_header_only(100_000, 100_000),
        "unreadable": tmp_path / "missing.png",
    }
    assert set(cases) == set(DECODE_ERROR_KINDS)
    for kind, source in cases.items():
        with pytest.raises(ImageDecodeError) as info:
            clf.predict(source)
        err = info.value
        assert err.kind == kind, (kind, str(err))
        again = pickle.loads(pickle.dumps(err))  # multiprocessing workers send errors back pickled
        assert (type(again), again.path, again.reason, again.kind, str(again)) == (ImageDecodeError, err.path, err.reason, kind, str(err))
    assert ImageDecodeError("a.png: broken").kind == "corrupt"  # cls(message), as torch's DataLoader re-raises
    with pytest.raises(ValueError, match="kind must be one of"):
        ImageDecodeError("a.png", "broken", "sideways")


def test_iter_predict_streams_in_order_across_batches(trained_run, clf):
    paths = val_files(trained_run[1])
    streamed = list(clf.iter_predict(paths, batch_size=4, top_k=1))
    at_once = clf.predict(paths, batch_size=64, top_k=1)
    assert [r["path"] for r in streamed] == paths
    assert [r["label"] for r in streamed] == [r["label"] for r in at_once]


def test_expand_inputs(tmp_path):
    (tmp_path / "a" / "deep" / ".hidden").mkdir(parents=True)
    for rel in ("a/one.png", "a/deep/two.JPG", "a/deep/.hidden/three.png", "a/.dot.png", "x1.png", "x2.jpg", "y.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / rel, format="PNG")
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "x3.txt").write_text("x")
    out = expand_inputs([str(tmp_path / name) for name in ("a", "x*", "y.png", "nope.png", "z*.png")])
    assert out == [
        str(tmp_path / "a" / "deep" / "two.JPG"),
        str(tmp_path / "a" / "one.png"),
        str(tmp_path / "x1.png"),
        str(tmp_path / "x2.jpg"),
        str(tmp_path / "y.png"),
        str(tmp_path / "nope.png"),  # kept, so the caller reports it
        str(tmp_path / "z*.png"),  # a glob that matches nothing, likewise
    ]


def test_expand_inputs_lists_each_file_once_and_never_follows_folder_links(tmp_path, monkeypatch):
    """`ln -s . loop` made 'dir/**/*.png' list one file 41 times; two such links never finished."""
    import os

    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    for rel in ("a.png", "sub/b.png"):
        Image.new("RGB", (4, 4)).save(d / rel)
    (d / "loop").symlink_to(".")
    (d / "sub" / "up").symlink_to("..")
    os.mkfifo(d / "pipe.png")  # not a regular file: a folder scan or a glob must not list it
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    assert expand_inputs(["dir/**/*.png"]) == ["dir/a.png", "dir/sub/b.png"]
    assert expand_inputs(["dir/**"]) == ["dir/a.png", "dir/sub/b.png"]
    assert expand_inputs(["dir"]) == ["dir/a.png", "dir/sub/b.png"]
    # the same files reached again (through a link, a second argument) are listed once, at their first place
    assert expand_inputs(["dir/sub/b.png", "dir", "dir/loop/a.png", "dir/*/*.png"]) == ["dir/sub/b.png", "dir/a.png"]
    assert time.perf_counter() - start < 2.0
    assert expand_inputs(["dir/pipe.png"]) == ["dir/pipe.png"]  # named on its own it is kept, for the decoder to refuse


# ----------------------------------------------------------------------------- the artifact


def test_artifact_is_json_and_safetensors_no_pickle(trained_run):
    run, _ = trained_run
    meta = json.loads((run / "model.json").read_text())
    assert meta == load_meta(run)
    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata()["arch"] == "small_cnn"
        assert all(isinstance(f.get_tensor(k), torch.Tensor) for k in keys)
    assert "fc.weight" in keys
    for p in run.rglob("*"):
        if p.is_file():
            head = p.read_bytes()[:2]
            assert head != b"\x80\x04" and head != b"\x80\x02", f"{p} looks like a pickle"
            assert p.suffix not in (".pt", ".pth", ".pkl", ".ckpt")


def test_load_artifact_accepts_the_folder_or_its_files(trained_run):
    run, _ = trained_run
    model, meta = load_artifact(run / "model.json")
    assert not model.training and meta["class_names"] == CLASSES
    assert Classifier.load(run / "model.safetensors").class_names == CLASSES


def test_load_artifact_fails_clearly(tmp_path, trained_run):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    with pytest.raises(ArtifactError, match="model.json"):
        load_artifact(empty)
    only_meta = tmp_path / "half"
    only_meta.mkdir()
    shutil.copy(trained_run[0] / "model.json", only_meta / "model.json")
    with pytest.raises(ArtifactError, match="model.safetensors"):
        load_artifact(only_meta)
    broken = tmp_path / "broken"
    shutil.copytree(trained_run[0], broken, ignore=shutil.ignore_patterns("report", "evaluation"))
    (broken / "model.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="JSON"):
        load_artifact(broken)
    wrong = json.loads((trained_run[0] / "model.json").read_text())
    wrong["class_names"] = ["a", "b"]  # head size no longer matches the weights
    (broken / "model.json").write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="fc.weight"):
        load_artifact(broken)


def test_model_json_records_the_architecture_layout_and_refuses_another(tmp_path, trained_run):
    meta = json.loads((trained_run[0] / "model.json").read_text())
    assert meta["arch_version"] == 2  # small_cnn's airbench layout
    old = tmp_path / "old_layout"
    shutil.copytree(trained_run[0], old, ignore=shutil.ignore_patterns("report", "evaluation"))
    (old / "model.json").write_text(json.dumps({**meta, "arch_version": 1}))
    with pytest.raises(ArtifactError, match="layout version 1.*layout version 2"):
        load_artifact(old)
