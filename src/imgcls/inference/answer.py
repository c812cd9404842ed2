"""From logits to the answer every front end returns.

logits -> `postprocess` (the model's temperature and "unknown" rule, `inference.trust.Trust`) ->
calibrated probabilities and verdicts -> `answer` -> {"path", "label", "score", "top_k",
"probabilities"}, with "best_guess" when the input is answered "unknown" and "set" when a
prediction set was asked for. `Classifier.predict`, `imgcls predict` (JSON, CSV, text) and the
HTTP server's /v1/predict all build their answers here, so they cannot drift apart; an input that
could not be decoded gets `error_answer` ({"path", "error"}) instead.

A multi-label model (`Trust.multilabel`) answers `multilabel_answer` instead: {"path", "labels":
[{"label", "score"}] (every label at or above its threshold, highest score first; possibly
empty), "probabilities"}: there is no single label, no "unknown" and no prediction set. The
thresholds are the model's, not repeated in each answer (model.json, `Classifier.trust.thresholds`,
the server's /v1/model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from imgcls.inference.trust import UNKNOWN_LABEL, Outputs, Trust
from imgcls.io import ImageDecodeError

ANSWER_KEYS = ("path", "label", "score", "top_k")  # plus "best_guess", "set" when they apply, "probabilities" unless left out
MULTILABEL_KEYS = ("path", "labels")  # plus "probabilities" unless left out
ERROR_KEYS = ("path", "error")


def postprocess(logits: torch.Tensor, trust: Trust | None = None, features: torch.Tensor | None = None) -> Outputs:
    """Logits (N, C) -> what answers are built from: the probabilities (N, C), a softmax of the
    logits divided by the model's temperature, and whether each input passes the model's "unknown"
    rule (N,). trust None: temperature 1, no rule.

    The one post-processing step between the model and `answer`, so the Python API, the CLI, the
    server and evaluation apply calibration and "unknown" alike.
    """
    return (trust or Trust()).apply(logits, features)  # features (N, F): for a mahalanobis or knn "unknown" rule


def answer(
    probs: np.ndarray,
    class_names: Sequence[str],
    top_k: int,
    path: str | None,
    probabilities: bool = True,
    known: bool = True,
    set_indices: Sequence[int] | None = None,
    thresholds: np.ndarray | None = None,
) -> dict[str, Any]:
    """One probability row (C,) -> {"path", "label", "score", "top_k": [{"label", "score"}], "probabilities"}.

    "score" is the top class's (calibrated) probability. known=False (the "unknown" rule turned the
    input away) answers label "unknown" and adds "best_guess": {"label", "score"}, the top class;
    top_k still lists the classes. set_indices: the conformal prediction set, added as "set" (labels,
    most probable first). top_k is clipped to 1..C; probabilities=False leaves out the per-class
    "probabilities" dict (1,000 floats per image for an ImageNet model). thresholds: a multi-label
    model's (C,) thresholds (`Trust.thresholds`): the answer is then `multilabel_answer`'s, and
    top_k, known and set_indices do not apply.
    """
    if thresholds is not None:
        return multilabel_answer(probs, class_names, thresholds, path, probabilities)
    order = np.argsort(-probs)[: max(1, min(top_k, len(probs)))]
    top, score = class_names[order[0]], float(probs[order[0]])
    out: dict[str, Any] = {
        "path": path,
        "label": top if known else UNKNOWN_LABEL,
        "score": score,
        "top_k": [{"label": class_names[i], "score": float(probs[i])} for i in order],
    }
    if not known:
        out["best_guess"] = {"label": top, "score": score}
    if set_indices is not None:
        out["set"] = [class_names[i] for i in set_indices]
    if probabilities:
        out["probabilities"] = dict(zip(class_names, probs.tolist()))
    return out


def multilabel_answer(
    probs: np.ndarray, class_names: Sequence[str], thresholds: np.ndarray, path: str | None, probabilities: bool = True
) -> dict[str, Any]:
    """One multi-label probability row (C,) (per-label sigmoids) -> {"path", "labels": [{"label",
    "score"}], "probabilities"}: "labels" holds every label whose score is at or above its
    threshold (C,), highest score first, and is empty when none is; probabilities=False leaves out
    the per-label dict."""
    above = np.flatnonzero(probs >= thresholds)
    above = above[np.argsort(-probs[above], kind="stable")]
    out: dict[str, Any] = {"path": path, "labels": [{"label": class_names[i], "score": float(probs[i])} for i in above]}
    if probabilities:
        out["probabilities"] = dict(zip(class_names, probs.tolist()))
    return out


def explain_target(answer: dict[str, Any]) -> str:
    """The label a Grad-CAM of this answer explains: its label, an "unknown" answer's best guess,
    a multi-label answer's top label (or, with none above its threshold, its most probable one)."""
    if "labels" not in answer:
        return (answer.get("best_guess") or answer)["label"]
    if answer["labels"]:
        return answer["labels"][0]["label"]
    probs = answer.get("probabilities") or {}
    if not probs:
        raise ValueError(f"{answer.get('path')}: no label to explain (no label above its threshold, no probabilities)")
    return max(probs, key=probs.__getitem__)


def error_answer(path: str, error: ImageDecodeError) -> dict[str, Any]:
    """The answer for an input that could not be decoded: {"path", "error": why}."""
    return {"path": path, "error": error.reason or str(error)}
