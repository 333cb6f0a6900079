"""Fair use of the worker pool, and one call's budget for the work it may cause.

Decoding and large post-processing run in a shared pool. A plain pool serves
jobs first come, first served, so one call with 64 huge images would hold
every worker while small calls wait behind it. :class:`FairExecutor` keeps a
queue per connection and per call, and hands free workers to the connections
in turn (and to the calls of a connection in turn), so neither a call nor a
client with many calls gets more than its share while others are waiting.

:class:`CallBudget` bounds, per call and before the work is done, the pixels
its images hold, the pixels of the masks it asks for, the run-length
counts it may receive and the size of its answer.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

from optic.server.errors import InvalidArgument, ResourceExhausted

T = TypeVar("T")


class FairExecutor:
    """Round-robin over connections, and over the calls of each connection: each free worker takes the next job
    of the connection whose turn it is, from the call whose turn it is there.

    Two levels because either alone can be gamed: per call, one client with many concurrent calls gets a turn
    for each of them; per connection alone, every client behind one proxy connection would share one turn.

    A newcomer (call or connection) goes ahead of the one whose job started last, if that one still has jobs
    waiting: it has just had its turn. Appended behind it instead, a small call waited for two of a big call's
    images, not one (1.5-2 s for one 640x480 JPEG behind 40-megapixel PNGs, where one image takes 0.9 s). It
    goes ahead of that one only: whoever arrives after the next start queues behind it, so nobody waits more
    than a round however many newcomers arrive."""

    def __init__(self, executor: Executor, workers: int) -> None:
        self._executor = executor
        self._free = max(1, workers)
        # A connection may hold at most half the workers while others could use them: one with many huge images
        # keeps at least one worker free for everyone else.
        self._share = max(1, workers // 2)
        self._active: dict[object, int] = {}
        self._queues: OrderedDict[object, OrderedDict[object, deque[_Job]]] = OrderedDict()
        # Whose job started last, among the connections and among each connection's calls.
        self._last_conn: object = None
        self._last_call: dict[object, object] = {}

    async def run(self, caller: object, fn: Callable[..., T], *args: Any, connection: object = None) -> T:
        """Run ``fn(*args)`` in the pool when the turn of ``connection`` (default: the caller itself) and, within
        it, of ``caller`` (one call) comes."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        conn = caller if connection is None else connection
        if conn not in self._queues:
            self._queues[conn] = OrderedDict()
            _ahead_of(self._queues, self._last_conn)
        calls = self._queues[conn]
        if caller not in calls:
            calls[caller] = deque()
            _ahead_of(calls, self._last_call.get(conn))
        calls[caller].append((fn, args, future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while self._free:
            conn = next((c for c in self._queues if self._active.get(c, 0) < self._share), None)
            if conn is None:  # nothing queued, or every waiting connection has its share already
                return
            calls = self._queues[conn]
            caller, queue = next(iter(calls.items()))
            fn, args, future = queue.popleft()
            if queue:
                calls.move_to_end(caller)  # this call's next job waits for the connection's other calls
            else:
                del calls[caller]
            if calls:
                self._queues.move_to_end(conn)  # and this connection's next job for the other connections
            else:
                del self._queues[conn]
            if future.cancelled():
                self._forget_if_idle(conn)
                continue
            self._last_conn = conn
            self._last_call[conn] = caller
            self._free -= 1
            self._active[conn] = self._active.get(conn, 0) + 1
            work = loop.run_in_executor(self._executor, fn, *args)
            work.add_done_callback(functools.partial(self._finished, conn=conn, target=future))

    def _finished(self, done: asyncio.Future[Any], conn: object, target: asyncio.Future[Any]) -> None:
        self._free += 1
        self._active[conn] -= 1
        if not self._active[conn]:
            del self._active[conn]
            self._forget_if_idle(conn)
        if not target.cancelled():
            if done.exception() is not None:
                target.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                target.set_result(done.result())
        elif not done.cancelled():
            done.exception()  # observed: never "exception was never retrieved"
        self._dispatch()

    def _forget_if_idle(self, conn: object) -> None:
        """Nothing of ``conn`` running or waiting: drop what is kept on it, which would otherwise hold a call
        object per connection ever seen."""
        if conn not in self._queues and conn not in self._active:
            self._last_call.pop(conn, None)
            if self._last_conn == conn:
                self._last_conn = None


_Job = tuple[Callable[..., Any], tuple, "asyncio.Future[Any]"]


def _ahead_of(order: OrderedDict[object, Any], last: object) -> None:
    """The entry just added (at the end) goes ahead of ``last``, the one whose job started last, if it is still
    waiting: moving ``last`` to the end puts it behind every newcomer since its start, in their order."""
    if last is not None and last in order:
        order.move_to_end(last)


@dataclass(frozen=True)
class CallLimits:
    """What one call may cost (documented in docs/operations.md, with the memory formula)."""

    max_call_pixels: int = 100_000_000  # pixels of all images of a call, checked from headers before decoding
    max_output_pixels: int = 100_000_000  # mask pixels a call may ask for (Segment), before any is computed
    max_rle_runs: int = 4_000_000  # RLE counts in one answer, counted before they are built
    max_answer_bytes: int = 64 * 1024 * 1024  # the answer must fit the message limit


class CallBudget:
    """One call's running totals; thread-safe (images of a call finish in different workers)."""

    def __init__(self, limits: CallLimits) -> None:
        self.limits = limits
        self._runs = 0
        self._bytes = 0
        self._lock = threading.Lock()

    def check_pixels(self, sizes: list[tuple[int, int]], masks: bool) -> None:
        total = sum(w * h for w, h in sizes)
        if total > self.limits.max_call_pixels:
            raise InvalidArgument(
                f"the call's {len(sizes)} image(s) hold {total:,} pixels; a call may hold at most "
                f"{self.limits.max_call_pixels:,} (--max-call-pixels): send fewer or smaller images per call"
            )
        if masks and total > self.limits.max_output_pixels:
            raise InvalidArgument(
                f"masks for {total:,} pixels asked for; a call may ask for at most {self.limits.max_output_pixels:,} "
                "(--max-output-pixels)"
            )

    def take_runs(self, runs: int) -> None:
        with self._lock:
            self._runs += runs
            if self._runs > self.limits.max_rle_runs:
                raise ResourceExhausted(
                    f"the answer's RLE would hold over {self.limits.max_rle_runs:,} runs (--max-rle-runs): "
                    "ask without return_rle, or for fewer images"
                )

    def take_bytes(self, size: int) -> None:
        with self._lock:
            self._bytes += size
            if self._bytes > self.limits.max_answer_bytes:
                raise ResourceExhausted(
                    f"the answer would be over {self.limits.max_answer_bytes:,} bytes, the message limit: "
                    "ask for fewer images per call"
                )
