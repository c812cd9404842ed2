"""The optimizer: one builder (`build_optimizer`) over parameter groups, and the three ways a run
groups its parameters (`param_groups` picks one):

- `decay_groups`: weight decay on weights, none on biases and norm parameters (the generic recipe);
- `norm_scaled_groups`: normalisation-layer parameters at bias_lr_scale x the rate (the fast recipe, airbench);
- `discriminative_groups`: rates rising from lr / 100 in the first layers to lr at the head (fine-tuning).

Every group carries its own "lr", "initial_lr" (the base the `Schedule` scales each step) and
"weight_decay", so the optimizer's defaults never decide anything.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from imgcls.training.finetune import classifier_of
from imgcls.training.recipes import Recipe

ParamGroup = dict[str, Any]


def _group(params: list[nn.Parameter], lr: float, weight_decay: float) -> ParamGroup:
    return {"params": params, "lr": lr, "initial_lr": lr, "weight_decay": weight_decay}


def decay_groups(model: nn.Module, lr: float, weight_decay: float) -> list[ParamGroup]:
    """Weights (>1-D tensors) with weight decay, then biases and norm parameters (1-D) without."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [_group([p for p in trainable if p.ndim > 1], lr, weight_decay), _group([p for p in trainable if p.ndim <= 1], lr, 0.0)]
    return [g for g in groups if g["params"]]


def norm_scaled_groups(model: nn.Module, lr: float, weight_decay: float, scale: float) -> list[ParamGroup]:
    """Everything else at lr, then normalisation-layer parameters at scale x lr (in small_cnn only
    the BN biases train; its BN scales are frozen). The base group comes first: metrics.csv logs its rate.

    Weight decay is divided by each group's multiplier, so every weight shrinks at the same rate
    per step (airbench). Frozen parameters (whitening weights, BN scales) are left out.
    """
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    norm_ids = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    other = [p for p in trainable if id(p) not in norm_ids]
    norm = [p for p in trainable if id(p) in norm_ids]
    return [_group(params, lr * s, weight_decay / s) for params, s in ((other, 1.0), (norm, scale)) if params]


def discriminative_groups(model: nn.Module, lr: float, weight_decay: float, n_groups: int = 3, lr_range: float = 100.0) -> list[ParamGroup]:
    """Learning rates rising from lr / lr_range (first layers) to lr (the classifier).

    Backbone parameters, in definition order (which follows depth in every model here), are cut
    into `n_groups` equal chunks with geometrically spaced rates, as fastai's `slice(lr/100, lr)`.
    Within each chunk, weights get weight decay and biases and norm parameters none.
    """
    head = list(classifier_of(model).parameters())
    head_ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    chunks = [[backbone[j] for j in idx] for idx in np.array_split(np.arange(len(backbone)), n_groups)]
    rates = [lr / lr_range ** (1 - i / n_groups) for i in range(len(chunks))] + [lr]
    groups: list[ParamGroup] = []
    for params, group_lr in zip([*chunks, head], rates):
        for decay in (True, False):
            ps = [p for p in params if (p.ndim > 1) == decay]
            if ps:
                groups.append(_group(ps, group_lr, weight_decay if decay else 0.0))
    return groups


def param_groups(model: nn.Module, recipe: Recipe, strategy: str) -> list[ParamGroup]:
    """The grouping a run uses: discriminative rates to fine-tune, the fast recipe's norm scaling,
    else plain decay / no-decay."""
    if strategy == "fine-tune":
        return discriminative_groups(model, recipe.lr, recipe.weight_decay)
    if recipe.name == "fast":
        return norm_scaled_groups(model, recipe.lr, recipe.weight_decay, recipe.bias_lr_scale)
    return decay_groups(model, recipe.lr, recipe.weight_decay)


def muon_groups(recipe: Recipe, groups: list[ParamGroup]) -> list[ParamGroup]:
    """`groups` with their 4-D conv filters moved to one Muon group (recipe.muon_lr, muon_momentum,
    no weight decay: Muon renormalises them) at the end; the rest keep their SGD rates, at
    recipe.momentum, and their order (metrics.csv logs the first group's rate)."""
    filters = [p for g in groups for p in g["params"] if p.ndim == 4]
    rest = [{**g, "params": [p for p in g["params"] if p.ndim != 4], "momentum": recipe.momentum, "muon": False} for g in groups]
    muon = {**_group(filters, recipe.muon_lr, 0.0), "momentum": recipe.muon_momentum, "muon": True}
    return [g for g in (*rest, muon) if g["params"]]


def build_optimizer(recipe: Recipe, groups: list[ParamGroup]) -> torch.optim.Optimizer:
    """The recipe's optimizer over `groups`: SGD with Nesterov momentum, AdamW, or Muon for the
    conv filters with Nesterov SGD for the rest (`muon.MuonSGD`)."""
    if recipe.optimizer == "muon":
        from imgcls.training.muon import MuonSGD

        return MuonSGD(muon_groups(recipe, groups), lr=recipe.lr, momentum=recipe.momentum)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.momentum > 0)
    return torch.optim.AdamW(groups, lr=recipe.lr)
