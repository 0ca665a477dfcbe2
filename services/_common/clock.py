"""Injected time, so timing logic is tested with a fake clock (STYLE.md habit 3)."""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Timer(Protocol):
    """What `Clock.call_later` returns: a pending call that can be called off."""

    def cancel(self) -> object: ...


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes back."""
        ...

    def wall_us(self) -> int:
        """Wall-clock microseconds since the Unix epoch (for records and reports)."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    async def wait_for(self, awaitable: Awaitable[T], timeout_s: float | None) -> T:
        """`awaitable`'s result; TimeoutError (and `awaitable` cancelled) once `timeout_s`
        has passed first (None: no limit), as asyncio.wait_for on this clock's time."""
        ...

    def call_later(self, delay_s: float, callback: Callable[[], object]) -> Timer:
        """Call `callback` after `delay_s` unless the returned timer is cancelled first."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall_us(self) -> int:
        return time.time_ns() // 1000

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait_for(self, awaitable: Awaitable[T], timeout_s: float | None) -> T:
        # the event loop keeps this clock's time: its own timers are the cheap way (an
        # agent runs every task under one). asyncio.timeout, not 3.11's asyncio.wait_for:
        # that one swallows a cancel that arrives as the work finishes (a task that ignores
        # its one cancel keeps a TaskGroup, a shutdown, waiting for ever), and it wraps the
        # coroutine in a new Task plus a waiter future, two more loop turns per call: a
        # no-op task ran a third of its pool's CPU in that machinery (issue 13 profile).
        async with asyncio.timeout(timeout_s):
            return await awaitable

    def call_later(self, delay_s: float, callback: Callable[[], object]) -> Timer:
        return asyncio.get_running_loop().call_later(delay_s, callback)


class FakeClock:
    """Time moves only when a test calls `advance`; sleepers wake in order."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0

    def monotonic(self) -> float:
        return self._now

    def wall_us(self) -> int:
        return int(self._now * 1_000_000)

    def _timer(self, seconds: float) -> asyncio.Future[None]:
        """A future that `advance` resolves once `seconds` have passed (registered now,
        so a sleeper is due from the moment it asks, not from when its task next runs)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._sleepers, (self._now + max(0.0, seconds), self._seq, fut))
        return fut

    async def sleep(self, seconds: float) -> None:
        await self._timer(seconds)

    async def wait_for(self, awaitable: Awaitable[T], timeout_s: float | None) -> T:
        job = asyncio.ensure_future(awaitable)
        if timeout_s is None:
            return await job
        timer = self._timer(timeout_s)
        either: set[asyncio.Future[Any]] = {job, timer}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the caller was cancelled: so is the work
            timer.cancel()
            job.cancel()
            raise
        timer.cancel()
        if job.done():
            return job.result()
        job.cancel()
        await asyncio.wait({job})  # it unwinds before the caller goes on, as in asyncio's
        if not job.cancelled():
            job.exception()  # retrieved: the timeout is what the caller hears of
        raise TimeoutError

    def call_later(self, delay_s: float, callback: Callable[[], object]) -> Timer:
        timer = self._timer(delay_s)
        timer.add_done_callback(lambda fut: None if fut.cancelled() else callback())
        return timer

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper due on the way, in order."""
        target = self._now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            due, _, fut = heapq.heappop(self._sleepers)
            self._now = max(self._now, due)
            if not fut.done():
                fut.set_result(None)
            # let the woken coroutine run before time moves on
            for _ in range(5):
                await asyncio.sleep(0)
        self._now = target
        for _ in range(5):
            await asyncio.sleep(0)
