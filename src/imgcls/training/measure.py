"""Measurements a run makes before it commits: seconds per training step (which precision trains
faster here; what a time budget buys) and seconds per evaluation pass. Model and optimizer are
left as they were."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from imgcls.runtime import batched_logits
from imgcls.threads import ThreadChoice, ThreadWatch, measure_choice, with_threads
from imgcls.training.loop import StepOptions, TrainData, train_one_epoch
from imgcls.transforms import PreprocessSpec


def time_train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    data: TrainData,
    options: StepOptions,
    n_steps: int,
    passes: int = 2,
    warm_up_steps: int = 2,
) -> float:
    """Seconds per training step, measured on up to `n_steps` real batches of `data` at a learning
    rate of zero, after `warm_up_steps` untimed ones; model and optimizer are restored after."""
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    bs = data.batch_size
    n = min(len(data.images), bs * n_steps)
    sub = TrainData(data.images[:n], data.labels[:n], data.spec, data.aug, bs)
    warm_up = TrainData(sub.images[: warm_up_steps * bs], sub.labels[: warm_up_steps * bs], data.spec, data.aug, bs)
    for group in optimizer.param_groups:
        group["lr"] = 0.0  # timing only
    g = torch.Generator().manual_seed(0)
    train_one_epoch(model, optimizer, loss_fn, warm_up, g, options)
    # Two timed passes, the faster one kept: on a shared machine one pass can catch a burst of
    # someone else's work, and the per-epoch re-planning in fit corrects the rest.
    seconds = []
    for _ in range(passes):
        stats = train_one_epoch(model, optimizer, loss_fn, sub, g, options)
        seconds.append(stats.seconds / max(1, stats.images // bs))
    model.load_state_dict(saved_model)
    optimizer.load_state_dict(saved_opt)
    return min(seconds)


def faster_train_dtype(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    data: TrainData,
    device: torch.device,
    channels_last: bool,
    log: Callable[[str], None],
) -> tuple[torch.dtype | None, float]:
    """bf16 autocast or fp32 for the training steps on a CPU with AMX or AVX512-BF16, whichever
    runs faster here, and its measured seconds per step (a time budget plans with it).

    Measured rather than assumed: on 2 cores bf16 trains small_cnn 1.8x (AVX512-BF16) to ~3x
    (AMX) faster than fp32, but EfficientNet-Lite's depthwise convolutions train up to 1.7x slower
    in bf16 at 64-128 px (bench/RESULTS.md). Two real steps of each decide.
    """
    t = {
        dt: time_train_steps(model, optimizer, loss_fn, data, StepOptions(device, dt, channels_last), 2, passes=1)
        for dt in (torch.bfloat16, None)
    }
    pick = torch.bfloat16 if t[torch.bfloat16] <= t[None] else None
    bs = data.batch_size
    rates = f"{bs / t[torch.bfloat16]:.0f} img/s bf16, {bs / t[None]:.0f} img/s fp32"
    log(f"training precision: {'bf16 autocast' if pick else 'fp32'} (measured {rates})")
    return pick, t[pick]


# Steps a thread timing runs: one untimed (oneDNN builds its kernels per thread count), two timed.
THREAD_WARM_UP_STEPS, THREAD_TIMED_STEPS = 1, 2


def _rate_at(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, data: TrainData, options: StepOptions
) -> Callable[[int], float]:
    """threads -> images/s of a few training steps at that many intra-op threads (time_train_steps)."""

    def rate_at(threads: int) -> float:
        step_s = with_threads(
            threads,
            lambda: time_train_steps(model, optimizer, loss_fn, data, options, THREAD_TIMED_STEPS, 1, THREAD_WARM_UP_STEPS),
        )
        return data.batch_size / step_s

    return rate_at


def watch_threads(choice: ThreadChoice, batch_size: int, step_s: float | None = None) -> ThreadWatch:
    """The between-epochs re-check of a measured choice, expecting `step_s` seconds per step (the
    precision trial's, at the chosen count) when given. Its first probe is priced at what the
    trial's slowest count took, so a run whose epochs are short next to that never probes."""
    steps = THREAD_WARM_UP_STEPS + THREAD_TIMED_STEPS
    watch = ThreadWatch(choice, probe_s=steps * batch_size / max(min(choice.rates.values(), default=1.0), 1e-9))
    if step_s:
        watch.expected = batch_size / step_s
    return watch


def faster_thread_count(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    data: TrainData,
    options: StepOptions,
    usable: int,
    log: Callable[[str], None],
) -> tuple[ThreadChoice, float]:
    """One intra-op thread or all `usable` ones for the training steps, whichever runs faster
    now (`threads.pick_threads`: all of them unless one is clearly faster), and its seconds per
    step.

    On 2 cores with one other busy process, two threads trained small_cnn at 108 img/s and one
    at 240; on a quiet machine two ran 428 (issue 19). Two real steps at each count decide;
    `recheck_threads` re-checks between epochs. Leaves torch at the chosen count.
    """
    choice = measure_choice(usable, _rate_at(model, optimizer, loss_fn, data, options))
    torch.set_num_threads(choice.threads)
    log(choice.describe())
    return choice, data.batch_size / choice.rates[choice.threads]


def recheck_threads(
    watch: ThreadWatch,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    data: TrainData,
    options: StepOptions,
    images: int,
    seconds: float,
    log: Callable[[str], None],
) -> ThreadChoice | None:
    """Between epochs: `watch` re-checks the thread count against the epoch just run (`images`
    in `seconds`), probing the other count with two timed steps (learning rate zero, model and
    optimizer restored) when it asks to; switches torch's count and says so when it changes."""
    new = watch.after_epoch(images / max(seconds, 1e-9), seconds, _rate_at(model, optimizer, loss_fn, data, options))
    if new is not None:
        torch.set_num_threads(new.threads)
        log(f"{new.describe()}: switched, the load on the cores changed")
    return new


def time_eval(
    model: nn.Module,
    image_sets: Sequence[torch.Tensor],
    spec: PreprocessSpec,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    tta: str = "none",
) -> float:
    """Seconds for one evaluation pass over the uint8 image sets (each (N, S, S, 3)) with `tta`,
    extrapolated from up to 512 images."""
    total = sum(len(s) for s in image_sets)
    if total == 0:
        return 0.0
    sample = torch.cat([s[:512] for s in image_sets])[:512]
    batched_logits(model, sample[:64].numpy(), spec, device=device, amp_dtype=amp_dtype)  # warm-up
    seconds = []
    halves = [h for h in (sample[: len(sample) // 2], sample[len(sample) // 2 :]) if len(h)]
    for half in halves:  # the faster half: a shared machine has bursts
        t0 = time.perf_counter()
        batched_logits(model, half.numpy(), spec, device=device, amp_dtype=amp_dtype, tta=tta)
        seconds.append((time.perf_counter() - t0) / max(1, len(half)))
    return min(seconds) * total
