"""CPU per call of a timeout around a no-op coroutine: asyncio.wait_for against
SystemClock.wait_for, on uvloop (BENCHMARKS.md, issue 13's pool cut).

    .venv/bin/python scripts/bench_wait_for.py
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import uvloop

from services._common.clock import SystemClock

CALLS = 50_000


async def noop() -> int:
    return 1


async def main() -> None:
    clock = SystemClock()
    variants: list[tuple[str, Callable[[], Awaitable[int]]]] = [
        ("asyncio.wait_for", lambda: asyncio.wait_for(noop(), 60.0)),
        ("SystemClock.wait_for", lambda: clock.wait_for(noop(), 60.0)),
    ]
    for name, make in variants:
        for _ in range(2):
            t0 = time.process_time()
            for _ in range(CALLS):
                await make()
            per_call_us = 1e6 * (time.process_time() - t0) / CALLS
            print(f"{name}: {per_call_us:.1f} µs CPU per call")


if __name__ == "__main__":
    uvloop.run(main())
