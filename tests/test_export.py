"""ONNX export and the onnxruntime backend: metadata, dynamic batch, parity with torch on real
images, the failure path, int8 quantisation, `imgcls export` / `predict --backend onnx`, and
EfficientNet-Lite0 at 224 px (TF "SAME" padding through the exporter)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from imgcls.artifact import WEIGHTS_FILE, load_artifact, save_artifact  # noqa: E402
from imgcls.cli import main  # noqa: E402
from imgcls.export import ONNX_FILE, ExportError, OnnxRunner, export_onnx  # noqa: E402
from imgcls.models import create_model, get_entry  # noqa: E402
from imgcls.predict import Classifier  # noqa: E402
from imgcls.transforms import PreprocessSpec, eval_transform, resize_image, to_batch  # noqa: E402

CLASSES = ["blue", "green", "red"]


def quiet(_: str) -> None:
    pass


def _write_dataset(root: pathlib.Path, per_class: int, size: tuple[int, int], seed: int) -> dict[str, list[str]]:
    """Class folders of noisy, tinted PNGs; returns a split.json-style {train, val} of relative paths."""
    rng = np.random.default_rng(seed)
    split: dict[str, list[str]] = {"train": [], "val": []}
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 120, (size[1], size[0], 3)).astype(np.uint8)
            arr[..., 2 - c] += 120  # class colour channel (blue, green, red)
            Image.fromarray(arr).save(root / name / f"{i}.png")
            split["val" if i % 2 else "train"].append(f"{name}/{i}.png")
    return split


def _make_artifact(base: pathlib.Path, arch: str, spec: PreprocessSpec, image_size: tuple[int, int], per_class: int = 4) -> pathlib.Path:
    torch.manual_seed(0)
    data = base / "data"
    split = _write_dataset(data, per_class, image_size, seed=1)
    meta = {"arch": arch, "class_names": CLASSES, "preprocess": spec.to_dict(), "dataset": {"root": str(data), "layout": "folders"},
            "split": {"file": "split.json"}, "calibration": {"temperature": 1.5}, "tta": "flip"}
    model = create_model(arch, len(CLASSES)).eval()
    # Random init gives near-equal logits (small_cnn: ~1e-6) or saturated ones (lite0: +-40), and a
    # parity check on uniform or one-hot probabilities proves little: rescale the head so the
    # logits on these images spread over a few units, like a trained model's.
    fc = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    x = eval_transform(to_batch([resize_image(Image.open(p).convert("RGB"), spec) for p in sorted(data.rglob("*.png"))]), spec)
    with torch.no_grad():
        fc.weight.normal_()
        fc.weight.mul_(2.0 / model(x).std())
    model_dir = save_artifact(base / "model", model, meta)
    (model_dir / "split.json").write_text(json.dumps(split))
    return model_dir


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return _make_artifact(tmp_path_factory.mktemp("export"), "small_cnn", PreprocessSpec(img_size=16), (20, 18))


def _image_paths(model_dir: pathlib.Path) -> list[str]:
    return sorted(str(p) for p in (model_dir.parent / "data").rglob("*.png"))


def test_export_metadata_parity_and_dynamic_batch(small_model: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "m.onnx"
    lines: list[str] = []
    report = export_onnx(small_model, out, log=lines.append)
    assert report["n_images"] == 6 and "split.json" in report["image_source"]  # the 6 recorded val images
    assert report["top1_agreement"] == 1.0 and report["max_abs_diff"] < 1e-4
    assert any("parity" in s and "top-1 agreement 6/6" in s for s in lines)

    m = onnx.load(str(out))
    props = {p.key: p.value for p in m.metadata_props}
    assert json.loads(props["class_names"]) == CLASSES
    assert PreprocessSpec.from_dict(json.loads(props["preprocess"])) == PreprocessSpec(img_size=16)
    assert props["arch"] == "small_cnn" and props["imgcls_version"]
    assert json.loads(props["calibration"]) == {"temperature": 1.5} and props["tta"] == "flip"
    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert [i.name for i in m.graph.input] == ["input"] and [o.name for o in m.graph.output] == ["logits"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis

    model, _ = load_artifact(small_model)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 16, 16)
        got = sess.run(["logits"], {"input": x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == (batch, 3)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)  # logits reach ~50: float32 rounding is relative
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_onnx_backend_matches_torch_and_exports_on_first_use(small_model: pathlib.Path, tmp_path: pathlib.Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(small_model, model_dir)
    paths = _image_paths(small_model)
    torch_clf = Classifier.load(model_dir, precision="fp32", device="cpu")
    ref = torch_clf.predict(paths)
    clf = Classifier.load(model_dir, backend="onnx")
    assert (model_dir / ONNX_FILE).is_file()  # exported on first use
    assert getattr(clf, "tta", None) == getattr(torch_clf, "tta", None)  # the TTA mode travels in the metadata too
    got = clf.predict(paths)
    assert [r["label"] for r in got] == [r["label"] for r in ref]
    for a, b in zip(got, ref):
        np.testing.assert_allclose(list(a["probabilities"].values()), list(b["probabilities"].values()), atol=1e-4)

    # Newer weights make model.onnx stale: the next load exports again.
    before = (model_dir / ONNX_FILE).stat().st_mtime_ns
    later = before + 10**9
    os.utime(model_dir / WEIGHTS_FILE, ns=(later, later))
    Classifier.load(model_dir, backend="onnx")
    assert (model_dir / ONNX_FILE).stat().st_mtime_ns > before

    # A .onnx file alone is self-describing: class names and preprocessing come from its metadata.
    lone = tmp_path / "elsewhere" / "deployed.onnx"
    lone.parent.mkdir()
    shutil.copy(model_dir / ONNX_FILE, lone)
    solo = Classifier.load(lone, backend="onnx")
    assert solo.class_names == CLASSES and solo.spec == PreprocessSpec(img_size=16)
    assert [r["label"] for r in solo.predict(paths)] == [r["label"] for r in ref]


def test_parity_failure_writes_nothing(small_model: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import imgcls.export as export

    real = export._export_graph

    def broken(model: torch.nn.Module, spec: PreprocessSpec, opset: int):  # a graph whose logits are negated
        flipped = create_model("small_cnn", 3).eval()
        flipped.load_state_dict(model.state_dict())
        flipped.fc.weight.data.neg_()
        return real(flipped, spec, opset)

    monkeypatch.setattr(export, "_export_graph", broken)
    with pytest.raises(ExportError, match="disagrees"):
        export_onnx(small_model, tmp_path / "m.onnx", log=quiet)
    assert list(tmp_path.iterdir()) == []


def test_synthetic_fallback_and_int8_needs_real_images(tmp_path: pathlib.Path) -> None:
    model_dir = save_artifact(tmp_path / "bare", create_model("small_cnn", 3), {"arch": "small_cnn", "class_names": CLASSES, "preprocess": PreprocessSpec(img_size=16).to_dict()})
    report = export_onnx(model_dir, tmp_path / "m.onnx", log=quiet)
    assert "synthetic" in report["image_source"] and report["top1_agreement"] == 1.0
    with pytest.raises(ExportError, match="real images"):
        export_onnx(model_dir, tmp_path / "q.onnx", quantize="int8", log=quiet)


def test_cli_export_quantize_and_predict_backend(trained_run: tuple[pathlib.Path, pathlib.Path], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, data = trained_run
    out = tmp_path / "model.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out), "--quantize", "int8"]) == 0
    printed = capsys.readouterr().out
    assert "parity onnxruntime vs torch fp32" in printed and "top-1 agreement" in printed
    assert "accuracy on" in printed and "fp32 " in printed and "-> int8 " in printed
    q = tmp_path / "model.int8.onnx"
    assert q.is_file() and q.stat().st_size < out.stat().st_size / 2
    report = export_onnx(run, tmp_path / "again.onnx", quantize="int8", log=quiet)
    assert 0 <= report["accuracy_int8"] <= 1 and report["accuracy_fp32"] > 0.5  # a trained model, real labels
    assert abs(report["accuracy_int8"] - report["accuracy_fp32"]) <= 0.2

    test_images = sorted(str(p) for p in (data / "test").rglob("*") if p.is_file())[:4]
    assert main(["predict", str(q), *test_images, "--backend", "onnx", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 4 and all("label" in r for r in results)


def test_efficientnet_lite0_224_parity(tmp_path: pathlib.Path) -> None:
    spec = get_entry("efficientnet_lite0").default_spec
    assert spec.img_size == 224
    model_dir = _make_artifact(tmp_path, "efficientnet_lite0", spec, (250, 230), per_class=2)
    report = export_onnx(model_dir, tmp_path / "lite0.onnx", log=quiet)
    assert report["n_images"] == 3 and "split.json" in report["image_source"]
    assert report["top1_agreement"] == 1.0 and report["max_abs_diff"] < 1e-4

    # Batch 1 and 5 through the runner against the torch model, on the same prepared images.
    model, _ = load_artifact(model_dir)
    rng = np.random.default_rng(0)
    runner = OnnxRunner(tmp_path / "lite0.onnx")
    for batch in (1, 5):
        imgs = rng.integers(0, 256, (batch, spec.cache_size, spec.cache_size, 3), dtype=np.uint8)
        with torch.no_grad():
            want = model(eval_transform(to_batch(imgs), spec))
        np.testing.assert_allclose(torch.softmax(runner(imgs), 1).numpy(), torch.softmax(want, 1).numpy(), atol=1e-4)
