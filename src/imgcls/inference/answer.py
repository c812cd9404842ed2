"""From logits to the answer every front end returns.

logits -> `postprocess` -> probabilities -> `answer` -> {"path", "label", "score", "top_k",
"probabilities"}. `Classifier.predict`, `imgcls predict` (JSON, CSV, text) and the HTTP server's
/v1/predict all build their answers here, so they cannot drift apart; an input that could not be
decoded gets `error_answer` ({"path", "error"}) instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from imgcls.io import ImageDecodeError

ANSWER_KEYS = ("path", "label", "score", "top_k")  # plus "probabilities" unless left out
ERROR_KEYS = ("path", "error")


def postprocess(logits: torch.Tensor) -> np.ndarray:
    """Logits (N, C) -> the probabilities (N, C) answers are built from: a softmax.

    The one post-processing step between the model and `answer`. Calibration (a temperature that
    divides the logits) and an "unknown" threshold on the top probability belong here, so the
    Python API, the CLI and the server apply them alike.
    """
    return torch.softmax(logits, dim=1).numpy()


def answer(probs: np.ndarray, class_names: Sequence[str], top_k: int, path: str | None, probabilities: bool = True) -> dict[str, Any]:
    """One probability row (C,) -> {"path", "label", "score", "top_k": [{"label", "score"}], "probabilities"}.

    top_k is clipped to 1..C; probabilities=False leaves out the per-class "probabilities" dict
    (1,000 floats per image for an ImageNet model).
    """
    order = np.argsort(-probs)[: max(1, min(top_k, len(probs)))]
    out: dict[str, Any] = {
        "path": path,
        "label": class_names[order[0]],
        "score": float(probs[order[0]]),
        "top_k": [{"label": class_names[i], "score": float(probs[i])} for i in order],
    }
    if probabilities:
        out["probabilities"] = dict(zip(class_names, probs.tolist()))
    return out


def error_answer(path: str, error: ImageDecodeError) -> dict[str, Any]:
    """The answer for an input that could not be decoded: {"path", "error": why}."""
    return {"path": path, "error": error.reason or str(error)}
