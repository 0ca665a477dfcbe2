"""A lease kept alive in the background, with a signal when it is lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from registry.errors import StoreUnavailableError
from registry.etcd import Etcd

log = logging.getLogger(__name__)


class Sleeper(Protocol):
    """The part of a clock a lease needs (services pass their injected Clock)."""

    async def sleep(self, seconds: float) -> None: ...


class _AsyncioSleeper:
    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class KeptLease:
    """Grants a lease and refreshes it every ttl/3 (etcd's own client does the same).

    `lost` is set when etcd says the lease is gone: from then on nothing attached
    to it can be trusted.
    """

    def __init__(self, etcd: Etcd, ttl_s: int, clock: Sleeper | None = None) -> None:
        if ttl_s < 2:
            raise ValueError("lease TTL must be at least 2 s (etcd's minimum with default timings)")
        self.etcd = etcd
        self.ttl_s = ttl_s
        self.clock: Sleeper = clock or _AsyncioSleeper()
        self.id = 0
        self.lost = asyncio.Event()

    async def grant(self) -> int:
        self.id = await self.etcd.grant(self.ttl_s)
        self.lost.clear()
        return self.id

    async def keep_alive(self) -> None:
        """Run until etcd says the lease is gone (then return), or until cancelled.

        An unreachable etcd is not a lost lease: etcd restores every lease with a
        fresh TTL when it restarts (its lessor promotes them on leader election),
        so claims and election keys survive an etcd restart and in-flight work is
        kept. If etcd was up and only we were cut off, the lease did expire, the
        first refresh that gets through says so, and fencing has refused every
        write made meanwhile.
        """
        while True:
            await self.clock.sleep(self.ttl_s / 3)
            try:
                ttl = await self.etcd.keepalive_once(self.id)
            except StoreUnavailableError as err:
                log.info(
                    "lease refresh failed, retrying", extra={"lease": self.id, "error": str(err)}
                )
                continue
            if ttl <= 0:
                log.warning("lease is gone", extra={"lease": self.id})
                self.lost.set()
                return

    async def revoke(self) -> None:
        if self.id:
            with contextlib.suppress(StoreUnavailableError):  # it expires by itself
                await self.etcd.revoke(self.id)
