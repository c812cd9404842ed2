"""Crash-safe training (issue 16): `imgcls train` killed with SIGKILL mid-epoch resumes to the same
weights as an uninterrupted run; a kill during a checkpoint or model write leaves the previous one
loadable; a full disk is an error naming the file, and leaves the last checkpoint as it was.

The kills and the full disk are real: `imgcls train` runs as a subprocess, SIGKILLed from here, or
killing itself halfway through writing a checkpoint, or under RLIMIT_FSIZE (writes past the limit fail
with EFBIG, as on a full disk). The uninterrupted reference and the resumes run in this process
(`imgcls.cli.main`), which saves a torch import each.
"""

from __future__ import annotations

import csv
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from imgcls.artifact import WEIGHTS_FILE, load_artifact, save_artifact
from imgcls.atomic import WriteError
from imgcls.cli import main
from imgcls.training.checkpoint import CHECKPOINT_FILE, read_checkpoint
from synth import make_class_folders

EPOCHS = 5
TIMEOUT_S = 120  # per subprocess: nothing here may hang


def train_args(data: Path, out: Path) -> list[str]:
    # --deterministic: fp32 and a fixed thread count, so two runs with one seed give equal weights.
    return [
        "train", str(data), "--out", str(out), "--model", "small_cnn", "--img-size", "16", "--epochs", str(EPOCHS),
        "--batch-size", "8", "--seed", "0", "--deterministic", "--threads", "1", "--quiet",
    ]  # fmt: skip


def train_command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "imgcls.cli", *train_args(data, out)]


def run_main(argv: list[str]) -> None:
    assert main(argv) == 0


@pytest.fixture(scope="module", autouse=True)
def _restore_global_torch_state():
    """main() puts back what fit() changes; this checks nothing leaks into the other test modules."""
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_class_folders(tmp_path_factory.mktemp("crash") / "data", per_class=12, size=16, seed=3)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("crash") / "ref"
    run_main(train_args(data, out))
    return out


def checkpoint_epoch(run: Path) -> int:
    """The checkpoint's last finished epoch (0-based), -1 while there is none."""
    try:
        with safe_open(str(run / CHECKPOINT_FILE), framework="pt") as f:
            return json.loads(f.metadata()["imgcls_checkpoint"])["epoch"]
    except FileNotFoundError:
        return -1


def history_epochs(run: Path) -> list[int]:
    with open(run / "metrics.csv", newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def temp_files(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob(".*.tmp"))


@pytest.fixture(scope="module")
def killed_run(data, tmp_path_factory) -> Path:
    """A run SIGKILLed during an epoch after its first: tests copy it, never change it."""
    out = tmp_path_factory.mktemp("crash") / "killed"
    proc = subprocess.Popen(train_command(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while checkpoint_epoch(out) < 0:  # the first epoch's checkpoint: the next epoch has begun
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.01)
        with open(out / "metrics.csv", newline="") as f:
            first_epoch_s = float(next(csv.DictReader(f))["epoch_time_s"])
        time.sleep(min(first_epoch_s / 2, 0.3))  # into the epoch, not at its start
        assert proc.poll() is None, "the run finished before the kill; give it more epochs"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def assert_equal_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{a} and {b} differ in {different}"


def best_epoch(run: Path) -> int:
    return json.loads((run / "model.json").read_text())["training"]["best_epoch"]


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(killed_run, reference, data, tmp_path):
    done = checkpoint_epoch(killed_run)
    assert 0 <= done < EPOCHS - 1  # killed after a finished epoch, with epochs left
    assert history_epochs(killed_run)[: done + 1] == list(range(1, done + 2))
    assert not (killed_run / "report").exists()  # it never got to the end

    run = copy_run(killed_run, tmp_path / "run")
    run_main([*train_args(data, run), "--resume"])

    assert history_epochs(run) == list(range(1, EPOCHS + 1))  # each epoch once: none lost, none repeated
    assert checkpoint_epoch(run) == EPOCHS - 1 and (run / "report" / "report.html").is_file()
    assert_equal_tensors(reference / WEIGHTS_FILE, run / WEIGHTS_FILE)
    assert_equal_tensors(reference / CHECKPOINT_FILE, run / CHECKPOINT_FILE)  # the optimizer state too
    assert best_epoch(run) == best_epoch(reference)
    assert temp_files(run) == []


# `imgcls train ARGS` whose second checkpoint write writes half of the file and then SIGKILLs its own
# process: a kill during the write, every time. (imgcls.atomic opens its temp files with `open`; a
# module global named `open` comes before the builtin.)
DIE_IN_SECOND_CHECKPOINT = f"""
import os, signal, sys
import imgcls.atomic
from imgcls.cli import main

class HalfThenKill:
    def __init__(self, f):
        self.f = f
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()
    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

opened = []

def open_then_die(path, mode="r", *args, **kwargs):
    f = open(path, mode, *args, **kwargs)
    if "w" in mode and os.path.basename(path).startswith(".{CHECKPOINT_FILE}."):
        opened.append(path)
        if len(opened) == 2:
            return HalfThenKill(f)
    return f

imgcls.atomic.open = open_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(data, reference, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", DIE_IN_SECOND_CHECKPOINT, *train_args(data, run)], capture_output=True, timeout=TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    left = temp_files(run)
    assert len(left) == 1 and left[0].startswith(f".{CHECKPOINT_FILE}."), left  # killed mid-write: its half file is there

    cfg, state = read_checkpoint(run)  # the first epoch's checkpoint, whole
    assert state.epoch == 0 and cfg.train.epochs == EPOCHS
    assert len(load_file(str(run / CHECKPOINT_FILE))) > 0
    load_artifact(run)  # and the kept model

    run_main([*train_args(data, run), "--resume"])
    assert history_epochs(run) == list(range(1, EPOCHS + 1))
    assert temp_files(run) == []  # the resumed run removed the killed write's temp file
    assert_equal_tensors(reference / WEIGHTS_FILE, run / WEIGHTS_FILE)


class HalfThenCrash:
    """A file whose first write writes half and then fails, as a writer that dies mid-write."""

    def __init__(self, f) -> None:
        self.f = f

    def __enter__(self) -> HalfThenCrash:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def write(self, data: bytes) -> None:
        self.f.write(data[: len(data) // 2])
        raise KeyboardInterrupt


def test_failed_model_write_keeps_the_previous_model(killed_run, tmp_path, monkeypatch):
    import imgcls.atomic

    run = copy_run(killed_run, tmp_path / "run")
    model, meta = load_artifact(run)
    before = load_file(str(run / WEIGHTS_FILE))
    left_by_the_kill = temp_files(run)  # the SIGKILL may land during a write: that temp file is the kill's, not this test's

    def open_half(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return HalfThenCrash(f) if "w" in mode and Path(path).name.startswith(f".{WEIGHTS_FILE}.") else f

    monkeypatch.setattr(imgcls.atomic, "open", open_half, raising=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_artifact(run, model, {**meta, "training": {"stage": "new"}})
    monkeypatch.undo()
    after, after_meta = load_artifact(run)  # still loads: the old weights and model.json, untouched
    assert all(torch.equal(before[k], v) for k, v in after.state_dict().items())
    assert after_meta == meta
    assert temp_files(run) == left_by_the_kill  # the failed write removed its own temp file


def limit_file_size(max_bytes: int):
    """preexec_fn: writes past max_bytes fail with EFBIG instead of killing the process (SIGXFSZ ignored)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply


def test_full_disk_names_the_file_and_keeps_the_checkpoint(killed_run, data, tmp_path):
    run = copy_run(killed_run, tmp_path / "run")
    done = checkpoint_epoch(run)
    checkpoint = load_file(str(run / CHECKPOINT_FILE))
    model_bytes, checkpoint_bytes = (run / WEIGHTS_FILE).stat().st_size, (run / CHECKPOINT_FILE).stat().st_size
    # Room for the model (and metrics.csv), not for the checkpoint (model + optimizer state) after the next epoch.
    limit = (model_bytes + checkpoint_bytes) // 2
    proc = subprocess.run(
        [*train_command(data, run), "--resume"], capture_output=True, text=True, timeout=TIMEOUT_S, preexec_fn=limit_file_size(limit)
    )
    assert proc.returncode == 2, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert message.startswith(f"imgcls: error: could not write {run / CHECKPOINT_FILE}: File too large"), message
    assert "the disk may be full" in message
    assert checkpoint_epoch(run) == done  # the last checkpoint, as it was, and loadable
    after = load_file(str(run / CHECKPOINT_FILE))
    assert after.keys() == checkpoint.keys() and all(torch.equal(after[k], checkpoint[k]) for k in after)
    read_checkpoint(run)
    load_artifact(run)
    assert temp_files(run) == []


def test_write_error_names_the_file(tmp_path, monkeypatch):
    import errno

    from imgcls.atomic import atomic_write_bytes

    target = tmp_path / "metrics.csv"
    target.write_text("old")

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(WriteError, match=re.escape(f"could not write {target}: No space left on device - the disk may be full")) as e:
        atomic_write_bytes(target, b"new")
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["metrics.csv"]
