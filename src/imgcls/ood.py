"""Out-of-distribution ("unknown") scores and the detector that applies one: pure functions on
logits and pooled features (no I/O, no training).

Scores are higher = more like the training data: maximum softmax probability (Hendrycks & Gimpel
2017), energy (Liu et al. 2020), Mahalanobis distance with a shared covariance (Lee et al. 2018)
and k-NN cosine similarity (Sun et al. 2022) on the pooled pre-logit features; a threshold chosen
on validation (`pick_threshold`), AUROC and FPR95 to measure a score, and `OodDetector` to save
and apply a fitted rule.

Arrays may be NumPy or torch; scores come back as NumPy. Logits are (N, C), features (N, F) as
`forward_head(forward_features(x), pre_logits=True)` gives them, labels int (N,).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from imgcls.calibration import Array, _labels, _np, _t64, softmax
from imgcls.config import OOD_METHODS

# The statistics each feature-space OOD method saves (as "ood.<name>" tensors).
OOD_TENSORS = {"mahalanobis": ("means", "precision"), "knn": ("bank",)}


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
