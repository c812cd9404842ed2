"""Tests for imgcls.training.distributed: DDP under torchrun, for real, with 2 gloo processes on
127.0.0.1 (`python -m torch.distributed.run --nproc-per-node 2 -m imgcls train ...`).

One 2-process run is killed (SIGKILL on rank 1) after it checkpointed, then resumed on 2
processes; its metrics.csv is compared, epoch by epoch, with one process trained on the same data
with the same global batch: the epochs before the kill test a fresh distributed start, those after
it a distributed --resume. The pieces (torchrun's variables, the global-batch BatchNorm, the
shards) are tested in-process on a one-rank gloo group.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from imgcls.cli import main as cli_main
from imgcls.config import DataConfig, RunConfig, TrainConfig
from imgcls.training.distributed import (
    DistributedError,
    GlobalBatchNorm2d,
    Ranks,
    Shard,
    check_supported,
    group_errors,
    ranks_from_env,
    sync_batchnorm,
)
from synth import make_split_folders

EPOCHS = 5
# fp32 and one thread per process: the same arithmetic in both runs (bf16 or another thread count
# would round differently); --batch-size is the global batch, 12 = 6 per rank.
FLAGS = ["--model", "small_cnn", "--img-size", "16", "--epochs", str(EPOCHS), "--batch-size", "12"]
FLAGS += ["--precision", "fp32", "--threads", "1", "--quiet", "--seed", "3"]
RUN_TIMEOUT_S = 120  # a hang fails the test instead of blocking the suite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str]) -> subprocess.Popen:
    """`imgcls train` on 2 gloo processes on this machine, in its own process group."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(free_port()), "-m", "imgcls", "train", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{out[-3000:]}")
    return out


def worker_of_rank(agent_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (a child of the agent), or None yet."""
    try:
        children = pathlib.Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    except OSError:
        return None
    for pid in children:
        try:
            env = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def history(run: pathlib.Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def checkpointed_epochs(run: pathlib.Path) -> int:
    """Epochs in RUN's checkpoint (0 before the first)."""
    from safetensors import safe_open

    try:
        with safe_open(str(run / "checkpoint.safetensors"), framework="pt") as f:
            return json.loads(f.metadata()["imgcls_checkpoint"])["epoch"] + 1
    except Exception:  # not there yet, or being replaced
        return 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One process, and 2 processes killed after 2 checkpointed epochs then resumed on 2."""
    if not pathlib.Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        pytest.skip("needs /proc/PID/task/PID/children to find torchrun's workers")
    base = tmp_path_factory.mktemp("ddp")
    data = make_split_folders(base / "data", per_split={"train": 12, "valid": 6}, size=16, seed=2)
    one, two = base / "one", base / "two"
    assert cli_main(["train", str(data), "--out", str(one), *FLAGS]) == 0

    proc = torchrun([str(data), "--out", str(two), *FLAGS])
    deadline, victim = time.monotonic() + RUN_TIMEOUT_S, None
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpointed_epochs(two) >= 2:
            victim = worker_of_rank(proc.pid, 1)
            if victim is not None:
                os.kill(victim, signal.SIGKILL)  # rank 1's machine dies mid-run
                break
        time.sleep(0.05)
    killed_at = time.monotonic()
    out = finish(proc)
    stopped_s = time.monotonic() - killed_at
    epochs_at_kill = len(history(two))

    resumed = torchrun([str(data), "--out", str(two), "--resume", "--quiet"])
    resumed_out = finish(resumed)
    return {
        "one": one,
        "two": two,
        "victim": victim,
        "killed": (proc.returncode, out, stopped_s, epochs_at_kill),
        "resumed": (resumed.returncode, resumed_out),
    }


def test_a_dead_rank_stops_the_others_with_an_error(runs):
    code, out, stopped_s, epochs_at_kill = runs["killed"]
    assert runs["victim"] is not None, f"the run ended before rank 1 could be killed:\n{out[-2000:]}"
    assert code != 0
    assert stopped_s < 60, f"the other rank took {stopped_s:.0f} s to stop"
    assert "exitcode" in out and "Signal 9" in out, out[-2000:]  # torchrun's report names the dead worker
    assert 2 <= epochs_at_kill < EPOCHS


def test_two_processes_train_as_one_with_the_same_global_batch(runs):
    code, out = runs["resumed"]
    assert code == 0, out[-3000:]
    one, two = history(runs["one"]), history(runs["two"])
    assert [r["epoch"] for r in two] == [str(e) for e in range(1, EPOCHS + 1)]
    for a, b in zip(one, two):  # epochs before the kill: a fresh start; after it: the resumed run
        for key in ("train_loss", "val_loss"):
            assert float(b[key]) == pytest.approx(float(a[key]), abs=1e-4), (a["epoch"], key, a[key], b[key])
        assert abs(float(b["train_acc"]) - float(a["train_acc"])) <= 1 / 36 + 1e-9
        assert abs(float(b["val_acc"]) - float(a["val_acc"])) <= 1 / 18 + 1e-9
    m1, m2 = (json.loads((runs[k] / "model.json").read_text()) for k in ("one", "two"))
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert m2["metrics"]["val"]["accuracy"] == pytest.approx(m1["metrics"]["val"]["accuracy"], abs=1 / 18 + 1e-9)
    assert m2["metrics"]["val"]["accuracy"] > 0.6  # and it learned (3 classes: chance is 1/3)
    assert (runs["two"] / "report" / "report.html").is_file()


# ----------------------------------------------------------------------------- the pieces, in-process


def test_torchrun_variables_or_one_process():
    assert ranks_from_env({}) is None
    assert ranks_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert ranks_from_env(env) == Ranks(3, 4, 1, 2)
    with pytest.raises(ValueError, match="RANK"):
        ranks_from_env({"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="torchrun"):
        ranks_from_env({"WORLD_SIZE": "2", "RANK": "0"})


def test_timed_choices_are_refused_distributed():
    cfg = RunConfig(data=DataConfig(path="d"), train=TrainConfig(out="o", time_budget=60.0))
    with pytest.raises(ValueError, match="--time-budget"):
        check_supported(cfg, Ranks(0, 2))


def test_shards_cover_a_batch_once():
    spans = [Shard(Ranks(r, 3)).span(8) for r in range(3)]
    assert [(s.start, s.stop) for s in spans] == [(0, 2), (2, 5), (5, 8)]
    assert sum(Shard(Ranks(r, 3)).share(s.stop - s.start, 8) for r, s in enumerate(spans)) == pytest.approx(3)


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_global_batchnorm_matches_batchnorm(one_rank_group):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    ours = sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), torch.device("cpu"))
    ours.load_state_dict(ref.state_dict())
    assert isinstance(ours[1], GlobalBatchNorm2d) and set(ours.state_dict()) == set(ref.state_dict())
    x = torch.randn(5, 3, 8, 8)  # (B, C, H, W)
    for m in (ref, ours):
        m(x).square().mean().backward()
    assert torch.allclose(ours(x), ref(x), atol=1e-5)
    for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name  # running statistics
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)
    ours.eval()
    ref.eval()
    assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_gather_puts_the_parts_back_in_order(one_rank_group):
    shard = Shard(Ranks(0, 1))
    part = torch.arange(10.0).view(5, 2)
    assert torch.equal(shard.gather(part, 5), part)
    assert shard.sum(1.5, 2.0) == [1.5, 2.0]


def test_a_lost_peer_is_a_clear_error(one_rank_group):
    with pytest.raises(DistributedError, match="rank 1 of 2: lost the other ranks .*Connection reset by peer"):
        with group_errors(Ranks(1, 2)):
            raise dist.DistBackendError("[pair.cc:537] Read error [127.0.0.1]:50830: Connection reset by peer")
    with pytest.raises(ValueError, match="not a collective"):  # other errors pass through as they are
        with group_errors(Ranks(1, 2)):
            raise ValueError("not a collective")
