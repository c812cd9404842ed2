"""Reading an HTTP request's images for the server: limits on size and time, multipart split as it arrives.

`read_uploads(request, ...)` -> [(filename or None, bytes)] and the form's top_k field. The body
is fed to a splitter chunk by chunk as it arrives (never joined and parsed in one go on the event
loop), must pass no size limit (413) and be complete within a time limit (408, connection closed),
and a client that disconnects halfway raises `ClientGone` (logged as 499, not an error). Every
refusal is a `RequestError` with the HTTP status and a message for the client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request

try:  # python-multipart >= 0.0.13 names its module python_multipart; older releases, multipart
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header
except ModuleNotFoundError:  # pragma: no cover
    from multipart.exceptions import FormParserError
    from multipart.multipart import MultipartParser, parse_options_header

UPLOAD_FIELD = "file"
RAW_CONTENT_TYPES = ("application/octet-stream",)  # plus any image/*
MAX_TOP_K_FIELD = 32  # bytes of the multipart top_k field


class RequestError(Exception):
    """A request the server refuses: HTTP status and a message for the client."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


class ClientGone(Exception):
    """The client closed the connection before its request body was in."""

    def __init__(self, received: int, declared: int | None) -> None:
        of = f" of {declared}" if declared is not None else ""
        super().__init__(f"client closed the connection during the upload ({received}{of} bytes received)")


async def read_uploads(
    request: Request, max_bytes: int, max_images: int, timeout: float
) -> tuple[list[tuple[str | None, bytearray]], str | None]:
    """The request's images as [(filename or None, bytes)] and the multipart top_k field (or None).

    A multipart/form-data body gives its `file` parts; an image/* or application/octet-stream
    body (or one without a content type) is one image. Raises `RequestError` (400, 408, 413, 415)
    or `ClientGone`.
    """
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    declared = declared_length(request.headers.get("content-length"), max_bytes)
    form, body = None, bytearray()
    if kind == "multipart/form-data":
        form = FormSplitter(content_type, max_images)
    elif not is_raw_image(kind):
        raise RequestError(
            415,
            f"unsupported content type {kind!r}: send multipart/form-data with field {UPLOAD_FIELD!r}, "
            "or the image bytes as image/* or application/octet-stream",
        )
    await receive_body(request, declared, max_bytes, timeout, form.write if form else body.extend)
    uploads, top_k = form.finish() if form else ([(None, body)] if body else [], None)
    if not uploads:
        raise RequestError(400, f"no image in the request: send multipart field {UPLOAD_FIELD!r} or a raw image body")
    return uploads, top_k


def parse_top_k(value: Any) -> int | None:
    """A form's top_k text -> a positive int, None when absent; 422 otherwise."""
    if value is None or value == "":
        return None
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = 0
    if k < 1:
        raise RequestError(422, f"top_k must be a positive integer, got {value!r}")
    return k


def declared_length(content_length: str | None, limit: int) -> int | None:
    """The Content-Length header as an int (None without one); 413 when it is over `limit`."""
    if content_length is None:
        return None
    try:
        declared = int(content_length)
    except ValueError:
        raise RequestError(400, f"bad Content-Length header {content_length!r}") from None
    if declared > limit:
        raise RequestError(413, f"request body is {declared} bytes: {too_big(limit)}")
    return declared


def too_big(limit: int) -> str:
    return f"upload over the limit of {limit / 2**20:g} MB ({limit} bytes); send fewer or smaller images"


async def receive_body(request: Request, declared: int | None, limit: int, timeout: float, sink: Callable[[bytes], None]) -> None:
    """Feed the body to `sink` chunk by chunk as it arrives.

    413 as soon as it passes `limit` bytes; 408 (and the connection closed) when it is not all in
    within `timeout` seconds; `ClientGone` when the client disconnects first.
    """
    received = 0

    async def pump() -> None:
        nonlocal received
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise RequestError(413, too_big(limit))
            sink(chunk)

    try:
        await asyncio.wait_for(pump(), timeout)
    except asyncio.TimeoutError:
        of = f" of {declared}" if declared is not None else ""
        raise RequestError(
            408,
            f"request body not complete after {timeout:g} s ({received}{of} bytes received); send the whole body at once",
            {"Connection": "close"},
        ) from None
    except ClientDisconnect:
        raise ClientGone(received, declared) from None


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class FormSplitter:
    """multipart/form-data fed chunk by chunk -> the `file` parts [(filename or None, bytes)] and the top_k field.

    Splitting as the chunks arrive keeps each step on the event loop small: parsing a whole 20 MB
    body at once held the loop for 20-60 ms, and every other request waited that long. A part
    over `max_images` or an unknown field is refused as soon as its headers are in.
    """

    def __init__(self, content_type: str, max_images: int) -> None:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise RequestError(400, "malformed multipart body: no boundary in the Content-Type header")
        self.max_images = max_images
        self.uploads: list[tuple[str | None, bytearray]] = []
        self.top_k: bytearray | None = None
        self.complete = False
        self._part: bytearray | None = None
        self._disposition = b""
        self._header_name, self._header_value = bytearray(), bytearray()
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_end": self._on_end,
            },
        )

    def write(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except FormParserError as e:
            raise RequestError(400, f"malformed multipart body: {e}") from None

    def finish(self) -> tuple[list[tuple[str | None, bytearray]], str | None]:
        """The uploads and the top_k field's text (None if absent), once the whole body is in."""
        if not self.complete:
            raise RequestError(400, "malformed multipart body: it ends before its closing boundary")
        return self.uploads, None if self.top_k is None else _text(bytes(self.top_k))

    def _on_part_begin(self) -> None:
        self._part, self._disposition = None, b""

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name, self._header_value = bytearray(), bytearray()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = _text(options.get(b"name", b""))
        self._part = bytearray()
        if name == UPLOAD_FIELD:
            if b"filename" not in options:
                raise RequestError(400, f"form field {UPLOAD_FIELD!r} must be a file upload, not text")
            if len(self.uploads) >= self.max_images:
                raise RequestError(400, f"too many images: at most {self.max_images} per request")
            self.uploads.append((_text(options[b"filename"]) or None, self._part))
        elif name == "top_k":
            self.top_k = self._part
        elif not name:
            raise RequestError(400, "malformed multipart body: a part without a name")
        else:
            raise RequestError(400, f"unexpected form field {name!r}; send images as {UPLOAD_FIELD!r} and optionally top_k")

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._part is not None  # python-multipart calls on_headers_finished first
        self._part += memoryview(data)[start:end]
        if self._part is self.top_k and len(self._part) > MAX_TOP_K_FIELD:
            raise RequestError(422, "top_k must be a positive integer")

    def _on_end(self) -> None:
        self.complete = True


def is_raw_image(content_type: str) -> bool:
    return content_type == "" or content_type.startswith("image/") or content_type in RAW_CONTENT_TYPES
