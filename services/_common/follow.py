"""Following an elected service: its leader's endpoint, the channels to it, the
reconnect loop of a stream to it, and the leader's own side of a term.

A pool's agents each hold a stream to three elected services: the coordinator
(agent_pool/agent.py), the active health monitor (heartbeat.py) and the active
consensus instance (voter.py). The health monitor calls the coordinator, and every
elected service follows its own role so that a standby can redirect callers. Each is
found the same way (etcd names the leader; a redirect may name it first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, Self

import grpc

from registry.election import current_leader, observe
from registry.errors import StoreUnavailableError
from registry.etcd import Etcd
from registry.leadership import parse_leader_value
from services._common.clock import Clock
from services._common.errors import LEADER_METADATA_KEY
from services._common.grpcserver import OPTIONS

if TYPE_CHECKING:  # clients import this module; only the leader's side runs a Runner
    from services._common.runner import Runner

log = logging.getLogger(__name__)

RETRY_S = 0.5
"""Pause before following again after etcd failed us."""
RECHECK_S = 2.0
"""How often a follower also reads the leader from etcd, on top of the watch."""
FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0


async def find_leader(
    etcd: str | Etcd, role: str, cluster: str = "default", *, quiet: bool = True
) -> str:
    """The endpoint etcd names for `role`'s leader: '' while none is elected or etcd is
    out of reach (callers retry either way; `quiet=False` raises StoreUnavailableError
    for the latter, so a caller can say which). Given endpoints (a string), it reads
    through a client of its own, closed after the one read."""
    client = (
        Etcd(etcd, prefix=f"/agentmesh/{cluster}/", timeout_s=3.0)
        if isinstance(etcd, str)
        else etcd
    )
    try:
        found = await current_leader(client, role)
    except StoreUnavailableError:
        if quiet:
            return ""
        raise
    finally:
        if client is not etcd:
            await client.close()
    return parse_leader_value(found.value)[1] if found else ""


def named_leader(err: grpc.aio.AioRpcError) -> str:
    """The leader a standby named in its error's trailing metadata (see grpcserver's
    `abort`), for the caller to go to at once; '' when it named none."""
    for key, value in err.trailing_metadata() or ():
        if key == LEADER_METADATA_KEY and value:
            return str(value)
    return ""


def etcd_unreachable(endpoints: str) -> str:
    """What a client says when the etcd it was given does not answer: most often the
    cluster is not running, or the endpoint is not the one `agentmesh up` printed."""
    return (
        f"etcd at {endpoints} does not answer; is the cluster running? `agentmesh up` "
        "prints its etcd endpoint: pass it with --etcd or AGENTMESH_ETCD"
    )


def no_leader(message: str) -> grpc.aio.AioRpcError:
    """The UNAVAILABLE a caller raises itself while no leader is known, so that its
    retries treat it like a failover (the same code a standby answers)."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), message
    )


class Closing:
    """`async with` for a client: the block's end calls its `close()`."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class LeaderClient(Closing):
    """A client of an elected service: its leader is looked up in etcd when endpoints
    are given (preferred), else it is the address given.

    Args:
        role: the election ("coordinator", "health").
        etcd: etcd endpoints, comma-separated.
        address: a host:port of the service, used when etcd is not given.
        cluster: the cluster name (key prefix).
        what: the service's name in the error when neither is given.
    """

    def __init__(
        self, role: str, etcd: str | None, address: str | None, cluster: str, what: str
    ) -> None:
        if not etcd and not address:
            raise ValueError(f"give etcd endpoints or a {what} address")
        self._role = role
        self._etcd_endpoints = etcd
        self._cluster = cluster
        self._fixed = address or ""
        self._etcd_down = False

    async def leader(self) -> str:
        """The leader's host:port ('' when none is elected, or etcd is out of reach)."""
        if not self._etcd_endpoints:
            return self._fixed
        try:
            found = await find_leader(self._etcd_endpoints, self._role, self._cluster, quiet=False)
        except StoreUnavailableError:
            self._etcd_down = True
            return ""
        self._etcd_down = False
        return found

    def no_leader_message(self, none_elected: str) -> str:
        """Why the last lookup found no leader: `none_elected`, or etcd not answering."""
        if self._etcd_down and self._etcd_endpoints:
            return etcd_unreachable(self._etcd_endpoints)
        return none_elected


class Redirecting(Protocol):
    """A servicer whose standby answers name the leader (`NotLeaderError`'s endpoint)."""

    leader_endpoint: str


class Leader:
    """The leader of `role` as etcd names it (`follow()` keeps it current), and one
    channel per endpoint, which every call and stream to it shares.

    Args:
        etcd: the process's etcd client.
        role: the election followed ("coordinator", "health", "consensus").
        clock: injected time.
        options: channel options.
        recheck_s: also read the leader every this long (None: the watch alone). A watch
            that died quietly, or a redirect that named a leader etcd no longer names,
            then costs seconds, not every stream.
        close_stale: close the channel of a former leader when the leader changes (its
            streams are moving anyway), so a later leader on the same address starts fresh.
        servicer: a servicer of this role's own service, whose `leader_endpoint` is kept
            equal to `endpoint` (what its standby answers redirect to).
    """

    def __init__(
        self,
        etcd: Etcd,
        role: str,
        clock: Clock,
        *,
        options: Sequence[tuple[str, Any]] = OPTIONS,
        recheck_s: float | None = RECHECK_S,
        close_stale: bool = False,
        servicer: Redirecting | None = None,
    ) -> None:
        self.etcd = etcd
        self.role = role
        self.clock = clock
        self.options = list(options)
        self.recheck_s = recheck_s
        self.close_stale = close_stale
        self.servicer = servicer
        self.endpoint = ""
        """The leader's endpoint now ('' while none is known)."""
        self._changed = asyncio.Event()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._checking: asyncio.Task[None] | None = None

    def changed(self) -> asyncio.Event:
        """An event set at the next change of leader."""
        return self._changed

    def set(self, endpoint: str) -> None:
        """The leader is now at `endpoint` (from etcd, or a redirect that knew first)."""
        if endpoint == self.endpoint:
            return
        self.endpoint = endpoint
        if self.servicer is not None:
            self.servicer.leader_endpoint = endpoint
        log.info("leader", extra={"role": self.role, "leader": endpoint or "none"})
        # wake every stream waiting on a change; later waiters wait for the next one
        self._changed.set()
        self._changed = asyncio.Event()
        if self.close_stale:
            for old in [e for e in self._channels if e != endpoint]:
                task = asyncio.ensure_future(self._channels.pop(old).close(grace=1.0))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    def redirected(self, endpoint: str) -> None:
        """A redirect named the leader: go there at once (it may know first), then ask
        etcd, which has the last word. A standby whose own view still lagged can name
        the leader that was just killed, and the watch would never undo that: it
        speaks only when etcd's answer changes, and etcd's answer had changed already.
        A redirect to where it already goes costs nothing (a failover redirects every
        agent of a pool: one read, not one per agent)."""
        if endpoint == self.endpoint:
            return
        self.set(endpoint)
        if self.etcd is None:  # a follower without etcd (tests)
            return
        if self._checking is not None:
            self._checking.cancel()  # its read may predate this redirect
        self._checking = asyncio.ensure_future(self._check())

    async def _check(self) -> None:
        with contextlib.suppress(Exception):  # the watch and the recheck still run
            found = await current_leader(self.etcd, self.role)
            if found is not None:
                self.set(parse_leader_value(found.value)[1])

    def channel(self, endpoint: str) -> grpc.aio.Channel:
        """The channel to `endpoint`: one HTTP/2 connection carries every agent's stream."""
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = grpc.aio.insecure_channel(endpoint, options=self.options)
            self._channels[endpoint] = channel
        return channel

    async def moved_from(self, endpoint: str, *, to_none: bool = True) -> None:
        """Return once the leader is no longer `endpoint` (with `to_none` False: once
        another leader is known, so a stream to a leader etcd stopped naming stays until
        there is somewhere to go)."""
        while self.endpoint == endpoint or (not to_none and not self.endpoint):
            await self._changed.wait()

    async def follow(self) -> None:
        """Keep `endpoint` current from etcd; until cancelled, whatever etcd does."""
        recheck = None if self.recheck_s is None else asyncio.ensure_future(self._recheck())
        try:
            while True:
                try:
                    async for found in observe(self.etcd, self.role):
                        self.set(parse_leader_value(found.value)[1] if found else "")
                except StoreUnavailableError:
                    pass  # etcd is away: the streams keep their leader meanwhile
                except Exception:  # noqa: BLE001 - following must never stop
                    log.warning("following the leader failed; again", exc_info=True)
                await self.clock.sleep(RETRY_S)
        finally:
            if recheck is not None:
                recheck.cancel()

    async def current(self) -> tuple[str, str, int]:
        """Ask etcd now: the leader's node id, endpoint and term (empty and 0 while none
        is elected). For the moment a watch may lag an election."""
        found = await current_leader(self.etcd, self.role)
        if found is None:
            return "", "", 0
        node, endpoint = parse_leader_value(found.value)
        return node, endpoint, found.term

    async def _recheck(self) -> None:
        assert self.recheck_s is not None
        while True:
            await self.clock.sleep(self.recheck_s)
            try:
                found = await current_leader(self.etcd, self.role)
            except Exception:  # noqa: BLE001 - the watch is the main path; try again later
                continue
            self.set(parse_leader_value(found.value)[1] if found else "")

    async def close(self) -> None:
        if self._checking is not None:
            self._checking.cancel()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)


@contextlib.asynccontextmanager
async def leading(runner: Runner, leader: Leader) -> AsyncIterator[None]:
    """One term of an elected service, on the leader's side: this process names itself
    the leader (before etcd's watch says so) and serves; after, it stops serving and
    stops naming itself (the watch names the next leader)."""
    leader.set(runner.endpoint)
    await runner.serving(True)
    try:
        yield
    finally:
        if leader.endpoint == runner.endpoint:
            leader.set("")
        await runner.serving(False)


async def reconnecting(
    leader: Leader,
    session: Callable[[str], Awaitable[bool]],
    *,
    alive: Callable[[], bool] = lambda: True,
    on_error: Callable[[Exception], None] = lambda _: None,
    rng: random.Random | None = None,
) -> None:
    """Run `session(endpoint)` against the leader for as long as `alive()`.

    Between sessions: a jittered backoff (50 ms doubling to 1 s) that a new leader cuts
    short, or, while no leader is known, a wait for one. A session that returns True
    (it got through) starts the backoff afresh; one that raises is passed to `on_error`.
    """
    uniform = (rng or random).uniform
    delay = FIRST_BACKOFF_S
    while alive():
        endpoint = leader.endpoint
        changed = leader.changed()
        if endpoint:
            try:
                if await session(endpoint):
                    delay = FIRST_BACKOFF_S
            except Exception as err:  # noqa: BLE001 - any failed stream: reconnect
                on_error(err)
        with contextlib.suppress(TimeoutError):
            wait = uniform(delay / 2, delay) if endpoint else None
            await leader.clock.wait_for(changed.wait(), wait)
        delay = min(delay * 2, MAX_BACKOFF_S)
