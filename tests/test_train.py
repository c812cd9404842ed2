"""Tests for imgcls.training.fit: fit() end to end on generated images, the run folder,
determinism, early stopping, resume after an interruption, the generic recipe, and the
learning-rate schedule's shapes."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import imgcls.training.fit as fit_mod
from badfiles import make_bad_files
from imgcls.artifact import load_artifact
from imgcls.config import DataConfig, RunConfig, TrainConfig
from imgcls.report import HISTORY_FIELDS
from imgcls.runtime import cpu_has_fast_bf16, default_threads
from imgcls.training.checkpoint import CHECKPOINT_FILE, read_checkpoint
from imgcls.training.fit import fit
from imgcls.training.schedule import lr_factor, steps_per_epoch
from imgcls.transforms import AugmentSpec
from interrupt import interrupt_epoch
from synth import make_class_folders, make_split_folders, write_images

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def quiet(_: str) -> None:
    """fit()'s log callback, silenced."""


def make_cfg(
    data: pathlib.Path, out: pathlib.Path, epochs: int = 3, val_fraction: float = 0.25, seed: int = 0, **train: object
) -> RunConfig:
    # The learning rate, optimizer and schedule are left to the default recipe.
    train = {"batch_size": 16, "augment": AugmentSpec(crop="translate"), **train}
    return RunConfig(
        data=DataConfig(path=str(data), img_size=16, val_fraction=val_fraction, seed=seed),
        train=TrainConfig(out=str(out), epochs=epochs, **train),
    )


def read_history(run: pathlib.Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def meta_of(run: pathlib.Path) -> dict:
    return json.loads((run / "model.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def _restore_global_torch_state():
    """fit(deterministic=True) switches deterministic algorithms on process-wide; switch back."""
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- one full run


@pytest.fixture(scope="module")
def basic_run(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path, list[str]]:
    """3 classes x 20 images with the 5 undecodable files of the bad-file corpus in 'circle'."""
    base = tmp_path_factory.mktemp("basic")
    data = make_class_folders(base / "data", per_class=20, size=24, seed=3)
    corpus = base / "corpus"
    expect = make_bad_files(corpus)
    bad = sorted(n for n, e in expect.items() if e == "error")
    for name in bad:
        shutil.copy(corpus / name, data / "circle" / f"bad_{name}")
    run = fit(make_cfg(data, base / "run", epochs=3, batch_size=8), progress=False, log=quiet)
    return run, data, [f"bad_{n}" for n in bad]


def test_run_folder_contents(basic_run):
    run, _, _ = basic_run
    for name in ("model.safetensors", "model.json", CHECKPOINT_FILE, "metrics.csv", "split.json", "bad_files.csv"):
        assert (run / name).is_file(), name
    for name in ("confusion_matrix.png", "training_curves.png"):
        assert (run / "report" / name).read_bytes()[:8] == PNG_MAGIC
    assert (run / "report" / "report.html").is_file()
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))  # atomic writes cleaned up


def test_model_json_records_where_the_model_came_from(basic_run):
    run, data, _ = basic_run
    meta = meta_of(run)
    assert meta["format"] == "imgcls-model"
    assert meta["arch"] == "small_cnn"
    assert meta["num_classes"] == 3 and meta["class_names"] == ["circle", "square", "triangle"]
    assert meta["preprocess"]["img_size"] == 16 and meta["preprocess"]["resize_mode"] == "crop"
    assert meta["seed"] == 0
    assert meta["config"]["data"]["path"] == str(data) and meta["config"]["train"]["epochs"] == 3
    assert RunConfig.from_dict(meta["config"]) == make_cfg(data, run, epochs=3, batch_size=8)  # the resolved config round-trips
    assert meta["split"]["method"] == "stratified" and meta["split"]["val_fraction"] == 0.25
    assert meta["split"]["counts"] == {"train": 45, "val": 15}  # 20 good per class, 5 held out
    assert len(meta["dataset"]["fingerprint"]) == 64
    assert meta["dataset"]["bad_files"] == 5
    assert {"imgcls", "torch", "numpy", "pillow", "python"} <= set(meta["versions"])
    assert meta["versions"]["torch"] == torch.__version__
    val = meta["metrics"]["val"]
    for key in ("accuracy", "top5_accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix"):
        assert key in val
    assert val["num_samples"] == 15
    assert np.asarray(val["confusion_matrix"]).sum() == 15
    assert meta["training"]["epochs_run"] == 3 and 1 <= meta["training"]["best_epoch"] <= 3


def test_accuracy_is_well_above_chance(basic_run):
    run, _, _ = basic_run
    meta = meta_of(run)
    assert meta["metrics"]["val"]["accuracy"] >= 0.75  # chance is 1/3
    _, rows = read_history(run)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_metrics_csv_has_one_row_per_epoch(basic_run):
    run, _, _ = basic_run
    fields, rows = read_history(run)
    assert fields == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "images_per_s"] == HISTORY_FIELDS
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for r in rows:
        values = {k: float(v) for k, v in r.items()}
        assert all(math.isfinite(v) for v in values.values())
        assert 0 <= values["train_acc"] <= 1 and 0 <= values["val_acc"] <= 1
        assert values["lr"] > 0 and values["images_per_s"] > 0
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"])  # cosine decays after the warmup epoch


def test_split_json_partitions_the_good_files(basic_run):
    run, data, _ = basic_run
    split = json.loads((run / "split.json").read_text())
    assert set(split) == {"train", "val"}
    train, val = set(split["train"]), set(split["val"])
    assert not train & val
    good = {p.relative_to(data).as_posix() for p in data.rglob("*.png") if not p.name.startswith("bad_")}
    assert train | val == good  # relative to DATA, bad files left out
    for cls in ("circle", "square", "triangle"):  # stratified: every class on both sides
        assert any(p.startswith(cls + "/") for p in val) and any(p.startswith(cls + "/") for p in train)
    assert meta_of(run)["split"]["counts"] == {"train": len(train), "val": len(val)}


def test_bad_files_are_listed_and_skipped(basic_run):
    run, data, bad = basic_run
    with open(run / "bad_files.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(pathlib.Path(r["path"]).name for r in rows) == sorted(bad)
    for r in rows:
        assert pathlib.Path(r["path"]).parent == data / "circle"
        assert r["reason"].strip()


def test_checkpoint_holds_the_last_epoch_and_the_config(basic_run):
    run, data, _ = basic_run
    with safe_open(str(run / CHECKPOINT_FILE), framework="pt") as f:
        state = json.loads(f.metadata()["imgcls_checkpoint"])
        keys = list(f.keys())
    assert state["epoch"] == 2 and len(state["history"]) == 3
    assert any(k.startswith("model.") for k in keys) and any(k.startswith("optim.") for k in keys)
    cfg, saved = read_checkpoint(run)
    assert cfg.data.path == str(data) and saved.epoch == 2 and saved.history == state["history"]


def test_split_folders_with_test_split_give_test_metrics(trained_run):
    run, _ = trained_run
    meta = meta_of(run)
    assert set(meta["metrics"]) == {"val", "test"}
    assert meta["split"]["method"] == "folders" and meta["split"]["counts"] == {"train": 48, "val": 18, "test": 18}
    assert meta["metrics"]["test"]["num_samples"] == 18
    assert meta["metrics"]["test"]["accuracy"] >= 0.6
    split = json.loads((run / "split.json").read_text())
    assert all(p.startswith("test/") for p in split["test"]) and all(p.startswith("valid/") for p in split["val"])


def test_time_budget_leaves_the_test_split_to_evaluate(tmp_path):
    """Under --time-budget the budget goes to training: val is evaluated at the end, test is not
    (and the log says how to evaluate it)."""
    data = make_split_folders(tmp_path / "data", per_split={"train": 8, "valid": 4, "test": 4}, size=16, seed=2)
    lines: list[str] = []
    run = fit(make_cfg(data, tmp_path / "run", epochs=1, time_budget=0.2), progress=False, log=lines.append)
    meta = meta_of(run)
    assert set(meta["metrics"]) == {"val"} and meta["split"]["counts"]["test"] == 12
    assert any("test split not evaluated" in s and f"imgcls evaluate {run}" in s for s in lines)


def test_val_fraction_zero_keeps_the_last_epoch(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=8, size=16, seed=4)
    run = fit(make_cfg(data, tmp_path / "run", epochs=2, val_fraction=0.0), progress=False, log=quiet)
    meta = meta_of(run)
    assert meta["split"]["counts"] == {"train": 24}
    assert meta["training"]["best_epoch"] == 2 and meta["training"]["epochs_run"] == 2
    assert meta["metrics"] == {}
    _, rows = read_history(run)
    assert len(rows) == 2 and all(r["val_acc"] == "nan" for r in rows)
    final = load_file(str(run / "model.safetensors"))
    last = {k[len("model.") :]: v for k, v in load_file(str(run / CHECKPOINT_FILE)).items() if k.startswith("model.")}
    assert final.keys() == last.keys()
    assert all(torch.equal(final[k], last[k]) for k in final)


def test_early_stopping(tmp_path):
    """Validation folders whose labels are swapped get worse as training learns: stop at once."""
    data = make_split_folders(tmp_path / "data", classes=("circle", "square"), per_split={"train": 16}, size=16, seed=5)
    rng = np.random.default_rng(6)
    write_images(data / "val" / "circle", 1, 2, 8, 16, rng, "RGB", ".png")  # squares labelled circle
    write_images(data / "val" / "square", 0, 2, 8, 16, rng, "RGB", ".png")
    max_epochs = 6
    run = fit(make_cfg(data, tmp_path / "run", epochs=max_epochs, patience=1), progress=False, log=quiet)
    training = meta_of(run)["training"]
    assert training["stopped_early"] is True
    assert training["epochs_run"] < max_epochs
    assert training["best_epoch"] == training["epochs_run"] - 1  # patience 1: one bad epoch ends it
    _, rows = read_history(run)
    assert len(rows) == training["epochs_run"]


# ----------------------------------------------------------------------------- the generic recipe


def test_generic_recipe_trains_small_cnn_with_its_optimizer_and_schedule(tmp_path):
    """--recipe generic on small_cnn: AdamW with decay / no-decay groups, one warmup epoch then
    cosine, every epoch's logged rate the schedule's; the model is kept and beats chance."""
    data = make_class_folders(tmp_path / "data", per_class=12, size=16, seed=3)
    run = fit(make_cfg(data, tmp_path / "run", epochs=4, recipe="generic", batch_size=8, precision="fp32"), progress=False, log=quiet)
    meta = meta_of(run)
    assert meta["recipe"]["name"] == "generic" and meta["recipe"]["optimizer"] == "adamw" and meta["recipe"]["schedule"] == "cosine"
    assert meta["metrics"]["val"]["accuracy"] > 0.6  # chance is 1/3
    lr = meta["recipe"]["lr"]
    spe = steps_per_epoch(meta["split"]["counts"]["train"], 8)
    _, rows = read_history(run)
    # the rate of each epoch's last step: warmup over the first epoch (warmup_epochs 1), cosine over 4
    expected = [lr * lr_factor((e + 1) * spe - 1, 4 * spe, spe, "cosine") for e in range(4)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-5)
    with safe_open(str(run / CHECKPOINT_FILE), framework="pt") as f:
        groups = json.loads(f.metadata()["imgcls_checkpoint"])["param_groups"]
    assert [g["weight_decay"] for g in groups] == [meta["recipe"]["weight_decay"], 0.0]  # weights, then biases and norms
    assert all(g["initial_lr"] == lr for g in groups)
    model, _ = load_artifact(run)
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 3)


# ----------------------------------------------------------------------------- determinism and resume


def det_cfg(data: pathlib.Path, out: pathlib.Path) -> RunConfig:
    aug = AugmentSpec(crop="translate", hflip=True, color_jitter=0.2)
    return make_cfg(data, out, epochs=3, precision="fp32", deterministic=True, augment=aug)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    base = tmp_path_factory.mktemp("det")
    data = make_class_folders(base / "data", per_class=10, size=16, seed=7)
    return data, fit(det_cfg(data, base / "a"), progress=False, log=quiet)


def tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6), k


DETERMINISTIC_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]  # not the timings


def test_same_seed_same_result(reference_run, tmp_path):
    data, run_a = reference_run
    run_b = fit(det_cfg(data, tmp_path / "b"), progress=False, log=quiet)
    assert meta_of(run_a)["metrics"]["val"] == meta_of(run_b)["metrics"]["val"]
    assert meta_of(run_a)["dataset"]["fingerprint"] == meta_of(run_b)["dataset"]["fingerprint"]
    _, ha = read_history(run_a)
    _, hb = read_history(run_b)
    assert [[r[k] for k in DETERMINISTIC_FIELDS] for r in ha] == [[r[k] for k in DETERMINISTIC_FIELDS] for r in hb]
    assert_same_tensors(tensors(run_a / "model.safetensors"), tensors(run_b / "model.safetensors"))
    assert (run_a / "split.json").read_text() == (run_b / "split.json").read_text()


def test_different_seed_different_split(reference_run, tmp_path):
    data, run_a = reference_run
    cfg = det_cfg(data, tmp_path / "c")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=1), train=dataclasses.replace(cfg.train, epochs=1))
    run_c = fit(cfg, progress=False, log=quiet)
    assert json.loads((run_a / "split.json").read_text())["val"] != json.loads((run_c / "split.json").read_text())["val"]


def test_resume_after_interrupt_matches_an_uninterrupted_run(reference_run, tmp_path, monkeypatch):
    data, run_a = reference_run
    out_b = tmp_path / "b"
    interrupt_epoch(monkeypatch, 3)  # Ctrl-C during the third epoch
    with pytest.raises(KeyboardInterrupt):
        fit(det_cfg(data, out_b), progress=False, log=quiet)
    monkeypatch.undo()
    real = fit_mod.train_one_epoch
    _, partial = read_history(out_b)
    assert [r["epoch"] for r in partial] == ["1", "2"]
    with safe_open(str(out_b / CHECKPOINT_FILE), framework="pt") as f:
        assert json.loads(f.metadata()["imgcls_checkpoint"])["epoch"] == 1

    messages: list[str] = []
    first_steps: list[int] = []

    def recorded(*args, **kwargs):
        first_steps.append(args[7])  # first_step: the global index of the pass's first step
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_mod, "train_one_epoch", recorded)
    # resume=True takes the saved config: the epochs given here must not matter.
    other = make_cfg(data, out_b, epochs=1)
    fit(other, resume=True, progress=False, log=messages.append)
    assert any("resumed after epoch 2/3" in m for m in messages)
    spe = steps_per_epoch(meta_of(out_b)["split"]["counts"]["train"], 16)
    assert first_steps == [2 * spe]  # only the third epoch trains, from where the second ended

    _, ha = read_history(run_a)
    _, hb = read_history(out_b)
    assert len(hb) == 3
    for ra, rb in zip(ha, hb):
        for k in DETERMINISTIC_FIELDS:
            assert float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-5, abs=1e-6), (ra["epoch"], k)
    assert_same_tensors(tensors(run_a / "model.safetensors"), tensors(out_b / "model.safetensors"))
    assert_same_tensors(tensors(run_a / CHECKPOINT_FILE), tensors(out_b / CHECKPOINT_FILE))  # optimizer state too
    ma, mb = meta_of(run_a), meta_of(out_b)
    assert ma["training"]["best_epoch"] == mb["training"]["best_epoch"]
    assert ma["metrics"]["val"]["accuracy"] == pytest.approx(mb["metrics"]["val"]["accuracy"])
    assert ma["metrics"]["val"]["confusion_matrix"] == mb["metrics"]["val"]["confusion_matrix"]


def test_resume_without_checkpoint_fails_clearly(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=2, size=16)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        fit(make_cfg(data, tmp_path / "empty_run"), resume=True, progress=False, log=quiet)


# ----------------------------------------------------------------------------- learning-rate schedule


def test_lr_warmup_ramps_linearly_to_one():
    f = [lr_factor(s, 100, 10, "cosine") for s in range(10)]
    assert f == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(0, 100, 0, "cosine") == pytest.approx(1.0)  # no warmup: full rate at once


def test_lr_cosine_decays_to_near_zero():
    total, warm = 100, 10
    f = [lr_factor(s, total, warm, "cosine") for s in range(warm, total)]
    assert all(a >= b for a, b in zip(f, f[1:]))
    assert f[-1] < 1e-3
    assert lr_factor(warm + 45, total, warm, "cosine") == pytest.approx(0.5)  # halfway
    assert lr_factor(total + 5, total, warm, "cosine") == pytest.approx(0.0, abs=1e-12)  # clamped past the end


def test_lr_onecycle_is_linear_and_constant_is_flat():
    total, warm = 60, 10
    f = np.array([lr_factor(s, total, warm, "onecycle") for s in range(warm, total)])
    assert np.allclose(np.diff(f), -1 / 50)
    assert f[0] == pytest.approx(1.0) and f[-1] == pytest.approx(1 / 50)
    assert [lr_factor(s, total, warm, "constant") for s in (0, 9, 10, 59)] == pytest.approx([0.1, 1.0, 1.0, 1.0])


def test_fit_puts_torch_process_settings_back(tmp_path):
    data = make_split_folders(tmp_path / "data", per_split={"train": 8}, size=16, seed=0)
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    fit(make_cfg(data, tmp_path / "run", epochs=1, threads=1, deterministic=True), progress=False, log=lambda _: None)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


# ----------------------------------------------------------------------------- --deterministic: nothing chosen from a timing


def no_timing(*args, **kwargs):
    raise AssertionError("a deterministic run timed something to decide")


def test_deterministic_runs_time_nothing_and_train_identical_weights(tmp_path, monkeypatch):
    import imgcls.training.build as build_mod
    import imgcls.training.plan as plan_mod

    # The precision trial (and any other timing a choice could come from) must not run at all; on
    # a busy machine it picked bf16 in 11 and fp32 in 7 of 18 identical runs.
    monkeypatch.setattr(build_mod, "faster_train_dtype", no_timing)
    monkeypatch.setattr(plan_mod, "time_train_steps", no_timing)
    monkeypatch.setattr(plan_mod, "time_eval", no_timing)
    data = make_class_folders(tmp_path / "data", per_class=5, size=16, seed=4)
    runs = [fit(make_cfg(data, tmp_path / name, epochs=2, batch_size=4, deterministic=True), progress=False, log=quiet) for name in "ab"]
    a, b = (tensors(r / "model.safetensors") for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = meta_of(runs[0])
    pinned = "bf16" if cpu_has_fast_bf16() else "fp32"
    assert meta["config"]["train"]["precision"] == pinned  # recorded as the rule resolved it, not "auto"
    assert meta["precision"] == ("bfloat16" if pinned == "bf16" else "float32")
    assert meta["config"]["train"]["threads"] == meta["threads"] == default_threads()


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_deterministic_pins_precision_and_threads_by_rule(monkeypatch, fast_bf16):
    import imgcls.runtime as runtime

    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: fast_bf16)
    cfg = make_cfg(pathlib.Path("d"), pathlib.Path("o"), deterministic=True, device="cpu")
    pinned = fit_mod.pin_timed_choices(cfg, quiet)
    assert pinned.train.precision == ("bf16" if fast_bf16 else "fp32") and pinned.train.threads == default_threads()
    assert fit_mod.pin_timed_choices(pinned, quiet) == pinned  # a resumed run keeps what was pinned
    explicit = make_cfg(pathlib.Path("d"), pathlib.Path("o"), deterministic=True, precision="fp32", threads=1)
    assert fit_mod.pin_timed_choices(explicit, quiet).train == explicit.train  # what the user gave stays


def test_deterministic_with_a_time_budget_is_refused_before_anything_is_written(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=2, size=16)
    cfg = make_cfg(data, tmp_path / "run", epochs=None, deterministic=True, time_budget=0.5)
    with pytest.raises(ValueError, match="--time-budget"):
        fit(cfg, progress=False, log=quiet)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the data audit inside training


def test_training_warns_about_duplicates_across_splits_and_labels(tmp_path):
    data = make_split_folders(tmp_path / "data", per_split={"train": 4, "val": 2}, size=16, seed=5)
    shutil.copy(data / "train" / "circle" / "000.png", data / "val" / "circle" / "leak.png")  # in train and val
    shutil.copy(data / "train" / "circle" / "001.png", data / "train" / "square" / "twice.png")  # under two classes
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    lines: list[str] = []
    fit(make_cfg(data, tmp_path / "run", epochs=1, batch_size=4, precision="fp32"), progress=False, log=lines.append)
    leak = [m for m in lines if "more than one split" in m]
    conflict = [m for m in lines if "more than one class" in m]
    assert len(leak) == 1 and leak[0].startswith("warning: 1 images") and f"imgcls audit {data}" in leak[0]
    assert len(conflict) == 1 and f"imgcls audit {data}" in conflict[0]
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # nothing moved or deleted
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert "circle/leak.png" in [p.replace(os.sep, "/").split("/", 1)[1] for p in split["val"]]  # still trained/validated on


def test_exclude_from_leaves_out_the_files_an_audit_marks(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=5, size=16, seed=6)
    audit = {
        "root": str(data),
        "findings": {
            "label_issues": [{"paths": ["circle/001.png"], "exclude": ["circle/001.png"]}],
            "exact_duplicates": [{"paths": ["square/000.png", "square/003.png"], "exclude": ["square/003.png"]}],
            "outliers": [{"paths": ["triangle/002.png"], "exclude": []}],  # flagged, not marked: stays
        },
    }
    audit_json = tmp_path / "audit.json"
    audit_json.write_text(json.dumps(audit))
    cfg = make_cfg(data, tmp_path / "run", epochs=1, batch_size=4, precision="fp32")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, exclude_from=str(audit_json)))
    lines: list[str] = []
    run = fit(cfg, progress=False, log=lines.append)
    used = sorted(p for paths in json.loads((run / "split.json").read_text()).values() for p in paths)
    assert len(used) == 13
    assert os.path.join("circle", "001.png") not in used and os.path.join("square", "003.png") not in used
    assert os.path.join("square", "000.png") in used and os.path.join("triangle", "002.png") in used
    meta = meta_of(run)
    assert meta["dataset"]["excluded"] == 2 and meta["config"]["data"]["exclude_from"] == str(audit_json)
    assert any("left out 2 file(s)" in m for m in lines)
    assert not [m for m in lines if "imgcls audit" in m]  # no duplicates left, balanced: no audit warning
