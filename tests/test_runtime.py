"""Tests for imgcls.runtime.CompiledForward: when inference switches to a torch.compile'd model,
that it only serves the batch shape it was compiled for, and that a failing compiler leaves
prediction working."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from imgcls import runtime
from imgcls.runtime import CompiledForward, batched_logits, tta_view_count
from imgcls.transforms import PreprocessSpec


class SlowNet(nn.Module):
    """A tiny classifier whose forward takes a known time, so the eager timing is predictable."""

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__()
        self.seconds = seconds
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 3)
        if self.seconds:
            time.sleep(self.seconds)
        return self.fc(self.conv(x).mean((2, 3)))


class FakeCompiler:
    """Stands in for torch.compile: records what it compiled and which shapes the copy ran."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.compiled, self.shapes = fail, 0, []

    def __call__(self, model: nn.Module):
        self.compiled += 1
        if self.fail:
            raise RuntimeError("no C++ compiler\nlong traceback")

        def run(x: torch.Tensor) -> torch.Tensor:
            self.shapes.append(tuple(x.shape))
            return model(x)

        return run


def test_view_counts():
    assert [tta_view_count(m) for m in ("none", "flip", "translate", "flip-translate")] == [1, 2, 3, 6]


def test_auto_compiles_once_the_announced_work_pays(monkeypatch):
    monkeypatch.setattr(runtime, "COMPILE_PAYS_S", 0.05)
    torch.manual_seed(0)
    model = SlowNet(seconds=0.01).eval()
    compiler, logs = FakeCompiler(), []
    fwd = CompiledForward(model, "auto", logs.append, compiler=compiler)
    fwd.expect(4 * 20)  # 20 batches of 4: ~0.01 s each eagerly, 0.2 s in all
    x = torch.randn(4, 3, 8, 8)
    with torch.inference_mode():
        fwd(x)  # warm-up, not timed
        assert compiler.compiled == 0
        fwd(x)  # timed: 18 batches left at 0.01 s > 0.05 s
        assert compiler.compiled == 0
        out = fwd(x)  # compiles now and runs the compiled copy
        assert compiler.compiled == 1 and compiler.shapes == [(4, 3, 8, 8)]
        torch.testing.assert_close(out, model(x))
        fwd(x)
        assert compiler.shapes == [(4, 3, 8, 8)] * 2
        fwd(torch.randn(3, 3, 8, 8))  # a partial last batch: eager, no recompile
        assert compiler.compiled == 1 and len(compiler.shapes) == 2
    assert any("compiling the model for batches of 4" in m for m in logs) and any(m.startswith("compiled in") for m in logs)


def test_auto_leaves_short_jobs_eager(monkeypatch):
    # 0.5 s, far above the ~0.04 s of work: a busy machine (sleep overshooting 10x) must not flip it
    monkeypatch.setattr(runtime, "COMPILE_PAYS_S", 0.5)
    compiler = FakeCompiler()
    fwd = CompiledForward(SlowNet(seconds=0.01).eval(), "auto", compiler=compiler)
    fwd.expect(4 * 4)  # 4 batches: 0.04 s eagerly, less than a compile would cost
    with torch.inference_mode():
        for _ in range(4):
            fwd(torch.randn(4, 3, 8, 8))
    assert compiler.compiled == 0
    # nothing announced (the HTTP server's batches): never compiles
    fwd = CompiledForward(SlowNet(seconds=0.01).eval(), "auto", compiler=compiler)
    with torch.inference_mode():
        for _ in range(6):
            fwd(torch.randn(4, 3, 8, 8))
    assert compiler.compiled == 0


def test_on_and_off():
    compiler = FakeCompiler()
    fwd = CompiledForward(SlowNet().eval(), "off", compiler=compiler)
    fwd.expect(10**9)
    with torch.inference_mode():
        for _ in range(3):
            fwd(torch.randn(2, 3, 8, 8))
    assert compiler.compiled == 0
    fwd = CompiledForward(SlowNet().eval(), "on", compiler=compiler)
    with torch.inference_mode():
        fwd(torch.randn(2, 3, 8, 8))
    assert compiler.compiled == 1 and compiler.shapes == [(2, 3, 8, 8)]
    with pytest.raises(ValueError, match="compile must be one of"):
        CompiledForward(SlowNet(), "sometimes")


def test_failing_compiler_stays_eager_and_says_so():
    compiler, logs = FakeCompiler(fail=True), []
    model = SlowNet().eval()
    fwd = CompiledForward(model, "on", logs.append, compiler=compiler)
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(fwd(x), model(x))
        fwd(x)
    assert compiler.compiled == 1  # not retried on every batch
    assert logs[-1] == "torch.compile failed, predicting without it: RuntimeError: no C++ compiler" and len(logs) == 2


def test_real_torch_compile_matches_eager_through_batched_logits():
    """The real inductor path (frozen bf16 weights, channels_last) gives the eager logits."""
    torch.manual_seed(0)
    model = SlowNet().eval().to(torch.bfloat16).to(memory_format=torch.channels_last)
    spec = PreprocessSpec(img_size=8)
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    logs: list[str] = []
    fwd = CompiledForward(model, "on", logs.append)
    compiled = batched_logits(model, images, spec, batch_size=4, forward=fwd)  # 4 + 4 compiled, the last 2 eager
    eager = batched_logits(model, images, spec, batch_size=4)
    if fwd.compiled is None:  # no working compiler on this machine: the fallback must have said so
        assert any(m.startswith("torch.compile failed") for m in logs)
    else:
        assert fwd.shape == (4, 3, 8, 8)
    torch.testing.assert_close(compiled, eager, atol=0.05, rtol=0.05)
