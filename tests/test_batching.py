"""Tests for imgcls.batching: the server's dynamic batcher and its admission limits, without a server or a model.

`infer` here is a stand-in that records the batch sizes it sees and returns each image's id (its
first pixel), so a test can tell which rows went back to which request. A `threading.Event` gate
holds the inference thread inside a forward pass, so what queues up behind it is deterministic.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from imgcls.batching import Batcher, BudgetExhausted, ByteBudget, ClientLimits

TIMEOUT = 10.0


def images(*ids: int) -> np.ndarray:
    """uint8 (n, 2, 2, 3) images whose pixels all hold their id."""
    return np.stack([np.full((2, 2, 3), i, dtype=np.uint8) for i in ids])


class FakeInfer:
    """uint8 (N, S, S, 3) -> (N, 1) float ids; records batch sizes; `gate` holds each call; `fail` raises on call numbers in it."""

    def __init__(self, gated: bool = False, fail: tuple[int, ...] = ()) -> None:
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.entered = threading.Event()
        self.sizes: list[int] = []
        self.fail = fail

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.sizes.append(len(x))
        self.entered.set()
        assert self.gate.wait(TIMEOUT), "the test never opened the gate"
        if len(self.sizes) in self.fail:
            raise RuntimeError(f"forward {len(self.sizes)} failed")
        return x[:, 0, 0, :1].astype(np.float32)


async def submit(batcher: Batcher, *ids: int) -> asyncio.Future:
    assert batcher.admit()
    return batcher.submit(images(*ids))


async def wait_until(cond, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


def ids_of(rows: np.ndarray) -> list[int]:
    return [int(v) for v in rows[:, 0]]


@pytest.mark.parametrize("batching", [True, False])
def test_batches_waiting_requests_up_to_max_batch(batching):
    """Request 1 holds the model; requests of 3, 2, 2 and 1 images queue behind it. With max_batch 4
    the next passes are [3] (3 + 2 would not fit), [2, 2] and [1]; unbatched, one pass each."""
    infer = FakeInfer(gated=True)
    batcher = Batcher(infer, max_batch=4, wait_ms=1, queue_size=16, batching=batching)

    async def main() -> list[list[int]]:
        batcher.start()
        try:
            futures = [await submit(batcher, 0)]
            assert await asyncio.to_thread(infer.entered.wait, TIMEOUT)
            futures += [await submit(batcher, 1, 2, 3), await submit(batcher, 4, 5), await submit(batcher, 6, 7), await submit(batcher, 8)]
            await wait_until(lambda: batcher.ready == 4, "4 queued requests")
            infer.gate.set()
            return [ids_of(await asyncio.wait_for(f, TIMEOUT)) for f in futures]
        finally:
            await asyncio.to_thread(batcher.stop)

    answers = asyncio.run(main())
    assert answers == [[0], [1, 2, 3], [4, 5], [6, 7], [8]]  # each request gets its own rows, in order
    assert infer.sizes == ([1, 3, 4, 1] if batching else [1, 3, 2, 2, 1])
    assert max(infer.sizes) <= 4 and batcher.forward_calls == len(infer.sizes) and batcher.images_done == 9


def test_full_queue_refuses_admission_until_a_place_frees():
    infer = FakeInfer()
    batcher = Batcher(infer, max_batch=8, wait_ms=0, queue_size=2)
    assert batcher.admit() and batcher.admit()
    assert not batcher.admit() and batcher.waiting == 2  # full: refused, nothing counted
    batcher.withdraw()  # a request that failed before submitting gives its place back
    assert batcher.admit()

    async def main() -> list[int]:
        futures = [batcher.submit(images(1)), batcher.submit(images(2))]  # queued, no thread yet
        assert not batcher.admit() and batcher.ready == 2
        batcher.start()  # taking them into a forward pass frees their places
        try:
            out = [ids_of(await asyncio.wait_for(f, TIMEOUT))[0] for f in futures]
        finally:
            await asyncio.to_thread(batcher.stop)
        return out

    assert asyncio.run(main()) == [1, 2]
    assert batcher.waiting == 0 and batcher.admit()


def test_stop_drains_the_queued_requests():
    """stop() while requests wait behind a busy forward: they are all answered before it returns."""
    infer = FakeInfer(gated=True)
    batcher = Batcher(infer, max_batch=2, wait_ms=0, queue_size=8)

    async def main() -> list[list[int]]:
        batcher.start()
        futures = [await submit(batcher, 0)]
        assert await asyncio.to_thread(infer.entered.wait, TIMEOUT)
        futures += [await submit(batcher, i) for i in (1, 2, 3)]
        stopping = asyncio.ensure_future(asyncio.to_thread(batcher.stop, TIMEOUT))
        await asyncio.sleep(0.05)
        assert not stopping.done()  # still draining: the first forward is held
        infer.gate.set()
        await asyncio.wait_for(stopping, TIMEOUT)
        assert all(f.done() for f in futures)  # answered before stop() returned
        return [ids_of(f.result()) for f in futures]

    assert asyncio.run(main()) == [[0], [1], [2], [3]]
    assert infer.sizes == [1, 2, 1] and batcher._thread is None


def test_an_inference_error_reaches_every_request_of_its_batch():
    infer = FakeInfer(gated=True, fail=(2,))  # the second forward (requests 1 and 2 together) fails
    batcher = Batcher(infer, max_batch=8, wait_ms=0, queue_size=8)

    async def main() -> None:
        batcher.start()
        try:
            first = await submit(batcher, 0)
            assert await asyncio.to_thread(infer.entered.wait, TIMEOUT)
            second, third = await submit(batcher, 1), await submit(batcher, 2)
            await wait_until(lambda: batcher.ready == 2, "2 queued requests")
            infer.gate.set()
            assert ids_of(await asyncio.wait_for(first, TIMEOUT)) == [0]
            for f in (second, third):
                with pytest.raises(RuntimeError, match="forward 2 failed"):
                    await asyncio.wait_for(f, TIMEOUT)
            # the inference thread survives: the next request is answered
            assert ids_of(await asyncio.wait_for(await submit(batcher, 3), TIMEOUT)) == [3]
        finally:
            await asyncio.to_thread(batcher.stop)

    asyncio.run(main())
    assert infer.sizes == [1, 2, 1] and batcher.waiting == 0


def test_full_is_a_peek_that_reserves_nothing():
    batcher = Batcher(FakeInfer(), max_batch=8, wait_ms=0, queue_size=1)
    assert not batcher.full and batcher.waiting == 0
    assert batcher.admit() and batcher.full and batcher.waiting == 1
    batcher.withdraw()
    assert not batcher.full


# ---------------------------------------------------------------------------------- ByteBudget


def test_byte_budget_holds_waits_and_times_out():
    budget = ByteBudget(100)
    with budget.hold(60, timeout=0):
        assert budget.in_use == 60
        with pytest.raises(BudgetExhausted, match="50 bytes did not fit within 0.05 s"):
            with budget.hold(50, timeout=0.05):
                pass
        assert budget.in_use == 60  # a refused hold takes nothing
        with budget.hold(40, timeout=0):  # exactly full is fine
            assert budget.in_use == 100
    assert budget.in_use == 0 and budget.peak == 100


def test_byte_budget_wakes_a_waiter_when_bytes_come_back():
    budget = ByteBudget(100)
    first_in, release, order = threading.Event(), threading.Event(), []

    def first() -> None:
        with budget.hold(80, timeout=TIMEOUT):
            order.append("first in")
            first_in.set()
            assert release.wait(TIMEOUT)
        order.append("first out")

    def second() -> None:
        with budget.hold(80, timeout=TIMEOUT):
            order.append("second in")

    a = threading.Thread(target=first)
    a.start()
    assert first_in.wait(TIMEOUT)
    b = threading.Thread(target=second)
    b.start()
    b.join(0.1)
    assert b.is_alive() and order == ["first in"]  # waiting: 80 + 80 > 100
    release.set()
    a.join(TIMEOUT)
    b.join(TIMEOUT)
    assert order == ["first in", "first out", "second in"] and budget.in_use == 0


def test_byte_budget_runs_an_oversized_item_alone_and_releases_on_error():
    budget = ByteBudget(100)
    with budget.hold(10**9, timeout=0):  # larger than the budget: it takes it all, not forever
        assert budget.in_use == 100
    with pytest.raises(RuntimeError):
        with budget.hold(30, timeout=0):
            raise RuntimeError("decode failed")
    assert budget.in_use == 0
    with pytest.raises(ValueError):
        ByteBudget(0)


# ---------------------------------------------------------------------------------- ClientLimits


def test_client_limits_count_each_address():
    limits = ClientLimits(2)
    assert limits.enter("10.0.0.1") and limits.enter("10.0.0.1")
    assert not limits.enter("10.0.0.1")  # a third from the same address
    assert limits.enter("10.0.0.2")  # another address is not affected
    assert (limits.active("10.0.0.1"), limits.clients, limits.requests) == (2, 2, 3)
    limits.leave("10.0.0.1")
    assert limits.enter("10.0.0.1")
    for _ in range(2):
        limits.leave("10.0.0.1")
    limits.leave("10.0.0.2")
    assert (limits.clients, limits.requests) == (0, 0)
    unlimited = ClientLimits(0)
    assert all(unlimited.enter("10.0.0.1") for _ in range(1000))
