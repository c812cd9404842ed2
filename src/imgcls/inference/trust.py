"""What a model folder says about trusting its answers, and how every answer applies it.

model.json carries three sections, fitted on the validation split at the end of training
(`fit_trust`, called by `training.fit.finish_run`) from the kept weights' logits, computed with
the numerics and TTA of evaluation:

- "calibration" {"temperature", "nll_before", "nll_after", "ece_before", "ece_after", "fitted_on",
  "n"}: logits are divided by the temperature before the softmax (Guo et al. 2017). Without a
  validation split the temperature is 1 and "fitted_on" is null, with a "note" saying why.
- "unknown" {"method", "threshold", "accept", "fitted_on", "n"}: an input whose score is below the
  threshold is answered "unknown", its best guess beside it. msp scores the calibrated top
  probability, energy T * logsumexp(logits / T); the threshold accepts `accept` of the validation
  images (`ood.pick_threshold`).
- "conformal" {"method": "aps", "randomized": false, "coverage", "qhat", "n", "fitted_on",
  "scores"}: the validation images' APS conformity scores, sorted (at most CONFORMAL_MAX_SCORES, a
  random subset beyond), so the prediction sets of any coverage are one quantile away (`Trust.qhat`);
  "qhat" is the one for "coverage", for reading.

`Trust.from_meta(meta)` reads them back (a model without them: temperature 1, no "unknown", no
sets) and `Trust.apply(logits)` is what `inference.answer.postprocess` runs for the Python API,
the CLI, the server and evaluation alike. The temperature and the threshold are fitted on the same
validation images as the conformal scores: one and two numbers fitted, which moves the sets'
coverage guarantee by a negligible amount.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from imgcls import calibration as cal
from imgcls import ood
from imgcls.config import CONFORMAL_COVERAGE, CONFORMAL_MAX_SCORES, UNKNOWN_ACCEPT, UNKNOWN_METHODS
from imgcls.metrics import expected_calibration_error

UNKNOWN_LABEL = "unknown"  # the answer's label when the "unknown" rule turns an input away
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

    @classmethod
    def from_meta(cls, meta: dict[str, Any], unknown_threshold: float | None = None) -> Trust:
        """The sections of model.json (or of an ONNX file's metadata); `unknown_threshold`
        overrides the stored threshold as `with_unknown_threshold` says. ValueError for a section
        this imgcls cannot apply."""
        c, u, s = (meta.get(k) or {} for k in ("calibration", "unknown", "conformal"))
        t = c.get("temperature", 1.0)
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"model.json calibration.temperature must be a positive number, found {t!r}")
        method, threshold = u.get("method", "msp"), u.get("threshold")
        if method not in UNKNOWN_METHODS:
            raise ValueError(f"model.json unknown.method {method!r} is not one this imgcls applies ({', '.join(UNKNOWN_METHODS)})")
        if threshold is not None and (not isinstance(threshold, (int, float)) or not math.isfinite(threshold)):
            raise ValueError(f"model.json unknown.threshold must be a number, found {threshold!r}")
        scores = None
        if s.get("scores"):
            if s.get("method", "aps") != "aps" or s.get("randomized", False):
                raise ValueError("model.json conformal: only non-randomised APS scores can be applied by this imgcls")
            scores = np.sort(np.asarray(s["scores"], dtype=np.float64))
        trust = cls(float(t), method, None if threshold is None else float(threshold), scores)
        return trust if unknown_threshold is None else trust.with_unknown_threshold(unknown_threshold)

    def with_unknown_threshold(self, threshold: float) -> Trust:
        """This Trust with another "unknown" threshold, in the units of its method (msp: a
        probability); 0 turns "unknown" answers off. A model without a stored rule gets msp."""
        if threshold == 0:
            return dataclasses.replace(self, unknown_threshold=None)
        if not math.isfinite(threshold):
            raise ValueError(f"unknown threshold must be a finite number, got {threshold}")
        if self.unknown_method == "msp" and not 0 < threshold <= 1:
            raise ValueError(
                f"this model's 'unknown' rule scores the top probability (msp): its threshold must be in (0, 1] "
                f"(0 turns it off), got {threshold}"
            )
        return dataclasses.replace(self, unknown_threshold=float(threshold))

    def known_scores(self, logits: torch.Tensor | np.ndarray) -> np.ndarray:
        """The "unknown" rule's score of each row of logits (N,), higher = more like the training data."""
        if self.unknown_method == "energy":
            return ood.energy_score(logits, self.temperature)
        return ood.msp_score(logits, self.temperature)

    def apply(self, logits: torch.Tensor) -> Outputs:
        """Logits (N, C) -> calibrated probabilities and the "unknown" rule's verdicts."""
        z = torch.as_tensor(logits).float()  # (N, C)
        probs = torch.softmax(z if self.temperature == 1.0 else z / self.temperature, dim=1).numpy()
        if self.unknown_threshold is None or len(z) == 0:
            return Outputs(probs, np.ones(len(z), dtype=bool))
        return Outputs(probs, self.known_scores(z) >= self.unknown_threshold)

    def qhat(self, coverage: float) -> float:
        """The conformal quantile for `coverage`; ValueError when the model has no scores or too few."""
        if self.conformal_scores is None or not len(self.conformal_scores):
            raise ValueError(NO_SETS)
        try:
            return cal.conformal_quantile(self.conformal_scores, coverage)
        except ValueError as e:
            raise ValueError(f"prediction sets: {e} (model.json holds {len(self.conformal_scores)} validation scores)") from None

    def sets(self, probs: np.ndarray, qhat: float) -> list[list[int]]:
        """Class indices of each row's prediction set (N lists), most probable first."""
        return cal.prediction_sets(probs, qhat)

    def describe(self) -> dict[str, Any]:
        """JSON for the server's /v1/model."""
        n = 0 if self.conformal_scores is None else len(self.conformal_scores)
        unknown = None if self.unknown_threshold is None else {"method": self.unknown_method, "threshold": self.unknown_threshold}
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
    scores = cal.conformal_scores(cal.softmax(z, t), y)  # (N,) non-randomised APS
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


def trust_metrics(logits: torch.Tensor, labels: np.ndarray | torch.Tensor, trust: Trust, coverage: float | None = None) -> dict[str, Any]:
    """What evaluation adds to the metrics of the calibrated probabilities: the temperature, the
    ECE without it; with an "unknown" rule, the share of images it accepts and their accuracy;
    with `coverage`, the prediction sets' empirical coverage and mean size."""
    z, y = torch.as_tensor(logits).float(), np.asarray(labels).astype(np.int64)
    out = trust.apply(z)
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
