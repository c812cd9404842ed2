"""What a model folder says about trusting its answers, and how every answer applies it.

model.json carries three sections, fitted on the validation split at the end of training
(`fit_trust`, called by `training.finish.finish_run`) from the kept weights' logits, computed with
the numerics and TTA of evaluation:

- "calibration" {"temperature", "nll_before", "nll_after", "ece_before", "ece_after", "fitted_on",
  "n"}: logits are divided by the temperature before the softmax (Guo et al. 2017). Without a
  validation split the temperature is 1 and "fitted_on" is null, with a "note" saying why.
- "unknown" {"method", "threshold", "accept", "fitted_on", "n"}: an input whose score is below the
  threshold is answered "unknown", its best guess beside it. msp scores the calibrated top
  probability, energy T * logsumexp(logits / T); the threshold accepts `accept` of the validation
  images (`ood.pick_threshold`). The feature-space methods (mahalanobis, knn: `fit_feature_rule`)
  score the pooled pre-logit features against statistics of the training images' features, kept
  in the model folder's OOD_FILE (safetensors: "ood.means" and "ood.precision", or "ood.bank");
  their section adds "k", "file", "tensors" (name -> shape), "train_images" and "fallback", the
  msp rule fitted at the same acceptance, which a backend without features (onnx) applies instead
  (`logits_only`).
- "conformal" {"method": "aps", "randomized": false, "coverage", "qhat", "n", "fitted_on",
  "scores"}: the validation images' APS conformity scores, sorted (at most CONFORMAL_MAX_SCORES, a
  random subset beyond), so the prediction sets of any coverage are one quantile away (`Trust.qhat`);
  "qhat" is the one for "coverage", for reading.

`Trust.from_meta(meta)` reads them back (a model without them: temperature 1, no "unknown", no
sets) and `Trust.apply(logits)` is what `inference.answer.postprocess` runs for the Python API,
the CLI, the server and evaluation alike. The temperature and the threshold are fitted on the same
validation images as the conformal scores: one and two numbers fitted, which moves the sets'
coverage guarantee by a negligible amount.

A multi-label model (model.json "task": "multi-label") has none of the three: each label is a
sigmoid of its own logit divided by its temperature ("label_temperatures", 1 when absent), and
"thresholds" holds the decision threshold of each label. Its Trust carries those two lists; the
"unknown" rule (a threshold given to override it is ignored) and prediction sets do not apply.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls import calibration as cal
from imgcls import ood
from imgcls.config import CONFORMAL_COVERAGE, CONFORMAL_MAX_SCORES, FEATURE_OOD_METHODS, UNKNOWN_ACCEPT, UNKNOWN_METHODS
from imgcls.metrics import expected_calibration_error
from imgcls.multilabel import sigmoid_probs

UNKNOWN_LABEL = "unknown"  # the answer's label when the "unknown" rule turns an input away
OOD_FILE = "ood.safetensors"  # a model folder's feature statistics for a mahalanobis or knn "unknown" rule
MULTI_LABEL = "multi-label"  # model.json "task" of a multi-label model; absent: single-label
NO_SETS_MULTILABEL = (
    "prediction sets (coverage) are for single-label models; this model is multi-label: "
    "each label is decided by its own threshold (model.json 'thresholds')"
)
NO_SETS = (
    "this model has no conformal scores (model.json 'conformal'), so it cannot give prediction sets: "
    "it was trained without a validation split, or by an older imgcls; retrain it with validation images"
)


@dataclass(frozen=True, eq=False)
class Outputs:
    """N images after post-processing: what answers are built from. Slicing keeps the two
    together (the server's batcher hands each request its rows)."""

    probs: np.ndarray  # (N, C) calibrated probabilities
    known: np.ndarray  # (N,) bool: accepted by the "unknown" rule (all True without one)

    def __len__(self) -> int:
        return len(self.probs)

    def __getitem__(self, rows: slice) -> Outputs:
        return Outputs(self.probs[rows], self.known[rows])

    @classmethod
    def of(cls, x: Outputs | np.ndarray) -> Outputs:
        """`x` itself, or plain probabilities (N, C) as Outputs that accept every row."""
        if isinstance(x, Outputs):
            return x
        p = np.asarray(x)
        return cls(p, np.ones(len(p), dtype=bool))


@dataclass(frozen=True, eq=False)
class Trust:
    """The post-processing of one model: its temperature, its "unknown" rule and its conformal scores."""

    temperature: float = 1.0
    unknown_method: str = "msp"
    unknown_threshold: float | None = None  # None: no "unknown" answers
    conformal_scores: np.ndarray | None = None  # (n,) sorted, float64
    thresholds: np.ndarray | None = None  # (C,) a multi-label model's decision thresholds; None: single-label
    label_temperatures: np.ndarray | None = None  # (C,) a multi-label model's temperature per label
    detector: ood.OodDetector | None = None  # the feature statistics of a mahalanobis or knn rule
    conformal_inclusive: bool = False  # the scores of a model before "score": "mass_above" (calibration.conformal_scores)

    @property
    def uses_features(self) -> bool:
        """Whether the "unknown" rule scores pooled features (then `apply` needs them)."""
        return self.unknown_method in FEATURE_OOD_METHODS and self.unknown_threshold is not None

    @property
    def multilabel(self) -> bool:
        """True for a multi-label model: sigmoid per label, a threshold per label."""
        return self.thresholds is not None

    @classmethod
    def from_meta(cls, meta: dict[str, Any], unknown_threshold: float | None = None, stats: dict[str, torch.Tensor] | None = None) -> Trust:
        """The sections of model.json (or of an ONNX file's metadata); `unknown_threshold`
        overrides the stored threshold as `with_unknown_threshold` says; `stats`: the model
        folder's OOD_FILE tensors (`read_ood_stats`), which a mahalanobis or knn rule needs.
        ValueError for a section this imgcls cannot apply."""
        if meta.get("task", "single-label") == MULTI_LABEL:
            return cls._multilabel(meta)
        c, u, s = (meta.get(k) or {} for k in ("calibration", "unknown", "conformal"))
        t = c.get("temperature", 1.0)
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"model.json calibration.temperature must be a positive number, found {t!r}")
        method, threshold = u.get("method", "msp"), u.get("threshold")
        if method not in UNKNOWN_METHODS:
            raise ValueError(f"model.json unknown.method {method!r} is not one this imgcls applies ({', '.join(UNKNOWN_METHODS)})")
        if threshold is not None and (not isinstance(threshold, (int, float)) or not math.isfinite(threshold)):
            raise ValueError(f"model.json unknown.threshold must be a number, found {threshold!r}")
        scores, inclusive = None, False
        if s.get("scores"):
            if s.get("method", "aps") != "aps" or s.get("randomized", False):
                raise ValueError("model.json conformal: only non-randomised APS scores can be applied by this imgcls")
            scores = np.sort(np.asarray(s["scores"], dtype=np.float64))
            inclusive = s.get("score", "inclusive") != "mass_above"
        detector = None
        rule_on = threshold is not None if unknown_threshold is None else unknown_threshold != 0
        if method in FEATURE_OOD_METHODS and rule_on:
            detector = feature_detector(u, stats)
        trust = cls(
            float(t), method, None if threshold is None else float(threshold), scores, detector=detector, conformal_inclusive=inclusive
        )
        return trust if unknown_threshold is None else trust.with_unknown_threshold(unknown_threshold)

    @classmethod
    def _multilabel(cls, meta: dict[str, Any]) -> Trust:
        """A multi-label model's thresholds and per-label temperatures; ValueError when they are malformed."""
        n = len(meta["class_names"])

        def per_label(key: str, default: float | None) -> np.ndarray:
            v = meta.get(key)
            if v is None and default is not None:
                return np.full(n, default)
            if not isinstance(v, list) or len(v) != n or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
                raise ValueError(f"model.json {key} of a multi-label model must list one number per label ({n}), found {v!r}")
            return np.asarray(v, dtype=np.float64)

        thresholds, temps = per_label("thresholds", None), per_label("label_temperatures", 1.0)
        if ((thresholds < 0) | (thresholds > 1)).any():
            raise ValueError(f"model.json thresholds must be probabilities in [0, 1], found {thresholds.tolist()}")
        if (temps <= 0).any():
            raise ValueError(f"model.json label_temperatures must be positive, found {temps.tolist()}")
        return cls(thresholds=thresholds, label_temperatures=temps)

    def with_unknown_threshold(self, threshold: float) -> Trust:
        """This Trust with another "unknown" threshold, in the units of its method (msp: a
        probability); 0 turns "unknown" answers off. A model without a stored rule gets msp.
        A multi-label model has no "unknown" rule: it comes back unchanged."""
        if self.multilabel:
            return self
        if threshold == 0:
            return dataclasses.replace(self, unknown_threshold=None)
        if not math.isfinite(threshold):
            raise ValueError(f"unknown threshold must be a finite number, got {threshold}")
        if self.unknown_method == "msp" and not 0 < threshold <= 1:
            raise ValueError(
                f"this model's 'unknown' rule scores the top probability (msp): its threshold must be in (0, 1] "
                f"(0 turns it off), got {threshold}"
            )
        if self.unknown_method == "knn" and not -1 <= threshold <= 1:
            raise ValueError(
                f"this model's 'unknown' rule scores a cosine similarity (knn): the threshold must be in [-1, 1], not {threshold}"
            )
        return dataclasses.replace(self, unknown_threshold=float(threshold))

    def known_scores(self, logits: torch.Tensor | np.ndarray, features: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
        """The "unknown" rule's score of each row (N,), higher = more like the training data: of
        the logits (N, C) for msp and energy, of the pooled features (N, F) for mahalanobis and knn."""
        if self.unknown_method in FEATURE_OOD_METHODS:
            if features is None or self.detector is None:
                raise ValueError(f"the 'unknown' rule {self.unknown_method} scores pooled features: pass features= (and {OOD_FILE})")
            return self.detector.score(features=features)
        if self.unknown_method == "energy":
            return ood.energy_score(logits, self.temperature)
        return ood.msp_score(logits, self.temperature)

    def apply(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> Outputs:
        """Logits (N, C) -> calibrated probabilities and the "unknown" rule's verdicts; a
        multi-label model's probabilities are per-label sigmoids (each row need not sum to 1).
        A mahalanobis or knn rule (`uses_features`) also needs the pooled features (N, F)."""
        z = torch.as_tensor(logits).float()  # (N, C)
        if self.multilabel:
            return Outputs(sigmoid_probs(z.numpy(), self.label_temperatures), np.ones(len(z), dtype=bool))
        probs = torch.softmax(z if self.temperature == 1.0 else z / self.temperature, dim=1).numpy()
        if self.unknown_threshold is None or len(z) == 0:
            return Outputs(probs, np.ones(len(z), dtype=bool))
        return Outputs(probs, self.known_scores(z, features) >= self.unknown_threshold)

    def qhat(self, coverage: float) -> float:
        """The conformal quantile for `coverage`; ValueError when the model has no scores or too few, or is multi-label."""
        if self.multilabel:
            raise ValueError(NO_SETS_MULTILABEL)
        if self.conformal_scores is None or not len(self.conformal_scores):
            raise ValueError(NO_SETS)
        try:
            return cal.conformal_quantile(self.conformal_scores, coverage)
        except ValueError as e:
            raise ValueError(f"prediction sets: {e} (model.json holds {len(self.conformal_scores)} validation scores)") from None

    def sets(self, probs: np.ndarray, qhat: float) -> list[list[int]]:
        """Class indices of each row's prediction set (N lists), most probable first."""
        return cal.prediction_sets(probs, qhat, inclusive=self.conformal_inclusive)

    def describe(self) -> dict[str, Any]:
        """JSON for the server's /v1/model."""
        n = 0 if self.conformal_scores is None else len(self.conformal_scores)
        unknown = None if self.unknown_threshold is None else {"method": self.unknown_method, "threshold": self.unknown_threshold}
        if self.label_temperatures is not None:  # multi-label: a temperature per label, no "unknown" rule, no sets
            return {"label_temperatures": self.label_temperatures.tolist(), "unknown": None, "conformal_scores": 0}
        return {"temperature": self.temperature, "unknown": unknown, "conformal_scores": n}


def fit_trust(
    logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    method: str = "msp",
    accept: float = UNKNOWN_ACCEPT,
    coverage: float = CONFORMAL_COVERAGE,
    max_scores: int = CONFORMAL_MAX_SCORES,
    seed: int = 0,
) -> dict[str, Any]:
    """model.json's "calibration", "unknown" and "conformal" sections from validation logits (N, C)
    and labels (N,): the temperature first, then the threshold and the conformity scores on the
    temperature-scaled logits."""
    if method not in UNKNOWN_METHODS:
        raise ValueError(f"unknown method must be one of {UNKNOWN_METHODS}, got {method!r}")
    if method in FEATURE_OOD_METHODS:
        raise ValueError(f"{method} scores pooled features: fit_trust(logits, labels, 'msp'), then fit_feature_rule")
    z, y = torch.as_tensor(logits).float(), np.asarray(labels).astype(np.int64)
    n = len(y)
    if n == 0:
        return uncalibrated("the validation split is empty")
    t = cal.fit_temperature(z, y)
    rep = cal.temperature_report(z, y, t)
    figures = {k: rep[k] for k in ("nll_before", "nll_after", "ece_before", "ece_after")}
    calibration = {"temperature": t, **figures, "fitted_on": "val", "n": n}
    threshold = ood.fit_ood_detector(method, val_logits=z, accept=accept, temperature=t).threshold
    unknown = {"method": method, "threshold": threshold, "accept": accept, "fitted_on": "val", "n": n}
    scores = cal.conformal_scores(cal.softmax(z, t), y)  # (N,) non-randomised APS: the mass ranked above the label
    if len(scores) > max_scores:
        scores = scores[np.random.default_rng(seed).choice(len(scores), max_scores, replace=False)]
    # Six decimals keep model.json readable; rounded up, a kept score is never below the exact
    # one, so the sets can only grow (coverage stays at or above its target).
    scores = np.sort(np.ceil(scores * 1e6) / 1e6)
    try:
        qhat: float | None = cal.conformal_quantile(scores, coverage)
    except ValueError:  # fewer than 9 validation images for 0.9
        qhat = None
    conformal = {
        "method": "aps",
        "randomized": False,
        "score": "mass_above",  # absent in models before it: the mass up to and including the label
        "coverage": coverage,
        "qhat": qhat,
        "n": len(scores),
        "fitted_on": "val",
        "scores": scores.tolist(),
    }
    return {"calibration": calibration, "unknown": unknown, "conformal": conformal}


def uncalibrated(reason: str) -> dict[str, Any]:
    """The sections for a model with nothing to calibrate on: temperature 1, and why."""
    return {"calibration": {"temperature": 1.0, "fitted_on": None, "n": 0, "note": reason}}


def describe_fit(sections: dict[str, Any]) -> str:
    """One log line on what `fit_trust` (or `uncalibrated`) fitted."""
    c = sections["calibration"]
    if c.get("fitted_on") is None:
        return f"not calibrated ({c.get('note', 'no validation images')}): temperature 1, no 'unknown' threshold, no prediction sets"
    u, n_scores = sections["unknown"], sections["conformal"]["n"]
    return (
        f"calibrated on {c['n']} validation images: temperature {c['temperature']:.3f} (NLL {c['nll_before']:.4f} -> "
        f"{c['nll_after']:.4f}, ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}); 'unknown' below {u['method']} "
        f"{u['threshold']:.4g} (accepts {u['accept']:.0%} of them); prediction sets from {n_scores} conformity scores"
    )


def trust_metrics(
    logits: torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    trust: Trust,
    coverage: float | None = None,
    features: torch.Tensor | None = None,
) -> dict[str, Any]:
    """What evaluation adds to the metrics of the calibrated probabilities: the temperature, the
    ECE without it; with an "unknown" rule, the share of images it accepts and their accuracy
    (a mahalanobis or knn rule reads `features`, (N, F)); with `coverage`, the prediction sets'
    empirical coverage and mean size."""
    z, y = torch.as_tensor(logits).float(), np.asarray(labels).astype(np.int64)
    out = trust.apply(z, features)
    m: dict[str, Any] = {
        "temperature": trust.temperature,
        "ece_uncalibrated": expected_calibration_error(torch.softmax(z, 1).numpy(), y) if len(y) else float("nan"),
    }
    if trust.unknown_threshold is not None:
        k, right = out.known, out.probs.argmax(1) == y
        m["unknown"] = {
            "method": trust.unknown_method,
            "threshold": trust.unknown_threshold,
            "accepted": float(k.mean()) if len(y) else None,
            "num_accepted": int(k.sum()),
            "accuracy_accepted": float(right[k].mean()) if k.any() else None,
        }
    if coverage is not None:
        sets = trust.sets(out.probs, trust.qhat(coverage))
        m["coverage_target"] = coverage
        m["coverage"] = float(np.mean([t in s for t, s in zip(y, sets)])) if len(y) else None
        m["mean_set_size"] = float(np.mean([len(s) for s in sets])) if len(y) else None
    return m


# ----------------------------------------------------------------------------- feature-space "unknown" rules


def feature_detector(section: dict[str, Any], stats: dict[str, torch.Tensor] | None) -> ood.OodDetector:
    """The `ood.OodDetector` of a mahalanobis or knn "unknown" section with its OOD_FILE tensors;
    ValueError naming what is missing or malformed."""
    method = section["method"]
    needed = [f"ood.{n}" for n in ood.OOD_TENSORS[method]]
    missing = [n for n in needed if n not in (stats or {})]
    if missing:
        raise ValueError(
            f"model.json's 'unknown' rule ({method}) scores pooled features against statistics in {OOD_FILE}, "
            f"but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not there: copy {OOD_FILE} with the model folder, "
            "or pass --unknown-threshold 0 to answer without the rule"
        )
    t = {n: stats[n].float() for n in needed}
    dims = {v.shape[-1] for v in t.values()}
    if any(v.dim() != 2 for v in t.values()) or len(dims) != 1 or ("ood.precision" in t and t["ood.precision"].shape[0] != dims.pop()):
        shapes = {n: list(v.shape) for n, v in t.items()}
        raise ValueError(f"{OOD_FILE}: malformed {method} statistics {shapes}")
    if not all(bool(torch.isfinite(v).all()) for v in t.values()):
        raise ValueError(f"{OOD_FILE}: the {method} statistics hold NaN or infinite values")
    k = section.get("k", 10)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"model.json unknown.k must be a positive integer, found {k!r}")
    return ood.OodDetector(method, 0.0, k=k, **{n.removeprefix("ood."): v for n, v in t.items()})


def read_ood_stats(folder: str | Path, meta: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The OOD_FILE tensors of a model folder whose "unknown" rule is mahalanobis or knn (None for
    any other rule, or when the file is absent: `Trust.from_meta` then says what is missing).
    Read with safetensors: never unpickled."""
    from safetensors.torch import load_file

    if (meta.get("unknown") or {}).get("method") not in FEATURE_OOD_METHODS:
        return None
    f = Path(folder) / OOD_FILE
    if not f.is_file():
        return None
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors' parser raises SafetensorError on a damaged file
        raise ValueError(f"{f}: not a readable safetensors file ({' '.join(str(e).split())})") from None


def write_ood_stats(folder: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save a feature rule's statistics ("ood.*", `fit_feature_rule`) as the model folder's OOD_FILE."""
    from imgcls.artifact import atomic_save_tensors

    atomic_save_tensors(Path(folder) / OOD_FILE, tensors, metadata={"format": "imgcls-ood"})


def fit_feature_rule(
    sections: dict[str, Any],
    method: str,
    val_features: torch.Tensor,
    train_features: torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`fit_trust`'s sections with a mahalanobis or knn "unknown" rule instead of its msp one, and
    the statistics to save as OOD_FILE: fitted on the pooled features of training images (N, F)
    with their labels, the threshold on the validation images' features at the same acceptance
    as the msp rule, which stays as the section's "fallback" for backends without features."""
    if method not in FEATURE_OOD_METHODS:
        raise ValueError(f"a feature rule is one of {FEATURE_OOD_METHODS}, got {method!r}")
    msp = sections["unknown"]
    det = ood.fit_ood_detector(
        method, val_features=val_features, train_features=train_features, train_labels=train_labels, accept=msp["accept"], seed=seed
    )
    tensors = det.to_tensors()
    unknown = {
        "method": method,
        "threshold": det.threshold,
        "accept": msp["accept"],
        "fitted_on": "val",
        "n": len(val_features),
        "k": det.k,
        "file": OOD_FILE,
        "tensors": {n: list(v.shape) for n, v in tensors.items()},
        "train_images": len(train_features),
        "fallback": {"method": msp["method"], "threshold": msp["threshold"]},
    }
    return {**sections, "unknown": unknown}, tensors


def logits_only(meta: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(meta, None), or for a mahalanobis or knn "unknown" rule, meta with the rule's msp
    "fallback" in its place and a warning to log: for a backend that gives logits only (onnx)."""
    u = meta.get("unknown") or {}
    if u.get("method") not in FEATURE_OOD_METHODS:
        return meta, None
    fb = u.get("fallback") or {}
    note = f"the onnx backend gives no pooled features, so this model's '{u['method']}' unknown rule cannot run: "
    if fb.get("method") in UNKNOWN_METHODS and fb.get("method") not in FEATURE_OOD_METHODS and "threshold" in fb:
        note += f"using its {fb['method']} fallback (threshold {fb['threshold']:.4g}, fitted at the same acceptance)"
        return {**meta, "unknown": {**u, "method": fb["method"], "threshold": fb["threshold"]}}, note
    return {**meta, "unknown": None}, note + "no fallback stored, so no 'unknown' answers"
