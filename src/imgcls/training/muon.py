"""Muon for the convolution filters, Nesterov SGD for everything else, in one optimizer.

Muon (Keller Jordan, 2024, kellerjordan.github.io/posts/muon; airbench94_muon in
github.com/KellerJordan/cifar10-airbench): the momentum of a 4-D conv weight, seen as a matrix
(C_out, C_in * kh * kw), is replaced by the nearest semi-orthogonal matrix (a few Newton-Schulz
iterations), so every direction of the update gets the same size. Each step first rescales the
weight to a norm of sqrt(C_out) (unit-norm filters on average), which makes the rate scale-free
and takes the place of weight decay for those weights. airbench94_muon: lr 0.24, momentum 0.6,
Nesterov; it reached 94% CIFAR-10 in fewer epochs than the SGD recipe.

One optimizer, not two, so the loop's step / zero_grad, the `Schedule` (every group's
"initial_lr") and checkpoints (each parameter's "momentum_buffer" tensor) work unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from imgcls.runtime import cpu_has_fast_bf16

# Quintic Newton-Schulz coefficients tuned for a steep slope at zero (Jordan 2024): 3 steps bring
# the singular values of a normalised matrix to roughly [0.7, 1.2], which is all the update needs.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 3


def ns_dtype(g: torch.Tensor) -> torch.dtype:
    """The iteration's dtype: bf16 (as airbench) on accelerators and CPUs with AMX or AVX512-BF16, else float32.
    Measured on 2 AMX cores, the 6 filters of small_cnn at widths 48/192/192: 12 ms a step in bf16
    against 38 ms in float32 (best of 15), next to about 200 ms for the step's forward and backward."""
    return torch.bfloat16 if g.is_cuda or cpu_has_fast_bf16() else torch.float32


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with the row and column spaces of `g` (2-D); dtype None: `ns_dtype`."""
    a, b, c = NS_COEFFS
    x = g.to(dtype or ns_dtype(g))
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + eps)  # spectral norm <= Frobenius norm <= 1: inside the iteration's range
    for _ in range(steps):
        gram = x @ x.T  # (r, r), r = the shorter side
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class MuonSGD(torch.optim.Optimizer):
    """Groups with "muon": True take Muon steps (4-D conv filters); the others Nesterov SGD steps,
    as torch.optim.SGD takes them (weight decay added to the gradient, then momentum).

    Each group carries its own "lr", "momentum" and "weight_decay" (Muon groups ignore weight
    decay: the weight is renormalised every step).
    """

    def __init__(self, groups: list[dict[str, Any]], lr: float, momentum: float) -> None:
        for g in groups:
            if g.get("muon") and any(p.ndim < 2 for p in g["params"]):
                raise ValueError("Muon groups take matrices or conv filters (2-D or more), not biases or norm parameters")
        super().__init__(groups, {"lr": lr, "momentum": momentum, "weight_decay": 0.0, "muon": False})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        assert closure is None, "MuonSGD takes no closure"
        for group in self.param_groups:
            lr, momentum, muon = group["lr"], group["momentum"], group["muon"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not muon and group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(g)
                g = g.add(buf, alpha=momentum)  # Nesterov
                if muon:
                    p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))  # (C_out, ...): filters of unit norm on average
                    g = orthogonalize(g.reshape(len(g), -1)).view_as(p)  # (C_out, C_in * kh * kw) -> p's shape
                p.add_(g, alpha=-lr)
