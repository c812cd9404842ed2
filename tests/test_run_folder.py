"""Tests for the run folder as a unit: a run never trains over another model unless told to
(--resume, --overwrite), --overwrite leaves nothing of the earlier run, writes replace links planted
in the folder instead of writing through them, and `imgcls evaluate MODEL ..` keeps its report
inside MODEL/evaluation."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import pytest
import torch

from imgcls.config import DataConfig, RunConfig, TrainConfig
from imgcls.evaluate import evaluate
from imgcls.training.fit import fit
from imgcls.training.prepare import RunFolderError, check_run_folder
from imgcls.transforms import AugmentSpec
from synth import make_class_folders


def quiet(_: str) -> None:
    """fit()'s log callback, silenced."""


@pytest.fixture(autouse=True)
def _restore_global_torch_state():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_cfg(data: pathlib.Path, out: pathlib.Path) -> RunConfig:
    """One epoch on a dozen 16 px images: a run folder in about a second."""
    return RunConfig(
        data=DataConfig(path=str(data), img_size=16, val_fraction=0.25, seed=0),
        # fp32: no precision trial, which costs more than the run itself here
        train=TrainConfig(out=str(out), epochs=1, batch_size=4, precision="fp32", augment=AugmentSpec(crop="translate")),
    )


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """Data A (circle/square/triangle) and data B (other class names), 4 images per class."""
    base = tmp_path_factory.mktemp("sets")
    a = make_class_folders(base / "a", per_class=4, size=16, seed=1)
    b = make_class_folders(base / "b", classes=("cross", "ring"), per_class=4, size=16, seed=2)
    return a, b


def meta_of(run: pathlib.Path) -> dict:
    return json.loads((run / "model.json").read_text())


def earlier_model(run: pathlib.Path, *names: str) -> pathlib.Path:
    """RUN with the files by which a folder holds a model (contents do not matter: the rule goes by name)."""
    run.mkdir(parents=True, exist_ok=True)
    for name in names or ("model.json", "model.safetensors", "checkpoint.safetensors"):
        (run / name).write_text(f"{name} of model A")
    return run


# ----------------------------------------------------------------------------- a folder with a model


@pytest.mark.parametrize(
    "held", [("model.json", "model.safetensors", "checkpoint.safetensors"), ("model.json",), ("checkpoint.safetensors",)]
)  # a checkpoint alone: a run killed before its first kept model
def test_training_over_another_model_is_refused_and_leaves_it_intact(two_sets, tmp_path, held):
    _, b = two_sets
    run = earlier_model(tmp_path / "run", *held)
    (run / "split.json").write_text("of model A")
    (run / "report").mkdir()
    (run / "report" / "report.html").write_text("of model A")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderError) as e:
        fit(tiny_cfg(b, run), progress=False, log=quiet)
    msg = str(e.value)
    assert str(run) in msg and "--resume" in msg and "--overwrite" in msg and held[0] in msg
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing removed


def test_resume_and_overwrite_together_are_refused(tmp_path):
    run = earlier_model(tmp_path / "run")
    with pytest.raises(ValueError, match="choose one"):
        check_run_folder(run, resume=True, overwrite=True)
    assert len(list(run.iterdir())) == 3


def test_overwrite_with_unusable_data_keeps_the_earlier_model(tmp_path):
    run = earlier_model(tmp_path / "run")
    with pytest.raises(ValueError, match="nowhere"):
        fit(tiny_cfg(tmp_path / "nowhere", run), overwrite=True, progress=False, log=quiet)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.safetensors", "model.json", "model.safetensors"]


def test_overwrite_leaves_nothing_of_the_earlier_run(two_sets, tmp_path):
    _, b = two_sets
    run = earlier_model(tmp_path / "run")
    # What else describes model A: its history and split, bad files it skipped, an export, an
    # evaluation, its report and probe sweep, and the temp file of a write a kill interrupted.
    stale = ["metrics.csv", "split.json", "bad_files.csv", "model.onnx", "model.int8.onnx", "probe.csv", ".model.json.123.abcd1234.tmp"]
    (run / "report").mkdir()
    (run / "report" / "top_losses.png").write_text("of model A")  # a name this run's report may not write
    for name in stale:
        (run / name).write_text("of model A")
    (run / "evaluation" / "a").mkdir(parents=True)
    (run / "evaluation" / "a" / "report.html").write_text("of model A")
    (run / "notes.txt").write_text("the user's own")  # not a name imgcls writes: kept
    (run / "audit.json").write_text("{}")  # describes data, not a model: kept
    lines: list[str] = []
    fit(tiny_cfg(b, run), overwrite=True, progress=False, log=lines.append)
    meta = meta_of(run)
    assert meta["class_names"] == ["cross", "ring"] and meta["dataset"]["bad_files"] == 0
    for name in stale:
        assert not (run / name).exists() or b"model A" not in (run / name).read_bytes(), name
    assert not (run / "bad_files.csv").exists() and not (run / "model.onnx").exists()
    assert not (run / "evaluation").exists() and not (run / "report" / "top_losses.png").exists()
    assert (run / "notes.txt").read_text() == "the user's own" and (run / "audit.json").exists()
    split = json.loads((run / "split.json").read_text())
    assert all(p.split(os.sep)[0] in ("cross", "ring") for paths in split.values() for p in paths)
    assert any("removed from" in m and "bad_files.csv" in m for m in lines)


def test_a_new_run_removes_stale_run_files_in_a_folder_without_a_model(two_sets, tmp_path):
    a, _ = two_sets
    run = tmp_path / "run"
    run.mkdir()
    (run / "bad_files.csv").write_text("path,reason\nold.png,broken\n")  # left by a run killed before its first model
    (run / "report").mkdir()
    (run / "report" / "mine.txt").write_text("kept")  # folders are only cleared with --overwrite
    fit(tiny_cfg(a, run), progress=False, log=quiet)
    assert not (run / "bad_files.csv").exists()  # this run had no bad files: nothing may say otherwise
    assert (run / "report" / "mine.txt").read_text() == "kept"


# ----------------------------------------------------------------------------- links planted in the folder


LINKED = ["bad_files.csv", "metrics.csv", "split.json", "report/report.html"]


def plant_links(run: pathlib.Path, outside: pathlib.Path) -> dict[str, bytes]:
    """A link in RUN for each LINKED name, to its own file in OUTSIDE; the outside files' bytes."""
    outside.mkdir(parents=True, exist_ok=True)
    targets = {}
    for name in LINKED:
        target = outside / name.replace("/", "_")
        target.write_bytes(f"precious {name}\n".encode())
        link = run / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
        targets[str(target)] = target.read_bytes()
    return targets


def assert_real_files_and_outside_intact(run: pathlib.Path, targets: dict[str, bytes]) -> None:
    for target, content in targets.items():
        assert pathlib.Path(target).read_bytes() == content, target
    for name in LINKED:
        p = run / name
        assert not p.is_symlink(), name
    for name in ("metrics.csv", "split.json", "report/report.html"):
        assert (run / name).is_file() and b"precious" not in (run / name).read_bytes(), name


def with_a_bad_file(base: pathlib.Path) -> pathlib.Path:
    """Data A with one undecodable file, so the run writes bad_files.csv."""
    data = make_class_folders(base, per_class=4, size=16, seed=1)
    (data / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return data


def test_links_in_a_fresh_folder_are_replaced_not_written_through(tmp_path):
    data = with_a_bad_file(tmp_path / "data")
    run = tmp_path / "run"
    targets = plant_links(run, tmp_path / "outside")
    fit(tiny_cfg(data, run), progress=False, log=quiet)
    assert_real_files_and_outside_intact(run, targets)
    assert "broken.png" in (run / "bad_files.csv").read_text()


def test_links_in_an_overwritten_folder_are_removed_not_followed(two_sets, tmp_path):
    a, _ = two_sets
    run = earlier_model(tmp_path / "run")
    targets = plant_links(run, tmp_path / "outside")
    outside_dir = tmp_path / "outside_evaluation"
    outside_dir.mkdir()
    (outside_dir / "keep.txt").write_text("precious")
    (run / "evaluation").symlink_to(outside_dir, target_is_directory=True)
    fit(tiny_cfg(a, run), overwrite=True, progress=False, log=quiet)
    assert_real_files_and_outside_intact(run, targets)
    assert not (run / "bad_files.csv").exists()  # no bad files this time: the link went, no file came
    assert (outside_dir / "keep.txt").read_text() == "precious" and not (run / "evaluation").exists()


def test_a_report_folder_link_is_removed_before_the_run_writes(two_sets, tmp_path):
    a, _ = two_sets
    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "report").symlink_to(outside, target_is_directory=True)
    fit(tiny_cfg(a, run), progress=False, log=quiet)
    assert list(outside.iterdir()) == []  # the report did not land where the link pointed
    assert not (run / "report").is_symlink() and (run / "report" / "report.html").is_file()


# ----------------------------------------------------------------------------- evaluate's default output folder


@pytest.mark.parametrize("how", ["dotdot", "dot"])
def test_evaluate_default_output_stays_in_model_evaluation(trained_run, tmp_path, monkeypatch, how):
    src, data = trained_run
    run = tmp_path / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("evaluation"))  # the shared run folder is read-only for tests
    before = sorted(p.name for p in run.iterdir())
    if how == "dotdot":  # `imgcls evaluate run ..` from inside DATA/test
        monkeypatch.chdir(data / "test")
        m = evaluate(run, "..", progress=False, log=quiet)
    else:  # `imgcls evaluate run .` from inside DATA
        monkeypatch.chdir(data)
        m = evaluate(run, ".", progress=False, log=quiet)
    expected = run / "evaluation" / data.name
    assert pathlib.Path(m["report"]) == expected / "report.html" and (expected / "metrics.json").is_file()
    assert sorted(p.name for p in run.iterdir()) == sorted({*before, "evaluation"})  # nothing new beside the model
    assert sorted(p.name for p in (run / "evaluation").iterdir()) == [data.name]
