"""DynamicBatcher on its own: a real numpy model function, no server."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from optic.server.errors import DeadlineExceeded, Internal, InvalidArgument, ResourceExhausted
from optic.server.scheduler import BatchingConfig, DynamicBatcher


class Recorder:
    """A deterministic 'model' (y = 2x + row sum) that records the batch sizes it ran."""

    def __init__(self, delay: float = 0.0, fail_on: float | None = None) -> None:
        self.sizes: list[int] = []
        self.delay = delay
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, feeds):
        x = feeds["x"]
        with self.lock:
            self.sizes.append(x.shape[0])
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on is not None and (x == self.fail_on).any():
            raise RuntimeError("poisoned input")
        return {"y": 2 * x, "s": x.reshape(len(x), -1).sum(1)}


def run(coro):
    return asyncio.run(coro)


async def _with_batcher(model, config, body):
    with ThreadPoolExecutor(2) as pool:
        batcher = DynamicBatcher("m", model, config, pool)
        batcher.start()
        try:
            return await body(batcher)
        finally:
            await batcher.close()


def test_concurrent_requests_share_batches_and_split_back():
    model = Recorder(delay=0.01)
    inputs = [np.full((1 + i % 3, 4), i, np.float32) for i in range(64)]

    async def body(b):
        return await asyncio.gather(*(b.infer({"x": x}) for x in inputs))

    results = run(_with_batcher(model, BatchingConfig(max_batch_size=16, max_queue_delay=0.01), body))
    for x, out in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(out["y"], 2 * x)
        np.testing.assert_array_equal(out["s"], x.sum(1))
    assert sum(model.sizes) == sum(len(x) for x in inputs)
    assert max(model.sizes) > 1 and max(model.sizes) <= 16
    assert len(model.sizes) < 64


def test_different_shapes_are_not_mixed():
    model = Recorder()
    small = [np.full((1, 2), i, np.float32) for i in range(5)]
    large = [np.full((1, 3), i, np.float32) for i in range(5)]

    async def body(b):
        return await asyncio.gather(*(b.infer({"x": x}) for pair in zip(small, large, strict=True) for x in pair))

    results = run(_with_batcher(model, BatchingConfig(max_batch_size=8, max_queue_delay=0.02), body))
    for x, out in zip([x for pair in zip(small, large, strict=True) for x in pair], results, strict=True):
        np.testing.assert_array_equal(out["y"], 2 * x)
    assert sorted(model.sizes) == [5, 5]


def test_full_queue_is_refused_immediately():
    model = Recorder(delay=0.2)

    async def body(b):
        def submit() -> asyncio.Future:
            return asyncio.ensure_future(b.infer({"x": np.zeros((1, 1), np.float32)}))

        running = submit()
        await asyncio.sleep(0.05)  # the first batch is running: the queue is empty again
        queued = [submit(), submit()]
        await asyncio.sleep(0.01)
        with pytest.raises(ResourceExhausted, match="2 requests queued"):
            await b.infer({"x": np.zeros((1, 1), np.float32)})
        await asyncio.gather(running, *queued)  # the accepted ones still complete

    run(_with_batcher(model, BatchingConfig(max_batch_size=1, max_queue_delay=0, max_queue_size=2), body))


def test_expired_requests_never_reach_the_model():
    model = Recorder(delay=0.2)

    async def body(b):
        first = asyncio.ensure_future(b.infer({"x": np.zeros((1, 1), np.float32)}))
        await asyncio.sleep(0.02)
        with pytest.raises(DeadlineExceeded, match="expired"):
            await b.infer({"x": np.ones((1, 1), np.float32)}, timeout=0.05)
        await first

    run(_with_batcher(model, BatchingConfig(max_batch_size=1, max_queue_delay=0), body))
    assert model.sizes == [1]


def test_cancelled_requests_are_dropped():
    model = Recorder(delay=0.1)

    async def body(b):
        first = asyncio.ensure_future(b.infer({"x": np.zeros((1, 1), np.float32)}))
        await asyncio.sleep(0.02)
        doomed = asyncio.ensure_future(b.infer({"x": np.ones((1, 1), np.float32)}))
        await asyncio.sleep(0.01)
        doomed.cancel()
        await first
        await asyncio.sleep(0.15)

    run(_with_batcher(model, BatchingConfig(max_batch_size=1, max_queue_delay=0), body))
    assert model.sizes == [1]


def test_a_failing_batch_fails_only_its_requests():
    model = Recorder(fail_on=13.0)

    async def body(b):
        with pytest.raises(Internal, match="poisoned input"):
            await b.infer({"x": np.full((1, 2), 13.0, np.float32)})
        out = await b.infer({"x": np.ones((1, 2), np.float32)})
        np.testing.assert_array_equal(out["y"], 2 * np.ones((1, 2)))

    run(_with_batcher(model, BatchingConfig(max_batch_size=4, max_queue_delay=0), body))


def test_a_poisoned_request_does_not_fail_its_batch_neighbours():
    model = Recorder(fail_on=13.0)

    async def body(b):
        values = [1.0, 13.0, 2.0, 3.0]
        calls = [b.infer({"x": np.full((1, 2), v, np.float32)}) for v in values]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(results[1], Internal) and "poisoned input" in results[1].message
        for v, r in zip(values, results, strict=True):
            if v != 13.0:
                np.testing.assert_array_equal(r["y"], np.full((1, 2), 2 * v))

    run(_with_batcher(model, BatchingConfig(max_batch_size=4, max_queue_delay=0.05), body))
    assert model.sizes == [4, 1, 1, 1, 1]  # the failed batch, then each request alone


def test_batch_size_limits():
    async def body(b):
        with pytest.raises(InvalidArgument, match="batch of 5"):
            await b.infer({"x": np.zeros((5, 1), np.float32)})
        with pytest.raises(InvalidArgument, match="batch of 0"):
            await b.infer({"x": np.zeros((0, 1), np.float32)})

    run(_with_batcher(Recorder(), BatchingConfig(max_batch_size=4), body))


def test_fixed_window_lone_request_waits_at_most_the_queue_delay():
    async def body(b):
        started = time.monotonic()
        await b.infer({"x": np.zeros((1, 1), np.float32)})
        return time.monotonic() - started

    config = BatchingConfig(max_batch_size=8, max_queue_delay=0.05, adaptive=False)
    waited = run(_with_batcher(Recorder(), config, body))
    assert 0.04 <= waited < 2.0


def test_preferred_batch_size_dispatches_without_waiting_out_the_delay():
    model = Recorder()
    config = BatchingConfig(max_batch_size=8, max_queue_delay=2.0, preferred_batch_sizes=(2,))

    async def body(b):
        started = time.monotonic()
        await asyncio.gather(*(b.infer({"x": np.ones((1, 4), np.float32)}) for _ in range(2)))
        return time.monotonic() - started

    elapsed = run(_with_batcher(model, config, body))
    assert model.sizes == [2] and elapsed < 1.0  # not the 2 s queue delay


def _backlog(model, config, sizes):
    """One request occupies the model; then requests of ``sizes`` arrive together and queue behind it."""

    async def body(b):
        first = asyncio.ensure_future(b.infer({"x": np.ones((1, 4), np.float32)}))
        await asyncio.sleep(0.05)  # the first is running: the rest queue
        xs = [np.full((n, 4), i, np.float32) for i, n in enumerate(sizes)]
        answers = await asyncio.gather(*(b.infer({"x": x}) for x in xs))
        await first
        for x, answer in zip(xs, answers, strict=True):
            np.testing.assert_array_equal(answer["y"], 2 * x)  # each caller still gets its own rows

    run(_with_batcher(model, config, body))


@pytest.mark.parametrize("preferred, expected", [((), [1, 32, 8]), ((8,), [1, 8, 8, 8, 8, 8]), ((4, 8), [1] + [8] * 5)])
def test_under_load_batches_stop_at_the_largest_preferred_size(preferred, expected):
    """Triton's meaning: with a backlog, a batch is the largest preferred size, not max_batch_size; onnxruntime
    costs more per image in full batches of these models (docs/benchmarks.md), so a model can say so."""
    model = Recorder(delay=0.2)
    config = BatchingConfig(max_batch_size=32, max_queue_delay=0.5, preferred_batch_sizes=preferred)
    _backlog(model, config, [1] * 40)
    assert model.sizes == expected


def test_a_request_larger_than_the_preferred_size_runs_whole_and_is_not_passed_over():
    model = Recorder(delay=0.1)
    config = BatchingConfig(max_batch_size=32, max_queue_delay=0.5, preferred_batch_sizes=(4,))
    _backlog(model, config, [16, 1, 1, 1, 1, 1])
    assert model.sizes == [1, 16, 4, 1]


def test_fixed_window_partial_batch_waits_for_the_delay():
    model = Recorder()
    config = BatchingConfig(max_batch_size=8, max_queue_delay=0.3, adaptive=False)

    async def body(b):
        started = time.monotonic()
        await asyncio.gather(*(b.infer({"x": np.ones((1, 4), np.float32)}) for _ in range(2)))
        return time.monotonic() - started

    assert run(_with_batcher(model, config, body)) >= 0.25 and model.sizes == [2]


def test_deadline_while_gathering_answers_promptly_and_never_runs():
    model = Recorder()
    config = BatchingConfig(max_batch_size=8, max_queue_delay=2.0, adaptive=False)

    async def body(b):
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await b.infer({"x": np.ones((1, 4), np.float32)}, timeout=0.1)
        return time.monotonic() - started

    elapsed = run(_with_batcher(model, config, body))
    assert elapsed < 1.0 and model.sizes == []


def test_adaptive_idle_model_runs_a_lone_request_at_once():
    """Sparse traffic: no request waits for company that is not coming (the fixed window would wait 0.3 s)."""
    model = Recorder()

    async def body(b):
        waits = []
        for _ in range(5):
            started = time.monotonic()
            await b.infer({"x": np.zeros((1, 1), np.float32)})
            waits.append(time.monotonic() - started)
            await asyncio.sleep(0.02)
        return waits

    waits = run(_with_batcher(model, BatchingConfig(max_batch_size=8, max_queue_delay=0.3), body))
    assert max(waits) < 0.1 and model.sizes == [1] * 5


class Costly(Recorder):
    """A model whose batch costs 40 ms whatever its size, plus 1 ms a sample (a GPU-like profile)."""

    def __call__(self, feeds):
        self.delay = 0.04 + 0.001 * len(feeds["x"])
        return super().__call__(feeds)


def test_adaptive_dense_arrivals_on_a_costly_model_still_gather():
    """Requests 2 ms apart to a model with a 40 ms per-batch cost: waiting for the next one pays, so batches grow
    (the fit needs two batch sizes first); sparse arrivals to the same model run at once."""
    model = Costly()

    async def body(b):
        async def spaced(n: int, gap: float) -> None:
            calls = []
            for _ in range(n):
                calls.append(asyncio.ensure_future(b.infer({"x": np.ones((1, 2), np.float32)})))
                await asyncio.sleep(gap)
            await asyncio.gather(*calls)

        await spaced(6, 0.0)  # a burst: sizes 1 and 5 teach the fit the per-batch cost
        model.sizes.clear()
        await spaced(40, 0.002)
        dense = list(model.sizes)
        model.sizes.clear()
        for _ in range(3):
            await spaced(1, 0.0)
            await asyncio.sleep(0.2)
        assert b.per_batch_cost() > 0.02
        return dense, list(model.sizes)

    dense, sparse = run(_with_batcher(model, BatchingConfig(max_batch_size=32, max_queue_delay=0.03), body))
    assert sum(dense) == 40 and len(dense) <= 6, dense
    assert dense[0] > 1, dense  # the first request waited for company: dispatch-when-idle alone would send it alone
    assert sparse == [1, 1, 1]


def test_slot_executor_keeps_a_lone_batch_on_one_thread_and_spreads_concurrent_ones():
    import threading

    from optic.server.scheduler import SlotExecutor

    pool = SlotExecutor(2, "t")
    try:
        names = {pool.submit(lambda: threading.current_thread().name).result(timeout=5) for _ in range(20)}
        assert names == {"t-0_0"}  # one at a time: always the first slot's thread
        gate = threading.Event()
        first = pool.submit(lambda: (gate.wait(5), threading.current_thread().name)[1])
        second = pool.submit(lambda: threading.current_thread().name).result(timeout=5)
        gate.set()
        assert (first.result(timeout=5), second) == ("t-0_0", "t-1_0")
    finally:
        pool.shutdown()
