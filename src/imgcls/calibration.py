"""The trust toolbox: pure functions on logits, probabilities, features and labels (no I/O, no training).

- Calibration: temperature scaling (Guo et al. 2017) fitted by NLL, ECE and reliability-diagram bins.
- "Unknown" answers: out-of-distribution scores, higher = more like the training data: maximum
  softmax probability (Hendrycks & Gimpel 2017), energy (Liu et al. 2020), Mahalanobis distance
  with a shared covariance (Lee et al. 2018) and k-NN cosine similarity (Sun et al. 2022) on the
  pooled pre-logit features; a threshold chosen on validation; `OodDetector` to save and apply one.
- Prediction sets: split conformal with APS / RAPS (Romano et al. 2020; Angelopoulos et al. 2021).
- Class imbalance: loss weights, sampler weights, logit-adjustment offsets (Menon et al. 2021).

Arrays may be NumPy or torch; scores and weights come back as NumPy. Logits are (N, C), features
(N, F) as `forward_head(forward_features(x), pre_logits=True)` gives them, labels int (N,).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imgcls.config import CLASS_WEIGHT_MODES, IMBALANCE_RATIO_LIMIT, OOD_METHODS
from imgcls.metrics import expected_calibration_error

Array = np.ndarray | torch.Tensor

# A fitted temperature outside this range means the logits or labels are broken (constant logits,
# labels from another class order), not a model that needs it: clamp rather than trust it.
TEMPERATURE_RANGE = (0.05, 20.0)
# The statistics each feature-space OOD method saves (as "ood.<name>" tensors).
OOD_TENSORS = {"mahalanobis": ("means", "precision"), "knn": ("bank",)}


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


# ----------------------------------------------------------------------------- OOD scores (higher = known)


def msp_score(logits: Array, temperature: float = 1.0) -> np.ndarray:
    """Maximum softmax probability (N,)."""
    return softmax(logits, temperature).max(axis=1)


def energy_score(logits: Array, temperature: float = 1.0) -> np.ndarray:
    """Negative energy (N,): T * logsumexp(logits / T); the energy -T logsumexp(logits / T) is low in-distribution."""
    return (temperature * torch.logsumexp(_t64(logits) / temperature, dim=1)).numpy()


def fit_mahalanobis(features: Array, labels: Array) -> tuple[torch.Tensor, torch.Tensor]:
    """(class means (K, F), shared precision matrix (F, F)) in float32 from training features.

    K is the number of classes that occur in `labels`. The covariance of the class-centred
    features is the Ledoit-Wolf shrinkage estimate: with fewer images than feature dimensions
    (a 1280-d EfficientNet feature, a few hundred images) the plain estimate is singular.
    """
    from sklearn.covariance import ledoit_wolf

    x, y = _t64(features), _labels(labels)
    classes, inverse = torch.unique(y, return_inverse=True)
    means = torch.zeros(len(classes), x.shape[1], dtype=torch.float64).index_add_(0, inverse, x)
    means /= torch.bincount(inverse, minlength=len(classes)).unsqueeze(1)  # (K, F)
    cov, _ = ledoit_wolf((x - means[inverse]).numpy(), assume_centered=True)  # (F, F)
    precision = torch.linalg.pinv(torch.from_numpy(cov), hermitian=True)
    return means.float(), precision.float()


def mahalanobis_score(features: Array, means: Array, precision: Array, chunk: int = 4096) -> np.ndarray:
    """Minus the smallest squared Mahalanobis distance to a class mean (N,)."""
    x, mu, prec = _t64(features), _t64(means), _t64(precision)
    mu_p = mu @ prec  # (K, F)
    mu_term = (mu_p * mu).sum(1)  # (K,)
    out = []
    for s in range(0, len(x), chunk):
        xb = x[s : s + chunk]  # (B, F)
        xp = xb @ prec
        d = (xp * xb).sum(1, keepdim=True) - 2 * xp @ mu.T + mu_term  # (B, K)
        out.append(-d.min(dim=1).values)
    return torch.cat(out).numpy() if out else np.zeros(0)


def normalise_features(features: Array) -> torch.Tensor:
    """Rows scaled to unit L2 norm (N, F), float32."""
    x = torch.as_tensor(_np(features)).float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def feature_bank(features: Array, size: int = 2048, seed: int = 0) -> torch.Tensor:
    """At most `size` training features, drawn at random and L2-normalised (M, F), for `knn_score`.

    Sun et al. 2022 found a 1% random sample of ImageNet's training set nearly as good as all of
    it; the bank is saved with the model, so it is kept small (2048 x 1280 float32 = 10 MB).
    """
    x = normalise_features(features)
    if len(x) > size:
        x = x[torch.from_numpy(np.sort(np.random.default_rng(seed).choice(len(x), size, replace=False)))]
    return x.contiguous()


def knn_score(features: Array, bank: Array, k: int = 10, chunk: int = 1024) -> np.ndarray:
    """Cosine similarity to the k-th nearest bank feature (N,) (k capped at the bank size)."""
    z, b = normalise_features(features), torch.as_tensor(_np(bank)).float()
    k = max(1, min(k, len(b)))
    out = [(z[s : s + chunk] @ b.T).topk(k, dim=1).values[:, -1] for s in range(0, len(z), chunk)]  # each (B,)
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def pick_threshold(scores_known: Array, accept: float = 0.95) -> float:
    """The largest threshold that accepts (score >= threshold) at least `accept` of `scores_known`."""
    s = np.sort(_np(scores_known).astype(np.float64))
    if len(s) == 0:
        raise ValueError("pick_threshold needs at least one in-distribution score")
    if not 0 < accept <= 1:
        raise ValueError(f"accept must be in (0, 1], got {accept}")
    return float(s[int(math.floor((1 - accept) * len(s) + 1e-9))])


def auroc(scores_known: Array, scores_unknown: Array) -> float:
    """Area under the ROC curve for telling known (positive, higher) from unknown: the chance that
    a random known input scores above a random unknown one, ties counting half (Mann-Whitney U)."""
    a, b = _np(scores_known).astype(np.float64).ravel(), _np(scores_unknown).astype(np.float64).ravel()
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    s = np.concatenate([a, b])
    order = np.argsort(s, kind="mergesort")
    _, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # 1-based ranks, ties averaged
    return float((ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2) / (len(a) * len(b)))


def fpr_at_tpr(scores_known: Array, scores_unknown: Array, tpr: float = 0.95) -> float:
    """Share of unknown inputs accepted at the threshold that accepts `tpr` of the known ones (FPR95)."""
    return float(np.mean(_np(scores_unknown) >= pick_threshold(scores_known, tpr)))


@dataclass
class OodDetector:
    """A fitted "unknown" rule: accept an input when its `method` score is >= `threshold`.

    msp and energy read logits (divided by `temperature`); mahalanobis (`means`, `precision`) and
    knn (`bank`, `k`) read pooled features. `to_dict()` is JSON for model.json and
    `to_tensors()` the statistics for a safetensors file; `from_dict(d, tensors)` reads both back.
    """

    method: str
    threshold: float
    accept: float = 0.95  # share of in-distribution validation images the threshold accepts
    temperature: float = 1.0
    k: int = 10
    means: torch.Tensor | None = None  # (K, F) mahalanobis
    precision: torch.Tensor | None = None  # (F, F) mahalanobis
    bank: torch.Tensor | None = None  # (M, F) knn, L2-normalised

    def __post_init__(self) -> None:
        if self.method not in OOD_METHODS:
            raise ValueError(f"OOD method must be one of {OOD_METHODS}, got {self.method!r}")
        missing = [n for n in OOD_TENSORS.get(self.method, ()) if getattr(self, n) is None]
        if missing:
            raise ValueError(f"OOD method {self.method!r} needs {', '.join(missing)}")

    @property
    def uses_features(self) -> bool:
        return self.method in OOD_TENSORS

    def score(self, logits: Array | None = None, features: Array | None = None) -> np.ndarray:
        """Scores (N,), higher = more like the training data; pass logits or features as the method needs."""
        if self.uses_features:
            if features is None:
                raise ValueError(f"OOD method {self.method!r} scores pooled features; pass features=")
            if self.method == "mahalanobis":
                return mahalanobis_score(features, self.means, self.precision)
            return knn_score(features, self.bank, self.k)
        if logits is None:
            raise ValueError(f"OOD method {self.method!r} scores logits; pass logits=")
        return msp_score(logits, self.temperature) if self.method == "msp" else energy_score(logits, self.temperature)

    def is_known(self, logits: Array | None = None, features: Array | None = None) -> np.ndarray:
        """Boolean (N,): True where the input is accepted as one of the model's classes."""
        return self.score(logits, features) >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "method": self.method,
            "threshold": float(self.threshold),
            "accept": float(self.accept),
            "temperature": float(self.temperature),
            "k": int(self.k),
        }
        d["tensors"] = {f"ood.{n}": list(getattr(self, n).shape) for n in OOD_TENSORS.get(self.method, ())}
        return d

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The statistics to save with the weights: {"ood.means", "ood.precision"} or {"ood.bank"}, float32."""
        return {f"ood.{n}": getattr(self, n).float().contiguous() for n in OOD_TENSORS.get(self.method, ())}

    @classmethod
    def from_dict(cls, d: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> OodDetector:
        tensors = tensors or {}
        stats = {n: tensors[f"ood.{n}"] for n in OOD_TENSORS.get(d["method"], ()) if f"ood.{n}" in tensors}
        return cls(
            method=d["method"],
            threshold=float(d["threshold"]),
            accept=float(d.get("accept", 0.95)),
            temperature=float(d.get("temperature", 1.0)),
            k=int(d.get("k", 10)),
            **stats,
        )


def fit_ood_detector(
    method: str,
    val_logits: Array | None = None,
    val_features: Array | None = None,
    train_features: Array | None = None,
    train_labels: Array | None = None,
    accept: float = 0.95,
    temperature: float = 1.0,
    k: int = 10,
    bank_size: int = 2048,
    seed: int = 0,
) -> OodDetector:
    """An `OodDetector` whose threshold accepts `accept` of the in-distribution validation inputs.

    msp / energy need val_logits; mahalanobis needs train features and labels, knn train features,
    and both then val_features. Validation data must not overlap the training features (a training
    image is its own nearest neighbour).
    """
    if method not in OOD_METHODS:
        raise ValueError(f"OOD method must be one of {OOD_METHODS}, got {method!r}")
    stats: dict[str, torch.Tensor] = {}
    if method == "mahalanobis":
        if train_features is None or train_labels is None:
            raise ValueError("mahalanobis needs train_features and train_labels")
        stats["means"], stats["precision"] = fit_mahalanobis(train_features, train_labels)
    elif method == "knn":
        if train_features is None:
            raise ValueError("knn needs train_features")
        stats["bank"] = feature_bank(train_features, bank_size, seed)
    probe = OodDetector(method, 0.0, accept, temperature, k, **stats)
    threshold = pick_threshold(probe.score(val_logits, val_features), accept)
    return OodDetector(method, threshold, accept, temperature, k, **stats)


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


def conformal_scores(
    probs: Array, labels: Array, randomized: bool = False, penalty: float = 0.0, k_reg: int = 1, seed: int = 0
) -> np.ndarray:
    """The APS (RAPS when penalty > 0) non-conformity score of each true label (N,)."""
    p, y = _np(probs).astype(np.float64), _np(labels).astype(np.int64)
    u = np.random.default_rng(seed).random(len(p)) if randomized else None
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

    randomized=False (the default) gives deterministic, slightly larger sets (coverage a little
    above the target); randomized=True gives coverage close to exactly the target, but an image's
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
    probs: Array, qhat: float, randomized: bool = False, penalty: float = 0.0, k_reg: int = 1, seed: int = 0
) -> list[list[int]]:
    """Per row, the class indices in the set, most probable first; never empty (the top class is always in).

    Options as given to `fit_conformal`. randomized draws one uniform number per row from `seed`.
    """
    p = _np(probs).astype(np.float64)
    u = np.random.default_rng(seed).random(len(p)) if randomized else None
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
