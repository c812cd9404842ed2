"""The trust toolbox: pure functions on logits, probabilities and labels (no I/O, no training).

- Calibration: temperature scaling (Guo et al. 2017) fitted by NLL, ECE and reliability-diagram bins.
- Prediction sets: split conformal with APS / RAPS (Romano et al. 2020; Angelopoulos et al. 2021).
- Class imbalance: loss weights, sampler weights, logit-adjustment offsets (Menon et al. 2021).

"Unknown" (out-of-distribution) scores and the detector live in `imgcls.ood`.

Arrays may be NumPy or torch; probabilities and weights come back as NumPy. Logits are (N, C),
labels int (N,).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imgcls.config import CLASS_WEIGHT_MODES, IMBALANCE_RATIO_LIMIT
from imgcls.metrics import expected_calibration_error

Array = np.ndarray | torch.Tensor

# A fitted temperature outside this range means the logits or labels are broken (constant logits,
# labels from another class order), not a model that needs it: clamp rather than trust it.
TEMPERATURE_RANGE = (0.05, 20.0)


def _t64(x: Array) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().to("cpu", torch.float64)


def _np(x: Array) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()  # NumPy has no bf16
    return np.asarray(x)


def _labels(y: Array) -> torch.Tensor:
    return torch.as_tensor(_np(y)).long()


# ----------------------------------------------------------------------------- temperature


def nll(logits: Array, labels: Array, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / temperature)."""
    return float(F.cross_entropy(_t64(logits) / temperature, _labels(labels)))


def fit_temperature(logits: Array, labels: Array, max_iter: int = 100) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) on held-out (logits, labels).

    L-BFGS on log T (T stays positive, the problem is well scaled); T is clamped to
    TEMPERATURE_RANGE, and 1.0 comes back when the data is empty or not finite, when every
    prediction is right, or when the fitted T does not lower the NLL.
    """
    z, y = _t64(logits), _labels(labels)
    if len(y) == 0 or not bool(torch.isfinite(z).all()):
        return 1.0
    if bool((z.argmax(1) == y).all()):
        # No minimum: the NLL falls towards 0 as T -> 0, so the fit would sharpen without limit on
        # no evidence (small_cnn, 100% right on 45 synthetic val images, got T = 0.13).
        return 1.0
    lo, hi = math.log(TEMPERATURE_RANGE[0]), math.log(TEMPERATURE_RANGE[1])
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.clamp(lo, hi).exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().clamp(lo, hi).exp())
    if not math.isfinite(t) or not nll(z, y, t) < nll(z, y, 1.0):
        return 1.0
    return t


def apply_temperature(logits: Array, temperature: float) -> Array:
    """logits / temperature, as the same kind of array (softmax of it is the calibrated probability)."""
    return logits / temperature


def softmax(logits: Array, temperature: float = 1.0) -> np.ndarray:
    """Probabilities (N, C) in float64 from logits (N, C)."""
    return torch.softmax(_t64(logits) / temperature, dim=1).numpy()


def reliability_diagram(probs: Array, labels: Array, n_bins: int = 15) -> list[dict[str, Any]]:
    """Per equal-width confidence bin: lower, upper, confidence (mean), accuracy, count.

    The bins are those of `metrics.expected_calibration_error`, so sum(count * |accuracy -
    confidence|) / N is the ECE; an empty bin has count 0 and None for confidence and accuracy.
    """
    p, y = _np(probs), _np(labels)
    conf, correct = p.max(axis=1), p.argmax(axis=1) == y
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    out = []
    for b in range(n_bins):
        m = bins == b
        n = int(m.sum())
        out.append(
            {
                "lower": b / n_bins,
                "upper": (b + 1) / n_bins,
                "count": n,
                "confidence": float(conf[m].mean()) if n else None,
                "accuracy": float(correct[m].mean()) if n else None,
            }
        )
    return out


def temperature_report(logits: Array, labels: Array, temperature: float, n_bins: int = 15) -> dict[str, Any]:
    """NLL, ECE and reliability bins before (T = 1) and after `temperature`, JSON-ready."""
    y = _np(labels)
    before, after = softmax(logits), softmax(logits, temperature)
    return {
        "temperature": float(temperature),
        "num_samples": int(len(y)),
        "nll_before": nll(logits, y),
        "nll_after": nll(logits, y, temperature),
        "ece_before": expected_calibration_error(before, y, n_bins),
        "ece_after": expected_calibration_error(after, y, n_bins),
        "reliability_before": reliability_diagram(before, y, n_bins),
        "reliability_after": reliability_diagram(after, y, n_bins),
    }


# ----------------------------------------------------------------------------- conformal prediction sets


def _set_scores(probs: np.ndarray, penalty: float, k_reg: int, u: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(class order by falling probability (N, C), the APS/RAPS score of each rank (N, C)).

    Score of rank r: the mass of ranks 1..r, less u * p_(r) when randomised, plus
    penalty * max(0, r - k_reg) (RAPS). It rises with r, so a set is a prefix of the order.
    """
    order = np.argsort(-probs, axis=1, kind="stable")
    p_sorted = np.take_along_axis(probs, order, axis=1)  # (N, C)
    scores = np.cumsum(p_sorted, axis=1)
    if u is not None:
        scores = scores - u[:, None] * p_sorted
    if penalty:
        scores = scores + penalty * np.maximum(0, np.arange(1, probs.shape[1] + 1) - k_reg)[None, :]
    return order, scores


def _draws(n: int, randomized: bool, inclusive: bool, seed: int) -> np.ndarray | None:
    """APS's u per row: uniform draws when randomised, else 1 (mass above the class) or None (inclusive)."""
    if randomized:
        return np.random.default_rng(seed).random(n)
    return None if inclusive else np.ones(n)


def conformal_scores(
    probs: Array, labels: Array, randomized: bool = False, penalty: float = 0.0, k_reg: int = 1, seed: int = 0, inclusive: bool = False
) -> np.ndarray:
    """The APS (RAPS when penalty > 0) non-conformity score of each true label (N,).

    Not randomised, the score is the mass of the classes ranked above the true one (APS with
    u = 1), so the top class, which every set holds, scores 0. inclusive=True is the older score
    (the mass up to and including the true class): with accurate, confident models it counted the
    confident correct images as misses that the always-held top class then covered, and the sets
    grew to 4-7 classes at 95 % accuracy for a 0.9 target (coverage 0.97-1.0, bench/RESULTS.md).
    """
    p, y = _np(probs).astype(np.float64), _np(labels).astype(np.int64)
    u = _draws(len(p), randomized, inclusive, seed)
    order, scores = _set_scores(p, penalty, k_reg, u)
    rank = np.argmax(order == y[:, None], axis=1)  # (N,) 0-based position of the label
    return scores[np.arange(len(p)), rank]


def fit_conformal(
    probs_val: Array,
    labels_val: Array,
    coverage: float = 0.9,
    randomized: bool = False,
    penalty: float = 0.0,
    k_reg: int = 1,
    seed: int = 0,
) -> float:
    """qhat: the ceil((n + 1) * coverage)-th smallest calibration score (split conformal's
    finite-sample correction), so that sets from `prediction_sets` hold the true label with
    probability >= coverage on exchangeable data.

    randomized=False (the default) gives deterministic sets, their coverage at least the target
    and at least the top-1 accuracy (the top class is always in); randomized=True gives coverage close to exactly the target, but an image's
    set then depends on a random draw. penalty > 0 is RAPS, which keeps sets small by charging for
    every rank past k_reg. Fit and predict with the same options and the same kind of probabilities
    (after temperature scaling, if the model uses it).
    """
    return conformal_quantile(conformal_scores(probs_val, labels_val, randomized, penalty, k_reg, seed), coverage)


def conformal_quantile(scores: Array, coverage: float) -> float:
    """qhat from calibration scores (N,) (any order): the ceil((N + 1) * coverage)-th smallest.

    Kept scores (model.json's "conformal") give the qhat of any coverage later; a ValueError
    names the number of images a coverage needs when there are too few.
    """
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    s = np.sort(_np(scores).astype(np.float64))
    rank = math.ceil((len(s) + 1) * coverage - 1e-9)
    if rank > len(s):
        need = math.ceil(coverage / (1 - coverage) - 1e-9)
        raise ValueError(f"coverage {coverage} needs at least {need} calibration images, got {len(s)}")
    return float(s[rank - 1])


def prediction_sets(
    probs: Array, qhat: float, randomized: bool = False, penalty: float = 0.0, k_reg: int = 1, seed: int = 0, inclusive: bool = False
) -> list[list[int]]:
    """Per row, the class indices in the set, most probable first; never empty (the top class is always in).

    Options as given to `fit_conformal` / `conformal_scores`. randomized draws one uniform number per row from `seed`.
    """
    p = _np(probs).astype(np.float64)
    u = _draws(len(p), randomized, inclusive, seed)
    order, scores = _set_scores(p, penalty, k_reg, u)
    sizes = np.maximum(1, (scores <= qhat).sum(axis=1))  # scores rise with rank: the set is a prefix
    return [order[i, : sizes[i]].tolist() for i in range(len(p))]


@dataclass(frozen=True)
class ConformalPredictor:
    """A fitted split-conformal rule with the options it was fitted with; JSON via to_dict/from_dict."""

    qhat: float
    coverage: float
    randomized: bool = False
    penalty: float = 0.0
    k_reg: int = 1

    @classmethod
    def fit(
        cls,
        probs_val: Array,
        labels_val: Array,
        coverage: float = 0.9,
        randomized: bool = False,
        penalty: float = 0.0,
        k_reg: int = 1,
        seed: int = 0,
    ) -> ConformalPredictor:
        qhat = fit_conformal(probs_val, labels_val, coverage, randomized, penalty, k_reg, seed)
        return cls(qhat, coverage, randomized, penalty, k_reg)

    def sets(self, probs: Array, seed: int = 0) -> list[list[int]]:
        return prediction_sets(probs, self.qhat, self.randomized, self.penalty, self.k_reg, seed)

    def to_dict(self) -> dict[str, Any]:
        return {"qhat": self.qhat, "coverage": self.coverage, "randomized": self.randomized, "penalty": self.penalty, "k_reg": self.k_reg}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConformalPredictor:
        return cls(
            float(d["qhat"]), float(d["coverage"]), bool(d.get("randomized", False)), float(d.get("penalty", 0.0)), int(d.get("k_reg", 1))
        )


# ----------------------------------------------------------------------------- class imbalance


def class_counts(labels: Array, num_classes: int) -> np.ndarray:
    """Images per class (C,), int64."""
    return np.bincount(_np(labels).astype(np.int64), minlength=num_classes)


def class_weights(counts: Array, mode: str = "inverse", beta: float = 0.999) -> np.ndarray:
    """Loss weight per class (C,), normalised so the mean weight over the training samples is 1.

    inverse: 1 / n_c. effective: (1 - beta) / (1 - beta^n_c), the inverse "effective number of
    samples" (Cui et al. 2019): beta -> 1 is inverse frequency, beta = 0 no reweighting; 0.999
    suits a few hundred to thousands of images per class. none: all ones. A class without images gets 0.
    """
    if mode not in CLASS_WEIGHT_MODES:
        raise ValueError(f"class weight mode must be one of {CLASS_WEIGHT_MODES}, got {mode!r}")
    n = _np(counts).astype(np.float64)
    if np.any(n < 0) or n.sum() <= 0:
        raise ValueError("class counts must be >= 0 with at least one image")
    present = n > 0
    w = np.zeros_like(n)
    if mode == "none":
        w[present] = 1.0
    elif mode == "inverse":
        w[present] = 1.0 / n[present]
    else:
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        w[present] = (1.0 - beta) / (1.0 - beta ** n[present])
    return w * n.sum() / (n * w).sum()


def balanced_sampler_weights(labels: Array, num_classes: int | None = None) -> np.ndarray:
    """Per-sample drawing probabilities (N,), summing to 1, that give every class the same share
    (for torch.utils.data.WeightedRandomSampler or np.random.choice(p=...))."""
    y = _np(labels).astype(np.int64)
    counts = np.bincount(y, minlength=num_classes or 0)
    w = 1.0 / counts[y]
    return w / w.sum()


def logit_adjustment(counts: Array, tau: float = 1.0) -> np.ndarray:
    """tau * log(prior) per class (C,) (Menon et al. 2021). Add to the logits inside the training
    loss (logit-adjusted loss), or subtract from a plainly trained model's logits at prediction,
    to favour rare classes. An empty class counts as one image, so the offset stays finite."""
    n = np.maximum(_np(counts).astype(np.float64), 1.0)
    return tau * np.log(n / n.sum())


def imbalance_ratio(counts: Array) -> float:
    """Largest over smallest class count among the classes that have images (1.0 for one class)."""
    n = _np(counts).astype(np.float64)
    n = n[n > 0]
    return float(n.max() / n.min()) if len(n) else 1.0


def needs_balancing(counts: Array, limit: float = IMBALANCE_RATIO_LIMIT) -> bool:
    """True when the classes differ by more than `limit` x in size (default: about 3x)."""
    return imbalance_ratio(counts) > limit
