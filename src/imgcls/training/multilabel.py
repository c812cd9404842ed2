"""Training for multi-label data (labels (N, C) multi-hot instead of (N,) class indices): a
sigmoid per label with binary cross-entropy, the validation pass judged on macro mAP, the
one-vs-rest linear probe, and the end of the run (per-label temperatures and thresholds fitted on
validation, model.json "task", "thresholds", "label_temperatures"). fit.py, build.py and
finetune.py call in here where a single-label run would use softmax.

The recipes' softmax parts: label smoothing is off unless --label-smoothing is given (then each
target moves towards 0.5: y (1 - e) + e / 2); --class-balance does not apply (it evens out classes
that compete for one answer), --pos-weight weighs rare labels' positives instead.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgcls.config import TrainConfig
from imgcls.multilabel import (
    DEFAULT_THRESHOLD,
    choose_thresholds,
    fit_label_temperatures,
    macro_map,
    multilabel_metrics,
    pos_weights,
    sigmoid_probs,
)
from imgcls.runtime import batched_logits, prepare_inference_model
from imgcls.training.loop import final_logits
from imgcls.training.recipes import Recipe
from imgcls.transforms import PreprocessSpec

Log = Callable[[str], None]
MULTI_LABEL = "multi-label"  # model.json "task"


class MultiLabelLoss(nn.Module):
    """Binary cross-entropy with logits, summed over labels and averaged over images (so a label's
    gradient does not shrink as labels are added), with optional positive weights (C,) and label
    smoothing towards 0.5."""

    def __init__(self, pos_weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = targets.to(logits.dtype)  # (B, C)
        if self.label_smoothing:
            t = t * (1 - self.label_smoothing) + self.label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits, t, pos_weight=self.pos_weight, reduction="none").sum(1).mean()


def multilabel_recipe(recipe: Recipe, t_cfg: TrainConfig, log: Log) -> Recipe:
    """The recipe with its softmax label smoothing off, unless the user asked for smoothing."""
    if t_cfg.label_smoothing is None and recipe.label_smoothing:
        log(f"multi-label: the recipe's label smoothing {recipe.label_smoothing:g} is for softmax; off (--label-smoothing sets it)")
        return dataclasses.replace(recipe, label_smoothing=0.0)
    return recipe


def build_multilabel_loss(
    recipe: Recipe, targets: torch.Tensor, mode: str, device: torch.device, log: Log
) -> tuple[MultiLabelLoss, torch.Tensor | None]:
    """The training loss for multi-hot `targets` (N, C) and --pos-weight `mode`; and the positive
    weights (C,) it uses (None: unweighted), which the linear probe uses too."""
    w = pos_weights(targets.numpy(), mode)
    share = targets.float().mean(0).tolist()
    how = "unweighted" if w is None else f"positive weights {w.min():.2g} to {w.max():.2g} (n_neg / n_pos, at most 10)"
    log(
        f"multi-label: sigmoid + binary cross-entropy, {how}; labels on {min(share):.1%} to {max(share):.1%} "
        f"of the training images; class balance does not apply"
    )
    weight = None if w is None else torch.tensor(w, dtype=torch.float32, device=device)
    return MultiLabelLoss(weight, recipe.label_smoothing).to(device), weight


def label_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of right (image, label) decisions at logit 0 (probability 0.5): 1 - Hamming loss."""
    return float(((logits > 0) == (targets > 0.5)).float().mean())


def validate_multilabel(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    spec: PreprocessSpec,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    progress: bool = False,
) -> tuple[float, float, float]:
    """(loss, label accuracy at 0.5, macro mAP) of `model` on uint8 images (N, S, S, 3) and
    multi-hot targets (N, C), eval mode, no TTA; the loss is MultiLabelLoss unweighted."""
    logits = batched_logits(model, images.numpy(), spec, device=device, amp_dtype=amp_dtype, progress=progress, desc="validate")  # (N, C)
    loss = float(MultiLabelLoss()(logits, targets))
    return loss, label_accuracy(logits, targets), macro_map(torch.sigmoid(logits).numpy(), targets.numpy())


def _lbfgs_binary(
    x: torch.Tensor, y: torch.Tensor, reg: float, max_iter: int, pos_weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """C independent L2-regularised logistic regressions on features x (N, F), solved together:
    the loss is a sum of per-label terms, so one L-BFGS run minimises each."""
    w = torch.zeros(y.shape[1], x.shape[1], requires_grad=True)
    b = torch.zeros(y.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = MultiLabelLoss(pos_weight)(x @ w.T + b, y) + 0.5 * reg * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _per_label_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0)  # (C,)


def fit_multilabel_head(
    head: nn.Linear,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    regs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
    max_iter: int = 200,
    log: Log = print,
    class_weights: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Fit `head` (in place) as one logistic regression per label (one-vs-rest) on features, the
    multi-label counterpart of finetune.fit_linear_head (same standardisation, folded back).

    Each label gets its own L2 strength: the one with the lowest validation log-loss for that
    label (a proper score, smooth where AP on a few hundred images moves in steps of one image);
    without validation, 1e-3. The grid goes one step past the single-label probe's, to 1.0: on a
    60-image MIML subset (bench/multilabel.py --subset 60) two of the five labels chose 1.0.
    class_weights (C,): BCE's positive weights (--pos-weight).
    """
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    z_train, y_train = (x_train - mean) / std, y_train.float()
    has_val = x_val is not None and y_val is not None and len(x_val) > 0
    z_val = (x_val - mean) / std if has_val else None
    candidates = regs if has_val else (1e-3,)
    sweep, fits, val_bce = [], [], []
    for reg in candidates:
        w, b = _lbfgs_binary(z_train, y_train, reg, max_iter, class_weights)
        lt = z_train @ w.T + b
        row: dict[str, Any] = {"reg": reg, "train_loss": float(MultiLabelLoss()(lt, y_train)), "train_acc": label_accuracy(lt, y_train)}
        if has_val:
            lv = z_val @ w.T + b
            row.update(val_loss=float(MultiLabelLoss()(lv, y_val)), val_acc=label_accuracy(lv, y_val))
            row["val_map"] = macro_map(torch.sigmoid(lv).numpy(), y_val.numpy())
            val_bce.append(_per_label_bce(lv, y_val.float()))
            log(f"  linear probe  L2 {reg:g}: train acc {row['train_acc']:.4f}  val acc {row['val_acc']:.4f}  val mAP {row['val_map']:.4f}")
        else:
            row.update(val_loss=math.nan, val_acc=math.nan, val_map=math.nan)
        sweep.append(row)
        fits.append((w, b))
    pick = torch.stack(val_bce).argmin(0) if has_val else torch.zeros(y_train.shape[1], dtype=torch.long)  # (C,) per label
    w = torch.stack([fits[int(k)][0][c] for c, k in enumerate(pick)])  # (C, F)
    b = torch.stack([fits[int(k)][1][c] for c, k in enumerate(pick)])  # (C,)
    with torch.no_grad():  # fold the standardisation: W' = W / std, b' = b - W' @ mean
        w_fold = w / std
        head.weight.copy_(w_fold.to(head.weight.dtype))
        head.bias.copy_((b - w_fold @ mean).to(head.bias.dtype))
    lt = z_train @ w.T + b
    most = int(torch.bincount(pick, minlength=len(candidates)).argmax())
    out = {"reg": candidates[most], "regs": [candidates[int(k)] for k in pick]}
    out.update(train_loss=float(MultiLabelLoss()(lt, y_train)), train_acc=label_accuracy(lt, y_train), val_balanced_acc=math.nan)
    if has_val:
        lv = z_val @ w.T + b
        out.update(val_loss=float(MultiLabelLoss()(lv, y_val)), val_acc=label_accuracy(lv, y_val))
        out["val_map"] = macro_map(torch.sigmoid(lv).numpy(), y_val.numpy())
    else:
        out.update(val_loss=math.nan, val_acc=math.nan, val_map=math.nan)
    log(f"  linear probe: L2 per label {', '.join(f'{r:g}' for r in out['regs'])}")
    return {**out, "sweep": [{**r, "chosen": i == most} for i, r in enumerate(sweep)]}


def fit_label_decisions(
    logits: np.ndarray | None, targets: np.ndarray | None, num_labels: int, precision: float | None, log: Log
) -> dict[str, Any]:
    """model.json's multi-label sections from the validation logits (N, C) and targets (N, C):
    "task", "thresholds" (best F1 per label, or the most recall at `precision`) and
    "label_temperatures" (NLL per label); 0.5 and 1 without validation."""
    if logits is None or targets is None or not len(logits):
        log(f"multi-label: no validation split: every threshold {DEFAULT_THRESHOLD}, temperatures 1")
        return {"task": MULTI_LABEL, "thresholds": [DEFAULT_THRESHOLD] * num_labels, "label_temperatures": [1.0] * num_labels}
    temps = fit_label_temperatures(logits, targets)
    thresholds = choose_thresholds(sigmoid_probs(logits, temps), targets, precision)
    rule = "best F1 per label" if precision is None else f"the most recall at precision {precision:g} per label"
    log(
        f"multi-label: thresholds ({rule}, on {len(logits)} validation images) "
        + ", ".join(f"{t:.3f}" for t in thresholds)
        + "; temperatures "
        + ", ".join(f"{t:.2f}" for t in temps)
    )
    return {"task": MULTI_LABEL, "thresholds": thresholds.tolist(), "label_temperatures": temps.tolist()}


def finish_multilabel(
    folder: Any, ev: Any, training: dict[str, Any], t_start: float, log: Log, precision: float | None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Step 6 of fit for multi-label data (finish.finish_run's counterpart): the kept weights'
    logits on the final splits (the recipe's TTA, as evaluate runs them), thresholds and
    temperatures fitted on validation, the metrics per split, and the final model.json; the
    metrics and the calibrated probabilities (N, C) per split. folder: checkpoint.RunFolder;
    ev: build.Evaluation."""
    from imgcls.artifact import load_artifact

    best, _ = load_artifact(folder.path, device=ev.device)
    best_eval, eval_dtype = prepare_inference_model(copy.deepcopy(best), ev.device, ev.amp_dtype)  # `best` stays as trained
    final = final_logits(best_eval, ev, eval_dtype)  # {split: ((N, C) logits, (N, C) targets)}
    logits = {name: z.numpy() for name, (z, _) in final.items()}
    targets = {name: y.numpy() for name, (_, y) in final.items()}
    names = folder.meta["class_names"]
    sections = fit_label_decisions(logits.get("val"), targets.get("val"), len(names), precision, log)
    probs = {name: sigmoid_probs(z, sections["label_temperatures"]) for name, z in logits.items()}
    metrics = {name: multilabel_metrics(probs[name], targets[name], sections["thresholds"], names) for name in logits}
    for name, m in metrics.items():
        log(
            f"{name}: macro mAP {m['macro_map']:.4f}  macro F1 {m['macro_f1']:.4f}  Hamming loss {m['hamming_loss']:.4f}  "
            f"subset accuracy {m['subset_accuracy']:.4f}"
        )
    training = {
        **training,
        "wall_time_s": round(time.perf_counter() - t_start, 2),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    folder.save_model(best, training, metrics, sections)
    return metrics, probs
