"""Dynamic batching and admission for the HTTP server.

`Batcher` runs one inference thread that takes waiting requests off a queue and runs them through
the model together: it takes the first waiting request, waits up to `wait_ms` for more while other
requests are still being decoded, and runs one forward pass on up to `max_batch` images.
Admission is bounded (`queue_size`, counted from when a request's body is in until its forward
pass), so the server can refuse at once instead of letting latency and memory grow. Results go
back to each request's asyncio future on its own event loop.

`ByteBudget` bounds the memory of the images being decoded at once, `ClientLimits` the requests
one client address has in progress.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

log = logging.getLogger("imgcls.serve")

_STOP = object()


class _Job:
    __slots__ = ("images", "loop", "future")

    def __init__(self, images: np.ndarray, loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        self.images = images  # uint8 (n, S, S, 3)
        self.loop = loop
        self.future = future


def _settle(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if future.done():  # the client went away and the request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class Batcher:
    """One inference thread fed by a queue of requests; batches them up to `max_batch` images.

    A request is admitted (`admit`) once its body is in and counts against `capacity` until the
    inference thread takes it into a forward pass, so decoding work is bounded too; `full` lets a
    server refuse before reading a body at all. `infer`
    maps uint8 (N, S, S, 3) to probabilities (N, C). With `batching=False` every request is its
    own forward pass, in arrival order.
    """

    def __init__(
        self, infer: Callable[[np.ndarray], np.ndarray], max_batch: int, wait_ms: float, queue_size: int, batching: bool = True
    ) -> None:
        self.infer = infer
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000.0
        self.batching = batching
        self.capacity = queue_size
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # bounded by admission
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.waiting = 0  # admitted, not yet in a forward pass (being decoded, or queued)
        self.arriving = 0  # of those, not yet queued: the batch wait is worth it only while > 0
        self.forward_calls = 0
        self.images_done = 0

    @property
    def ready(self) -> int:
        """Requests decoded and queued for the model."""
        return self._queue.qsize()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="imgcls-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._queue.put(_STOP)  # after the requests already queued
        self._thread.join(timeout)
        self._thread = None

    @property
    def full(self) -> bool:
        """True while `capacity` requests are waiting: `admit` would refuse now."""
        return self.waiting >= self.capacity

    def admit(self) -> bool:
        """Reserve a place for one request; False when `capacity` requests are already waiting."""
        with self._lock:
            if self.waiting >= self.capacity:
                return False
            self.waiting += 1
            self.arriving += 1
            return True

    def withdraw(self) -> None:
        """Give back an admitted request's place without submitting it (it failed)."""
        with self._lock:
            self.waiting -= 1
            self.arriving -= 1

    def submit(self, images: np.ndarray) -> asyncio.Future:
        """Queue an admitted request's images; its future gets their probabilities."""
        loop = asyncio.get_running_loop()
        job = _Job(images, loop, loop.create_future())
        with self._lock:
            self.arriving -= 1
        self._queue.put(job)
        return job.future

    def _taken(self, n: int) -> None:
        with self._lock:
            self.waiting -= n

    def _collect(self, first: _Job) -> tuple[list[_Job], Any]:
        """The jobs for one forward pass, and a job taken from the queue that did not fit (or None)."""
        jobs, n = [first], len(first.images)
        if not self.batching:
            return jobs, None
        deadline = time.monotonic() + self.wait_s
        while n < self.max_batch:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0 or self.arriving == 0:  # nothing is on its way: run what we have
                    return jobs, None
                try:
                    nxt = self._queue.get(timeout=min(left, 0.001))
                except queue.Empty:
                    continue
            if nxt is _STOP or n + len(nxt.images) > self.max_batch:
                return jobs, nxt
            jobs.append(nxt)
            n += len(nxt.images)
        return jobs, None

    def _run(self) -> None:
        carry: Any = None
        while True:
            job = carry if carry is not None else self._queue.get()
            carry = None
            if job is _STOP:
                return
            jobs, carry = self._collect(job)
            self._taken(len(jobs))
            try:
                probs = self.infer(np.concatenate([j.images for j in jobs]) if len(jobs) > 1 else jobs[0].images)
                error = None
            except Exception as e:  # reported to every request in the batch as a 500
                log.exception("inference failed")
                probs, error = None, e
            self.forward_calls += 1
            start = 0
            for j in jobs:
                part = None if probs is None else probs[start : start + len(j.images)]
                start += len(j.images)
                try:
                    j.loop.call_soon_threadsafe(_settle, j.future, part, error)
                except RuntimeError:  # the event loop has closed (shutdown)
                    pass
            self.images_done += start


class BudgetExhausted(Exception):
    """`ByteBudget.hold` waited its timeout and the bytes still did not fit."""


class ByteBudget:
    """A budget of bytes shared by threads: `hold(n, timeout)` waits until `n` more fit under `capacity`.

    The server's decode threads hold each image's estimated decoding memory
    (`io.ImageHeader.decode_bytes`) while they decode it, so all the decoding in progress stays
    under `capacity` however many requests arrive at once.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 byte, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self.peak = 0  # the most held at once, for monitoring
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, n: int, timeout: float) -> Iterator[None]:
        """Hold `n` bytes for the `with` block; `BudgetExhausted` when they do not fit within `timeout` s."""
        n = min(max(n, 0), self.capacity)  # one item larger than the whole budget runs alone, not never
        with self._cond:
            if not self._cond.wait_for(lambda: self.in_use + n <= self.capacity, timeout):
                raise BudgetExhausted(f"{n} bytes did not fit within {timeout:g} s ({self.in_use} of {self.capacity} in use)")
            self.in_use += n
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= n
                self._cond.notify_all()


class ClientLimits:
    """Requests in progress per client address, at most `limit` each (0: no limit).

    Used from the event loop's thread only, so it needs no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._active: Counter[str] = Counter()

    def enter(self, client: str) -> bool:
        """Count one more request for `client`; False (nothing counted) when it already has `limit`."""
        if self.limit and self._active[client] >= self.limit:
            return False
        self._active[client] += 1
        return True

    def leave(self, client: str) -> None:
        self._active[client] -= 1
        if self._active[client] <= 0:
            del self._active[client]

    def active(self, client: str) -> int:
        return self._active[client]

    @property
    def clients(self) -> int:
        """Client addresses with a request in progress."""
        return len(self._active)

    @property
    def requests(self) -> int:
        """Requests in progress, all clients together."""
        return sum(self._active.values())
