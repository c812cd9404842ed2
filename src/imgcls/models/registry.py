"""The model registry: one dict filled by a decorator, one `create_model` entry point."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from imgcls.transforms import PreprocessSpec

# A weight loader returns a plain state dict (tensors only) for the model built with
# `pretrained_classes` outputs; it raises `MissingWeightsError` naming what to install.
WeightLoader = Callable[[], dict[str, torch.Tensor]]


class MissingWeightsError(RuntimeError):
    """Pretrained weights were asked for but are not on this machine."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    default_spec: PreprocessSpec
    description: str = ""
    weight_loader: WeightLoader | None = None
    pretrained_classes: int = 1000
    pretrained_source: str = ""  # human-readable: where pretrained weights come from
    # Bumped whenever the state-dict layout changes; model.json records it, so a model folder
    # from another layout gets a clear error instead of a wall of missing keys.
    arch_version: int = 1


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    default_spec: PreprocessSpec,
    description: str = "",
    weight_loader: WeightLoader | None = None,
    pretrained_classes: int = 1000,
    pretrained_source: str = "",
    arch_version: int = 1,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register `builder(num_classes=..., **kwargs) -> nn.Module` under `name`."""

    def deco(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelEntry(
            name, builder, default_spec, description, weight_loader, pretrained_classes, pretrained_source, arch_version
        )
        return builder

    return deco


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build a registered model with a fresh `num_classes` head.

    pretrained=True loads the entry's weights (built with `pretrained_classes` outputs) and then
    replaces the classifier when `num_classes` differs. Nothing is downloaded here.
    """
    entry = get_entry(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not pretrained:
        return entry.builder(num_classes=num_classes, **kwargs)
    if entry.weight_loader is None:
        raise MissingWeightsError(f"model {name!r} has no built-in pretrained weights; pass a weights file instead")
    model = entry.builder(num_classes=entry.pretrained_classes, **kwargs)
    load_state_dict_strict(model, entry.weight_loader(), source=entry.pretrained_source or name)
    if num_classes != entry.pretrained_classes:
        model.reset_classifier(num_classes)
    return model


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, raising an error that names the first mismatching keys."""
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True)


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """ValueError naming the first missing, unexpected and wrongly shaped keys of `state` for `model`
    (which may live on the meta device: only names and shapes are compared)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:5])}")
        if shape:
            parts.append(f"shape mismatches ({len(shape)}): {'; '.join(shape[:5])}")
        raise ValueError(f"weights from {source} do not fit {type(model).__name__}: " + " | ".join(parts))
