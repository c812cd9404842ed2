"""`imgcls predict --engine ray`: a local Ray with 2 actors gives the single-process answers, row for row."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

from imgcls.cli import main
from imgcls.predict import Classifier

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None or importlib.util.find_spec("pyarrow") is None,
    reason='needs ray and pyarrow: pip install "imgcls[ray]"',
)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (2 CPUs, 127.0.0.1) for the module: `predict_to_file` reuses it instead of starting its own."""
    from imgcls.predict_ray import start_ray

    assert start_ray(None, 2)  # before anything imports ray, so that it stays on 127.0.0.1
    import ray

    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(trained_run, tmp_path_factory) -> list[str]:
    """The test split's 18 images, a corrupt PNG in the middle and a missing file at the end."""
    _, data = trained_run
    files = sorted(str(p) for p in (data / "test").rglob("*") if p.is_file())
    corrupt = tmp_path_factory.mktemp("bad") / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return [*files[:9], str(corrupt), *files[9:], str(corrupt.with_name("missing.jpg"))]


def _assert_same_answers(rows: list[dict], expected: list[dict]) -> None:
    assert [r["path"] for r in rows] == [e["path"] for e in expected]
    for r, e in zip(rows, expected):
        assert set(r) == set(e), r["path"]
        if "error" in e:
            assert r["error"] == e["error"]
            continue
        assert r["label"] == e["label"]
        assert r["score"] == pytest.approx(e["score"], abs=1e-5)
        assert [t["label"] for t in r["top_k"]] == [t["label"] for t in e["top_k"]]
        assert [t["score"] for t in r["top_k"]] == pytest.approx([t["score"] for t in e["top_k"]], abs=1e-5)


@needs_ray
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_ray_rows_equal_single_process_predict(local_ray, trained_run, inputs, tmp_path, capsys, suffix):
    from imgcls.predict_ray import read_predictions

    run, _ = trained_run
    expected = Classifier.load(run).predict(inputs, top_k=2, errors="report")
    for e in expected:  # `imgcls predict --json` leaves out a single-label answer's probabilities
        e.pop("probabilities", None)
    out = tmp_path / f"preds{suffix}"
    # --batch-size 4: 5 actor calls spread over the 2 actors; the rows still come back in input order
    code = main(["predict", str(run), *inputs, "--engine", "ray", "--workers", "2", "--batch-size", "4", "--top-k", "2", "--out", str(out)])
    assert code == 0
    assert "2 of 20 inputs could not be read" in capsys.readouterr().err
    rows = read_predictions(out)
    _assert_same_answers(rows, expected)
    assert "not found" in rows[-1]["error"] and rows[9]["path"].endswith("corrupt.png")
    assert not out.with_name(out.name + ".tmp").exists()
    assert {n["NodeManagerAddress"] for n in local_ray.nodes()} == {"127.0.0.1"}  # the local Ray stays on loopback
    assert local_ray.util.get_node_ip_address() == "127.0.0.1"


@needs_ray
def test_ray_engine_flags_are_checked_before_ray_starts(trained_run, tmp_path, capsys):
    run, data = trained_run
    image = str(next((data / "test").rglob("*.*")))
    assert main(["predict", str(run), image, "--engine", "ray"]) == 2
    assert "--engine ray needs --out" in capsys.readouterr().err
    assert main(["predict", str(run), image, "--out", str(tmp_path / "p.parquet")]) == 2
    assert "--out needs --engine ray" in capsys.readouterr().err
    assert main(["predict", str(run), image, "--engine", "ray", "--out", str(tmp_path / "p.json")]) == 2
    assert "must end in .parquet or .csv" in capsys.readouterr().err


def test_missing_ray_names_the_extra(trained_run, tmp_path, capsys, monkeypatch):
    run, data = trained_run
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    image = str(next((data / "test").rglob("*.*")))
    assert main(["predict", str(run), image, "--engine", "ray", "--out", str(tmp_path / "p.parquet")]) == 2
    err = capsys.readouterr().err
    assert 'pip install "imgcls[ray]"' in err and "ray" in err
    assert not pathlib.Path(tmp_path / "p.parquet").exists()
