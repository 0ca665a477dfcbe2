"""Health monitor process: the Runner, one elected active monitor, its timers and actions.

The active monitor's term runs three loops next to the servicer: a ticker (timers of the
core), an actuator (carries out what the core orders: Coordinator.ReleaseClaims, the
AgentPool API for replacements) and a flusher (writes the `health/<agent>` records the
core marks dirty, each batch one transaction fenced by the term). Standbys follow the
leader and answer UNAVAILABLE with its address.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aetcd import rpc
from google.protobuf.message import DecodeError
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

from protos.agentmesh.v1 import agent_pool_pb2 as ppb
from protos.agentmesh.v1 import agent_pool_pb2_grpc as ppb_grpc
from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc
from protos.agentmesh.v1 import health_pb2 as hpb
from protos.agentmesh.v1 import health_pb2_grpc as hpb_grpc
from registry import discovery
from registry.election import observe
from registry.errors import StoreUnavailableError
from registry.etcd import op_delete, op_put
from registry.leadership import Term, parse_leader_value
from services._common.clock import Clock
from services._common.errors import LEADER_METADATA_KEY
from services._common.grpcserver import OPTIONS
from services._common.runner import Runner
from services.health import metrics
from services.health.config import HealthConfig
from services.health.core import HealthCore, PoolInfo, Release, Replace
from services.health.servicer import HealthServicer

log = logging.getLogger(__name__)

SERVICE = hpb.DESCRIPTOR.services_by_name["HealthMonitor"].full_name

MAX_TXN_OPS = 100
MAX_TXN_BYTES = 1 << 20
"""A record batch stays under etcd's 128 operations and 1.5 MiB per request."""
RELEASE_TIMEOUT_S = 2.0
RELEASE_RETRY_S = 5.0
"""A release retries through a coordinator failover (about a lease TTL), then gives up
and the core detects the hang again a second later."""
STOP_TIMEOUT_S = 5.0
SPAWN_TIMEOUT_S = 35.0
"""A pool waits up to 30 s for a new agent's welcome."""
_RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def _retryable(err: BaseException) -> bool:
    return isinstance(err, grpc.aio.AioRpcError) and err.code() in _RETRY


class HealthMonitorNode:
    """One monitor replica: `await node.run()` until SIGTERM (or `node.runner.stop()`)."""

    def __init__(self, cfg: HealthConfig, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.runner = Runner("health", cfg, [SERVICE], clock=clock)
        self.clock = self.runner.clock
        self.etcd = self.runner.etcd
        self.servicer = HealthServicer()
        hpb_grpc.add_HealthMonitorServicer_to_server(self.servicer, self.runner.server)
        self.pools: dict[str, PoolInfo] = {}
        self.coordinator = ""
        self.core: HealthCore | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stopping = False

    @property
    def endpoint(self) -> str:
        return self.runner.endpoint

    async def run(self) -> None:
        leadership = self.runner.leadership()
        try:
            await self.runner.run(
                lambda: leadership.serve(self._lead),
                self._follow_monitor,
                self._follow_pools,
                self._follow_coordinator,
                drain=self._drain,
            )
        finally:
            for channel in self._channels.values():
                await channel.close()

    # ---- the active monitor ----

    async def _lead(self, term: Term) -> None:
        if self._stopping:
            await asyncio.Event().wait()  # won again while shutting down: hold, decide nothing
        started = self.clock.monotonic()
        records = await self._records()
        registered = await self._registered_agents()
        core = HealthCore(
            self.cfg,
            self.clock,
            term=term.number,
            node_id=self.runner.node_id,
            endpoint=self.endpoint,
        )
        core.load(records, registered)
        core.set_pools(self.pools.values())
        core.subscribers = self.servicer.subscribers
        counter = metrics.watch(core)
        core.subscribers.add(counter)
        stored = {r.agent_id for r in records}
        self.core = core
        self.servicer.core = core
        self.servicer.leader_endpoint = self.endpoint
        await self.runner.serving(True)
        metrics.IS_ACTIVE.set(1)
        log.info(
            "active health monitor",
            extra={
                "term": term.number,
                "records": len(records),
                "registered_agents": len(registered),
                "load_ms": round((self.clock.monotonic() - started) * 1000, 1),
            },
        )
        try:
            async with asyncio.TaskGroup() as group:
                flush = asyncio.Event()
                group.create_task(self._tick(core), name="tick")
                group.create_task(self._actuate(core, term, flush, group), name="actuate")
                group.create_task(self._flush(core, term, flush, stored), name="flush")
        finally:
            metrics.IS_ACTIVE.set(0)
            core.subscribers.discard(counter)
            self.core = None
            self.servicer.end_term()
            if self.servicer.leader_endpoint == self.endpoint:
                self.servicer.leader_endpoint = ""
            await self.runner.serving(False)
            log.info("health monitor term over", extra={"term": term.number})

    async def _tick(self, core: HealthCore) -> None:
        while not self._stopping:
            await self.clock.sleep(self.cfg.tick_s)
            core.tick()

    async def _actuate(
        self, core: HealthCore, term: Term, flush: asyncio.Event, group: asyncio.TaskGroup
    ) -> None:
        """Carry out what the core orders, each action on its own (bounded) task."""
        while True:
            await core.changed.wait()
            core.changed.clear()
            for action in core.take_actions():
                if isinstance(action, Release):
                    group.create_task(self._release(core, term, action))
                else:
                    group.create_task(self._replace(core, action))
            if core.dirty:
                flush.set()

    async def _release(self, core: HealthCore, term: Term, action: Release) -> None:
        request = cpb.ReleaseClaimsRequest(
            agent_id=action.agent_id,
            claims=[cpb.ClaimRef(task_id=t, claim_token=c) for t, c in action.claims],
            reason=action.reason[:256],
            health_term=term.number,
        )
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_retryable),
                stop=stop_after_delay(RELEASE_RETRY_S),
                wait=wait_random_exponential(multiplier=0.05, max=0.5),
                sleep=self.clock.sleep,
                reraise=True,
            ):
                with attempt:
                    resp = await self._call_coordinator(request)
        except grpc.aio.AioRpcError as err:
            log.warning(
                "release failed",
                extra={"agent": action.agent_id, "code": err.code().name, "error": err.details()},
            )
            core.release_done(action, [], error=f"{err.code().name}: {err.details()}")
            return
        released = [(c.task_id, c.claim_token) for c in resp.released]
        log.info(
            "claims released",
            extra={
                "agent": action.agent_id,
                "released": [t for t, _ in released],
                "skipped": [c.task_id for c in resp.skipped],
                "reason": action.reason,
            },
        )
        core.release_done(action, released)

    async def _call_coordinator(self, request: cpb.ReleaseClaimsRequest) -> Any:
        if not self.coordinator:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                "no coordinator leader is known",
            )
        stub = cpb_grpc.CoordinatorStub(self._channel(self.coordinator))
        try:
            return await stub.ReleaseClaims(request, timeout=RELEASE_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            for key, value in err.trailing_metadata() or ():
                if key == LEADER_METADATA_KEY and value:
                    self.coordinator = str(value)  # a standby pointed at the leader
            raise

    async def _replace(self, core: HealthCore, action: Replace) -> None:
        stub = ppb_grpc.AgentPoolStub(self._channel(action.endpoint))
        info = action.info
        template = ppb.AgentTemplate(
            roles=info.roles, labels=info.labels, kinds=info.kinds, capacity=info.capacity
        )
        try:
            if action.own_pool:
                # it may still run there (alive, its stream gone): stop it first; a pool that
                # no longer knows it says INVALID_ARGUMENT, which is fine
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.StopAgents(
                        ppb.StopAgentsRequest(agent_ids=[action.agent_id], graceful=False),
                        timeout=STOP_TIMEOUT_S,
                    )
            resp = await stub.SpawnAgents(
                ppb.SpawnAgentsRequest(count=1, batch_size=1, template=template),
                timeout=SPAWN_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as err:
            why = f"{action.pool_id}: SpawnAgents {err.code().name}: {err.details()}"
            log.warning("replacement failed", extra={"agent": action.agent_id, "error": why})
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                core.pool_unreachable(action.agent_id, action.pool_id, why)
            else:
                core.replace_failed(action.agent_id, why)
            return
        if not resp.agents:
            core.replace_failed(action.agent_id, f"{action.pool_id} started no agent")
            return
        new = resp.agents[0].agent_id
        log.info(
            "agent replaced",
            extra={"agent": action.agent_id, "new_agent": new, "pool": action.pool_id},
        )
        core.replace_done(action.agent_id, new)

    async def _flush(
        self, core: HealthCore, term: Term, wanted: asyncio.Event, stored: set[str]
    ) -> None:
        """Make `health/<agent>` match the core: one fenced transaction per batch. A write
        whose reply was lost is written again (a put of the whole record, or a delete,
        is idempotent), so etcd converges on the core's latest word; a deposed monitor's
        write is refused by the fence (NotLeaderError ends the term)."""
        delay = 0.05
        while True:
            await wanted.wait()
            wanted.clear()
            pending = collections.deque(core.take_dirty())
            while pending:
                batch: list[tuple[str, bool]] = []
                ops: list[Any] = []
                size = 0
                while pending and len(ops) < MAX_TXN_OPS:
                    agent_id = pending[0]
                    record = core.record(agent_id)
                    key = self.etcd.key("health", agent_id)
                    if record is None and agent_id not in stored:
                        pending.popleft()  # nothing stored, nothing to delete
                        continue
                    value = b"" if record is None else record.SerializeToString()
                    if ops and size + len(key) + len(value) > MAX_TXN_BYTES:
                        break
                    pending.popleft()
                    ops.append(op_delete(key) if record is None else op_put(key, value))
                    batch.append((agent_id, record is not None))
                    size += len(key) + len(value)
                if not ops:
                    break
                for agent_id, put in batch:
                    if put:
                        stored.add(agent_id)  # it may exist from now on, whatever the reply
                try:
                    await term.fenced(rpc.TxnRequest(success=ops))
                except StoreUnavailableError as err:
                    log.warning("health records not written; retrying", extra={"error": str(err)})
                    core.dirty.update(agent_id for agent_id, _ in batch)
                    core.dirty.update(pending)
                    await self.clock.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    wanted.set()
                    break
                delay = 0.05
                for agent_id, put in batch:
                    if not put:
                        stored.discard(agent_id)

    # ---- takeover reads ----

    async def _records(self) -> list[hpb.AgentHealth]:
        prefix = self.etcd.key("health") + b"/"
        out: list[hpb.AgentHealth] = []
        start = None
        while True:
            resp = await self.etcd.range(prefix, start=start, limit=1000)
            for kv in resp.kvs:
                try:
                    out.append(hpb.AgentHealth.FromString(kv.value))
                except DecodeError:
                    log.warning("unreadable health record", extra={"key": kv.key.decode()})
            if not resp.more:
                return out
            start = resp.kvs[-1].key + b"\0"

    async def _registered_agents(self) -> list[tuple[str, str]]:
        """Agents registered by live pools (agents/<id> on each pool's lease)."""
        prefix = self.etcd.key("agents") + b"/"
        out: list[tuple[str, str]] = []
        start = None
        while True:
            resp = await self.etcd.range(prefix, start=start, limit=1000)
            for kv in resp.kvs:
                pool = ""
                with contextlib.suppress(ValueError, AttributeError):
                    pool = str(json.loads(kv.value).get("pool", ""))
                out.append((kv.key[len(prefix) :].decode(errors="replace"), pool))
            if not resp.more:
                return out
            start = resp.kvs[-1].key + b"\0"

    # ---- following etcd ----

    async def _follow(self, follow: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await follow()
            except StoreUnavailableError:
                await asyncio.sleep(0.5)
            except Exception:  # noqa: BLE001 - a follower that stops would blind the monitor
                log.warning("following etcd failed; again", exc_info=True)
                await asyncio.sleep(0.5)

    async def _follow_monitor(self) -> None:
        async def go() -> None:
            async for leader in observe(self.etcd, "health"):
                self.servicer.leader_endpoint = (
                    parse_leader_value(leader.value)[1] if leader else ""
                )

        await self._follow(go)

    async def _follow_coordinator(self) -> None:
        async def go() -> None:
            async for leader in observe(self.etcd, "coordinator"):
                self.coordinator = parse_leader_value(leader.value)[1] if leader else ""

        await self._follow(go)

    async def _follow_pools(self) -> None:
        async def go() -> None:
            async for instances in discovery.watch(self.etcd, "agent-pool"):
                pools = {}
                for i in instances:
                    agents = 0
                    with contextlib.suppress(ValueError):
                        agents = int(i.metadata.get("agents", "0"))
                    pools[i.instance_id] = PoolInfo(i.instance_id, i.endpoint, agents)
                self.pools = pools
                if self.core is not None:
                    self.core.set_pools(pools.values())

        await self._follow(go)

    # ---- plumbing ----

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                endpoint,
                options=[
                    *OPTIONS,
                    # a coordinator or pool that restarts must be reachable within a
                    # second, not after gRPC's default reconnect backoff (up to 120 s)
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000),
                ],
            )
            self._channels[endpoint] = channel
        return channel

    async def _drain(self) -> None:
        """Stop judging (streams are about to close because this process stops, not
        because agents failed) and close the streams, so they move to the next monitor."""
        self._stopping = True
        self.servicer.end_term()


async def serve(cfg: HealthConfig) -> None:
    node = HealthMonitorNode(cfg)
    await node.run()
