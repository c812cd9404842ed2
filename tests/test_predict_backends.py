"""Prediction backends beyond torch: the int8 graph against fp32, the agreement its export records,
backend "auto" (which file it picks, and why) and its fallbacks to torch."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from imgcls.artifact import WEIGHTS_FILE  # noqa: E402
from imgcls.cli import main  # noqa: E402
from imgcls.export import MIN_HELD_OUT, calibration_split, export_onnx  # noqa: E402
from imgcls.inference import runners  # noqa: E402
from imgcls.inference.runners import INT8_MIN_AGREEMENT, ONNX_FILE, ONNX_INT8_FILE, BackendError, OnnxRunner, int8_trusted  # noqa: E402
from imgcls.predict import Classifier  # noqa: E402
from synth import make_split_folders  # noqa: E402


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def exported(
    trained_run: tuple[pathlib.Path, pathlib.Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[pathlib.Path, dict, list[str]]:
    """(a copy of the trained small_cnn folder with model.onnx and model.int8.onnx, the export report,
    held-out-style generated images): int8 calibrated on 90 generated images (45 held out)."""
    run, _ = trained_run
    base = tmp_path_factory.mktemp("backends")
    model_dir = pathlib.Path(shutil.copytree(run, base / "model"))  # the shared run folder stays without an export
    check = make_split_folders(base / "check", per_split={"valid": 30}, size=24, seed=7)
    report = export_onnx(model_dir, model_dir / ONNX_FILE, quantize="int8", data=check, log=quiet)
    images = make_split_folders(base / "new", per_split={"test": 20}, size=24, seed=11)
    return model_dir, report, sorted(str(p) for p in images.rglob("*.png"))


def _labels(results: list[dict]) -> list[str]:
    return [r["label"] for r in results]


def test_calibration_split_holds_images_out() -> None:
    calib, held = calibration_split(1000)
    assert len(calib) == 256 and len(held) == 744 and not set(calib) & set(held)
    assert sorted(calib + held) == list(range(1000)) and calib[0] == 0 and calib[-1] == 999  # evenly spread, not a prefix
    calib, held = calibration_split(2 * MIN_HELD_OUT)
    assert len(calib) == len(held) == MIN_HELD_OUT
    calib, held = calibration_split(2 * MIN_HELD_OUT - 1)  # too few: all calibrate, none held out
    assert held == [] and len(calib) == 2 * MIN_HELD_OUT - 1


def test_int8_agrees_with_fp32_and_records_it(exported: tuple[pathlib.Path, dict, list[str]]) -> None:
    model_dir, report, paths = exported
    assert report["int8_held_out"] and report["int8_agreement_images"] == 45
    # The record in the file is what the export measured, and the runner reads it back.
    q = OnnxRunner(model_dir / ONNX_INT8_FILE)
    assert q.meta["int8_agreement"] == {"top1": report["int8_top1_agreement"], "images": 45, "held_out": True}
    assert "quantization" in q.meta and q.meta["class_names"] == json.loads((model_dir / "model.json").read_text())["class_names"]
    # On new generated images, int8 answers as torch fp32 does (a trained model, confident answers).
    fp32 = Classifier.load(model_dir, backend="torch", precision="fp32", compile="off")
    int8 = Classifier.load(model_dir, backend="onnx-int8")
    assert int8.meta["backend"] == "onnx-int8" and int8.meta["onnx_path"].endswith(ONNX_INT8_FILE)
    want, got = fp32.predict(paths, top_k=1), int8.predict(paths, top_k=1)
    agree = np.mean([a == b for a, b in zip(_labels(want), _labels(got))])
    assert agree >= 0.9, f"int8 top-1 agrees with fp32 on only {agree:.0%} of {len(paths)} images"
    # Scores stay close too: quantisation noise, not a different model.
    diff = max(abs(a["score"] - b["score"]) for a, b in zip(want, got))
    assert diff < 0.2


def _set_agreement(path: pathlib.Path, record: dict | None) -> None:
    """Rewrite the int8 file's recorded agreement (None: drop it), keeping its mtime newer than the model."""
    m = onnx.load(str(path))
    props = {p.key: p.value for p in m.metadata_props if p.key != "int8_agreement"}
    if record is not None:
        props["int8_agreement"] = json.dumps(record)
    m.ClearField("metadata_props")
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(path))


@pytest.fixture()
def folder(exported: tuple[pathlib.Path, dict, list[str]], tmp_path: pathlib.Path) -> pathlib.Path:
    """A fresh copy of the exported folder (mtimes kept), for tests that change its files."""
    return pathlib.Path(shutil.copytree(exported[0], tmp_path / "model"))


def test_auto_picks_int8_only_on_enough_held_out_agreement(folder: pathlib.Path) -> None:
    q = folder / ONNX_INT8_FILE
    cases = [
        ({"top1": 1.0, "images": 300, "held_out": True}, "onnx-int8", ONNX_INT8_FILE),
        ({"top1": INT8_MIN_AGREEMENT - 0.001, "images": 300, "held_out": True}, "onnx", ONNX_FILE),  # below the bar
        ({"top1": 1.0, "images": 30, "held_out": False}, "onnx", ONNX_FILE),  # measured on its own calibration images
        (None, "onnx", ONNX_FILE),  # an older export without the record
    ]
    for record, backend, file in cases:
        _set_agreement(q, record)
        lines: list[str] = []
        clf = Classifier.load(folder, backend="auto", log=lines.append)
        assert clf.meta["backend"] == backend and clf.meta["onnx_path"].endswith(file), (record, lines)
        assert any(line.startswith("backend auto: onnxruntime on " + file) for line in lines), lines
    # Asked for explicitly, int8 runs whatever its agreement.
    assert Classifier.load(folder, backend="onnx-int8").meta["backend"] == "onnx-int8"
    assert int8_trusted({"int8_agreement": {"top1": 0.9, "images": 10, "held_out": True}})[0] is False


def test_auto_falls_back_to_torch(folder: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stale graphs (newer weights): torch, never a silent re-export; the reason is logged.
    later = max(p.stat().st_mtime_ns for p in folder.iterdir()) + 10**9
    os.utime(folder / WEIGHTS_FILE, ns=(later, later))
    lines: list[str] = []
    clf = Classifier.load(folder, backend="auto", compile="off", log=lines.append)
    assert clf.meta.get("backend", "torch") == "torch" and clf.model is not None
    assert any("older than the model" in line for line in lines), lines
    with pytest.raises(BackendError, match="older than the model.*--quantize int8"):
        Classifier.load(folder, backend="onnx-int8")
    # No exported files at all, or no onnxruntime: torch too.
    for f in (ONNX_FILE, ONNX_INT8_FILE):
        (folder / f).unlink()
    lines.clear()
    assert Classifier.load(folder, backend="auto", compile="off", log=lines.append).model is not None
    assert not any("backend auto" in line for line in lines), lines  # nothing exported: torch, silently (the usual case)
    with pytest.raises(BackendError, match=f"no {ONNX_INT8_FILE}: run `imgcls export .* --quantize int8`"):
        Classifier.load(folder, backend="onnx-int8")

    def missing() -> None:
        raise BackendError('the onnx backend needs onnxruntime: pip install "imgcls[onnx]"')

    monkeypatch.setattr(runners, "import_onnxruntime", missing)
    runner, why = runners.choose_onnx_runner(folder)
    assert runner is None and "needs onnxruntime" in why


def test_auto_keeps_torch_for_a_feature_rule(folder: pathlib.Path) -> None:
    # A knn/mahalanobis "unknown" rule needs pooled features, which only torch gives: onnx would answer differently.
    meta = json.loads((folder / "model.json").read_text())
    meta["unknown"] = {"method": "knn", "threshold": 0.5, "fallback": {"method": "msp", "threshold": 0.5}}
    st = (folder / "model.json").stat()
    (folder / "model.json").write_text(json.dumps(meta))
    os.utime(folder / "model.json", ns=(st.st_atime_ns, st.st_mtime_ns))  # the exports stay up to date
    lines: list[str] = []
    from imgcls.predict import _auto_runner

    assert _auto_runner(folder, "cpu", None, lines.append) is None
    assert "pooled features" in lines[0]


def test_cli_predict_defaults_to_auto(exported: tuple[pathlib.Path, dict, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, report, paths = exported
    want = ONNX_INT8_FILE if report["int8_top1_agreement"] >= INT8_MIN_AGREEMENT else ONNX_FILE
    assert main(["predict", str(model_dir), *paths[:3], "--json"]) == 0
    out = capsys.readouterr()
    assert len(json.loads(out.out)) == 3 and f"backend auto: onnxruntime on {want}" in out.err
    assert main(["predict", str(model_dir), *paths[:3], "--json", "--backend", "torch"]) == 0
    assert "backend auto" not in capsys.readouterr().err


def test_onnx_batches_side_by_side_match_one_by_one(exported: tuple[pathlib.Path, dict, list[str]]) -> None:
    model_dir, _, _ = exported
    spec = OnnxRunner(model_dir / ONNX_FILE).spec
    images = np.random.default_rng(0).integers(0, 256, (7, spec.cache_size, spec.cache_size, 3), dtype=np.uint8)
    serial = OnnxRunner(model_dir / ONNX_FILE, threads=1)  # threads given: every batch in turn, one session
    auto = OnnxRunner(model_dir / ONNX_FILE)  # several batches: side by side on a one-thread session
    want = serial(images, 2)
    np.testing.assert_allclose(auto(images, 2).numpy(), want.numpy(), rtol=1e-5, atol=1e-5)  # 4 batches, in order
    np.testing.assert_allclose(auto(images[:2], 2).numpy(), want[:2].numpy(), rtol=1e-5, atol=1e-5)  # one batch: all cores
    assert serial._side_by_side is None


def test_export_int8_flag_is_quantize_int8() -> None:
    from imgcls.cli.parsers import build_parser

    assert build_parser().parse_args(["export", "m", "--int8"]).quantize == "int8"
    assert build_parser().parse_args(["export", "m"]).quantize is None
    assert build_parser().parse_args(["predict", "m", "a.jpg"]).backend == "auto"
