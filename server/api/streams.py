"""Request streams (ModelStreamInfer, DetectStream): answered in order, bounded in items, bytes, admission and time.

A stream's requests start as they arrive, so they batch with everyone
else's, and their answers go back in arrival order. What one stream may
hold is bounded three ways: ``window`` items in flight, ``window_bytes`` of
requests plus finished answers not yet written (a client that sends big
messages and never reads stops being read, and gRPC flow control pushes
back), and every item takes an admission slot like a unary call (when none is
free it is answered in-band with RESOURCE_EXHAUSTED). A stream with nothing in
flight and no new request for ``idle_seconds`` ends with DEADLINE_EXCEEDED, so
open-and-forget streams cannot hold the server's stream budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from optic.server.admission import SizedRequest, Undecodable
from optic.server.errors import DeadlineExceeded, InvalidArgument, OpticError, ResourceExhausted
from optic.server.handlers import forget

Req = TypeVar("Req")
Resp = TypeVar("Resp")


@dataclass(frozen=True)
class StreamLimits:
    window: int = 16  # items of one stream in flight
    window_bytes: int = 16 * 1024 * 1024  # request bytes + unwritten answers of one stream
    idle_seconds: float = 60.0  # nothing in flight and nothing sent for this long: the stream ends


class StreamIdle(DeadlineExceeded):
    """The stream sat idle; its status is DEADLINE_EXCEEDED."""


class _Budget:
    """Bytes held by a stream; ``take`` waits until they fit (an item larger than the whole budget waits for the
    budget to be empty, then goes alone)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self._changed = asyncio.Condition()

    async def take(self, size: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.held == 0 or self.held + size <= self.limit)
            self.held += size

    async def give(self, size: int) -> None:
        async with self._changed:
            self.held -= size
            self._changed.notify_all()

    def add(self, size: int) -> None:
        """Count bytes that are already held (a finished answer); never waits."""
        self.held += size


def _size(message: Any) -> int:
    return int(message.ByteSize()) if hasattr(message, "ByteSize") else 0


def _sized(item: Any, index: int) -> tuple[Any, int]:
    """A request and its size: the size admission read it at (a ``@sized_stream`` method), else re-encoded."""
    if isinstance(item, Undecodable):
        raise InvalidArgument(f"stream item {index}: {item.message}; the items before it were answered")
    return (item.message, item.size) if isinstance(item, SizedRequest) else (item, _size(item))


async def in_order(
    requests: AsyncIterator[Req] | AsyncIterator[SizedRequest | Undecodable],
    start: Callable[[Req], Awaitable[Resp]],
    limits: StreamLimits,
    admit: Callable[[int], str | None],
    release: Callable[[int], None],
) -> AsyncIterator[tuple[Req, Resp | OpticError]]:
    """Yield (request, answer or error) in arrival order; raises :class:`StreamIdle` when the stream idles, and
    :class:`InvalidArgument` after the last good item's answer when an item could not be parsed."""
    pending: asyncio.Queue[tuple[Req, asyncio.Future[Resp], int] | None] = asyncio.Queue()
    slots = asyncio.Semaphore(limits.window)
    budget = _Budget(limits.window_bytes)
    started: set[asyncio.Future[Resp]] = set()
    idle = False
    broken: OpticError | None = None

    async def guarded(request: Req, size: int) -> Resp:
        refused = admit(size)
        if refused is not None:
            raise ResourceExhausted(refused + "; retry with backoff")
        try:
            return await start(request)
        finally:
            release(size)

    async def next_request(it: AsyncIterator[Any]) -> Any:
        nonlocal idle
        waiting = asyncio.ensure_future(it.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=limits.idle_seconds)
                if done:
                    return waiting.result()
                if not started:  # nothing in flight and nothing new: idle
                    idle = True
                    raise StopAsyncIteration
        finally:
            if not waiting.done():
                waiting.cancel()
                with contextlib.suppress(BaseException):
                    await waiting
            elif not waiting.cancelled():
                waiting.exception()  # the stream's end (StopAsyncIteration) or error, observed: never "not retrieved"

    async def read() -> None:
        nonlocal broken
        it = requests.__aiter__()
        try:
            for index in itertools.count():
                await slots.acquire()
                try:
                    request, size = _sized(await next_request(it), index)
                except StopAsyncIteration:
                    slots.release()
                    break
                except OpticError as exc:  # an undecodable item: answer what came before, then end the stream
                    slots.release()
                    broken = exc
                    break
                await budget.take(size)
                task = asyncio.ensure_future(guarded(request, size))
                started.add(task)

                def finished(t: asyncio.Future[Resp], s: int = size) -> None:
                    started.discard(t)
                    if not t.cancelled() and t.exception() is None:
                        budget.add(_size(t.result()))

                task.add_done_callback(finished)
                await pending.put((request, task, size))
        finally:
            await pending.put(None)

    reader = asyncio.ensure_future(read())
    try:
        while (item := await pending.get()) is not None:
            request, task, size = item
            try:
                answer: Resp | OpticError = await task
            except OpticError as exc:
                forget(exc)
                answer = exc
            try:
                yield request, answer
            finally:
                held = size + (_size(answer) if not isinstance(answer, OpticError) else 0)
                await budget.give(held)
                slots.release()
        if broken is not None:
            raise broken
        if idle:
            raise StreamIdle(f"stream idle for {limits.idle_seconds:g} s with nothing in flight; reopen it for more")
    finally:
        # The client went away (or the stream failed): stop reading, cancel what is still running and wait for it,
        # so no started work is left behind unobserved.
        reader.cancel()
        leftovers: list[asyncio.Future[Any]] = [reader, *started]
        for task in started:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
