"""Stopping a training run part-way, as Ctrl-C would, for the resume tests."""

from __future__ import annotations

from typing import Any

import pytest

import imgcls.training.fit as fit_mod


def interrupt_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Make the run raise KeyboardInterrupt as its `epoch`-th training epoch starts (1-based);
    `monkeypatch.undo()` restores the real epochs."""
    real = fit_mod.train_one_epoch
    calls = []

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_mod, "train_one_epoch", interrupted)
