"""Tests for the `imgcls` command: in-process through `imgcls.cli.main`, plus real subprocesses
for `--help` (every command listed, torch not imported)."""

from __future__ import annotations

import csv
import io
import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from imgcls.cli import build_parser, main
from synth import make_class_folders

CLASSES = ["circle", "square", "triangle"]
COMMANDS = ["demo", "train", "evaluate", "predict", "models"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed before
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def imgcls_command() -> list[str]:
    script = pathlib.Path(sys.executable).with_name("imgcls")
    if script.is_file():
        return [str(script)]
    found = shutil.which("imgcls")
    return [found] if found else [sys.executable, "-m", "imgcls.cli"]


# ----------------------------------------------------------------------------- help


def test_help_in_a_subprocess_lists_every_command():
    proc = subprocess.run([*imgcls_command(), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"^ {4}([a-z]+)\s", proc.stdout, re.M)
    assert set(COMMANDS) <= set(listed)
    assert listed == subcommands()  # every command the parser has, in its order
    assert "examples:" in proc.stdout


def test_help_does_not_import_torch():
    code = "import imgcls.cli, sys; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    # Building the parser and printing every command's help must not import it either.
    code = (
        "import sys, contextlib, io, imgcls.cli as c\n"
        "for argv in (['--help'], ['train', '--help'], ['evaluate', '--help'], ['predict', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            c.main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return list(action.choices)


EXPECTED_OPTIONS = {
    "train": ["--out", "--epochs", "--img-size", "--batch-size", "--lr", "--resume", "--val-fraction", "--seed", "--quiet"],
    "evaluate": ["--split", "--json", "--out", "--batch-size"],
    "predict": ["--top-k", "--json", "--csv", "--batch-size"],
    "demo": ["--out", "--epochs"],
    "models": [],
}


def test_every_command_is_known():
    assert set(COMMANDS) <= set(subcommands())


@pytest.mark.parametrize("command", subcommands())
def test_each_command_help(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: imgcls {command}")
    for option in EXPECTED_OPTIONS.get(command, []):
        assert option in out, option


def test_no_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


# ----------------------------------------------------------------------------- train


def test_train(capsys, tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=6, size=16, seed=11)
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", data, "--out", run, "--epochs", "2", "--img-size", "16", "--quiet")
    assert code == 0, err
    meta = json.loads((run / "model.json").read_text())
    assert meta["class_names"] == CLASSES and meta["preprocess"]["img_size"] == 16
    assert meta["config"]["train"]["epochs"] == 2 and meta["training"]["epochs_run"] == 2
    assert (run / "checkpoint.safetensors").is_file() and (run / "report" / "report.html").is_file()
    assert "model saved to" in out and str(run) in out
    assert "\r" not in out + err  # --quiet: no progress bars


def test_train_resume_without_checkpoint(capsys, tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=2, size=16)
    (tmp_path / "run").mkdir()
    code, _, err = run_cli(capsys, "train", data, "--out", tmp_path / "run", "--epochs", "1", "--resume", "--quiet")
    assert code == 2
    assert "checkpoint" in err and str(tmp_path / "run") in err
    assert not (tmp_path / "run" / "model.json").exists()


def test_train_over_a_model_needs_overwrite(capsys, tmp_path):
    a = make_class_folders(tmp_path / "a", per_class=4, size=16, seed=11)
    b = make_class_folders(tmp_path / "b", classes=("cross", "ring"), per_class=4, size=16, seed=12)
    run = tmp_path / "run"
    common = ["--out", run, "--epochs", "1", "--img-size", "16", "--batch-size", "4", "--precision", "fp32", "--quiet"]
    assert run_cli(capsys, "train", a, *common)[0] == 0
    model_a = (run / "model.json").read_bytes()
    code, _, err = run_cli(capsys, "train", b, *common)
    assert code == 2 and err.startswith("imgcls: error:") and "Traceback" not in err
    assert str(run) in err and "--resume" in err and "--overwrite" in err
    assert (run / "model.json").read_bytes() == model_a
    # --overwrite, and --exclude-from wired through: the audit marks one of B's files
    audit = tmp_path / "audit.json"
    audit.write_text(json.dumps({"root": str(b), "findings": {"label_issues": [{"paths": ["ring/000.png"], "exclude": ["ring/000.png"]}]}}))
    code, out, err = run_cli(capsys, "train", b, *common, "--overwrite", "--exclude-from", audit)
    assert code == 0, err
    meta = json.loads((run / "model.json").read_text())
    assert meta["class_names"] == ["cross", "ring"] and meta["dataset"]["excluded"] == 1
    assert "left out 1 file(s)" in out


def test_train_deterministic_with_time_budget_is_a_clean_error(capsys, tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=2, size=16)
    code, _, err = run_cli(capsys, "train", data, "--out", tmp_path / "run", "--deterministic", "--time-budget", "1", "--quiet")
    assert code == 2 and "--time-budget" in err and "--epochs" in err
    assert not (tmp_path / "run").exists()


def test_train_on_a_missing_folder_is_a_clean_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", tmp_path / "nowhere", "--out", tmp_path / "run", "--epochs", "1", "--quiet")
    assert code == 2
    assert err.startswith("imgcls: error:") and "nowhere" in err
    assert "Traceback" not in err


def test_train_rejects_bad_flag_values(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", tmp_path, "--out", tmp_path / "run", "--epochs", "0", "--quiet")
    assert code == 2 and "epochs" in err
    with pytest.raises(SystemExit) as e:
        main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--optimizer", "lion"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_json(capsys, trained_run, tmp_path):
    run, data = trained_run
    code, out, err = run_cli(capsys, "evaluate", run, data, "--json", "--out", tmp_path / "report")
    assert code == 0, err
    m = json.loads(out)
    for key in ("accuracy", "top5_accuracy", "macro_f1", "balanced_accuracy", "per_class", "confusion_matrix"):
        assert key in m
    assert "predictions" not in m
    assert m["split"] == "test" and m["num_samples"] == 18
    assert set(m["per_class"]) == set(CLASSES)
    assert 0 <= m["accuracy"] <= 1
    assert (tmp_path / "report" / "report.html").is_file()


def test_evaluate_text(capsys, trained_run, tmp_path):
    run, data = trained_run
    code, out, err = run_cli(capsys, "evaluate", run, data, "--split", "val", "--quiet", "--out", tmp_path / "r")
    assert code == 0, err
    assert "val split" in out and "accuracy" in out and "true \\ predicted" in out
    for c in CLASSES:
        assert c in out


def test_evaluate_unknown_class_exits_2(capsys, trained_run, tmp_path):
    run, _ = trained_run
    data = make_class_folders(tmp_path / "d", classes=("circle", "oval"), per_class=2, size=16)
    code, _, err = run_cli(capsys, "evaluate", run, data, "--json", "--out", tmp_path / "r")
    assert code == 2 and "oval" in err


# ----------------------------------------------------------------------------- predict


@pytest.fixture()
def inputs(trained_run, tmp_path) -> dict[str, pathlib.Path]:
    """A single file, a folder (with a corrupt file inside) and a glob, from the test images."""
    _, data = trained_run
    test_files = sorted(p for p in (data / "test").rglob("*") if p.is_file())
    single = tmp_path / "single.png"
    shutil.copy(test_files[0], single)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(test_files[1], folder / "a.png")
    shutil.copy(test_files[7], folder / "sub" / ("b" + test_files[7].suffix))
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    globbed = tmp_path / "globbed"
    globbed.mkdir()
    for i in range(3):
        shutil.copy(test_files[12 + i], globbed / f"img_{i}{test_files[12 + i].suffix}")
    (globbed / "img_notes.txt").write_text("not an image")
    return {"single": single, "folder": folder, "corrupt": corrupt, "glob": globbed / "img_*"}


def test_predict_json(capsys, trained_run, inputs):
    run, _ = trained_run
    code, out, err = run_cli(capsys, "predict", run, inputs["single"], inputs["folder"], inputs["glob"], "--json", "--top-k", "2")
    assert code == 0, err
    results = json.loads(out)
    assert len(results) == 1 + 3 + 3  # file; folder: a, sub/b, corrupt; glob: 3 images (not the .txt)
    assert results[0]["path"] == str(inputs["single"])
    errors = [r for r in results if "error" in r]
    assert errors == [{"path": str(inputs["corrupt"]), "error": errors[0]["error"]}] and errors[0]["error"]
    for r in results:
        if "error" not in r:
            top = r.get("best_guess") or r  # label "unknown" (below the model's "unknown" threshold) comes with its best guess
            assert set(r) == {"path", "label", "score", "top_k"} | ({"best_guess"} if "best_guess" in r else set())
            assert top["label"] in CLASSES and 0 < r["score"] <= 1
            assert len(r["top_k"]) == 2 and r["top_k"][0]["label"] == top["label"]
    assert "1 of 7" in err


def test_predict_only_bad_input_fails(capsys, trained_run, inputs, tmp_path):
    run, _ = trained_run
    code, out, err = run_cli(capsys, "predict", run, inputs["corrupt"], "--json")
    assert code != 0
    assert json.loads(out) == [{"path": str(inputs["corrupt"]), "error": json.loads(out)[0]["error"]}]
    code, out, err = run_cli(capsys, "predict", run, tmp_path / "does_not_exist.png")
    assert code != 0 and "does_not_exist.png" in out + err


def test_predict_csv(capsys, trained_run, inputs):
    run, _ = trained_run
    code, out, err = run_cli(capsys, "predict", run, inputs["folder"], inputs["single"], "--csv", "--top-k", "3")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["path", "label", "score", "top_k", "error"]
    assert len(rows) == 4
    by_path = {r["path"]: r for r in rows}
    assert by_path[str(inputs["corrupt"])]["error"] and not by_path[str(inputs["corrupt"])]["label"]
    ok = by_path[str(inputs["single"])]
    assert ok["label"] in CLASSES and not ok["error"]
    assert 0 < float(ok["score"]) <= 1
    top = [t.split(":") for t in ok["top_k"].split(";")]
    assert len(top) == 3 and top[0][0] == ok["label"] and {t[0] for t in top} == set(CLASSES)


def test_predict_text(capsys, trained_run, inputs):
    run, _ = trained_run
    code, out, _ = run_cli(capsys, "predict", run, inputs["single"], inputs["corrupt"])
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(str(inputs["single"])) and any(c in lines[0] for c in CLASSES)
    assert "ERROR" in lines[1]


def test_predict_json_and_csv_are_exclusive(capsys, trained_run, inputs):
    with pytest.raises(SystemExit) as e:
        main(["predict", str(trained_run[0]), str(inputs["single"]), "--json", "--csv"])
    assert e.value.code == 2


def test_predict_on_a_folder_that_is_not_a_model(capsys, tmp_path, inputs):
    code, _, err = run_cli(capsys, "predict", tmp_path, inputs["single"])
    assert code == 2 and "model.json" in err


def test_models_lists_small_cnn(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    assert any(line.startswith("small_cnn") for line in out.splitlines())
