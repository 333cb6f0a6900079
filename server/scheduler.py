"""Per-model dynamic batching: one small policy object, nothing else.

Requests queue with their own future and deadline. One scheduling task per
model waits until an execution slot is free, takes the oldest live request,
gathers compatible requests (same input names, dtypes and non-batch shapes)
and runs the stacked batch in a worker thread, splitting the outputs back.
While a batch runs, the next one accumulates, so under load batches fill by
themselves.

How long to gather is the policy. ``fixed`` (Triton's): until the batch is
full or the oldest has waited ``max_queue_delay``, so a lone request always
waits the whole window. ``adaptive`` (the default): wait for the next arrival
only while it is worth it, that is while the requests already gathered would
wait less in total (their count x the expected gap to the next arrival) than
the per-batch cost a merged request saves (the intercept of batch time against
batch size, fitted on recent batches); never past ``max_queue_delay``. An idle
model with sparse traffic runs a request at once; dense arrivals on a model
with a large per-batch cost still gather.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from optic.server.errors import DeadlineExceeded, Internal, InvalidArgument, OpticError, ResourceExhausted, Unavailable

T = TypeVar("T")
Tensors = dict[str, np.ndarray]
RunFn = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


class BatchObserver(Protocol):
    """Where the batcher reports what it did (metrics); it knows nothing more about them."""

    def observe_queue(self, seconds: float) -> None: ...
    def observe_batch(self, size: int, compute_input: float, compute_infer: float, compute_output: float) -> None: ...


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 32  # 0: the model cannot batch; each request runs alone
    max_queue_delay: float = 0.002  # seconds the oldest request may wait for company
    max_queue_size: int = 1024  # queued requests beyond this are refused (backpressure)
    instances: int = 1  # batches allowed to run at once (`optic serve --instances 0` resolves its default first)
    # Triton's meaning: under load a batch stops at the largest preferred size (the queue keeps the rest for the
    # next one), and a batch that reaches a preferred size with nothing more waiting leaves at once. A request
    # larger than the largest preferred size still runs whole. Empty: batches fill to max_batch_size.
    preferred_batch_sizes: tuple[int, ...] = ()
    adaptive: bool = True  # gather only while waiting pays (module docstring); False: always the whole window


class SlotExecutor(Executor):
    """One thread per batch slot, and a batch goes to the lowest free one.

    A model that runs one batch at a time then runs it on the same thread every time, as with one slot. With a
    shared pool, runs went to whichever of its threads woke once load had started them both, and on the 16-core
    machine's 2 dedicated cores a lone request took ~20 % longer with two slots than with one (classifier 8.3 vs
    9.9 ms p50, detector 23.2 vs 27.5); with a thread per slot, 10.0 vs 11.1 and 21.8 vs 21.8
    (benchmarks/results/lanes-device.json; noisy: the one-slot baseline itself moved between the two calls).
    """

    def __init__(self, slots: int, name: str) -> None:
        self._pools = [ThreadPoolExecutor(1, thread_name_prefix=f"{name}-{i}") for i in range(max(1, slots))]
        self._busy = [0] * len(self._pools)
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        with self._lock:
            index = next((i for i, n in enumerate(self._busy) if n == 0), 0)
            self._busy[index] += 1
        try:
            future = self._pools[index].submit(fn, *args, **kwargs)
        except BaseException:  # shut down: the slot was never taken
            self._release(index)
            raise
        future.add_done_callback(lambda _: self._release(index))
        return future

    def _release(self, index: int) -> None:
        with self._lock:
            self._busy[index] -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for pool in self._pools:
            pool.shutdown(wait, cancel_futures=cancel_futures)


@dataclass
class _Pending:
    inputs: Tensors
    size: int  # samples along axis 0
    key: tuple
    future: asyncio.Future[Tensors]
    enqueued: float
    deadline: float | None
    started: float = field(default=0.0)


def _batch_key(inputs: Mapping[str, np.ndarray]) -> tuple:
    return tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in inputs.items()))


class DynamicBatcher:
    def __init__(
        self,
        name: str,
        run: RunFn,
        config: BatchingConfig,
        executor: Executor,
        observer: BatchObserver | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._run = run
        self._executor = executor
        self._observer = observer
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(max(1, config.instances))
        self._running: set[asyncio.Task[None]] = set()
        self._progress = asyncio.Event()  # set whenever the queue shrinks or a batch finishes (for close)
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self._last_arrival: float | None = None
        self._gap: float | None = None  # EWMA of the time between arrivals, seconds
        self._timings: deque[tuple[int, float]] = deque(maxlen=64)  # (batch size, seconds) of recent batches
        self._batches = 0
        self._cost = 0.0  # per_batch_cost(), refitted every few batches (a fit per decision cost 4% of a core)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._schedule(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        """Refuse new work, let queued and running batches finish, then stop the scheduler."""
        self._closed = True
        while self._queue or self._running:
            self._progress.clear()
            self._arrived.set()  # a gathering batch leaves at once: nothing more will join it
            await self._progress.wait()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    async def infer(self, inputs: Tensors, timeout: float | None = None) -> Tensors:
        """Queue one request (axis 0 is its batch) and wait for its own slice of the outputs."""
        if self._closed:
            raise Unavailable(f"model {self.name!r} is shutting down")
        if self._loop_task is None:
            raise Unavailable(f"model {self.name!r} is not started")
        sizes = {a.shape[0] if a.ndim else 1 for a in inputs.values()}
        if self.config.max_batch_size > 0:
            if len(sizes) != 1:
                raise InvalidArgument(f"inputs disagree on the batch dimension: {sorted(sizes)}")
            size = sizes.pop()
            if not 1 <= size <= self.config.max_batch_size:
                raise InvalidArgument(
                    f"batch of {size} for model {self.name!r}; it takes 1 to {self.config.max_batch_size}"
                )
        else:
            size = 1
        if len(self._queue) >= self.config.max_queue_size:
            raise ResourceExhausted(
                f"model {self.name!r} has {len(self._queue)} requests queued (limit {self.config.max_queue_size}); "
                "retry later"
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        item = _Pending(
            inputs,
            size,
            _batch_key(inputs) if self.config.max_batch_size > 0 else (),
            loop.create_future(),
            now,
            None if timeout is None else now + timeout,
        )
        self._queue.append(item)
        if self._last_arrival is not None:
            gap = now - self._last_arrival
            self._gap = gap if self._gap is None else 0.9 * self._gap + 0.1 * gap
        self._last_arrival = now
        self._arrived.set()
        # If the caller is cancelled (client gone), the future is cancelled too and
        # the scheduler drops the request before it reaches the session.
        return await item.future

    def _live(self, item: _Pending, now: float) -> bool:
        if item.future.done():  # cancelled by its caller
            return False
        if item.deadline is not None and now >= item.deadline:
            waited = (now - item.enqueued) * 1e3
            item.future.set_exception(
                DeadlineExceeded(f"request to {self.name!r} expired after {waited:.1f} ms in the queue")
            )
            return False
        return True

    def _take(self, key: tuple | None, room: int) -> list[_Pending]:
        """Remove from the queue, oldest first, live requests matching ``key`` that fit in ``room``; with no
        ``key``, the oldest live request leads (taken whatever its size) and sets it."""
        taken: list[_Pending] = []
        kept: deque[_Pending] = deque()
        now = time.monotonic()
        while self._queue:
            item = self._queue.popleft()
            if not self._live(item, now):
                continue
            lead = key is None
            if key is None:
                key = item.key
            if item.key == key and (item.size <= room or lead):
                taken.append(item)
                room -= item.size
                if self.config.max_batch_size <= 0:
                    break
            else:
                kept.append(item)
            if room <= 0:
                break
        kept.extend(self._queue)
        self._queue = kept
        return taken

    async def _schedule(self) -> None:
        preferred = [b for b in self.config.preferred_batch_sizes if b <= self.config.max_batch_size]
        limit = max(preferred) if preferred else max(1, self.config.max_batch_size)
        while True:
            await self._slots.acquire()
            batch: list[_Pending] = []
            while not batch:
                batch = self._take(None, limit)
                if not batch:
                    self._arrived.clear()
                    await self._arrived.wait()
            size = sum(p.size for p in batch)
            cap = max(limit, size)  # a request larger than the largest preferred size runs whole
            flush_at = batch[0].enqueued + self.config.max_queue_delay
            while size < cap and self.config.max_batch_size > 0:
                more = self._take(batch[0].key, cap - size)
                batch += more
                size += sum(p.size for p in more)
                now = time.monotonic()
                if size >= cap or flush_at <= now or self._closed:
                    break
                if size in self.config.preferred_batch_sizes and not more:
                    break
                if self.config.adaptive and not self._worth_waiting(size):
                    break
                # Wake for the next arrival, the flush, or the first deadline of a request already gathered.
                wake = min([flush_at, *(p.deadline for p in batch if p.deadline is not None)])
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), max(0.0, wake - now))
                now = time.monotonic()
                live = [p for p in batch if self._live(p, now)]
                if len(live) != len(batch):
                    batch, size = live, sum(p.size for p in live)
                    if not batch:
                        break
            if not batch:  # everything gathered expired or was cancelled while waiting
                self._slots.release()
                self._progress.set()
                continue
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)
            self._progress.set()

    def per_batch_cost(self) -> float:
        """Seconds a batch costs whatever its size: the intercept of a least-squares line through recent
        (size, time) pairs; 0 until two sizes have been seen."""
        return self._cost

    def _refit(self) -> None:
        sizes = np.array([b for b, _ in self._timings], dtype=np.float64)
        if len(sizes) < 2 or sizes.min() == sizes.max():
            self._cost = 0.0
            return
        times = np.array([t for _, t in self._timings], dtype=np.float64)
        slope = float(((sizes - sizes.mean()) * (times - times.mean())).mean() / sizes.var())
        self._cost = max(0.0, float(times.mean() - slope * sizes.mean()))

    def _worth_waiting(self, gathered: int) -> bool:
        return self._gap is not None and gathered * self._gap < self._cost

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._progress.set()

    async def _execute(self, batch: list[_Pending]) -> None:
        try:
            started = time.monotonic()
            for p in batch:
                p.started = started
                if self._observer:
                    self._observer.observe_queue(started - p.enqueued)
            loop = asyncio.get_running_loop()
            try:
                outputs, input_seconds, infer_seconds = await loop.run_in_executor(
                    self._executor, self._timed_run, [p.inputs for p in batch]
                )
            except Exception as exc:  # a model failing at run time fails only its own requests
                if len(batch) == 1:
                    self._fail(batch, self._error(exc))
                else:  # one poisoned input must not fail its neighbours: run each request alone
                    await self._isolate(batch)
                return
            total = sum(p.size for p in batch)
            if self.config.max_batch_size > 0:
                wrong = {k: v.shape for k, v in outputs.items() if v.ndim == 0 or v.shape[0] != total}
                if wrong:
                    self._fail(batch, Internal(f"model {self.name!r} returned {wrong} for a batch of {total}"))
                    return
            split_start = time.monotonic()
            offset = 0
            for p in batch:
                if not p.future.done():
                    if self.config.max_batch_size > 0:
                        p.future.set_result({k: v[offset : offset + p.size] for k, v in outputs.items()})
                    else:
                        p.future.set_result(dict(outputs))
                offset += p.size
            self._timings.append((total, infer_seconds))
            self._batches += 1
            if self._batches % 8 == 0 or self._batches < 8:
                self._refit()
            if self._observer:
                done = time.monotonic()
                self._observer.observe_batch(total, input_seconds, infer_seconds, done - split_start)
        finally:
            self._slots.release()

    async def _isolate(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        for p in batch:
            if p.future.done():
                continue
            try:
                outputs, _, infer_seconds = await loop.run_in_executor(self._executor, self._timed_run, [p.inputs])
            except Exception as exc:
                p.future.set_exception(self._error(exc))
                continue
            if not p.future.done():
                p.future.set_result(dict(outputs))
            if self._observer:
                self._observer.observe_batch(p.size, 0.0, infer_seconds, 0.0)

    def _error(self, exc: Exception) -> OpticError:
        if isinstance(exc, OpticError):
            return exc
        return Internal(f"model {self.name!r} failed: {type(exc).__name__}: {exc}")

    def _timed_run(self, parts: Sequence[Tensors]) -> tuple[Mapping[str, np.ndarray], float, float]:
        """Gather the batch and run it, both on the slot's thread: the event loop serves every call, and copying a
        batch's inputs there took 27 % of its busy time at 64 detector callers (15 % of its samples at 64 caption
        callers: a step's features are 123 KB a request). Returns the outputs and the seconds spent gathering and
        running."""
        started = time.monotonic()
        if len(parts) == 1:
            feeds: Mapping[str, np.ndarray] = parts[0]
        else:
            feeds = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        gathered = time.monotonic()
        outputs = self._run(feeds)
        return outputs, gathered - started, time.monotonic() - gathered

    @staticmethod
    def _fail(batch: list[_Pending], exc: OpticError) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(exc)
