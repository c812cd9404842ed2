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
from imgcls.export import ONNX_FILE, ExportError, export_onnx  # noqa: E402
from imgcls.inference.runners import BackendError, OnnxRunner, Runner, TorchRunner  # noqa: E402
from imgcls.models import create_model, get_entry  # noqa: E402
from imgcls.predict import Classifier  # noqa: E402
from imgcls.runtime import batched_logits, tta_logits  # noqa: E402
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
    meta = {
        "arch": arch,
        "class_names": CLASSES,
        "preprocess": spec.to_dict(),
        "dataset": {"root": str(data), "layout": "folders"},
        "split": {"file": "split.json"},
        "calibration": {"temperature": 1.5},
        "tta": "flip",
    }
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


def test_onnx_backend_needs_an_export_and_then_matches_torch(
    small_model: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(small_model, model_dir)
    before = sorted(p.name for p in model_dir.iterdir())
    paths = _image_paths(small_model)

    # Loading never exports: no model.onnx is a clear error naming the command, and nothing is written.
    with pytest.raises(BackendError, match=f"no {ONNX_FILE}: run `imgcls export {model_dir}` first"):
        Classifier.load(model_dir, backend="onnx")
    assert main(["predict", str(model_dir), paths[0], "--backend", "onnx"]) == 2
    assert "imgcls export" in capsys.readouterr().err
    assert sorted(p.name for p in model_dir.iterdir()) == before

    export_onnx(model_dir, model_dir / ONNX_FILE, log=quiet)
    torch_clf = Classifier.load(model_dir, precision="fp32", device="cpu")
    ref = torch_clf.predict(paths)
    clf = Classifier.load(model_dir, backend="onnx")
    assert clf.tta == torch_clf.tta == "flip"  # the TTA mode travels in the metadata too
    got = clf.predict(paths)
    assert [r["label"] for r in got] == [r["label"] for r in ref]
    for a, b in zip(got, ref):
        assert set(a) == set(b)
        np.testing.assert_allclose(list(a["probabilities"].values()), list(b["probabilities"].values()), atol=1e-4)

    # Newer weights make model.onnx stale: an error that says to export again, not a silent re-export.
    onnx_mtime = (model_dir / ONNX_FILE).stat().st_mtime_ns
    later = onnx_mtime + 10**9
    os.utime(model_dir / WEIGHTS_FILE, ns=(later, later))
    with pytest.raises(BackendError, match="older than the model.*imgcls export"):
        Classifier.load(model_dir, backend="onnx")
    assert (model_dir / ONNX_FILE).stat().st_mtime_ns == onnx_mtime

    # A .onnx file alone is self-describing: class names and preprocessing come from its metadata.
    lone = tmp_path / "elsewhere" / "deployed.onnx"
    lone.parent.mkdir()
    shutil.copy(model_dir / ONNX_FILE, lone)
    solo = Classifier.load(lone, backend="onnx")
    assert solo.class_names == CLASSES and solo.spec == PreprocessSpec(img_size=16)
    assert [r["label"] for r in solo.predict(paths)] == [r["label"] for r in ref]
    with pytest.raises(BackendError, match="not an imgcls ONNX export|cannot load"):
        (tmp_path / "junk.onnx").write_bytes(b"not a graph")
        Classifier.load(tmp_path / "junk.onnx", backend="onnx")


def reference_tta_logits(model: torch.nn.Module, images: np.ndarray, spec: PreprocessSpec, mode: str) -> torch.Tensor:
    """TTA written out by hand (airbench94's views and weights), float64: the result the runners must give."""
    x = to_batch(images)  # (N, 3, S, S) uint8
    s = x.shape[-1]
    padded = torch.nn.functional.pad(x.float(), (1, 1, 1, 1), mode="reflect").to(torch.uint8)  # (N, 3, S + 2, S + 2)
    up_left, down_right = padded[..., :s, :s], padded[..., 2:, 2:]
    views = {
        "none": [(x, 1.0)],
        "flip": [(x, 0.5), (x.flip(-1), 0.5)],
        "translate": [(x, 0.5), (up_left, 0.25), (down_right, 0.25)],
        "flip-translate": [
            (x, 0.25),
            (x.flip(-1), 0.25),
            (up_left, 0.125),
            (down_right, 0.125),
            (up_left.flip(-1), 0.125),
            (down_right.flip(-1), 0.125),
        ],
    }[mode]
    with torch.no_grad():
        return sum(w * model(eval_transform(v, spec)).double() for v, w in views)


def test_runners_agree_and_tta_on_top_of_either_equals_the_reference(small_model: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """The Runner interface: torch and onnxruntime give the same logits for the same uint8
    images, at any batch size; runtime.tta_logits on top of either gives the hand-written TTA."""
    model, meta = load_artifact(small_model)
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    export_onnx(small_model, tmp_path / "m.onnx", log=quiet)
    runners: dict[str, Runner] = {
        "torch": TorchRunner(model, spec, torch.device("cpu"), None, compile="off"),
        "onnx": OnnxRunner(tmp_path / "m.onnx"),
    }
    images = np.random.default_rng(0).integers(0, 256, (7, spec.cache_size, spec.cache_size, 3), dtype=np.uint8)
    plain = {name: r(images, 3) for name, r in runners.items()}  # batches of 3, 3, 1
    assert plain["torch"].shape == plain["onnx"].shape == (7, 3) and plain["torch"].dtype == plain["onnx"].dtype == torch.float32
    torch.testing.assert_close(plain["onnx"], plain["torch"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(runners["onnx"](images), plain["onnx"])  # the batch size does not change the answer
    np.testing.assert_allclose(plain["torch"].double().numpy(), reference_tta_logits(model, images, spec, "none").numpy(), atol=1e-4)
    # flip-translate has every view (translate's weights differ, but come from the same tta_views: test_recipe)
    for mode in ("flip", "flip-translate"):
        want = reference_tta_logits(model, images, spec, mode)
        for name, runner in runners.items():
            got = tta_logits(lambda a, r=runner: r(a, 4), images, mode)
            assert got.shape == (7, 3)
            np.testing.assert_allclose(got.double().numpy(), want.numpy(), atol=1e-4, err_msg=f"{name} {mode}")
    # batched_logits(tta=) (evaluation, training) is the same TTA, applied per batch
    np.testing.assert_allclose(batched_logits(model, images, spec, batch_size=4, tta=mode).double().numpy(), want.numpy(), atol=1e-4)


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
    meta = {"arch": "small_cnn", "class_names": CLASSES, "preprocess": PreprocessSpec(img_size=16).to_dict()}
    model_dir = save_artifact(tmp_path / "bare", create_model("small_cnn", 3), meta)
    report = export_onnx(model_dir, tmp_path / "m.onnx", log=quiet)
    assert "synthetic" in report["image_source"] and report["top1_agreement"] == 1.0
    with pytest.raises(ExportError, match="real images"):
        export_onnx(model_dir, tmp_path / "q.onnx", quantize="int8", log=quiet)


def test_cli_export_quantize_and_predict_backend(
    trained_run: tuple[pathlib.Path, pathlib.Path], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
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
