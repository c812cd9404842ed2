"""Tests for imgcls.training.optim: the three parameter groupings and the one optimizer builder."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from imgcls.config import ModelConfig, TrainConfig
from imgcls.training.optim import build_optimizer, decay_groups, discriminative_groups, norm_scaled_groups, param_groups
from imgcls.training.recipes import resolve_recipe
from imgcls.transforms import AugmentSpec


class Toy(nn.Module):
    """conv -> BN -> conv -> LayerNorm -> head, with the model surface's classifier_name."""

    classifier_name = "head"

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.ln = nn.Conv2d(4, 4, 3), nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)
        self.bn.weight.requires_grad_(False)  # frozen, as small_cnn's BN scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 2)
        x = self.conv2(self.bn(self.conv1(x)))
        return self.head(self.ln(x.mean((2, 3))))


def ids(groups: list[dict]) -> list[set[int]]:
    return [{id(p) for p in g["params"]} for g in groups]


def trainable_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def assert_partition(model: nn.Module, groups: list[dict]) -> None:
    """Every trainable parameter in exactly one group, no frozen one in any."""
    sets = ids(groups)
    assert sum(len(s) for s in sets) == len(set().union(*sets)) and set().union(*sets) == trainable_ids(model)


def test_decay_groups_exempt_biases_and_norm_parameters():
    m = Toy()
    groups = decay_groups(m, 0.01, 0.05)
    assert_partition(m, groups)
    decay, no_decay = groups
    assert ids([decay])[0] == {id(m.conv1.weight), id(m.conv2.weight), id(m.head.weight)} and decay["weight_decay"] == 0.05
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert all(g["lr"] == g["initial_lr"] == 0.01 for g in groups)


def test_norm_scaled_groups_speed_up_norm_parameters_at_the_same_decay_per_step():
    m = Toy()
    base, norm = norm_scaled_groups(m, 0.1, 0.002, scale=64.0)
    assert_partition(m, [base, norm])
    assert ids([norm])[0] == {id(m.bn.bias), id(m.ln.weight), id(m.ln.bias)}  # the frozen BN scale left out
    assert norm["lr"] == norm["initial_lr"] == pytest.approx(6.4) and base["lr"] == 0.1
    assert norm["lr"] * norm["weight_decay"] == pytest.approx(base["lr"] * base["weight_decay"])


def test_discriminative_groups_rise_from_lr_over_100_to_the_head():
    m = Toy()
    groups = discriminative_groups(m, 1e-3, 0.05, n_groups=3)
    assert_partition(m, groups)
    backbone = [p for n, p in m.named_parameters() if p.requires_grad and not n.startswith("head.")]  # definition order
    rates = sorted({g["lr"] for g in groups})
    assert rates == pytest.approx([1e-5, 1e-3 / 100 ** (2 / 3), 1e-3 / 100 ** (1 / 3), 1e-3])
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert [lr_of[id(p)] for p in backbone] == sorted(lr_of[id(p)] for p in backbone)  # earlier layers never faster
    assert lr_of[id(backbone[0])] == pytest.approx(1e-5) and lr_of[id(m.head.weight)] == lr_of[id(m.head.bias)] == 1e-3
    for g in groups:
        assert g["weight_decay"] == (0.05 if all(p.ndim > 1 for p in g["params"]) else 0.0) and g["initial_lr"] == g["lr"]


def test_param_groups_follow_strategy_and_recipe():
    m = Toy()
    fast = resolve_recipe(TrainConfig(recipe="fast"), ModelConfig(), AugmentSpec(), 1000)
    generic = resolve_recipe(TrainConfig(recipe="generic"), ModelConfig(), AugmentSpec(), 1000)
    assert len({g["lr"] for g in param_groups(m, generic, "fine-tune")}) == 4  # discriminative, whatever the recipe
    assert [g["lr"] for g in param_groups(m, fast, "full")] == pytest.approx([fast.lr, 64 * fast.lr])
    assert [g["weight_decay"] for g in param_groups(m, generic, "full")] == [generic.weight_decay, 0.0]


def test_build_optimizer_keeps_each_groups_rate():
    m = Toy()
    generic = resolve_recipe(TrainConfig(recipe="generic"), ModelConfig(), AugmentSpec(), 1000)
    adamw = build_optimizer(generic, discriminative_groups(m, generic.lr, generic.weight_decay))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["lr"] == pytest.approx(generic.lr / 100)
    sgd_recipe = dataclasses.replace(generic, optimizer="sgd", momentum=0.9)
    sgd = build_optimizer(sgd_recipe, decay_groups(m, 0.05, 0.0))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    plain = build_optimizer(dataclasses.replace(sgd_recipe, momentum=0.0), decay_groups(m, 0.05, 0.0))  # Nesterov needs momentum
    assert not plain.defaults["nesterov"]
    loss = m(torch.randn(2, 3, 8, 8)).sum()
    loss.backward()
    before = m.head.weight.detach().clone()
    sgd.step()
    assert not torch.equal(before, m.head.weight)
