"""The HTTP server: `create_app(classifier, settings)` -> a FastAPI app with the JSON API and the web page.

An upload goes: `predict` (read the body within the size limit, split multipart) -> `_decode_all`
(`Classifier.prepare` in a thread pool, the same decode and resize as `imgcls predict`) ->
`batching.Batcher` (one inference thread runs `Classifier.predict_arrays` on whole batches) -> JSON.

Requests are batched dynamically: the inference thread takes the first waiting request, waits up
to `batch_wait_ms` for more while other requests are still decoding, and runs one forward on up
to `max_batch` images. The requests in front of it are bounded (`queue_size`, counted from
before the body is read); when the queue is full the server answers 503 at once rather than
letting latency and memory grow without limit. A request never names a file on the
server: only uploaded bytes are decoded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np
from fastapi import FastAPI, Query, Request  # imgcls[serve]; cli imports this module only for `imgcls serve`
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.formparsers import MultiPartException, MultiPartParser

from imgcls.artifact import WEIGHTS_FILE
from imgcls.batching import Batcher
from imgcls.io import ImageDecodeError
from imgcls.predict import Classifier

log = logging.getLogger("imgcls.serve")

UPLOAD_FIELD = "file"
NOT_AN_IMAGE = "not a recognised image format"  # io.ImageDecodeError's reason for non-images -> 415
RAW_CONTENT_TYPES = ("application/octet-stream",)  # plus any image/*
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching for the server; every field has a CLI flag of the same name.

    max_upload_mb: largest request body (all images together); larger -> 413.
    max_images: most images in one request; more -> 400.
    max_batch: most images in one forward pass.
    batch_wait_ms: how long the inference thread waits for more requests to fill a batch
        (only while other requests are still being decoded).
    queue_size: requests admitted and not yet in a forward pass (being read, decoded or queued);
        one more -> 503 at once, before its body is read.
    batching: False runs one forward per request (the baseline the benchmark compares with).
    decode_workers: threads decoding uploads; 0 = min(4, cores).
    default_top_k: classes listed per image when the request gives no top_k.
    """

    max_upload_mb: float = 20.0
    max_images: int = 16
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    queue_size: int = 64
    batching: bool = True
    decode_workers: int = 0
    default_top_k: int = 5

    def __post_init__(self) -> None:
        if not self.max_upload_mb > 0:
            raise ValueError(f"max_upload_mb must be > 0, got {self.max_upload_mb}")
        for name in ("max_images", "max_batch", "queue_size", "default_top_k"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(f"batch_wait_ms must be in [0, 1000], got {self.batch_wait_ms}")
        if not (isinstance(self.decode_workers, int) and self.decode_workers >= 0):
            raise ValueError(f"decode_workers must be an integer >= 0, got {self.decode_workers!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class RequestError(Exception):
    """A request the server refuses: HTTP status and a message for the client."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


# ---------------------------------------------------------------------------------- helpers


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


def _prediction(probs: np.ndarray, class_names: list[str], top_k: int, filename: str | None) -> dict[str, Any]:
    """The same label, score and top-k as `Classifier.predict` for one probability row."""
    order = np.argsort(-probs)[: max(1, min(top_k, len(probs)))]
    return {
        "filename": filename,
        "label": class_names[order[0]],
        "score": float(probs[order[0]]),
        "top_k": [{"label": class_names[i], "score": float(probs[i])} for i in order],
    }


def _parse_top_k(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = 0
    if k < 1:
        raise RequestError(422, f"top_k must be a positive integer, got {value!r}")
    return k


async def _read_body(receive_stream: AsyncIterator[bytes], content_length: str | None, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it is known to pass `limit` bytes."""
    too_big = f"upload over the limit of {limit / 1024 / 1024:g} MB ({limit} bytes); send fewer or smaller images"
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise RequestError(400, f"bad Content-Length header {content_length!r}") from None
        if declared > limit:
            raise RequestError(413, f"request body is {declared} bytes: {too_big}")
    chunks, size = [], 0
    async for chunk in receive_stream:
        size += len(chunk)
        if size > limit:
            raise RequestError(413, too_big)
        chunks.append(chunk)
    return b"".join(chunks)


async def _split_multipart(headers: Any, body: bytes, max_images: int, limit: int) -> tuple[list[tuple[str | None, bytes]], str | None]:
    """multipart/form-data -> ([(filename, bytes) for each `file` part], the top_k field or None)."""
    async def once() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(headers, once(), max_files=max_images, max_fields=4)
    parser.spool_max_size = limit + 1  # keep every part in memory; the body is already bounded by `limit`
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if "Too many files" in str(e):
            raise RequestError(400, f"too many images: at most {max_images} per request") from None
        raise RequestError(400, f"malformed multipart body: {e}") from None
    try:
        uploads = []
        for key, value in form.multi_items():
            if key == UPLOAD_FIELD:
                if isinstance(value, str):
                    raise RequestError(400, f"form field {UPLOAD_FIELD!r} must be a file upload, not text")
                uploads.append((value.filename or None, await value.read()))
            elif key != "top_k":
                raise RequestError(400, f"unexpected form field {key!r}; send images as {UPLOAD_FIELD!r} and optionally top_k")
        top_k = form.get("top_k")
        return uploads, top_k if isinstance(top_k, str) else None
    finally:
        await form.close()


def _is_raw_image(content_type: str) -> bool:
    return content_type == "" or content_type.startswith("image/") or content_type in RAW_CONTENT_TYPES


# ---------------------------------------------------------------------------------- the app


class LabelScore(BaseModel):
    label: str
    score: float

class Prediction(BaseModel):
    filename: str | None
    label: str
    score: float
    top_k: list[LabelScore]

class ModelRef(BaseModel):
    name: str
    version: str

class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[Prediction]

class Error(BaseModel):
    detail: str



def create_app(classifier: Classifier, settings: ServeSettings | None = None, infer: Callable[[np.ndarray], np.ndarray] | None = None) -> FastAPI:
    """The FastAPI app serving `classifier`: /v1/predict, /v1/health, /v1/model, /docs and the page at /.

    `infer` replaces the batched forward `classifier.predict_arrays` (uint8 (N, S, S, 3) ->
    probabilities (N, C)); tests pass a wrapper that counts or blocks calls.
    """
    import imgcls

    s = settings or ServeSettings()
    meta = classifier.meta
    class_names = list(classifier.class_names)
    model_ref = {"name": str(meta.get("arch", "model")), "version": model_version(meta)}
    batcher = Batcher(infer or (lambda x: classifier.predict_arrays(x, batch_size=s.max_batch)), s.max_batch, s.batch_wait_ms, s.queue_size, s.batching)
    decode_workers = s.decode_workers or min(4, os.cpu_count() or 1)
    runtime: dict[str, Any] = {}
    static = {name: resources.files("imgcls").joinpath("static", name).read_bytes() for name in ("index.html", *STATIC_FILES)}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime["pool"] = ThreadPoolExecutor(decode_workers, thread_name_prefix="imgcls-decode")
        batcher.start()
        log.info("serving %s %s (%d classes), batching %s", model_ref["name"], model_ref["version"], len(class_names), f"up to {s.max_batch} images, wait {s.batch_wait_ms:g} ms" if s.batching else "off")
        try:
            yield
        finally:
            batcher.stop()
            runtime.pop("pool").shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="imgcls",
        version=imgcls.__version__,
        description=f"Image classification with `{model_ref['name']}` ({len(class_names)} classes). POST images to /v1/predict.",
        lifespan=lifespan,
    )
    app.add_middleware(AccessLog)
    app.state.batcher = batcher  # for tests and monitoring

    @app.exception_handler(RequestError)
    async def _refuse(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    binary = {"type": "string", "format": "binary"}
    predict_body = {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": [UPLOAD_FIELD], "properties": {
                UPLOAD_FIELD: {"type": "array", "items": binary, "description": f"one or more images (repeat the field), at most {s.max_images}"},
                "top_k": {"type": "integer", "minimum": 1, "description": "classes per image"},
            }}},
            "application/octet-stream": {"schema": binary},
            "image/*": {"schema": binary},
        },
    }
    errors = {
        400: {"model": Error, "description": "too many images, a corrupt image or a decompression bomb"},
        413: {"model": Error, "description": f"body over {s.max_upload_mb:g} MB"},
        415: {"model": Error, "description": "not an image, or an unsupported content type"},
        503: {"model": Error, "description": "the queue is full; retry later"},
    }

    async def _decode_all(uploads: list[tuple[str | None, bytes]]) -> np.ndarray:
        """Each upload -> uint8 (S, S, 3) via Classifier.prepare in the decode pool; stacked."""
        loop = asyncio.get_running_loop()

        def prepare(data: bytes, name: str) -> np.ndarray | ImageDecodeError:
            try:
                return classifier.prepare(data, name)
            except ImageDecodeError as e:
                return e

        names = [fn or (f"image {i + 1}" if len(uploads) > 1 else "image") for i, (fn, _) in enumerate(uploads)]
        out = await asyncio.gather(*(loop.run_in_executor(runtime["pool"], prepare, data, name) for (_, data), name in zip(uploads, names)))
        for name, a in zip(names, out):
            if isinstance(a, ImageDecodeError):
                status = 415 if a.reason == NOT_AN_IMAGE else 400
                raise RequestError(status, f"{name}: {a.reason or a}")
        return np.stack(out)

    async def _read_uploads(request: Request, top_k: int | None) -> tuple[list[tuple[str | None, bytes]], int]:
        """The request's images as [(filename or None, bytes)] and the top_k to answer with."""
        body = await _read_body(request.stream(), request.headers.get("content-length"), s.max_upload_bytes)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            uploads, form_top_k = await _split_multipart(request.headers, body, s.max_images, s.max_upload_bytes)
            top_k = top_k or _parse_top_k(form_top_k)
        elif _is_raw_image(content_type):
            uploads = [(None, body)] if body else []
        else:
            raise RequestError(415, f"unsupported content type {content_type!r}: send multipart/form-data with field {UPLOAD_FIELD!r}, or the image bytes as image/* or application/octet-stream")
        if not uploads:
            raise RequestError(400, f"no image in the request: send multipart field {UPLOAD_FIELD!r} or a raw image body")
        if len(uploads) > s.max_images:
            raise RequestError(400, f"too many images: {len(uploads)}, at most {s.max_images} per request")
        return uploads, top_k or s.default_top_k

    @app.post("/v1/predict", response_model=PredictResponse, responses=errors, openapi_extra={"requestBody": predict_body}, tags=["predict"])
    async def predict(request: Request, top_k: int | None = Query(None, ge=1, description=f"classes per image (default {s.default_top_k})")) -> dict[str, Any]:
        """Label, score and top-k classes for each image: multipart field `file` (repeatable) or a raw image body."""
        if not batcher.admit():  # before reading the body: an overloaded server sheds load cheaply
            raise RequestError(503, f"server busy: {batcher.capacity} requests already waiting; retry shortly", {"Retry-After": "1"})
        future = None
        try:
            uploads, k = await _read_uploads(request, top_k)
            request.state.n_images = len(uploads)
            future = batcher.submit(await _decode_all(uploads))  # uint8 (n, S, S, 3)
        finally:
            if future is None:
                batcher.withdraw()
        probs = await future  # (n, num_classes)
        return {"model": model_ref, "predictions": [_prediction(p, class_names, k, fn) for p, (fn, _) in zip(probs, uploads)]}

    @app.get("/v1/health", tags=["service"])
    async def health() -> dict[str, Any]:
        """Liveness and load: the model, the requests waiting and the forward passes run."""
        return {
            "status": "ok",
            "model": model_ref,
            "queue": {"waiting": batcher.waiting, "ready": batcher.ready, "capacity": batcher.capacity},
            "batching": s.batching,
            "forward_calls": batcher.forward_calls,
            "images": batcher.images_done,
        }

    @app.get("/v1/model", tags=["service"])
    async def model_info() -> dict[str, Any]:
        """Class names, preprocessing, metrics and version of the served model, and the server's limits."""
        return {
            **model_ref,
            "num_classes": len(class_names),
            "class_names": class_names,
            "preprocess": classifier.spec.to_dict(),
            "metrics": meta.get("metrics", {}),
            "training": meta.get("training", {}),
            "versions": meta.get("versions", {}),
            "runtime": {"backend": meta.get("backend", "torch"), "device": str(classifier.device), "precision": str(classifier.amp_dtype or "float32").replace("torch.", "")},
            "limits": asdict(s),
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> Response:
        return Response(static["index.html"], media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        if name not in STATIC_FILES:  # a fixed set held in memory; the URL never becomes a path
            return JSONResponse({"detail": "not found"}, status_code=404)
        return Response(static[name], media_type=STATIC_FILES[name], headers=PAGE_HEADERS)

    return app


# The page loads nothing from elsewhere; say so to the browser too.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'",
    "X-Content-Type-Options": "nosniff",
}


class AccessLog:
    """ASGI middleware: one log line per request: method, path, status, images, milliseconds."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        state = scope.setdefault("state", {})

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            log.info("%s %s %d %d img %.1f ms", scope["method"], scope["path"], status, state.get("n_images", 0), (time.perf_counter() - t0) * 1000)


def run_server(classifier: Classifier, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `classifier` with uvicorn until interrupted (uvicorn's access log off: AccessLog writes one)."""
    import uvicorn

    uvicorn.run(create_app(classifier, settings), host=host, port=port, access_log=False, log_level="info")
