"""`--strategy fine-tune-last`: fine-tune only the last blocks of a pretrained EfficientNet-Lite, on
cached activations of its frozen early blocks, computed once.

Full fine-tuning on a 2-core CPU runs the whole network forward and backward for every image of
every epoch (~20-50 img/s at 224 px; cats vs dogs: ~100 s an epoch). Here the early blocks (stem
and all but the last TAIL_BLOCKS MBConv blocks, about two thirds of the forward FLOPs) run once
per image, in eval mode as the probe's features do; the activations they leave (at 224 px
(112, 14, 14) per image for Lite0, kept in bf16) are what the tail trains on:

1. cache: train images and their mirror images (the augmentation: a random one of the two per
   image and epoch; none with --no-hflip), and the validation images;
2. the linear probe on the tail's pooled features of the cached activations (the head the
   fine-tune starts from, LP-FT: Kumar et al. 2022), which is also the first candidate for the kept model;
3. epochs of the tail (last blocks, head convolution, classifier) with AdamW, warm-up then
   cosine, BatchNorm statistics frozen (batches of 32 from one small data set would move them
   more than they should); the weights that validate best, the probe's included, are kept.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from imgcls.config import TrainConfig
from imgcls.runtime import as_nchw, autocast, batch_slices
from imgcls.training import budget
from imgcls.training.build import Evaluation, Log, Setup, dtype_name
from imgcls.training.checkpoint import RunFolder, TrainState
from imgcls.training.finetune import balanced_accuracy, classifier_of, fit_linear_head, probe_history_row
from imgcls.training.plan import announce_estimate
from imgcls.training.prepare import RunData, SplitData
from imgcls.transforms import eval_transform

TAIL_BLOCKS = 5  # EfficientNet-Lite0: its last two stages (4 blocks at 192 channels, 1 at 320) and the head convolution
DEFAULT_EPOCHS = 6  # flowers, 20 a class: the probe's 95.6% validation, 97.1% after 3 tail epochs, 98.5% after 5
PATIENCE = 3  # epochs without validation improvement before stopping
TAIL_LR = 3e-4  # AdamW peak rate (--lr overrides), the tail's blocks; the classifier (warm-started by the probe) the same
WARMUP_FRACTION = 0.1
WARMUP_MIN_STEPS = 20
CACHE_BATCH = 64
TRAIN_BATCH = 32


def split_network(model: nn.Module, tail_blocks: int = TAIL_BLOCKS) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.ModuleList]:
    """(early, tail modules) of an EfficientNet-Lite: early(x) (B, 3, H, W) -> the activations
    (B, C, h, w) the last `tail_blocks` blocks take; the tail modules are those blocks, the head
    convolution and its BatchNorm (and the classifier is `classifier_of(model)`)."""
    blocks = getattr(model, "_blocks", None)
    if blocks is None or not hasattr(model, "_conv_head"):
        raise ValueError("--strategy fine-tune-last works on efficientnet_lite0/1/2 (their last blocks are trained); use fine-tune")
    k = len(blocks) - tail_blocks

    def early(x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu6(model._bn0(model._conv_stem(x)))  # (B, 32, H/2, W/2)
        for block in blocks[:k]:
            x = block(x)
        return x  # (B, 112, H/16, W/16) for Lite0

    return early, nn.ModuleList([*blocks[k:], model._conv_head, model._bn1])


def tail_features(model: nn.Module, acts: torch.Tensor) -> torch.Tensor:
    """Cached activations (B, C, h, w) -> pooled pre-logit features (B, 1280) through the tail."""
    x = acts
    for block in model._blocks[len(model._blocks) - TAIL_BLOCKS :]:
        x = block(x)
    x = nn.functional.relu6(model._bn1(model._conv_head(x)))  # (B, 1280, h', w')
    return model.forward_head(x, pre_logits=True)


@torch.no_grad()
def cache_activations(
    early: Callable[[torch.Tensor], torch.Tensor],
    split: SplitData,
    ev: Evaluation,
    mirror: bool,
) -> torch.Tensor:
    """The early blocks' activations of every image of `split`, eval transform, in bf16:
    (N, C, h, w), or (2, N, C, h, w) with the mirror images' second when `mirror`."""
    out: list[list[torch.Tensor]] = [[], []] if mirror else [[]]
    for sl in batch_slices(len(split.images), CACHE_BATCH):
        x = eval_transform(as_nchw(split.images[sl]), ev.spec).to(ev.device).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
        for views, v in zip(out, (x, x.flip(3))):
            with autocast(ev.device, ev.amp_dtype):
                views.append(early(v).to(torch.bfloat16).cpu())  # bf16: half the memory of float32, as precise as the autocast
    return torch.stack([torch.cat(v) for v in out]) if mirror else torch.cat(out[0])


@torch.no_grad()
def tail_pass(model: nn.Module, acts: torch.Tensor, labels: torch.Tensor, ev: Evaluation) -> tuple[torch.Tensor, dict[str, float]]:
    """Pooled features (N, 1280) of cached activations through the tail in eval mode, and the
    classifier's loss, accuracy and balanced accuracy on `labels`."""
    model.eval()
    feats = []
    for sl in batch_slices(len(acts), CACHE_BATCH):
        with autocast(ev.device, ev.amp_dtype):
            feats.append(tail_features(model, acts[sl].to(ev.device, torch.float32)).float().cpu())
    f = torch.cat(feats)  # (N, 1280)
    logits = classifier_of(model)(f.to(ev.device)).cpu()
    scores = {
        "val_loss": float(nn.functional.cross_entropy(logits, labels)),
        "val_acc": float((logits.argmax(1) == labels).float().mean()),
        "val_balanced_acc": balanced_accuracy(logits, labels),
    }
    return f, scores


def fine_tune_last(
    setup: Setup,
    data: RunData,
    ev: Evaluation,
    state: TrainState,
    folder: RunFolder,
    budget_end: float | None,
    epochs: int | None,
    log: Log,
    lr: float | None = None,
) -> None:
    """Steps 4-5 for fine-tune-last: cache, probe, tail epochs; the best weights saved in `folder`
    and recorded in `state` (history row 1 is the probe; best_epoch 0 means the probe was kept).
    budget_end: time.perf_counter() by which the epochs must end (the final evaluation's seconds
    already taken off), None: `epochs` (or DEFAULT_EPOCHS) with early stopping."""
    model, train, val = setup.model, data.train, data.val
    if train.labels.ndim == 2:
        raise ValueError("--strategy fine-tune-last trains single-label data; for multi-label data use fine-tune")
    early, tail = split_network(model)
    model.eval()  # the early blocks as the final model runs them: BatchNorm's running statistics, left untouched
    t0 = time.perf_counter()
    mirror = setup.data.aug.hflip
    acts = cache_activations(early, train, ev, mirror)  # (2, N, C, h, w) or (N, C, h, w)
    val_acts = cache_activations(early, val, ev, False) if val is not None and len(val.paths) else None
    n_cached = len(train.paths) * (2 if mirror else 1) + (len(val.paths) if val_acts is not None else 0)
    t_cache = time.perf_counter() - t0
    log(
        f"fine-tune-last: cached early-block activations {tuple(acts.shape[-3:])} of {n_cached} images in {t_cache:.1f}s "
        f"({n_cached / max(t_cache, 1e-9):.0f} img/s)"
    )
    train_acts = acts[0] if mirror else acts
    state.record_epoch(0, probe_row(model, train_acts, train.labels, val_acts, val, setup, ev, log), val_acts is not None, setup.best_key)
    folder.write_history(state.history)
    folder.save_model(model, {"strategy": setup.strategy, "stage": "linear-probe"})
    train_tail(
        model, tail, acts, train.labels, val_acts, val, setup, ev, state, folder, budget_end, epochs or DEFAULT_EPOCHS, log, lr or TAIL_LR
    )


def probe_row(
    model: nn.Module,
    train_acts: torch.Tensor,
    y: torch.Tensor,
    val_acts: torch.Tensor | None,
    val: SplitData | None,
    setup: Setup,
    ev: Evaluation,
    log: Log,
) -> dict[str, float]:
    """Fit the classifier on the tail's features of the cached activations; its metrics.csv row."""
    t0 = time.perf_counter()
    x_tr, _ = tail_pass(model, train_acts, y, ev)
    x_va = tail_pass(model, val_acts, val.labels, ev)[0] if val_acts is not None and val is not None else None
    weights = setup.class_balance.probe_weights() if setup.class_balance else None
    fit = fit_linear_head(classifier_of(model), x_tr, y, x_va, val.labels if x_va is not None else None, log=log, class_weights=weights)
    seconds = time.perf_counter() - t0
    log(f"linear probe: L2 {fit['reg']:g}, train acc {fit['train_acc']:.4f}, val acc {fit['val_acc']:.4f} ({seconds:.1f}s)")
    return probe_history_row(fit, seconds, (len(x_tr) + (len(x_va) if x_va is not None else 0)) / max(seconds, 1e-9))


def tail_optimizer(model: nn.Module, tail: nn.ModuleList, lr: float) -> torch.optim.AdamW:
    """AdamW over the tail and the classifier (the rest frozen): weight decay on weights, none on
    biases and norm parameters."""
    model.requires_grad_(False)
    params = [*tail.parameters(), *classifier_of(model).parameters()]
    for p in params:
        p.requires_grad_(True)
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": 0.05},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    for g in groups:
        g["initial_lr"] = lr  # the base the schedule scales (lr_at)
    return torch.optim.AdamW(groups, lr=lr)


def lr_at(step: int, total: int) -> float:
    """Linear warm-up over WARMUP_FRACTION of the steps, then cosine to zero: the peak rate times this."""
    # At least WARMUP_MIN_STEPS (or half a short run): Adam's first steps move every weight by about
    # the full rate whatever its gradient, which at 3e-4 undid a fitted probe in one step (tests' 21 images).
    warm = max(1, int(WARMUP_FRACTION * total), min(WARMUP_MIN_STEPS, total // 2))
    return (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def train_tail_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    acts: torch.Tensor,
    labels: torch.Tensor,
    g: torch.Generator,
    first_step: int,
    total: int,
    setup: Setup,
    ev: Evaluation,
) -> dict[str, float]:
    """One epoch of the tail on cached activations (a random one of each image's two views when
    `acts` holds the mirror images too): forward, loss, backward, step, zero_grad; its train metrics."""
    model.train()
    for m in model.modules():  # frozen BatchNorm statistics (see the module docstring)
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    mirror = acts.ndim == 5
    n = acts.shape[1] if mirror else acts.shape[0]
    order = torch.randperm(n, generator=g)
    flip = torch.randint(0, 2, (n,), generator=g) if mirror else None
    t0, seen, loss_sum, right, factor = time.perf_counter(), 0, 0.0, 0, 0.0
    for i, sl in enumerate(batch_slices(n, TRAIN_BATCH)):
        idx = order[sl]
        factor = lr_at(first_step + i, total)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        x = (acts[flip[idx], idx] if flip is not None else acts[idx]).to(ev.device, torch.float32)  # (B, C, h, w)
        y = labels[idx].to(ev.device)
        with autocast(ev.device, setup.options.amp_dtype):
            logits = classifier_of(model)(model._dropout(tail_features(model, x)))  # (B, num_classes)
        loss = setup.loss_fn(logits.float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += len(idx)
        loss_sum += float(loss.detach()) * len(idx)
        right += int((logits.argmax(1) == y).sum())
    seconds = time.perf_counter() - t0
    return {
        "train_loss": loss_sum / seen,
        "train_acc": right / seen,
        "lr": optimizer.param_groups[0]["lr"],
        "epoch_time_s": seconds,
        "images_per_s": seen / max(seconds, 1e-9),
    }


def train_tail(
    model: nn.Module,
    tail: nn.ModuleList,
    acts: torch.Tensor,
    labels: torch.Tensor,
    val_acts: torch.Tensor | None,
    val: SplitData | None,
    setup: Setup,
    ev: Evaluation,
    state: TrainState,
    folder: RunFolder,
    budget_end: float | None,
    epochs: int,
    log: Log,
    lr: float = TAIL_LR,
) -> None:
    """The tail's epochs (see the module docstring), each validated, the best weights saved in
    `folder`; under a time budget as many as fit at the pace of the first."""
    optimizer = tail_optimizer(model, tail, lr)
    spe = math.ceil((acts.shape[1] if acts.ndim == 5 else acts.shape[0]) / TRAIN_BATCH)
    g = torch.Generator().manual_seed(0)
    epoch = 0
    tail_best, tail_bad = -math.inf, 0  # the tail's own best: its first epochs trail the probe while they adapt
    while epoch < epochs:
        t0 = time.perf_counter()
        epoch += 1
        row = {"epoch": epoch + 1, **train_tail_epoch(model, optimizer, acts, labels, g, (epoch - 1) * spe, epochs * spe, setup, ev)}
        if val_acts is not None and val is not None:
            row.update(tail_pass(model, val_acts, val.labels, ev)[1])
        else:
            row["val_loss"] = row["val_acc"] = row["val_balanced_acc"] = math.nan
        improved = state.record_epoch(epoch, row, val_acts is not None, setup.best_key)
        folder.write_history(state.history)
        if improved:
            folder.save_model(model, {"best_epoch": epoch + 1, "epochs_run": epoch + 1})
        log(
            f"epoch {epoch + 1}/{epochs + 1}  last blocks: loss {row['train_loss']:.4f}  acc {row['train_acc']:.4f}  "
            f"val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.4f}  {row['epoch_time_s']:.1f}s  {row['images_per_s']:.0f} img/s"
            + ("  *" if improved else "")
        )
        score = row.get(setup.best_key, math.nan)
        if not math.isnan(score):  # no validation split: every planned epoch runs
            tail_best, tail_bad = (score, 0) if score > tail_best else (tail_best, tail_bad + 1)
        if tail_bad >= PATIENCE:  # the tail's own plateau, not the probe's: flowers reached 97.1% at epoch 3, 98.5% at 5
            log(f"early stop: no validation improvement of the last blocks for {PATIENCE} epochs")
            break
        if budget_end is not None:  # as many more epochs as fit at this epoch's pace (validation included)
            fit = epoch + int((budget_end - time.perf_counter()) / (time.perf_counter() - t0))
            if fit < epochs:
                epochs = max(epoch, fit)  # the cosine is re-stretched over the new length
                log(f"time budget: {epochs} epochs of the last blocks fit")
        if epoch == 1 and epochs > 1:  # the first epoch's pace says how long the rest takes
            epoch_s = time.perf_counter() - t0
            announce_estimate((epochs - 1) * epoch_s, epochs - 1, epoch_s, log, ": the remaining epochs of the last blocks")
    state.planned_epochs = epoch + 1
    model.requires_grad_(True)


def fine_tune_last_step(
    setup: Setup, data: RunData, ev: Evaluation, state: TrainState, folder: RunFolder, t_cfg: TrainConfig, t_start: float, log: Log
) -> None:
    """Step 4-5 of fit for --strategy fine-tune-last: `fine_tune_last` with --epochs (a cap) and,
    under --time-budget, the deadline less the final evaluation's measured seconds and a margin."""
    budget_end = None
    if t_cfg.time_budget is not None:
        budget_end = t_start + t_cfg.time_budget * 60 * budget.MARGIN - ev.time_final(setup.model) - budget.SLACK_S
    if t_cfg.precision == "auto" and ev.device.type == "cpu":
        # The tail's training steps in fp32: on 2 cores (AVX512-BF16, no AMX) they ran 9.1-13.5 img/s
        # against 7.5-9.6 in bf16 autocast (224 px, batch 32; EfficientNet-Lite's depthwise convolutions
        # train slower in bf16, bench/RESULTS.md). The cache pass stays in the evaluation dtype (bf16: 1.5-1.7x).
        setup = dataclasses.replace(setup, options=dataclasses.replace(setup.options, amp_dtype=None))
        folder.meta["precision"] = dtype_name(None)  # model.json: the precision of the training steps
    fine_tune_last(setup, data, ev, state, folder, budget_end, t_cfg.epochs, log, t_cfg.lr)
