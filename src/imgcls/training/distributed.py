"""Training on several processes: PyTorch DDP under torchrun (gloo on CPUs, NCCL on CUDA GPUs).

`torchrun --nproc-per-node N -m imgcls train DATA --out RUN ...` starts N copies of the same run;
the CLI reads torchrun's variables (`ranks_from_env`) and `fit` joins them (`join_group`). How the
ranks share the work, and why:

- data: every rank indexes and decodes DATA itself (no shared filesystem needed between machines;
  with --cache-dir on a shared one, the cache is written atomically so concurrent ranks are safe),
  draws the same split and the same epoch order from the seed, and checks that its dataset
  fingerprint is rank 0's (`agree`), so two machines with different copies of DATA fail at once;
- batches: --batch-size is the global batch, as on one process. Every rank augments the whole
  global batch with the epoch's generator (the very draws one process makes) and trains on its
  contiguous share of the rows (`Shard.rows`); each rank's mean loss is weighted by its share, so
  DDP's average of the gradients is the gradient of the global batch's mean loss. Augmenting the
  whole batch costs each rank the augmentation of N x its rows, a small part of a step next to
  forward and backward, and buys runs on 1, 2 or N processes that train on the same images;
- BatchNorm: statistics over the global batch: nn.SyncBatchNorm on CUDA; on CPUs (where
  SyncBatchNorm refuses CPU tensors) `GlobalBatchNorm2d`, which all-reduces the per-channel sums;
- validation: each rank runs its share of the validation images and the logits are all-gathered
  (`Shard.gather`), so every rank computes the same val_loss / val_acc, the kept epoch and the
  early stop agree on all of them;
- writing: rank 0 alone writes the run folder (split.json, metrics.csv, checkpoints, model.json,
  the final calibration, evaluation and report); the other ranks get a `QuietFolder` and stop
  after the last epoch. model.json records "world_size". --resume works with any number of
  processes (the global batch is the same); every rank reads RUN/checkpoint.safetensors, so on
  several machines RUN must be on a filesystem they share.
- failures: torchrun ends the other workers when one exits non-zero; a rank that loses its peers
  in a collective (another machine died) raises `DistributedError` instead of a gloo traceback; a
  peer that hangs without dying ends the group after GROUP_TIMEOUT.

Not distributed (refused with an error by `check_supported`): --time-budget and --model auto
(they time steps, and each rank would time its own), multi-label data, and the linear-probe and
fine-tune-last strategies (they fit a head on frozen features outside the epoch loop). "full" and
"fine-tune" (its probe runs on every rank, then rank 0's result is shared) are.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from imgcls.config import RunConfig
from imgcls.threads import usable_cores
from imgcls.training.checkpoint import RunFolder, TrainState

# How long a collective waits for a rank that neither answers nor dies (a dead one ends the group
# at once: torchrun stops its workers, gloo's sockets close). Generous because ranks meet after
# decoding DATA, which one machine may take much longer to do than another (a cold cache).
GROUP_TIMEOUT = datetime.timedelta(minutes=30)
UNSUPPORTED_STRATEGIES = ("linear-probe", "fine-tune-last")


class DistributedError(RuntimeError):
    """A rank lost the others (one of them stopped), or the ranks disagree about the run."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among torchrun's workers."""

    rank: int
    world_size: int
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes the run folder."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def ranks_from_env(environ: Mapping[str, str]) -> Ranks | None:
    """torchrun's WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE as `Ranks`; None for one process
    (WORLD_SIZE unset or 1), which trains exactly as without torchrun."""
    try:
        world = int(environ.get("WORLD_SIZE", "1") or "1")
        if world <= 1:
            return None
        ranks = Ranks(
            rank=int(environ["RANK"]),
            world_size=world,
            local_rank=int(environ.get("LOCAL_RANK", "0")),
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", "1")),
        )
    except (KeyError, ValueError) as e:
        world = environ.get("WORLD_SIZE")
        raise ValueError(f"WORLD_SIZE={world} but torchrun's RANK/LOCAL_RANK are missing or not numbers ({e})") from None
    if not 0 <= ranks.rank < world or "MASTER_ADDR" not in environ or "MASTER_PORT" not in environ:
        raise ValueError(f"WORLD_SIZE={world}: start distributed training with torchrun (RANK, MASTER_ADDR and MASTER_PORT are not set)")
    return ranks


def check_supported(cfg: RunConfig, ranks: Ranks) -> None:
    """Refuse, on every rank alike and before any work, the options that do not run distributed."""
    if cfg.train.time_budget is not None:
        _refuse(ranks, "--time-budget plans epochs from timed steps, which each rank would time differently; give --epochs")
    if cfg.model.name == "auto":
        _refuse(ranks, "--model auto times candidate models on each rank; name the model (see `imgcls models`)")


def check_run(strategy: str, multilabel: bool, ranks: Ranks) -> None:
    """Refuse the resolved strategy or task when it does not run distributed."""
    if multilabel:
        _refuse(ranks, "multi-label data is not distributed; train it on one process")
    if strategy in UNSUPPORTED_STRATEGIES:
        _refuse(ranks, f"strategy {strategy} fits a head on frozen features, not distributed; use --strategy full or fine-tune")


def _refuse(ranks: Ranks, why: str) -> None:
    raise ValueError(f"distributed training ({ranks.describe()}): {why}")


def pin_choices(cfg: RunConfig, ranks: Ranks) -> RunConfig:
    """The config with the threads split between the ranks of this machine (N ranks on C cores
    get C // N each: N ranks at C threads each would fight over the cores), after refusing what
    does not run distributed (`check_supported`). fit then pins the other timed choices as
    --deterministic does, since every rank must choose alike."""
    check_supported(cfg, ranks)
    t = cfg.train
    threads = t.threads or max(1, usable_cores() // max(ranks.local_world_size, 1))
    return dataclasses.replace(cfg, train=dataclasses.replace(t, threads=threads))


def join_group(ranks: Ranks, device: torch.device) -> torch.device:
    """Join torchrun's process group: NCCL for a CUDA device (this rank's GPU, LOCAL_RANK), else
    gloo. Returns the device this rank trains on."""
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size, timeout=GROUP_TIMEOUT, **kwargs)
    return device


def start_shard(ranks: Ranks, fingerprint: str, strategy: str, multilabel: bool) -> Shard:
    """This rank's `Shard`, once every rank has decoded the same dataset (`fingerprint`) and the
    resolved strategy and task run distributed (`check_run`)."""
    check_run(strategy, multilabel, ranks)
    agree(fingerprint, "dataset (fingerprint of DATA's files, labels and split)", ranks)
    return Shard(ranks)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def group_errors(ranks: Ranks | None) -> Iterator[None]:
    """Turn a collective that failed because a peer went away into a `DistributedError` naming
    this rank, instead of a backend traceback."""
    try:
        yield
    except DistributedError:
        raise
    except (dist.DistError, RuntimeError) as e:
        lost = isinstance(e, dist.DistError) or "gloo" in str(e).lower() or "nccl" in str(e).lower()
        if ranks is None or not dist.is_initialized() or not lost:
            raise
        raise DistributedError(
            f"{ranks.describe()}: lost the other ranks ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
            "another rank stopped: see its error"
        ) from e


def agree(value: Any, what: str, ranks: Ranks) -> None:
    """Raise on every rank when some rank's `value` differs from rank 0's."""
    values: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(values, value)
    odd = [r for r, v in enumerate(values) if v != values[0]]
    if odd:
        theirs, ours = values[odd[0]], values[0]
        raise DistributedError(f"{ranks.describe()}: rank(s) {odd} see a different {what} than rank 0 ({theirs!r} vs {ours!r})")


def broadcast_state(state: TrainState) -> None:
    """Give every rank rank 0's `state` (its best accuracy after the probe, which decides the kept
    epoch and the early stop), in place."""
    box = [state.to_dict()]
    dist.broadcast_object_list(box, src=0)
    for k, v in TrainState.from_dict(box[0]).to_dict().items():
        setattr(state, k, v)


class _AllReduce(torch.autograd.Function):
    """Sum over the ranks, differentiable: the gradient of a sum over ranks is the sum of the
    ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are over the global batch (all ranks), for CPUs,
    where nn.SyncBatchNorm refuses CPU tensors. Two all-reduces per layer (the sums, then the
    squared deviations from the global mean: the same two-pass arithmetic as one process), through
    `_AllReduce` so gradients flow back to every rank's rows. Eval mode is BatchNorm2d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        xf = x.float()
        count = torch.tensor([x.shape[0] * x.shape[2] * x.shape[3]], dtype=torch.float32, device=x.device)
        sums = _AllReduce.apply(torch.cat([xf.sum((0, 2, 3)), count]))  # (C + 1,): per-channel sums, global count
        n = sums[-1]
        mean = sums[:-1] / n  # (C,)
        centred = xf - mean.view(1, -1, 1, 1)
        var = _AllReduce.apply((centred * centred).sum((0, 2, 3))) / n  # (C,) biased, as BatchNorm normalises with
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / max(float(n) - 1, 1.0), alpha=m)  # unbiased, as torch keeps it
                self.num_batches_tracked.add_(1)
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` with each BatchNorm2d replaced by one that normalises over the global batch
    (nn.SyncBatchNorm on CUDA, GlobalBatchNorm2d on CPUs). The new layers hold the very same
    parameters and buffers, so the optimizer and the saved state dict are unchanged."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var, new.num_batches_tracked = child.running_mean, child.running_var, child.num_batches_tracked
            new.train(child.training)
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)
    return model


@dataclass(frozen=True)
class Shard:
    """This rank's share of the work: rows of each global batch, of the validation images."""

    ranks: Ranks

    @property
    def world_size(self) -> int:
        return self.ranks.world_size

    def span(self, n: int) -> slice:
        """This rank's contiguous rows of `n` (sizes differ by at most one between ranks)."""
        r, w = self.ranks.rank, self.ranks.world_size
        return slice(n * r // w, n * (r + 1) // w)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (B, ...)."""
        return t[self.span(len(t))]

    def share(self, rows: int, global_rows: int) -> float:
        """The weight of this rank's mean loss: DDP averages the ranks' gradients, so a rank
        holding `rows` of the batch's `global_rows` weighs rows * world_size / global_rows."""
        return rows * self.world_size / global_rows

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks."""
        t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return t.cpu().tolist()

    def seed_rank(self) -> None:
        """Reseed torch's global generator on ranks other than 0, before the epochs: dropout and
        drop-path draw from it, and with one seed every rank would apply the same masks to its
        rows. Rank 0 keeps the stream one process has. The data order and the augmentation come
        from the epoch's own generator, the same on every rank."""
        if self.ranks.rank:
            torch.manual_seed(torch.initial_seed() + self.ranks.rank)

    def gather(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's `part` (its `span(n)` rows of an (n, ...) result, on the CPU), in rank order: the (n, ...) whole."""
        w = self.world_size
        size = -(-n // w)  # the largest part
        padded = torch.zeros((size, *part.shape[1:]), dtype=part.dtype)
        padded[: len(part)] = part
        parts = [torch.empty_like(padded) for _ in range(w)]
        dist.all_gather(parts, padded.to(_collective_device()))
        spans = [Shard(Ranks(r, w)).span(n) for r in range(w)]
        return torch.cat([p.cpu()[: s.stop - s.start] for p, s in zip(parts, spans)])

    def wrap(self, model: nn.Module, device: torch.device, previous: nn.Module | None = None) -> nn.Module:
        """`model`'s training forward as DDP (gradients averaged over the ranks inside backward).
        DDP reduces the parameters that train when it is built, so it is built again when that set
        changed since `previous` (the fast recipe freezes the whitening bias after some epochs);
        else `previous` is returned. BatchNorm buffers are not synced each step: the global-batch
        statistics (`sync_batchnorm`) keep them equal on every rank."""
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        trains = [p.requires_grad for p in model.parameters()]
        if previous is not None and getattr(previous, "imgcls_trains", None) == trains:
            return previous
        kwargs: dict[str, Any] = {"broadcast_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:  # torch >= 2.13's spelling
            kwargs = {"forward_sync_buffers": False}
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **kwargs)
        ddp.imgcls_trains = trains
        return ddp


def _collective_device() -> torch.device:
    """Where a collective's tensors live: this rank's GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class QuietFolder(RunFolder):
    """The run folder as ranks other than 0 see it: they write nothing (rank 0 writes it all)."""

    def save_model(self, *args: Any, **kwargs: Any) -> None:
        pass

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        pass

    def write_history(self, *args: Any, **kwargs: Any) -> None:
        pass
