"""The HTTP API's schema: the server's settings, the JSON answers, and /v1/predict's OpenAPI description.

`serve.create_app` builds the app from these; they hold no state and do no I/O except
`model_version`, which reads the weights once to name the served model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from imgcls.artifact import WEIGHTS_FILE
from imgcls.config import COMPILE_MODES
from imgcls.uploads import UPLOAD_FIELD


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching for the server; every field has a CLI flag of the same name.

    max_upload_mb: largest request body (all images together); larger -> 413.
    max_images: most images in one request; more -> 400.
    max_batch: most images in one forward pass.
    batch_wait_ms: how long the inference thread waits for more requests to fill a batch
        (only while other requests are still being decoded).
    queue_size: requests with their body in and not yet in a forward pass (being decoded or
        queued); when full, a new request gets 503 at once, before its body is read.
    batching: False runs one forward per request (the baseline the benchmark compares with).
    decode_workers: threads decoding uploads; 0 = the usable cores less the inference thread's one,
        1 to 4 (`threads.decode_workers`).
    default_top_k: classes listed per image when the request gives no top_k.
    body_timeout_s: the whole body must arrive within this many seconds of the request's
        headers; later -> 408 and the connection is closed (a client trickling bytes holds nothing
        for longer).
    max_client_requests: requests one client address may have in progress; more -> 429. 0: no limit.
    max_decoded_mb: most memory decoding one image may take, estimated from its header (width x
        height x the bytes a pixel of its format and mode takes while decoding, after a JPEG
        draft); more -> 413. A small file can decode to gigabytes: a 16-bit PNG, a lossless WebP.
    decode_budget_mb: memory all the images being decoded at once may take; an image that does not
        fit waits up to `serve.DECODE_WAIT_S` for others to finish, then its request gets 503.
    buckets: the batch sizes a forward pass is padded to (`serve_engine.Engine`), increasing, the
        largest equal to max_batch; None: 1, 4, 8, ... up to max_batch (`default_buckets`) when the
        model is compiled or runs in onnxruntime, no padding when it runs eagerly; (): no padding.
    compile: "auto" compiles the model for each bucket at start-up (torch.compile, frozen weights)
        when torch.compile works here and the model is large enough for it to pay, else serves
        eagerly, with the reason in the log; "on" compiles or fails to start; "off" never compiles.
    """

    max_upload_mb: float = 20.0
    max_images: int = 16
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    queue_size: int = 64
    batching: bool = True
    decode_workers: int = 0
    default_top_k: int = 5
    body_timeout_s: float = 20.0
    max_client_requests: int = 32
    max_decoded_mb: float = 256.0
    decode_budget_mb: float = 512.0
    buckets: tuple[int, ...] | None = None
    compile: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "body_timeout_s", "max_decoded_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_images", "max_batch", "queue_size", "default_top_k"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("decode_workers", "max_client_requests"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(f"batch_wait_ms must be in [0, 1000], got {self.batch_wait_ms}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.buckets is not None:
            check_buckets(self.buckets, self.max_batch)
        if self.compile == "on" and self.buckets == ():
            raise ValueError("compile 'on' needs batch buckets to compile (buckets off was given)")
        if not self.decode_budget_mb >= self.max_decoded_mb:
            raise ValueError(
                f"decode_budget_mb ({self.decode_budget_mb}) must be >= max_decoded_mb ({self.max_decoded_mb}): "
                "the largest image allowed must fit in the budget"
            )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_decoded_bytes(self) -> int:
        return int(self.max_decoded_mb * 2**20)

    @property
    def decode_budget_bytes(self) -> int:
        return int(self.decode_budget_mb * 2**20)


# torch._dynamo recompiles a compiled model once per batch shape up to its recompile_limit (8), then
# runs the frame eagerly: more buckets than that would leave some uncompiled.
MAX_BUCKETS = 8


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 4, 8, 16, ... below max_batch, then max_batch: (1, 4, 8, 16) for 16, (1, 4, 8, 12) for 12."""
    out, b = [1], 4
    while b < max_batch and len(out) < MAX_BUCKETS - 1:
        out.append(b)
        b *= 2
    return tuple(sorted({*out, max_batch}))


def check_buckets(buckets: tuple[int, ...], max_batch: int) -> None:
    """ValueError unless `buckets` is () or increasing integers >= 1, at most MAX_BUCKETS, the largest max_batch."""
    if not buckets:
        return
    if not all(isinstance(b, int) and b >= 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"buckets must be increasing integers >= 1, got {list(buckets)}")
    if len(buckets) > MAX_BUCKETS:
        raise ValueError(f"at most {MAX_BUCKETS} buckets (torch.compile recompiles at most that many shapes), got {len(buckets)}")
    if buckets[-1] != max_batch:
        raise ValueError(f"the largest bucket ({buckets[-1]}) must equal max_batch ({max_batch}): every batch must fit in a bucket")


def model_version(meta: dict[str, Any]) -> str:
    """meta["version"] if the artifact sets one, else the first 12 hex digits of the weights' SHA-256.

    Without a weights file (a pretrained model from the registry) the digest is of model.json.
    """
    if meta.get("version"):
        return str(meta["version"])
    weights = Path(str(meta.get("source", ""))) / WEIGHTS_FILE
    h = hashlib.sha256()
    if weights.is_file():
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        h.update(json.dumps({k: v for k, v in meta.items() if k != "source"}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


# ---------------------------------------------------------------------------------- the JSON answers


class LabelScore(BaseModel):
    label: str
    score: float


class Explanation(BaseModel):
    target: str  # the class explained: the answer's label
    overlay_png_base64: str  # the image with the Grad-CAM heat map over it, PNG, at most 512 px a side
    width: int
    height: int


class Prediction(BaseModel):
    """One image's answer: label, score and top_k from a single-label model; labels and
    probabilities from a multi-label one (`inference.answer.multilabel_answer`)."""

    path: str | None
    label: str | None = None  # single-label: the top class, or "unknown"
    score: float | None = None  # single-label: the top class's probability
    top_k: list[LabelScore] | None = None  # single-label: the k most probable classes
    labels: list[LabelScore] | None = None  # multi-label: every label at or above its threshold, highest score first (maybe none)
    probabilities: dict[str, float] | None = None  # multi-label: every label's score (thresholds: /v1/model)
    filename: str | None  # the same as path: the name this API gave it before answers were unified
    best_guess: LabelScore | None = None  # only when label is "unknown": the top class and its probability
    set: list[str] | None = None  # only with ?coverage=: the conformal prediction set, most probable first
    explanation: Explanation | None = None  # only with ?explain=true


class ModelRef(BaseModel):
    name: str
    version: str


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[Prediction]


class Error(BaseModel):
    detail: str


class ValidationErrors(BaseModel):
    """FastAPI's own 422 answer for a query parameter out of range: one entry per problem."""

    detail: list[dict[str, Any]]


# ---------------------------------------------------------------------------------- OpenAPI


def predict_body(s: ServeSettings) -> dict[str, Any]:
    """/v1/predict's request body for the OpenAPI document (the endpoint reads the body itself)."""
    binary = {"type": "string", "format": "binary"}
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [UPLOAD_FIELD],
                    "properties": {
                        UPLOAD_FIELD: {
                            "type": "array",
                            "items": binary,
                            "minItems": 1,
                            "maxItems": s.max_images,
                            "description": f"one or more images (repeat the field), at most {s.max_images}",
                        },
                        "top_k": {"type": "integer", "minimum": 1, "description": "classes per image"},
                    },
                }
            },
            "application/octet-stream": {"schema": binary},
            "image/*": {"schema": binary},
        },
    }


def predict_errors(s: ServeSettings) -> dict[int | str, dict[str, Any]]:
    """/v1/predict's error answers for the OpenAPI document."""
    return {
        400: {"model": Error, "description": "too many images, or an empty, truncated or corrupt image"},
        408: {"model": Error, "description": f"the body did not arrive within {s.body_timeout_s:g} s"},
        413: {
            "model": Error,
            "description": f"body over {s.max_upload_mb:g} MB, or an image with too many pixels or that would "
            f"take over {s.max_decoded_mb:g} MB to decode (a decompression bomb)",
        },
        415: {"model": Error, "description": "not an image in a format imgcls reads, or an unsupported content type"},
        # The form's top_k is checked by imgcls (a message), the query's by FastAPI (its list of problems).
        422: {"model": Error | ValidationErrors, "description": "top_k or coverage out of range"},
        429: {"model": Error, "description": f"this client already has {s.max_client_requests} requests in progress"},
        501: {"model": Error, "description": "?explain=true where the server has no model folder to explain with (a bare ONNX file)"},
        503: {"model": Error, "description": "the queue is full, or decoding memory is taken by other requests; retry later"},
    }
