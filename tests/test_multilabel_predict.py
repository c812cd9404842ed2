"""Prediction with a multi-label model everywhere: `Classifier.predict`, `imgcls predict` (JSON,
CSV, text), ONNX export and the onnx backend, the HTTP server and its OpenAPI schema, and the
report's per-label figures and mistakes; single-label answers stay as they were.

The model is a random-weight small_cnn (3 labels, 16 px) saved with "task": "multi-label", a
temperature per label and thresholds placed at the median score of the test images, so the
answers hold zero, one and several labels.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.artifact import load_artifact, save_artifact
from imgcls.cli import main
from imgcls.inference.answer import ANSWER_KEYS, multilabel_answer
from imgcls.inference.trust import Trust
from imgcls.models import create_model
from imgcls.predict import Classifier
from imgcls.runtime import batched_logits
from imgcls.transforms import PreprocessSpec

LABELS = ["sea", "sunset", "boat"]
TEMPERATURES = [1.0, 2.0, 0.5]
N_IMAGES = 8


def _model(num_classes: int) -> torch.nn.Module:
    """A seeded random small_cnn whose outputs differ by image (BN statistics calibrated on noise)."""
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        model.train()(torch.randn(64, 3, 16, 16))
        model.fc.weight.normal_(0.0, 8.0)  # scores spread over (0, 1), not all near 0.5
    return model.eval()


def _meta(class_names: list[str], **extra) -> dict:
    return {"arch": "small_cnn", "class_names": class_names, "preprocess": PreprocessSpec(img_size=16).to_dict(), **extra}


def make_multilabel_artifact(path: Path, thresholds: list[float]) -> Path:
    """A multi-label model folder for LABELS with these thresholds (the browser test serves one)."""
    meta = _meta(LABELS, task="multi-label", thresholds=thresholds, label_temperatures=TEMPERATURES)
    return save_artifact(path, _model(len(LABELS)), meta)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("ml_images")
    rng = np.random.default_rng(5)
    paths = []
    for i in range(N_IMAGES):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _sigmoid(logits: np.ndarray, temps: list[float]) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits / np.asarray(temps)))  # (N, C)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, images) -> Path:
    """The multi-label artifact; each label's threshold sits in the widest gap between the scores
    of `images` near their median, so numeric noise (batch size, backend) cannot flip a decision."""
    model = _model(len(LABELS))
    probe = Classifier(model, _meta(LABELS), device="cpu", precision="fp32")
    logits = batched_logits(model, np.stack([probe.prepare(p) for p in images]), probe.spec, amp_dtype=None).numpy()
    thresholds = []
    for s in np.sort(_sigmoid(logits, TEMPERATURES), axis=0).T:  # (N,) sorted scores of one label
        k = 2 + int(np.argmax(np.diff(s)[1:-2]))  # split between s[k - 1] and s[k], 2 <= k <= N - 2
        thresholds.append(round(float(s[k - 1] + s[k]) / 2, 6))
    return make_multilabel_artifact(tmp_path_factory.mktemp("ml") / "model", thresholds)


@pytest.fixture(scope="module")
def clf(model_dir) -> Classifier:
    return Classifier.load(model_dir, device="cpu", precision="fp32")


def _expected(model_dir: Path, clf: Classifier, images: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The per-label probabilities (N, C) and thresholds (C,), computed here from the raw logits."""
    model, meta = load_artifact(model_dir)
    logits = batched_logits(model, np.stack([clf.prepare(p) for p in images]), clf.spec, amp_dtype=None).numpy()  # (N, C)
    return _sigmoid(logits, meta["label_temperatures"]), np.asarray(meta["thresholds"])


def _check_answer(a: dict, probs: np.ndarray, thresholds: np.ndarray, tol: float = 1e-5) -> None:
    want = [LABELS[i] for i in np.argsort(-probs) if probs[i] >= thresholds[i]]
    assert [x["label"] for x in a["labels"]] == want
    assert [x["score"] for x in a["labels"]] == sorted((x["score"] for x in a["labels"]), reverse=True)
    assert list(a["probabilities"]) == LABELS
    assert np.allclose([a["probabilities"][c] for c in LABELS], probs, atol=tol)


# ---------------------------------------------------------------------------------- Python API


def test_classifier_answers_labels_above_their_thresholds(model_dir, clf, images):
    probs, thresholds = _expected(model_dir, clf, images)
    answers = clf.predict(images)
    assert clf.multilabel and np.allclose(clf.trust.thresholds, thresholds)
    counts = set()
    for a, p in zip(answers, probs):
        assert set(a) == {"path", "labels", "probabilities"}  # no label, top_k, best_guess or set
        _check_answer(a, p, thresholds)
        counts.add(len(a["labels"]))
    assert len(counts) >= 2  # the thresholds make answers with different numbers of labels
    assert not np.allclose(probs.sum(1), 1.0)  # sigmoids, not a softmax
    # one input gives one dict; probabilities=False leaves out the per-label dict only
    one = clf.predict(images[0])
    assert one["labels"] == [{"label": x["label"], "score": pytest.approx(x["score"], abs=1e-5)} for x in answers[0]["labels"]]
    lean = list(clf.iter_predict(images[:2], probabilities=False))
    assert [set(a) for a in lean] == [{"path", "labels"}] * 2 and lean[0]["labels"] == answers[0]["labels"]


def test_multilabel_answer_edges():
    probs, th = np.array([0.2, 0.9, 0.5]), np.array([0.5, 0.5, 0.5])
    a = multilabel_answer(probs, LABELS, th, "x.png")
    assert a["labels"] == [{"label": "sunset", "score": 0.9}, {"label": "boat", "score": 0.5}]  # at the threshold counts
    assert multilabel_answer(probs, LABELS, np.ones(3), "x.png")["labels"] == []


def test_coverage_refused_and_unknown_threshold_ignored(model_dir, clf, images, capsys):
    with pytest.raises(ValueError, match="multi-label"):
        clf.predict(images[:1], coverage=0.9)
    assert main(["predict", str(model_dir), images[0], "--coverage", "0.9"]) == 2
    assert "multi-label" in capsys.readouterr().err
    same = Classifier.load(model_dir, device="cpu", precision="fp32", unknown_threshold=0.99)
    assert same.predict(images) == clf.predict(images)


def test_malformed_thresholds_are_refused():
    meta = _meta(LABELS, task="multi-label")
    with pytest.raises(ValueError, match="thresholds"):
        Trust.from_meta(meta)  # a multi-label model needs its thresholds
    with pytest.raises(ValueError, match="one number per label"):
        Trust.from_meta({**meta, "thresholds": [0.5, 0.5]})
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        Trust.from_meta({**meta, "thresholds": [0.5, 1.5, 0.5]})
    with pytest.raises(ValueError, match="positive"):
        Trust.from_meta({**meta, "thresholds": [0.5] * 3, "label_temperatures": [1.0, 0.0, 1.0]})
    t = Trust.from_meta({**meta, "thresholds": [0.5] * 3})
    assert t.multilabel and t.label_temperatures.tolist() == [1.0] * 3


# ---------------------------------------------------------------------------------- CLI


def test_cli_json_csv_and_text(model_dir, images, capsys):
    answers = Classifier.load(model_dir, device="cpu").predict(images)  # the CLI's precision (bf16 on an AMX CPU)
    assert main(["predict", str(model_dir), *images, "--json", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [a["labels"] for a in got] == [a["labels"] for a in answers]
    assert all(a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6) for a, b in zip(got, answers))

    assert main(["predict", str(model_dir), *images, "--csv", "--device", "cpu"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["path", "labels", *LABELS, "error"]
    for row, a in zip(rows[1:], answers):
        assert row[0] == a["path"] and row[1] == ";".join(x["label"] for x in a["labels"])
        assert [float(v) for v in row[2:5]] == pytest.approx([a["probabilities"][c] for c in LABELS], abs=1e-5)

    assert main(["predict", str(model_dir), *images, "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for line, a in zip(lines, answers):
        shown = ", ".join(f"{x['label']} {x['score']:.3f}" for x in a["labels"]) or "(no label above its threshold)"
        assert line == f"{a['path']}: {shown}"


# ---------------------------------------------------------------------------------- ONNX


def test_onnx_export_and_backend_answer_as_torch(model_dir, clf, images, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from imgcls.export import export_onnx
    from imgcls.inference.runners import PROBS_NAME

    out = tmp_path / "ml.onnx"
    report = export_onnx(model_dir, out, log=lambda _: None)
    assert report["top1_agreement"] == 1.0 and report["max_abs_diff"] < 1e-4
    graph = onnx.load(str(out))
    props = {p.key: p.value for p in graph.metadata_props}
    assert props["task"] == "multi-label"
    assert json.loads(props["thresholds"]) == pytest.approx(clf.trust.thresholds.tolist())
    assert json.loads(props["label_temperatures"]) == TEMPERATURES
    assert [o.name for o in graph.graph.output] == ["logits", PROBS_NAME]  # the sigmoid is in the graph too

    onnx_clf = Classifier.load(out, backend="onnx")
    assert onnx_clf.multilabel
    for a, b in zip(onnx_clf.predict(images), clf.predict(images)):
        assert [x["label"] for x in a["labels"]] == [x["label"] for x in b["labels"]]
        assert [a["probabilities"][c] for c in LABELS] == pytest.approx([b["probabilities"][c] for c in LABELS], abs=1e-4)

    # the graph's own "probabilities" output is the calibrated sigmoid, for users outside imgcls
    import onnxruntime as ort

    from imgcls.transforms import eval_transform, to_batch

    x = eval_transform(to_batch(np.stack([clf.prepare(p) for p in images])), clf.spec).contiguous().numpy()
    graph_probs = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run([PROBS_NAME], {"input": x})[0]
    probs, _ = _expected(model_dir, clf, images)
    assert np.abs(graph_probs - probs).max() < 1e-4


# ---------------------------------------------------------------------------------- server


def test_server_answers_the_multilabel_dict(model_dir, clf, images):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from imgcls.serve import ServeSettings, create_app

    with TestClient(create_app(clf, ServeSettings())) as client:
        files = [("file", (Path(p).name, Path(p).read_bytes(), "image/png")) for p in images[:3]]
        r = client.post("/v1/predict", files=files)
        assert r.status_code == 200, r.text
        got = r.json()["predictions"]
        for a, b in zip(got, clf.predict(images[:3])):
            assert set(a) == {"path", "filename", "labels", "probabilities"}
            assert a["labels"] == [{"label": x["label"], "score": pytest.approx(x["score"], abs=1e-5)} for x in b["labels"]]
            assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
        assert client.post("/v1/predict?coverage=0.9", files=files[:1]).status_code == 400
        info = client.get("/v1/model").json()
        assert info["task"] == "multi-label" and info["thresholds"] == dict(zip(LABELS, clf.trust.thresholds.tolist()))
        schema = client.get("/openapi.json").json()["components"]["schemas"]["Prediction"]
        assert {"labels", "probabilities", "label", "top_k"} <= set(schema["properties"])
        assert "label" not in schema.get("required", [])  # a multi-label answer has none
        assert "multi-label" in client.get("/static/app.js").text  # the page draws one bar per label


# ---------------------------------------------------------------------------------- single-label unchanged


def test_single_label_answers_unchanged(tmp_path, images, capsys):
    single = save_artifact(tmp_path / "single", _model(3), _meta(["cat", "dog", "bird"]))
    c = Classifier.load(single, device="cpu", precision="fp32")
    assert not c.multilabel and c.trust.thresholds is None
    a = c.predict(images[0], top_k=2)
    assert list(a) == [*ANSWER_KEYS, "probabilities"] and len(a["top_k"]) == 2
    assert sum(a["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert main(["predict", str(single), images[0], "--csv", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "path,label,score,top_k,error"
    assert main(["predict", str(single), images[0], "--json", "--device", "cpu"]) == 0
    assert list(json.loads(capsys.readouterr().out)[0]) == list(ANSWER_KEYS)  # no per-class dict in the CLI


# ---------------------------------------------------------------------------------- report


def test_pr_curve_and_most_wrong():
    from sklearn.metrics import average_precision_score

    from imgcls.report.multilabel import most_wrong, operating_point, pr_curve

    rng = np.random.default_rng(0)
    y = rng.random(40) < 0.4
    s = np.round(np.where(y, rng.random(40) * 0.7 + 0.3, rng.random(40) * 0.7), 1)  # ties on purpose
    recall, precision = pr_curve(s, y)
    assert recall[0] == 0 and recall[-1] == 1 and np.all(np.diff(recall) >= 0)
    assert np.sum(np.diff(recall) * precision[1:]) == pytest.approx(average_precision_score(y, s))
    assert pr_curve(s, np.zeros(40))[0].size == 0
    r, p = operating_point(s, y, 0.5)
    pred = s >= 0.5
    assert (r, p) == pytest.approx(((pred & y).sum() / y.sum(), (pred & y).sum() / pred.sum()))

    probs = np.array([[0.9, 0.1], [0.6, 0.8], [0.2, 0.3], [0.4, 0.05]])
    targets = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    w = most_wrong(probs, targets, np.array([0.5, 0.5]), ["a", "b"], ["p0", "p1", "p2", "p3"])
    assert [x["path"] for x in w[0]["false_positives"]] == ["p1"] and [x["path"] for x in w[0]["false_negatives"]] == ["p2"]
    assert w[1]["false_positives"] == [] and [x["path"] for x in w[1]["false_negatives"]] == ["p2"]
    assert (w[0]["num_fp"], w[0]["num_fn"], w[1]["num_fp"], w[1]["num_fn"]) == (1, 1, 0, 1)
    w = most_wrong(
        np.array([[0.9], [0.7], [0.95], [0.1], [0.3]]), np.array([[0], [0], [0], [1], [1]]), np.array([0.5]), ["a"], list("vwxyz")
    )
    assert [x["path"] for x in w[0]["false_positives"]] == ["x", "v", "w"]  # highest score first
    assert [x["path"] for x in w[0]["false_negatives"]] == ["y", "z"]  # lowest score first


def test_multilabel_report_page(tmp_path, images):
    from imgcls.multilabel import multilabel_metrics
    from imgcls.report import MultiLabelPredictions, write_report

    rng = np.random.default_rng(1)
    targets = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 1], [1, 0, 1], [0, 0, 1]])
    probs = np.clip(targets * 0.6 + rng.random(targets.shape) * 0.5, 0, 1)
    probs[3, 0] = 0.99  # images[3] has no label: its sea score is the worst false positive
    thresholds = np.array([0.5, 0.6, 0.7])
    metrics = multilabel_metrics(probs, targets, thresholds, LABELS)
    pred = MultiLabelPredictions(probs, targets, images, thresholds)
    page = write_report(tmp_path / "rep", metrics, LABELS, predictions=pred, title="ml")
    html = page.read_text()
    assert 'id="per-label"' in html and 'id="pr"' in html and "Most wrong, per label" in html and "multi-label" in html
    assert 'id="confusion"' not in html and "Top losses" not in html  # the single-label sections are left out
    assert html.index(Path(images[3]).name) < html.index("scored lowest (false negatives)")  # listed as sea's false positive
    assert (tmp_path / "rep" / "pr_curves.png").is_file() and not (tmp_path / "rep" / "confusion_matrix.txt").exists()
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["task"] == "multi-label"
    with pytest.raises(ValueError, match="do not fit"):
        MultiLabelPredictions(probs, targets[:3], images, thresholds)
