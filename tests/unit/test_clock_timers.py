"""The clock's timers (wait_for, call_later) on the fake clock, which the pool's timing
runs on in tests, and on the system clock."""

from __future__ import annotations

import asyncio

import pytest

from services._common.clock import FakeClock, SystemClock


async def test_wait_for_gives_the_result_when_it_comes_first() -> None:
    clock = FakeClock()
    done = asyncio.Event()

    async def work() -> str:
        await done.wait()
        return "ok"

    waiting = asyncio.ensure_future(clock.wait_for(work(), 5.0))
    await asyncio.sleep(0)  # it starts (and sets its timer) before time moves
    await clock.advance(4.9)
    done.set()
    assert await asyncio.wait_for(waiting, 1) == "ok"


async def test_wait_for_times_out_on_the_clock_and_cancels_the_work() -> None:
    clock = FakeClock()
    cancelled = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    waiting = asyncio.ensure_future(clock.wait_for(work(), 5.0))
    await asyncio.sleep(0)  # it starts (and sets its timer) before time moves
    await clock.advance(4.9)
    assert not waiting.done()
    await clock.advance(0.2)
    assert waiting.done()  # by the fake clock's timer, not by a real one
    with pytest.raises(TimeoutError):
        waiting.result()
    assert cancelled.is_set()  # it unwound before the caller heard of the timeout


async def test_wait_for_passes_the_works_error_and_no_limit_waits_forever() -> None:
    clock = FakeClock()

    async def fail() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        await clock.wait_for(fail(), 1.0)
    forever = asyncio.ensure_future(clock.wait_for(asyncio.Event().wait(), None))
    await clock.advance(1e6)
    assert not forever.done()
    forever.cancel()


async def test_cancelling_the_caller_cancels_the_work() -> None:
    clock = FakeClock()
    work = asyncio.ensure_future(asyncio.Event().wait())
    waiting = asyncio.ensure_future(clock.wait_for(work, 5.0))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0)
    assert work.cancelled()


async def test_call_later_calls_at_its_time_unless_cancelled() -> None:
    clock = FakeClock(start=0.0)
    called: list[float] = []
    clock.call_later(0.02, lambda: called.append(clock.monotonic()))
    off = clock.call_later(0.01, lambda: called.append(-1.0))
    off.cancel()
    await clock.advance(0.019)
    assert called == []
    await clock.advance(0.001)
    assert called == [pytest.approx(0.02)]


async def test_the_system_clock_has_the_same_timers() -> None:
    clock = SystemClock()
    with pytest.raises(TimeoutError):
        await clock.wait_for(asyncio.Event().wait(), 0.01)
    assert await clock.wait_for(asyncio.sleep(0, result=3), 1.0) == 3
    fired = asyncio.Event()
    clock.call_later(0.01, fired.set)
    await asyncio.wait_for(fired.wait(), 1)


async def test_system_wait_for_never_swallows_a_cancel_that_meets_the_result() -> None:
    # asyncio.wait_for (3.11) returns the result when its task is cancelled in the same
    # loop pass as the work finishes: the task goes on as if never cancelled, and a
    # TaskGroup shutting down waits for it for ever
    clock = SystemClock()
    work: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    waiting = asyncio.ensure_future(clock.wait_for(work, 10.0))
    await asyncio.sleep(0)  # it waits on the work now
    work.set_result("ok")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
