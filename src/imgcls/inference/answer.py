"""From logits to the answer every front end returns.

logits -> `postprocess` (the model's temperature and "unknown" rule, `inference.trust.Trust`) ->
calibrated probabilities and verdicts -> `answer` -> {"path", "label", "score", "top_k",
"probabilities"}, with "best_guess" when the input is answered "unknown" and "set" when a
prediction set was asked for. `Classifier.predict`, `imgcls predict` (JSON, CSV, text) and the
HTTP server's /v1/predict all build their answers here, so they cannot drift apart; an input that
could not be decoded gets `error_answer` ({"path", "error"}) instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from imgcls.inference.trust import UNKNOWN_LABEL, Outputs, Trust
from imgcls.io import ImageDecodeError

ANSWER_KEYS = ("path", "label", "score", "top_k")  # plus "best_guess", "set" when they apply, "probabilities" unless left out
ERROR_KEYS = ("path", "error")


def postprocess(logits: torch.Tensor, trust: Trust | None = None) -> Outputs:
    """Logits (N, C) -> what answers are built from: the probabilities (N, C), a softmax of the
    logits divided by the model's temperature, and whether each input passes the model's "unknown"
    rule (N,). trust None: temperature 1, no rule.

    The one post-processing step between the model and `answer`, so the Python API, the CLI, the
    server and evaluation apply calibration and "unknown" alike.
    """
    return (trust or Trust()).apply(logits)


def answer(
    probs: np.ndarray,
    class_names: Sequence[str],
    top_k: int,
    path: str | None,
    probabilities: bool = True,
    known: bool = True,
    set_indices: Sequence[int] | None = None,
) -> dict[str, Any]:
    """One probability row (C,) -> {"path", "label", "score", "top_k": [{"label", "score"}], "probabilities"}.

    "score" is the top class's (calibrated) probability. known=False (the "unknown" rule turned the
    input away) answers label "unknown" and adds "best_guess": {"label", "score"}, the top class;
    top_k still lists the classes. set_indices: the conformal prediction set, added as "set" (labels,
    most probable first). top_k is clipped to 1..C; probabilities=False leaves out the per-class
    "probabilities" dict (1,000 floats per image for an ImageNet model).
    """
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


def error_answer(path: str, error: ImageDecodeError) -> dict[str, Any]:
    """The answer for an input that could not be decoded: {"path", "error": why}."""
    return {"path": path, "error": error.reason or str(error)}
