"""The training loop itself: `train_one_epoch` (forward, loss, backward, step, zero_grad) and the
validation pass after each epoch."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from imgcls.runtime import autocast, batched_logits
from imgcls.training.recipes import Lookahead
from imgcls.training.schedule import Schedule, steps_per_epoch
from imgcls.transforms import AugmentSpec, PreprocessSpec, train_transform

if TYPE_CHECKING:
    from imgcls.training.distributed import Shard


@dataclass(frozen=True)
class TrainData:
    """The training images as the loop reads them: decoded once, augmented a batch at a time."""

    images: torch.Tensor  # (N, S, S, 3) uint8
    labels: torch.Tensor  # (N,) int64, or multi-label (N, C) float32 multi-hot
    spec: PreprocessSpec
    aug: AugmentSpec
    batch_size: int
    sample_weights: torch.Tensor | None = None  # (N,) drawing weights (--class-balance sampler); None: a permutation
    train_size: int | None = None  # side the augmented batches are resized to (progressive resizing); None: spec.img_size


@dataclass(frozen=True)
class StepOptions:
    """How a training step runs: where, in which autocast dtype, and its numerical guards."""

    device: torch.device
    amp_dtype: torch.dtype | None = None  # None: plain float32
    channels_last: bool = True
    grad_clip: float | None = None
    scaler: torch.amp.GradScaler | None = None  # float16 only: scales the loss so gradients don't underflow


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float
    steps: int = 0


def epoch_order(num_images: int, generator: torch.Generator, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The epoch's random order of sample indices, from the epoch's own generator.

    weights (N,): num_images indices drawn with replacement in proportion to them (the balanced
    sampler of --class-balance sampler), else a permutation. The distributed seam: a
    multi-process run would shard this order here (each rank taking order[rank::world_size], as
    torch's DistributedSampler does), with every rank drawing the same order from the same
    per-epoch seed.
    """
    if weights is not None:
        return torch.multinomial(weights.double(), num_images, replacement=True, generator=generator)
    return torch.randperm(num_images, generator=generator)


def load_batch(data: TrainData, idx: torch.Tensor, generator: torch.Generator, options: StepOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `idx` of `data`, augmented as a batch with `generator`, and their labels, on the device."""
    x = data.images[idx].permute(0, 3, 1, 2)  # (B, 3, S, S) uint8
    x = train_transform(x, data.spec, data.aug, generator)  # (B, 3, H, W) float, normalised
    if data.train_size is not None and data.train_size != x.shape[-1]:
        x = nn.functional.interpolate(x, size=(data.train_size, data.train_size), mode="bilinear", antialias=True)  # (B, 3, s, s)
    x = x.to(options.device, non_blocking=True)
    if options.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, data.labels[idx].to(options.device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    data: TrainData,
    generator: torch.Generator,
    options: StepOptions,
    schedule: Schedule | None = None,
    first_step: int = 0,
    lookahead: Lookahead | None = None,
    progress: str | None = None,
    shard: Shard | None = None,
) -> EpochStats:
    """One pass over `data` in an order drawn from `generator` (which the augmentation draws from too).

    schedule: sets each step's learning rate; under a time budget it may end the pass early (the
    last epoch of a budgeted run may be partial). None leaves the rates as they are. first_step is
    the global index of this pass's first step. lookahead, when given, runs after each optimizer
    step (the fast recipe's EMA of the weights). progress: a progress bar with this label.
    shard: distributed (training.distributed), this rank's share of each global batch; the
    returned figures are over all ranks.
    """
    from tqdm.auto import tqdm

    model.train()
    n, bs = len(data.images), data.batch_size
    order = epoch_order(n, generator, data.sample_weights)
    n_batches = steps_per_epoch(n, bs)
    if schedule is not None:
        n_batches = min(n_batches, schedule.total_steps - first_step)
    total_loss, total_correct, seen, steps = 0.0, 0, 0, 0
    start = time.perf_counter()
    bar = tqdm(total=n_batches * bs if n_batches else 0, desc=progress, unit="img", disable=None if progress else True, leave=False)
    for b in range(n_batches):
        step = first_step + b
        if schedule is not None and b > 0 and not schedule.keep_going(step):
            break
        idx = order[b * bs : (b + 1) * bs]
        x, y = load_batch(data, idx, generator, options)  # (B, 3, H, W) augmented, (B,)
        if shard is not None:  # every rank augments the global batch with one process's draws, and trains on its rows
            x, y = shard.rows(x), shard.rows(y)
        if schedule is not None:
            schedule.apply(optimizer, step)
        with autocast(options.device, options.amp_dtype):
            logits = model(x)  # (B, num_classes)
        loss = loss_fn(logits.float(), y)
        # distributed: DDP averages the ranks' gradients inside backward; weighting each rank's mean
        # loss by its share of the global batch makes that the gradient of the global mean loss
        step_loss = loss if shard is None else loss * shard.share(len(y), len(idx))
        if options.scaler is not None:
            options.scaler.scale(step_loss).backward()
            if options.grad_clip:
                options.scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
            options.scaler.step(optimizer)
            options.scaler.update()
        else:
            step_loss.backward()
            if options.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if lookahead is not None and schedule is not None:
            lookahead.update(step, schedule.total_steps, epoch_end=b == n_batches - 1)
        steps += 1
        total_loss += loss.item() * len(y) if len(y) else 0.0  # a rank left without rows (a last batch < ranks) has a NaN mean
        if y.ndim == 2:  # multi-label (N, C) targets: the share of labels right at probability 0.5
            total_correct += float(((logits > 0) == (y > 0.5)).float().mean(1).sum())
        else:
            total_correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        bar.update(len(y))
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{total_correct / seen:.3f}", refresh=False)
    bar.close()
    if shard is not None:
        total_loss, total_correct, seen = shard.sum(total_loss, total_correct, seen)
    return EpochStats(total_loss / max(seen, 1), total_correct / max(seen, 1), seen, time.perf_counter() - start, steps)


def validate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: PreprocessSpec,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    progress: bool = False,
    shard: Shard | None = None,
) -> tuple[float, float, float]:
    """(loss, accuracy, balanced accuracy) of `model` on uint8 images (N, S, S, 3), in eval mode,
    without TTA. Balanced accuracy is the mean recall over the classes present in `labels`.
    shard: distributed, each rank runs its share of the images and gathers everyone's logits."""
    part = images if shard is None else images[shard.span(len(images))]
    logits = (
        batched_logits(model, part.numpy(), spec, device=device, amp_dtype=amp_dtype, progress=progress, desc="validate")
        if len(part)
        else torch.zeros(0, model.num_classes)
    )  # (n, num_classes)
    if shard is not None:
        logits = shard.gather(logits, len(images))  # (N, num_classes), rank 0's rows first
    loss = nn.functional.cross_entropy(logits, labels).item()
    right = logits.argmax(1) == labels  # (N,)
    counts = torch.bincount(labels, minlength=logits.shape[1])  # (C,)
    hits = torch.bincount(labels[right], minlength=logits.shape[1])
    present = counts > 0
    return loss, float(right.float().mean()), float((hits[present] / counts[present]).mean())


def _logit_cols(model: nn.Module) -> int | None:
    """How many of `model`'s last output columns are logits: all (None), or num_classes after
    `inference.runners.FeaturesAndLogits`'s features."""
    inner = getattr(model, "model", None)
    return getattr(inner, "num_classes", None) if inner is not None and hasattr(inner, "forward_head") else None


def final_logits(model: nn.Module, ev: object, amp_dtype: torch.dtype | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The kept model over each non-empty split of `ev.final_splits` (build.Evaluation) as evaluate
    runs it (its TTA, `amp_dtype`): {split name: (logits (N, out), labels)}. `model` may be
    `inference.runners.FeaturesAndLogits`, whose output has the pooled features first."""
    out = {}
    for name, split in ev.final_splits.items():
        if split is not None and len(split.paths):
            z = batched_logits(
                model,
                split.images.numpy(),
                ev.spec,
                device=ev.device,
                amp_dtype=amp_dtype,
                progress=ev.progress,
                desc=f"evaluate {name}",
                tta=ev.tta,
                tta_select=getattr(ev, "tta_select", 1.0),
                logit_cols=_logit_cols(model),
            )
            out[name] = (z, split.labels)
    return out
