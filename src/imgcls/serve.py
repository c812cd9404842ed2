"""The HTTP server: `create_app(classifier, settings)` -> a FastAPI app with the JSON API and the web page.

An upload goes: `predict` (refuse at once when the queue is full: 503, or when its client already
has `max_client_requests` in progress: 429) -> `_read_uploads` (the body within the size limit
and `body_timeout_s`, multipart split chunk by chunk as it arrives) -> a place in the queue ->
`_decode_all` (in the decode threads: the header checked against `max_decoded_mb`, the image's
decoding memory held from the `decode_budget_mb` budget, `Classifier.prepare`, the same decode and
resize as `imgcls predict`) -> `batching.Batcher` (one inference thread runs
`serve_engine.Engine` on whole batches: `Classifier.infer_arrays`, each batch padded to one of a few
bucket sizes that were compiled at start-up) -> `inference.answer.answer` (the same answer dict
`Classifier.predict` returns) -> JSON.

Requests are batched dynamically: the inference thread takes the first waiting request, waits up
to `batch_wait_ms` for more while other requests are still decoding, and runs one forward on up
to `max_batch` images. The requests in front of it are bounded (`queue_size`, counted from when
the body is in, so slow uploads hold no place); when the queue is full the server answers 503 at
once, before reading the body, rather than letting latency and memory grow without limit. The
event loop only moves bytes: it never decodes, and parses a body a chunk at a time, so
/v1/health and the 503s stay fast under load. A request never names a file on the server: only
uploaded bytes are decoded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request  # imgcls[serve]; cli imports this module only for `imgcls serve`
from fastapi.responses import HTMLResponse, JSONResponse, Response

from imgcls.batching import Batcher, BudgetExhausted, ByteBudget, ClientLimits
from imgcls.inference.answer import answer, explain_target
from imgcls.inference.explain import UNAVAILABLE, UploadExplainer
from imgcls.inference.trust import Outputs
from imgcls.io import ImageDecodeError, read_header
from imgcls.predict import Classifier
from imgcls.serve_engine import Engine
from imgcls.serve_schema import (  # re-exported: callers import the schema from imgcls.serve
    Error,
    Explanation,
    LabelScore,
    ModelRef,
    Prediction,
    PredictResponse,
    ServeSettings,
    model_version,
    predict_body,
    predict_errors,
)
from imgcls.threads import decode_workers, usable_cores
from imgcls.uploads import ClientGone, RequestError, parse_top_k, read_uploads

log = logging.getLogger("imgcls.serve")

# io.ImageDecodeError.kind -> HTTP status; decided by the kind, never by the message's wording.
DECODE_ERROR_STATUS = {"unsupported": 415, "too_large": 413, "corrupt": 400, "unreadable": 400}
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# How long an image waits for room in the decode memory budget before its request gets 503: a
# decode of the largest image the default limit allows takes a second or two on a CPU core, so a
# longer wait means the server is overloaded.
DECODE_WAIT_S = 2.0
CLIENT_CLOSED = 499  # nginx's "client closed request": written to the access log, never sent

__all__ = [
    "AccessLog",
    "Error",
    "Explanation",
    "LabelScore",
    "ModelRef",
    "PredictResponse",
    "Prediction",
    "ServeSettings",
    "create_app",
    "model_version",
    "run_server",
]


# ---------------------------------------------------------------------------------- helpers


def _prediction(
    probs: np.ndarray,
    class_names: list[str],
    top_k: int,
    filename: str | None,
    known: bool = True,
    set_indices: list[int] | None = None,
    thresholds: np.ndarray | None = None,
) -> dict[str, Any]:
    """`inference.answer.answer` for one upload's probability row, without the per-class dict
    (a multi-label model's answer keeps it: every label's score is part of that answer).

    "path" is the upload's filename (None for a raw body), as `Classifier.predict` names its
    inputs; "filename" repeats it because that is the HTTP API's documented name for it.
    """
    a = answer(probs, class_names, top_k, filename, thresholds is not None, known, set_indices, thresholds)
    return {**a, "filename": filename}


# ---------------------------------------------------------------------------------- the app


class _Service:
    """What one app serves with: the model, the batcher, the limits and the decode and explanation
    threads; one method per step of a /v1/predict request, and the bodies of /v1/health and /v1/model."""

    def __init__(self, classifier: Classifier, s: ServeSettings, infer: Callable[[np.ndarray], np.ndarray] | None) -> None:
        self.classifier = classifier
        self.s = s
        self.meta = classifier.meta
        self.class_names = list(classifier.class_names)
        self.model_ref = {"name": str(self.meta.get("arch", "model")), "version": model_version(self.meta)}
        # The forward pass, padded to bucket sizes compiled in `lifespan` (`infer` from a test replaces it)
        self.engine = Engine(classifier, s.buckets, s.max_batch, s.compile, log.info)
        self.batcher = Batcher(infer or self.engine, s.max_batch, s.batch_wait_ms, s.queue_size, s.batching)
        # The cores the inference thread's forward passes leave (one decode thread on 2 cores): decoding
        # beside two intra-op threads made their barriers wait; the forward's ThreadTuner (predict.Classifier)
        # drops to one thread when decoding still competes.
        self.decode_workers = s.decode_workers or decode_workers(usable_cores())
        self.budget = ByteBudget(s.decode_budget_bytes)  # decoding memory across the decode threads
        self.clients = ClientLimits(s.max_client_requests)
        self.runtime: dict[str, ThreadPoolExecutor] = {}  # the thread pools, while the app runs
        # Loads the model folder on the first ?explain=true.
        self.explainer = UploadExplainer(self.meta.get("source"), classifier.max_pixels)
        self.static = {name: resources.files("imgcls").joinpath("static", name).read_bytes() for name in ("index.html", *STATIC_FILES)}
        self.draft_size = classifier.spec.cache_size  # what Classifier.prepare decodes a JPEG at

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """The decode and explanation threads and the inference thread, from start-up to shutdown."""
        s, model_ref = self.s, self.model_ref
        self.runtime["pool"] = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="imgcls-decode")
        self.runtime["explain"] = ThreadPoolExecutor(1, thread_name_prefix="imgcls-explain")  # one: the explainer's model is not shared
        self.engine.start()  # compiles the bucket shapes (seconds to minutes) before the first request is accepted
        self.batcher.start()
        batching = f"up to {s.max_batch} images, wait {s.batch_wait_ms:g} ms" if s.batching else "off"
        log.info(
            "serving %s %s (%d classes), batching %s, engine %s",
            model_ref["name"],
            model_ref["version"],
            len(self.class_names),
            batching,
            self.engine.name,
        )
        try:
            yield
        finally:
            self.batcher.stop()
            self.runtime.pop("pool").shutdown(wait=False, cancel_futures=True)
            self.runtime.pop("explain").shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ /v1/predict, step by step

    async def predict(self, request: Request, top_k: int | None, explain: bool, coverage: float | None) -> dict[str, Any]:
        """The answer to one /v1/predict request; every refusal is a `RequestError` (or `ClientGone`)."""
        s = self.s
        qhat = self.parse_query(explain, coverage)
        client = self.enter(request)
        try:
            uploads, form_top_k = await read_uploads(request, s.max_upload_bytes, s.max_images, s.body_timeout_s)
            k = top_k or parse_top_k(form_top_k) or s.default_top_k
            request.state.n_images = len(uploads)
            future = await self.queue(uploads)
            out = Outputs.of(await future)  # probabilities (n, num_classes), "unknown" verdicts (n,)
            answers = self.answers(out, uploads, k, qhat)
            if explain:
                await self.explain(answers, uploads)
        finally:
            self.clients.leave(client)
        return {"model": self.model_ref, "predictions": answers}

    def parse_query(self, explain: bool, coverage: float | None) -> float | None:
        """The conformal threshold for ?coverage= (None without it); 501 for ?explain=true with nothing to explain with."""
        if explain and not self.explainer.available:
            raise RequestError(501, UNAVAILABLE)
        try:
            return None if coverage is None else self.classifier.trust.qhat(coverage)
        except ValueError as e:
            raise RequestError(400, str(e)) from None

    def enter(self, request: Request) -> str:
        """The request's client address, counted in progress until `clients.leave`; 503 when the queue
        is full, 429 when the client has too many requests in progress."""
        # Refusals that cost nothing come first, before a byte of the body is read.
        if self.batcher.full:
            raise self.busy()
        client = request.client.host if request.client else "unknown"
        if not self.clients.enter(client):
            limit = self.s.max_client_requests
            raise RequestError(
                429,
                f"too many requests in progress from {client} (at most {limit}); wait for an answer before sending more",
                {"Retry-After": "1"},
            )
        return client

    def busy(self) -> RequestError:
        return RequestError(503, f"server busy: {self.batcher.capacity} requests already waiting; retry shortly", {"Retry-After": "1"})

    async def queue(self, uploads: list[tuple[str | None, bytearray]]) -> asyncio.Future:
        """A place in the queue, the uploads decoded, then handed to the batcher; its future for their outputs."""
        if not self.batcher.admit():  # a place in the queue only once the body is in: slow uploads hold none
            raise self.busy()
        future = None
        try:
            future = self.batcher.submit(await self.decode_all(uploads))  # uint8 (n, S, S, 3)
        finally:
            if future is None:
                self.batcher.withdraw()
        return future

    def prepare(self, data: bytes, name: str) -> np.ndarray | RequestError:
        """One upload -> uint8 (S, S, 3), in a decode thread: the header checked first, then its
        decoding memory held from the budget while Classifier.prepare decodes and resizes it."""
        s, classifier = self.s, self.classifier
        try:
            header = read_header(
                data, name=name, max_pixels=classifier.max_pixels, draft_size=self.draft_size, max_bytes=s.max_decoded_bytes
            )
            with self.budget.hold(header.decode_bytes, DECODE_WAIT_S):
                return classifier.prepare(data, name)
        except ImageDecodeError as e:
            return RequestError(DECODE_ERROR_STATUS.get(e.kind, 400), f"{name}: {e.reason or e}")
        except BudgetExhausted:
            return RequestError(
                503, f"server busy decoding other images (over {s.decode_budget_mb:g} MB in progress); retry shortly", {"Retry-After": "1"}
            )

    async def decode_all(self, uploads: list[tuple[str | None, bytearray]]) -> np.ndarray:
        """Each upload -> uint8 (S, S, 3) in the decode threads; stacked (n, S, S, 3). The first failure is raised."""
        loop = asyncio.get_running_loop()
        names = [fn or (f"image {i + 1}" if len(uploads) > 1 else "image") for i, (fn, _) in enumerate(uploads)]
        pool = self.runtime["pool"]
        out = await asyncio.gather(*(loop.run_in_executor(pool, self.prepare, data, name) for (_, data), name in zip(uploads, names)))
        for a in out:
            if isinstance(a, RequestError):
                raise a
        return np.stack(out)

    def answers(self, out: Outputs, uploads: list[tuple[str | None, bytearray]], k: int, qhat: float | None) -> list[dict[str, Any]]:
        """One answer dict per upload from the batch's outputs, with its conformal set under ?coverage=."""
        sets = self.classifier.trust.sets(out.probs, qhat) if qhat is not None else [None] * len(out)
        th = self.classifier.trust.thresholds  # None for a single-label model
        rows = zip(out.probs, out.known, sets, uploads)
        return [_prediction(p, self.class_names, k, fn, bool(ok), st, th) for p, ok, st, (fn, _) in rows]

    async def explain(self, answers: list[dict[str, Any]], uploads: list[tuple[str | None, bytearray]]) -> None:
        """Add "explanation" to each answer: a Grad-CAM overlay of its label."""
        # Off the event loop and outside the batching queue, one image at a time in the explanation thread.
        loop = asyncio.get_running_loop()
        for a, (_, data) in zip(answers, uploads):
            target = explain_target(a)  # an "unknown" answer for its best guess, a multi-label one for its top label
            a["explanation"] = await loop.run_in_executor(self.runtime["explain"], self.explainer, data, target)

    # ------------------------------------------------------------------ /v1/health, /v1/model

    def health(self) -> dict[str, Any]:
        """Liveness and load: the model, the requests waiting and the forward passes run."""
        batcher, budget, clients = self.batcher, self.budget, self.clients
        return {
            "status": "ok",
            "model": self.model_ref,
            "queue": {"waiting": batcher.waiting, "ready": batcher.ready, "capacity": batcher.capacity},
            "batching": self.s.batching,
            "engine": self.engine.describe(),  # compiled / eager / onnx, its buckets, start-up seconds
            "forward_calls": batcher.forward_calls,
            "images": batcher.images_done,
            "decoding": {"bytes": budget.in_use, "peak_bytes": budget.peak, "budget_bytes": budget.capacity},
            "clients": {"addresses": clients.clients, "requests": clients.requests, "limit_each": self.s.max_client_requests},
        }

    def model_info(self) -> dict[str, Any]:
        """Class names, preprocessing, metrics and version of the served model, and the server's limits."""
        meta, classifier = self.meta, self.classifier
        return {
            **self.model_ref,
            "num_classes": len(self.class_names),
            "class_names": self.class_names,
            "preprocess": classifier.spec.to_dict(),
            "metrics": meta.get("metrics", {}),
            "calibration": classifier.trust.describe(),  # temperature, "unknown" rule, conformal scores (for ?coverage=)
            **_task(classifier),
            "training": meta.get("training", {}),
            "versions": meta.get("versions", {}),
            "runtime": {
                "backend": meta.get("backend", "torch"),
                "engine": self.engine.name,
                "device": str(classifier.device),
                "precision": str(classifier.amp_dtype or "float32").replace("torch.", ""),
            },
            "limits": {**asdict(self.s), "max_pixels": classifier.max_pixels},
        }


def _task(classifier: Classifier) -> dict[str, Any]:
    """/v1/model's "task", and a multi-label model's "thresholds" {label: threshold} (the page marks them on its bars)."""
    th = classifier.trust.thresholds
    if th is None:
        return {"task": "single-label"}
    return {"task": "multi-label", "thresholds": dict(zip(classifier.class_names, th.tolist()))}


async def _refuse(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)


async def _gone(request: Request, exc: ClientGone) -> Response:
    # Nobody is left to answer (uvicorn drops it); the access log records 499 and why, no traceback.
    request.state.log_note = str(exc)
    return Response(status_code=CLIENT_CLOSED)


def _add_predict_route(app: FastAPI, service: _Service) -> None:
    """POST /v1/predict, its query parameters described with the server's settings."""
    s = service.s
    top_k_query = Query(None, ge=1, description=f"classes per image (default {s.default_top_k})")
    explain_query = Query(False, description="add `explanation` to each answer: a Grad-CAM overlay of its label (~0.3 s per 224 px image)")
    coverage_query = Query(
        None,
        gt=0,
        lt=1,
        description="add `set` to each answer: the classes that hold the true one with this "
        "probability (split conformal on the model's validation scores), e.g. 0.9",
    )

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=predict_errors(s),
        openapi_extra={"requestBody": predict_body(s)},
        tags=["predict"],
        response_model_exclude_unset=True,  # "explanation" only when asked for
    )
    async def predict(
        request: Request, top_k: int | None = top_k_query, explain: bool = explain_query, coverage: float | None = coverage_query
    ) -> dict[str, Any]:
        """Label, score and top-k classes for each image: multipart field `file` (repeatable) or a raw image body.
        An image the model's "unknown" rule turns away is answered label "unknown" with its `best_guess`.
        A multi-label model answers `labels` (those at or above their threshold, maybe none) and every label's
        score in `probabilities` instead (top_k and coverage do not apply; the thresholds are in /v1/model)."""
        return await service.predict(request, top_k, explain, coverage)


def create_app(
    classifier: Classifier, settings: ServeSettings | None = None, infer: Callable[[np.ndarray], np.ndarray] | None = None
) -> FastAPI:
    """The FastAPI app serving `classifier`: /v1/predict, /v1/health, /v1/model, /docs and the page at /.

    `infer` replaces the batched forward `classifier.infer_arrays` (uint8 (N, S, S, 3) ->
    `inference.trust.Outputs`, or plain probabilities (N, C), which answer no image "unknown");
    tests pass a wrapper that counts or blocks calls.
    """
    import imgcls

    service = _Service(classifier, settings or ServeSettings(), infer)
    model_ref, static = service.model_ref, service.static
    app = FastAPI(
        title="imgcls",
        version=imgcls.__version__,
        description=f"Image classification with `{model_ref['name']}` ({len(service.class_names)} classes). POST images to /v1/predict.",
        lifespan=service.lifespan,
    )
    app.add_middleware(AccessLog)
    app.state.batcher = service.batcher  # for tests and monitoring
    app.state.decode_budget = service.budget
    app.add_exception_handler(RequestError, _refuse)
    app.add_exception_handler(ClientGone, _gone)
    _add_predict_route(app, service)

    @app.get("/v1/health", tags=["service"])
    async def health() -> dict[str, Any]:
        """Liveness and load: the model, the requests waiting and the forward passes run."""
        return service.health()

    @app.get("/v1/model", tags=["service"])
    async def model_info() -> dict[str, Any]:
        """Class names, preprocessing, metrics and version of the served model, and the server's limits."""
        return service.model_info()

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
    """ASGI middleware: one log line per request: method, path, status, images, milliseconds (and
    why, for a client that left: status 499)."""

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
            ms = (time.perf_counter() - t0) * 1000
            note = f": {state['log_note']}" if "log_note" in state else ""
            log.info("%s %s %d %d img %.1f ms%s", scope["method"], scope["path"], status, state.get("n_images", 0), ms, note)


def run_server(classifier: Classifier, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `classifier` with uvicorn until interrupted (uvicorn's access log off: AccessLog writes one)."""
    import uvicorn

    uvicorn.run(create_app(classifier, settings), host=host, port=port, access_log=False, log_level="info")
