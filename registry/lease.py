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
            except Exception as err:  # noqa: BLE001 - the keeper must outlive any odd error
                # A keeper that died here left no trace and its lease expired 3 s later:
                # a leader lost its term after an etcd restart with nothing in its log.
                log.warning(
                    "lease refresh failed unexpectedly, retrying",
                    extra={"lease": self.id, "error": f"{type(err).__name__}: {err}"},
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


class Session:
    """A process's presence in etcd: a kept lease, renewed with a new id whenever etcd
    says the old one is gone (as etcd's `concurrency.Session`, but it outlives one lease).

    Keys `attach`ed to the session (a service registration, say) are put on every new
    lease. `lost` is a fresh event per lease: whatever hung on the old lease (a
    candidacy, claims) waits on it and redoes its work on the next one.
    """

    def __init__(self, etcd: Etcd, ttl_s: int, clock: Sleeper | None = None) -> None:
        self.etcd = etcd
        self._lease = KeptLease(etcd, ttl_s, clock)
        self.clock = self._lease.clock
        self.ttl_s = ttl_s
        self.ready = asyncio.Event()
        """Set while a granted lease is believed alive."""
        self.lost = asyncio.Event()
        """Set when the current lease is gone; replaced by a fresh event on each grant."""
        self.generation = 0
        self._attached: dict[bytes, bytes] = {}

    @property
    def id(self) -> int:
        return self._lease.id

    async def attach(self, key: bytes, value: bytes) -> None:
        """Keep `key` = `value` on the session's lease, now (if a lease is live) and
        after every renewal."""
        self._attached[key] = value
        if self.ready.is_set():
            await self.etcd.put(key, value, lease=self.id)

    async def detach(self, key: bytes) -> None:
        self._attached.pop(key, None)
        with contextlib.suppress(StoreUnavailableError):
            await self.etcd.delete(key)

    async def wait_ready(self) -> int:
        """The live lease's id, once there is one."""
        await self.ready.wait()
        return self.id

    async def run(self) -> None:
        """Grant, attach, keep alive; on loss, grant again. Until cancelled."""
        delay = 0.1
        while True:
            try:
                await self._lease.grant()
                for key, value in tuple(self._attached.items()):
                    await self.etcd.put(key, value, lease=self.id)
            except StoreUnavailableError as err:
                log.warning(
                    "cannot take an etcd lease yet; retrying",
                    extra={"error": str(err), "retry_s": round(delay, 2)},
                )
                await self.clock.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            self.generation += 1
            self.lost = asyncio.Event()
            self.ready.set()
            await self._lease.keep_alive()
            self.ready.clear()
            self.lost.set()
            log.warning(
                "session lease lost; taking a new one", extra={"generation": self.generation}
            )

    async def close(self) -> None:
        """Revoke the lease: every attached key and candidacy goes at once."""
        self.ready.clear()
        await self._lease.revoke()
