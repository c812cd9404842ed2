"""Transfer learning from pretrained backbones: the linear probe on cached features and the rule
that picks a strategy from the dataset size (fine-tuning's discriminative learning rates are
`imgcls.training.optim.discriminative_groups`).

Strategies (`--strategy`):
- linear-probe: backbone frozen; pooled features computed once (eval mode, so BatchNorm
  statistics are untouched) and a logistic-regression head fitted on them with L-BFGS, its L2
  strength chosen on validation, as in the CLIP paper's linear probes (Radford et al. 2021).
- fine-tune: the linear probe first, then every layer trained with smaller learning rates for
  earlier layers. Starting from a fitted head is LP-FT (Kumar et al. 2022, "Fine-Tuning can
  Distort Pretrained Features"): the random-head phase of fastai's `fine_tune` is replaced by the
  exact probe, which takes seconds and keeps early gradients from wrecking the features.
- fine-tune-last: the probe, then only the last blocks, trained on cached activations of the
  frozen early blocks (imgcls.training.partial; EfficientNet-Lite): a fraction of full
  fine-tuning's cost on a CPU.
- full: every layer from the start at one learning rate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from imgcls.config import STRATEGIES
from imgcls.runtime import batched_logits
from imgcls.training.multilabel import fit_multilabel_head
from imgcls.training.prepare import SplitData
from imgcls.transforms import PreprocessSpec

LINEAR_PROBE_MAX_IMAGES = 500  # below this many training images, auto picks the linear probe


def resolve_strategy(strategy: str, pretrained: bool, n_train: int) -> str:
    """auto: from scratch -> full; pretrained with few images -> linear-probe, else fine-tune."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy in ("linear-probe", "fine-tune", "fine-tune-last") and not pretrained:
        # A head fitted on a random backbone validates at chance (50% on two classes): never silently.
        raise ValueError(
            f"--strategy {strategy} needs pretrained weights (the backbone stays frozen or nearly so): add --pretrained "
            "(efficientnet_lite0/1/2 have built-in ImageNet weights) or --weights FILE|URL, or use --strategy full to train from scratch"
        )
    if strategy != "auto":
        return strategy
    if not pretrained:
        return "full"
    return "linear-probe" if n_train < LINEAR_PROBE_MAX_IMAGES else "fine-tune"


def classifier_of(model: nn.Module) -> nn.Linear:
    """The final linear layer: logits == classifier(forward_head(feats, pre_logits=True))."""
    return model.get_submodule(model.classifier_name)


def extract_features(
    model: nn.Module,
    images: np.ndarray,
    spec: PreprocessSpec,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    batch_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Pooled pre-logit features (N, F) in float32 for uint8 images (N, S, S, 3), eval mode."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(x), pre_logits=True)

    return batched_logits(
        model, images, spec, batch_size=batch_size, device=device, amp_dtype=amp_dtype, progress=progress, desc="features", forward=forward
    )


def _lbfgs_logreg(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, reg: float, bias: bool, max_iter: int, class_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True) if bias else None
    params = [w] + ([b] if bias else [])
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = x @ w.T + (b if bias else 0)
        loss = nn.functional.cross_entropy(logits, y, weight=class_weights) + 0.5 * reg * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), (b.detach() if bias else None)


def fit_linear_head(
    head: nn.Linear,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    regs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1),
    max_iter: int = 200,
    log: Callable[[str], None] = print,
    class_weights: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Fit `head` (in place) as an L2-regularised logistic regression on features.

    Features are standardised for a well-conditioned problem and the scaling is folded back into
    the weights, so the model's own forward gives the fitted probabilities. The L2 strength is
    the one with the best validation accuracy (lowest validation loss on ties); without a
    validation set, 1e-3. class_weights (C,): a weighted cross-entropy (--class-balance), and the
    L2 strength is then chosen on balanced accuracy.
    """
    has_bias = head.bias is not None
    mean = x_train.mean(0) if has_bias else torch.zeros(x_train.shape[1])
    std = x_train.std(0).clamp_min(1e-6)
    z_train = (x_train - mean) / std
    candidates = regs if x_val is not None and len(x_val) else (1e-3,)
    best: dict[str, Any] | None = None
    sweep = []  # every candidate's numbers, for the report's L2 plot
    for reg in candidates:
        w, b = _lbfgs_logreg(z_train, y_train, head.out_features, reg, has_bias, max_iter, class_weights)
        row: dict[str, Any] = {"reg": reg, "w": w, "b": b}
        logits = z_train @ w.T + (b if has_bias else 0)
        row["train_loss"] = float(nn.functional.cross_entropy(logits, y_train))
        row["train_acc"] = float((logits.argmax(1) == y_train).float().mean())
        if x_val is not None and len(x_val):
            vl = ((x_val - mean) / std) @ w.T + (b if has_bias else 0)
            row["val_loss"] = float(nn.functional.cross_entropy(vl, y_val))
            row["val_acc"] = float((vl.argmax(1) == y_val).float().mean())
            row["val_balanced_acc"] = balanced_accuracy(vl, y_val)
            log(
                f"  linear probe  L2 {reg:g}: train acc {row['train_acc']:.4f}  "
                f"val acc {row['val_acc']:.4f}  val loss {row['val_loss']:.4f}"
            )
        else:
            row["val_loss"] = row["val_acc"] = row["val_balanced_acc"] = math.nan
        sweep.append({k: v for k, v in row.items() if k not in ("w", "b")})
        key = "val_acc" if class_weights is None else "val_balanced_acc"
        if best is None or (row[key], -row["val_loss"]) > (best[key], -best["val_loss"]):
            best = row
    assert best is not None
    with torch.no_grad():  # fold the standardisation: W' = W / std, b' = b - W' @ mean
        w_fold = best["w"] / std
        head.weight.copy_(w_fold.to(head.weight.dtype))
        if has_bias:
            head.bias.copy_((best["b"] - w_fold @ mean).to(head.bias.dtype))
    return {**{k: v for k, v in best.items() if k not in ("w", "b")}, "sweep": sweep}


def balanced_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Mean recall over the classes present in y."""
    right = logits.argmax(1) == y
    counts = torch.bincount(y, minlength=logits.shape[1])
    hits = torch.bincount(y[right], minlength=logits.shape[1])
    return float((hits[counts > 0] / counts[counts > 0]).mean())


def probe_history_row(fit: dict[str, Any], seconds: float, images_per_s: float) -> dict[str, Any]:
    """metrics.csv's one row for a fitted linear probe (`fit_linear_head`'s answer): epoch 1, no optimizer steps."""
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc")
    return {"epoch": 1, **{k: fit[k] for k in keys}, "lr": 0.0, "epoch_time_s": seconds, "images_per_s": images_per_s}


def linear_probe(
    model: nn.Module,
    train: SplitData,
    val: SplitData | None,
    spec: PreprocessSpec,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    progress: bool,
    log: Callable[[str], None],
    class_weights: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Fit the classifier of `model` on its frozen features of `train`, the L2 strength chosen on
    `val` (class_weights: weighted, chosen on balanced accuracy, see `fit_linear_head`); return the
    probe's metrics.csv row (epoch 1), with "probe_sweep": every L2 strength tried
    (`fit_linear_head`'s "sweep"), which metrics.csv leaves out."""
    t0 = time.perf_counter()
    x_tr = extract_features(model, train.images.numpy(), spec, device, amp_dtype, progress=progress)
    x_va = (
        extract_features(model, val.images.numpy(), spec, device, amp_dtype, progress=progress)
        if val is not None and len(val.paths)
        else None
    )
    t_feat = time.perf_counter() - t0
    n_img = len(x_tr) + (len(x_va) if x_va is not None else 0)
    log(f"features: {n_img} images in {t_feat:.1f}s ({n_img / max(t_feat, 1e-9):.0f} img/s)")
    y_va = val.labels if x_va is not None and val is not None else None
    # multi-label (N, C) targets: one logistic regression per label; class_weights are then BCE's positive weights
    fit_head = fit_multilabel_head if train.labels.ndim == 2 else fit_linear_head
    fit = fit_head(classifier_of(model), x_tr, train.labels, x_va, y_va, log=log, class_weights=class_weights)
    seconds = time.perf_counter() - t0
    log(f"linear probe: L2 {fit['reg']:g}, train acc {fit['train_acc']:.4f}, val acc {fit['val_acc']:.4f} ({seconds:.1f}s)")
    return {
        **probe_history_row(fit, seconds, n_img / max(t_feat, 1e-9)),
        "probe_sweep": [{**r, "chosen": r.get("chosen", r["reg"] == fit["reg"])} for r in fit["sweep"]],
        **({"val_map": fit["val_map"]} if "val_map" in fit else {}),  # multi-label: the best epoch's measure
    }
