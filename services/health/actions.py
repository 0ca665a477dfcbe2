"""What the active monitor's core orders, carried out: a hung agent's claims released
through Coordinator.ReleaseClaims, a failed agent replaced through the AgentPool API.

The `Actuator` outlives terms: it follows the coordinator's leader and the registered
pools (the core picks a pool for each replacement) and keeps one channel per peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc
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
from registry import discovery
from registry.errors import StoreUnavailableError
from registry.etcd import Etcd
from registry.leadership import Term
from services._common.clock import Clock
from services._common.follow import RETRY_S, Leader, named_leader, no_leader
from services._common.grpcserver import OPTIONS
from services.health.core import HealthCore, PoolInfo, Release, Replace

log = logging.getLogger(__name__)

RELEASE_TIMEOUT_S = 2.0
RELEASE_RETRY_S = 5.0
"""A release retries through a coordinator failover (about a lease TTL), then gives up
and the core detects the hang again a second later."""
STOP_TIMEOUT_S = 5.0
SPAWN_TIMEOUT_S = 35.0
"""A pool waits up to 30 s for a new agent's welcome."""
CHANNEL_OPTIONS = [
    *OPTIONS,
    # a coordinator or pool that restarts must be reachable within a second, not
    # after gRPC's default reconnect backoff (up to 120 s)
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
_RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
RELEASED_BY_US = "released by the health monitor: "
"""How the coordinator stores a release's reason as the task's last_error
(services/coordinator/core.py, `_release_claim`): the read-back after a lost reply."""


def _retryable(err: BaseException) -> bool:
    return isinstance(err, grpc.aio.AioRpcError) and err.code() in _RETRY


class Actuator:
    """Carries out the active core's orders; run `follow_pools` and `coordinator.follow`
    for the life of the process, `run(core, ...)` for each term."""

    def __init__(self, etcd: Etcd, clock: Clock) -> None:
        self.etcd = etcd
        self.clock = clock
        self.coordinator = Leader(etcd, "coordinator", clock, options=CHANNEL_OPTIONS)
        self.pools: dict[str, PoolInfo] = {}
        self.core: HealthCore | None = None
        """The term's core, told of every change of the pools."""
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def run(
        self, core: HealthCore, term: Term, flush: asyncio.Event, group: asyncio.TaskGroup
    ) -> None:
        """Carry out what the core orders, each action on its own (bounded) task of
        `group`; set `flush` when the core has records to write."""
        while True:
            await core.changed.wait()
            core.changed.clear()
            for action in core.take_actions():
                if isinstance(action, Release):
                    group.create_task(self.release(core, term, action))
                else:
                    group.create_task(self.replace(core, action))
            if core.dirty:
                flush.set()

    async def release(self, core: HealthCore, term: Term, action: Release) -> None:
        request = cpb.ReleaseClaimsRequest(
            agent_id=action.agent_id,
            claims=[cpb.ClaimRef(task_id=t, claim_token=c) for t, c in action.claims],
            reason=action.reason[:256],
            health_term=term.number,
        )
        lost = False
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_retryable),
                stop=stop_after_delay(RELEASE_RETRY_S),
                wait=wait_random_exponential(multiplier=0.05, max=0.5),
                sleep=self.clock.sleep,
                reraise=True,
            ):
                with attempt:
                    try:
                        resp = await self._call_coordinator(request)
                    except grpc.aio.AioRpcError:
                        lost = True  # it may have been applied, its reply lost
                        raise
        except grpc.aio.AioRpcError as err:
            log.warning(
                "release failed",
                extra={"agent": action.agent_id, "code": err.code().name, "error": err.details()},
            )
            core.release_done(action, [], error=f"{err.code().name}: {err.details()}")
            return
        released = [(c.task_id, c.claim_token) for c in resp.released]
        if lost and resp.skipped and action.hung:
            # A retry finds the claims an earlier attempt released gone, like claims
            # that moved on by themselves: read the tasks back and decide.
            released += await self._released_before(request, resp.skipped)
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

    async def _released_before(
        self, request: cpb.ReleaseClaimsRequest, skipped: Any
    ) -> list[tuple[str, int]]:
        """Of `skipped`, the claims whose task says this release requeued it."""
        endpoint = self.coordinator.endpoint
        if not endpoint:
            return []
        stub = cpb_grpc.CoordinatorStub(self.coordinator.channel(endpoint))
        ours = RELEASED_BY_US + request.reason
        out = []
        for claim in skipped:
            try:
                task = await stub.GetTask(
                    cpb.GetTaskRequest(task_id=claim.task_id), timeout=RELEASE_TIMEOUT_S
                )
            except grpc.aio.AioRpcError:
                continue  # unknown still: counted as moved on, as before
            if task.last_error == ours:
                out.append((claim.task_id, claim.claim_token))
        return out

    async def _call_coordinator(self, request: cpb.ReleaseClaimsRequest) -> Any:
        endpoint = self.coordinator.endpoint
        if not endpoint:
            raise no_leader("no coordinator leader is known")
        stub = cpb_grpc.CoordinatorStub(self.coordinator.channel(endpoint))
        try:
            return await stub.ReleaseClaims(request, timeout=RELEASE_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            if pointed := named_leader(err):
                self.coordinator.redirected(pointed)  # a standby pointed at the leader
            raise

    async def replace(self, core: HealthCore, action: Replace) -> None:
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
                # naming the agent replaced: a pool that started its replacement already
                # (this order's reply was lost, or the last monitor sent it) answers
                # with that one rather than starting a second
                ppb.SpawnAgentsRequest(
                    count=1, batch_size=1, template=template, replaces=action.agent_id
                ),
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

    async def follow_pools(self) -> None:
        """Keep `pools` (and the term's core) current with the registered agent pools."""
        while True:
            try:
                async for instances in discovery.watch(self.etcd, "agent-pool"):
                    self._set_pools(instances)
            except StoreUnavailableError:
                pass
            except Exception:  # noqa: BLE001 - a follower that stops would blind the monitor
                log.warning("following the agent pools failed; again", exc_info=True)
            await self.clock.sleep(RETRY_S)

    def _set_pools(self, instances: list[discovery.Instance]) -> None:
        pools = {}
        for i in instances:
            agents = 0
            with contextlib.suppress(ValueError):
                agents = int(i.metadata.get("agents", "0"))
            pools[i.instance_id] = PoolInfo(i.instance_id, i.endpoint, agents)
        self.pools = pools
        if self.core is not None:
            self.core.set_pools(pools.values())

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
            self._channels[endpoint] = channel
        return channel

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        await self.coordinator.close()
