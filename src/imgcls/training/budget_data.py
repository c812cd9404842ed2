"""Transfer learning under --time-budget: as many images as the pretrained network's first pass
can cover in the time.

A linear probe or a fine-tune starts with a forward pass of the frozen network over every training
and validation image (the probe's features, or the early blocks' activations for fine-tune-last),
and the final evaluation passes over validation again. At 224 px that runs at about 100 images/s
on 2 cores: MNIST's 54,000 training images alone take 9 minutes, so `--model efficientnet_lite0
--pretrained --time-budget 3` ran far past its budget. Here a few batches are timed first; where the
passes would take more than the strategy's share of the time left (PASS_SHARE: the rest is for
fine-tuning), a stratified subset of the training and validation images is kept, and the log and
model.json ("split" -> "budget_subset") say how many.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from imgcls.training import budget
from imgcls.training.build import Setup
from imgcls.training.finetune import extract_features
from imgcls.training.prepare import RunData, SplitData
from imgcls.transforms import PreprocessSpec

# Share of the time left that the frozen network's passes may take, by strategy: a probe is little
# else; fine-tune-last then trains the tail on the cached activations, fine-tune the whole network.
PASS_SHARE = {"linear-probe": 0.8, "fine-tune-last": 0.45, "fine-tune": 0.3}
WARM_IMAGES, TIMED_IMAGES = 8, 32  # images run before the clock starts, then timed
MIN_PER_CLASS = 2  # a subset keeps at least this many images of each class (or all it has)


def pass_rate(model: nn.Module, images: torch.Tensor, spec: PreprocessSpec, device: torch.device, amp_dtype: torch.dtype | None) -> float:
    """Images per second of the frozen network's forward pass, timed on a few training images."""
    x = images[: WARM_IMAGES + TIMED_IMAGES].numpy()
    extract_features(model, x[:WARM_IMAGES], spec, device, amp_dtype)
    t = time.perf_counter()
    extract_features(model, x[WARM_IMAGES:], spec, device, amp_dtype)
    return max(1, len(x) - WARM_IMAGES) / max(time.perf_counter() - t, 1e-6)


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of about `fraction` of the rows, class by class (at least MIN_PER_CLASS of
    each); multi-label (N, C) targets: a uniform random subset."""
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    if y.ndim == 2:
        return np.sort(rng.choice(len(y), max(MIN_PER_CLASS, round(fraction * len(y))), replace=False))
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = min(len(idx), max(MIN_PER_CLASS, round(fraction * len(idx))))
        keep.append(rng.choice(idx, k, replace=False))
    return np.sort(np.concatenate(keep))


def take(split: SplitData, idx: np.ndarray) -> SplitData:
    t = torch.from_numpy(idx)
    return SplitData(split.images[t], split.labels[t], [split.paths[i] for i in idx], [split.hashes[i] for i in idx])


def fit_to_budget(
    data: RunData,
    setup: Setup,
    time_budget: float | None,
    t_start: float,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    seed: int,
    log: Callable[[str], None],
) -> tuple[RunData, Setup]:
    """`data` and `setup` as they are, or with stratified subsets of train and val where the frozen
    network's passes over them (train once, twice with fine-tune-last's mirrored copies; val for the
    probe and the final evaluation) would not fit in PASS_SHARE[strategy] of what is left of
    `time_budget` minutes."""
    strategy, spec, mirror = setup.strategy, setup.data.spec, setup.data.aug.hflip
    if time_budget is None or strategy not in PASS_SHARE:
        return data, setup
    train, val = data.train, data.val
    n_tr, n_va = len(train.paths), len(val.paths) if val is not None else 0
    passes = n_tr * (2 if strategy == "fine-tune-last" and mirror else 1) + 2 * n_va
    left = time_budget * 60 * budget.MARGIN - (time.perf_counter() - t_start)
    rate = pass_rate(setup.model, train.images, spec, device, amp_dtype)
    affordable = PASS_SHARE[strategy] * max(left, 0.0) * rate
    if passes <= affordable:
        return data, setup
    fraction = affordable / passes
    splits = dict(data.splits, train=take(train, stratified_subset(train.labels, fraction, seed)))
    if val is not None and n_va:
        splits["val"] = take(val, stratified_subset(val.labels, fraction, seed + 1))
    n_val = len(splits["val"].paths) if "val" in splits else 0
    kept = {"train": len(splits["train"].paths), "val": n_val, "of": {"train": n_tr, "val": n_va}}
    log(
        f"time budget: the pretrained network's passes over {n_tr:,} training and {n_va:,} validation images would take "
        f"{passes / rate / 60:.1f} min at {rate:.0f} img/s, more than this {time_budget:g}-minute budget leaves for them: "
        f"training on {kept['train']:,} and validating on {kept['val']:,} of them (stratified); a larger --time-budget uses more"
    )
    counts = {**data.split_info.get("counts", {}), "train": kept["train"], **({"val": kept["val"]} if "val" in splits else {})}
    data = dataclasses.replace(data, splits=splits, split_info={**data.split_info, "counts": counts, "budget_subset": kept})
    return data, with_subset(setup, data)


def with_subset(setup: Setup, data: RunData) -> Setup:
    """`setup` training on `data`'s train split (after `fit_to_budget` kept a subset)."""
    train = data.train
    weights = setup.class_balance.sample_weights(train.labels) if setup.class_balance else None
    subset = dataclasses.replace(setup.data, images=train.images, labels=train.labels, sample_weights=weights)
    return dataclasses.replace(setup, data=subset)
