"""Agent pool process: hosts many agents, serves the AgentPool API, follows the leader."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import grpc

from protos.agentmesh.v1 import agent_pool_pb2 as ppb
from protos.agentmesh.v1 import agent_pool_pb2_grpc as ppb_grpc
from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc
from registry import discovery
from registry.election import observe
from registry.etcd import Etcd, cmp_create, op_delete, op_get, op_put
from registry.lease import KeptLease
from services._common.clock import SystemClock
from services._common.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    StoreUnavailableError,
)
from services._common.grpcserver import (
    OPTIONS,
    SERVING,
    advertised,
    bind,
    build_server,
    rpc_errors,
    shutdown,
    stop_event,
)
from services.agent_pool.agent import A, Agent, PoolContext, leader_endpoint_of
from services.agent_pool.config import PoolConfig
from services.agent_pool.executors import build_executors, etcd_context_source
from services.agent_pool.heartbeat import Heartbeater, TaskTracker
from services.agent_pool.voter import (
    Policy,
    ProposeExecutor,
    VoterInfo,
    VoterPool,
    parse_byzantine,
)
from services.coordinator import limits

log = logging.getLogger(__name__)

SERVICE = ppb.DESCRIPTOR.services_by_name["AgentPool"].full_name
MAX_SPAWN = limits.SPAWN_MAX


class PoolNode:
    def __init__(self, cfg: PoolConfig) -> None:
        self.cfg = cfg
        self.pool_id = cfg.pool_id or f"pool-{os.getpid()}-{secrets.token_hex(2)}"
        self.etcd = Etcd(
            cfg.etcd, prefix=f"/agentmesh/{cfg.cluster}/", timeout_s=cfg.etcd_timeout_s
        )
        self.lease = KeptLease(self.etcd, cfg.lease_ttl_s, SystemClock())
        self.flaky: set[str] = set()
        self.tracker = TaskTracker(cfg.task_timeout_s, flaky=self.flaky.__contains__)
        executors = build_executors(
            tuple(k for k in cfg.kinds if k != "propose"),
            cfg.sleep_ms,
            context_source=etcd_context_source(self.etcd),
        )
        # consensus: every agent votes on its own Participate stream (voter.py)
        self.voters = VoterPool(
            self.etcd,
            self.pool_id,
            lambda: self.lease.id,
            Policy.parse(cfg.vote_policy),
            parse_byzantine(cfg.byzantine),
            cfg.vote_delay_ms,
        )
        if "propose" in cfg.kinds:
            from services.consensus.client import ConsensusClient

            executors["propose"] = ProposeExecutor(ConsensusClient(self.etcd))
        self.executors = self.tracker.wrap(executors)
        self.defaults = ppb.AgentTemplate(
            roles=cfg.roles, labels=cfg.label_map(), kinds=cfg.kinds, capacity=cfg.capacity
        )
        self.agents: dict[str, tuple[Agent, asyncio.Task[None]]] = {}
        self.warm: list[Agent] = []
        self._seq = itertools.count(1)
        self._leader = ""
        self._leader_changed = asyncio.Event()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.ctx = PoolContext(
            pool_id=self.pool_id,
            lease_id=lambda: self.lease.id,
            leader=lambda: self._leader,
            leader_changed=lambda: self._leader_changed,
            stub=self._stub,
            executors=self.executors,  # type: ignore[arg-type]
            task_timeout_s=cfg.task_timeout_s,
            on_redirect=self._redirect,
            max_result_bytes=cfg.max_result_bytes,
        )
        self.heartbeats = Heartbeater(
            self.etcd,
            self.pool_id,
            self.tracker,
            lambda: self.agents,
            self._on_health_directive,
            cfg.heartbeat_interval_s,
        )
        self._chores: set[asyncio.Task[None]] = set()
        self.server, self.health = build_server([SERVICE])
        ppb_grpc.add_AgentPoolServicer_to_server(PoolServicer(self), self.server)
        self.port = bind(self.server, cfg.listen)
        self.endpoint = advertised(cfg.listen, self.port, cfg.advertise)
        self.stop = asyncio.Event()
        self._published = -1
        self._publishing: asyncio.Task[None] | None = None

    # ---- leader and channels ----

    def _stub(self, endpoint: str) -> cpb_grpc.CoordinatorStub:
        channel = self._channels.get(endpoint)
        if channel is None:
            # one HTTP/2 connection per leader carries every agent's stream
            channel = grpc.aio.insecure_channel(endpoint, options=OPTIONS)
            self._channels[endpoint] = channel
        return cpb_grpc.CoordinatorStub(channel)

    def _set_leader(self, endpoint: str) -> None:
        if endpoint != self._leader:
            self._leader = endpoint
            # wake every agent sleeping in backoff; later sleepers wait for the next change
            self._leader_changed.set()
            self._leader_changed = asyncio.Event()

    def _redirect(self, endpoint: str) -> None:
        if endpoint:
            self._set_leader(endpoint)

    async def _follow_leader(self) -> None:
        while True:
            try:
                async for leader in observe(self.etcd, "coordinator"):
                    self._set_leader(leader_endpoint_of(leader.value) if leader else "")
                    log.info("coordinator leader", extra={"leader": self._leader or "none"})
            except StoreUnavailableError:
                await asyncio.sleep(0.5)

    # ---- agents ----

    def _template(self, t: ppb.AgentTemplate | None) -> ppb.AgentTemplate:
        out = ppb.AgentTemplate()
        out.CopyFrom(self.defaults)
        if t is not None:
            # the template becomes each agent's hello: the coordinator's limits apply
            limits.validate_template_fields("template", t.roles, t.labels, t.kinds)
            if t.roles:
                del out.roles[:]
                out.roles.extend(t.roles)
            if t.labels:
                out.labels.clear()
                out.labels.update(t.labels)
            if t.kinds:
                missing = [k for k in t.kinds if k not in self.executors]
                if missing:
                    raise InvalidArgumentError(
                        f"template.kinds {missing} have no executor in this pool; use {sorted(self.executors)}"
                    )
                del out.kinds[:]
                out.kinds.extend(t.kinds)
            if t.capacity:
                if t.capacity > 1000:
                    raise InvalidArgumentError("template.capacity must be 1-1000")
                out.capacity = t.capacity
        return out

    def _new_agent(self, template: ppb.AgentTemplate) -> Agent:
        seq = next(self._seq)
        agent = Agent(f"{self.pool_id}-a{seq:04d}", self.ctx, template)
        if seq <= self.cfg.flaky_agents:
            self.flaky.add(agent.agent_id)
        return agent

    async def _register_agents(self, agents: list[Agent]) -> None:
        for i in range(0, len(agents), 128):
            ops = [
                op_put(
                    self.etcd.key("agents", a.agent_id),
                    json.dumps(
                        {
                            "pool": self.pool_id,
                            "kinds": list(a.template.kinds),
                            "roles": list(a.template.roles),
                        }
                    ).encode(),
                    self.lease.id,
                )
                for a in agents[i : i + 128]
            ]
            with contextlib.suppress(StoreUnavailableError):
                await self.etcd.txn([], ops)
        await self.voters.register([_voter_info(a) for a in agents])

    async def spawn(
        self,
        count: int,
        batch_size: int,
        template: ppb.AgentTemplate | None,
        timeout_s: float = 30.0,
    ) -> tuple[list[Agent], int]:
        """Start `count` agents, `batch_size` at a time; wait until each is welcomed."""
        check_count(count)
        tmpl = self._template(template)
        batch = batch_size or count
        started: list[Agent] = []
        from_warm = 0
        for first in range(0, count, batch):
            wave = []
            for _ in range(min(batch, count - first)):
                if self.warm and template is None:
                    agent = self.warm.pop()
                    agent.requested_at = time.monotonic()
                    from_warm += 1
                else:
                    agent = self._new_agent(tmpl)
                wave.append(agent)
                self.agents[agent.agent_id] = (agent, asyncio.ensure_future(agent.run()))
            await self._register_agents(wave)
            for agent in wave:
                self.voters.start(_voter_info(agent))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(a.welcomed.wait() for a in wave)), timeout_s
                )
            started.extend(wave)
        self._refill_warm()
        self._publish_count()
        return started, from_warm

    def _refill_warm(self) -> None:
        while len(self.warm) < self.cfg.warm:
            self.warm.append(self._new_agent(self.defaults))
            self.warm[-1].state = A.AGENT_STATE_WARM

    async def stop_agents(self, agent_ids: list[str], count: int, graceful: bool) -> list[str]:
        limits.check_items("agent_ids", agent_ids, MAX_SPAWN, limits.ID_BYTES)
        if count > MAX_SPAWN:
            raise InvalidArgumentError(f"count {count} is out of range: use 0-{MAX_SPAWN}")
        if agent_ids:  # an id given twice stops its agent once, in its first place
            chosen = list(dict.fromkeys(agent_ids))
        else:
            chosen = list(self.agents)[-count:] if count else []
        unknown = [a for a in chosen if a not in self.agents]
        if unknown:
            raise InvalidArgumentError(
                f"{len(unknown)} agent ids are not in this pool, e.g. "
                + ", ".join(limits.quote(a) for a in unknown[:3])
            )
        try:
            if graceful:
                await asyncio.gather(*(self.agents[a][0].drain(self.cfg.grace_s) for a in chosen))
        finally:
            # whatever happened above, every chosen agent stops and its key goes
            for agent_id in chosen:
                held = self.agents.pop(agent_id, None)
                if held is None:
                    continue
                agent, task = held
                task.cancel()
                self.voters.stop(agent_id)
                for _, runner in agent.running.values():
                    runner.cancel()
                agent.state = A.AGENT_STATE_STOPPED
            with contextlib.suppress(StoreUnavailableError):
                for i in range(0, len(chosen), 128):
                    keys = [self.etcd.key("agents", a) for a in chosen[i : i + 128]]
                    await self.etcd.txn([], [op_delete(k) for k in keys])
            self._publish_count()
        return chosen

    def _publish_count(self) -> None:
        """Keep the registration's `agents` metadata (GetStatus shows it) current: one
        update in flight at a time, repeated while the count moved meanwhile."""
        if self._publishing is None or self._publishing.done():
            self._publishing = asyncio.ensure_future(self._publish_loop())

    async def _publish_loop(self) -> None:
        while self._published != len(self.agents) and self.lease.id:
            count = len(self.agents)
            instance = discovery.Instance(
                "agent-pool", self.pool_id, self.endpoint, {"agents": str(count)}
            )
            try:
                await discovery.register(self.etcd, self.lease.id, instance)
            except StoreUnavailableError:
                return  # the next change, or the lease renewal, publishes it
            self._published = count

    # ---- the health monitor's orders ----

    def _on_health_directive(self, agent_id: str, directive: Any) -> None:
        body = directive.WhichOneof("body")
        if body == "replace":
            self._chore(self.replace_agent(agent_id, directive.replace.reason))
        elif body == "drain":
            self._chore(self.retire_agent(agent_id, directive.drain.reason))

    def _chore(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def replace_agent(self, agent_id: str, reason: str) -> None:
        """Stop the agent now (the coordinator requeues what it held when its stream
        closes) and start a fresh one like it: the pool keeps its size."""
        held = self.agents.get(agent_id)
        if held is None:
            return
        log.warning(
            "replacing an agent on the health monitor's order",
            extra={"agent": agent_id, "reason": reason},
        )
        template = held[0].template
        await self.stop_agents([agent_id], 0, graceful=False)
        new = self._new_agent(template)
        self.heartbeats.replaces[new.agent_id] = agent_id
        self.agents[new.agent_id] = (new, asyncio.ensure_future(new.run()))
        await self._register_agents([new])

    async def retire_agent(self, agent_id: str, reason: str) -> None:
        """Drain the agent and stop it for good (it was replaced elsewhere)."""
        if agent_id not in self.agents:
            return
        log.warning(
            "retiring an agent on the health monitor's order",
            extra={"agent": agent_id, "reason": reason},
        )
        with contextlib.suppress(InvalidArgumentError):
            await self.stop_agents([agent_id], 0, graceful=True)

    # ---- lifecycle ----

    async def _keep_lease(self) -> None:
        """If the lease is lost, every claim on it is gone: take a new one and reconnect
        every agent so its hello carries the new lease."""
        while True:
            await self.lease.keep_alive()
            log.warning(
                "pool lease lost; renewing and reconnecting agents", extra={"pool": self.pool_id}
            )
            while True:
                try:
                    await self.lease.grant()
                    break
                except StoreUnavailableError:
                    await asyncio.sleep(0.5)
            await self._register()
            for agent_id, (agent, task) in list(self.agents.items()):
                task.cancel()
                self.agents[agent_id] = (agent, asyncio.ensure_future(agent.run()))

    async def _claim_pool_id(self) -> None:
        """Register this pool only if no other live pool has its id.

        Two pools with one id would give out the same agent ids: the coordinator refuses
        the second hello for a connected id, so half the agents would never connect. A
        registration on another lease that outlives that lease's TTL belongs to a live
        pool (a crashed one's goes with its lease): refuse to start, saying so."""
        instance = self._instance()
        key = discovery.key(self.etcd, instance)
        deadline = time.monotonic() + 2 * self.cfg.lease_ttl_s + 1
        while True:
            resp = await self.etcd.txn(
                [cmp_create(key, 0)],
                [op_put(key, instance.encode(), self.lease.id)],
                [op_get(key)],
            )
            if resp.succeeded:
                return
            kvs = resp.responses[0].response_range.kvs
            if not kvs or int(kvs[0].lease) == self.lease.id:
                return
            if time.monotonic() > deadline:
                other = discovery.Instance.decode(kvs[0].value)
                raise AlreadyExistsError(
                    f"agent pool id {self.pool_id!r} is in use by a live pool at "
                    f"{other.endpoint} (etcd lease {int(kvs[0].lease):x}); start this one "
                    "with another --pool-id (or none: a unique one is generated)"
                )
            await asyncio.sleep(0.25)  # a crashed pool's registration goes with its lease

    def _instance(self) -> discovery.Instance:
        return discovery.Instance(
            "agent-pool", self.pool_id, self.endpoint, {"agents": str(len(self.agents))}
        )

    async def _register(self) -> None:
        count = len(self.agents)
        await discovery.register(self.etcd, self.lease.id, self._instance())
        self._published = count
        await self._register_agents([a for a, _ in self.agents.values()])

    async def run(self) -> None:
        await self.server.start()
        while True:
            try:
                await self.lease.grant()
                await self._claim_pool_id()
                await self._register()
                break
            except StoreUnavailableError as err:
                log.warning("etcd unreachable at start; retrying", extra={"error": str(err)})
                await asyncio.sleep(0.5)
            except AlreadyExistsError as err:
                log.error("agent pool refused to start", extra={"error": str(err)})
                await self.lease.revoke()
                await self.server.stop(0)
                await self.etcd.close()
                raise
        await self.health.set("", SERVING)
        await self.health.set(SERVICE, SERVING)
        log.info("agent pool listening", extra={"endpoint": self.endpoint, "pool": self.pool_id})
        background = [
            asyncio.ensure_future(self._follow_leader()),
            asyncio.ensure_future(self._keep_lease()),
            asyncio.ensure_future(self.heartbeats.run()),
            asyncio.ensure_future(self.voters.follow()),
        ]
        try:
            if self.cfg.agents:
                t0 = time.monotonic()
                agents, _ = await self.spawn(self.cfg.agents, self.cfg.batch_size, None)
                ready = sum(a.welcomed.is_set() for a in agents)
                log.info(
                    "agents started",
                    extra={
                        "ready": ready,
                        "requested": self.cfg.agents,
                        "elapsed_ms": round((time.monotonic() - t0) * 1000, 1),
                    },
                )
            else:
                self._refill_warm()
            await self.stop.wait()
        finally:
            await shutdown(self.server, self.health, self.cfg.grace_s, [self._drain_all])
            if self._publishing is not None:
                background.append(self._publishing)
            # stopping on purpose: the monitor hears goodbye rather than silence
            await self.heartbeats.close()
            leftover = (*background, *self._chores)
            for task in leftover:
                task.cancel()
            await asyncio.gather(*leftover, return_exceptions=True)
            await self.voters.close()
            await self.lease.revoke()
            for channel in self._channels.values():
                await channel.close()
            await self.etcd.close()

    async def _drain_all(self) -> None:
        await self.stop_agents(list(self.agents), 0, graceful=True)


def _voter_info(agent: Agent) -> VoterInfo:
    t = agent.template
    return VoterInfo(agent.agent_id, tuple(t.roles), dict(t.labels))


class PoolServicer(ppb_grpc.AgentPoolServicer):
    def __init__(self, node: PoolNode) -> None:
        self.node = node

    @rpc_errors
    async def SpawnAgents(
        self, request: ppb.SpawnAgentsRequest, context: grpc.aio.ServicerContext
    ) -> ppb.SpawnAgentsResponse:
        t0 = time.monotonic()
        template = request.template if request.HasField("template") else None
        agents, from_warm = await self.node.spawn(request.count, request.batch_size, template)
        return ppb.SpawnAgentsResponse(
            agents=[a.info() for a in agents], elapsed_s=time.monotonic() - t0, from_warm=from_warm
        )

    @rpc_errors
    async def SpawnWaves(
        self, request: ppb.SpawnWavesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ppb.SpawnProgress]:
        node = self.node
        # everything is checked before the first wave: a bad request spawns nothing
        check_count(request.count)
        if request.wave_size > request.count:
            raise InvalidArgumentError(
                f"wave_size {request.wave_size} is out of range: use 1-count ({request.count}); 0: 10"
            )
        limits.check_finite(
            "wave_interval_s", request.wave_interval_s, 0.0, limits.WAVE_INTERVAL_S_MAX
        )
        template = request.template if request.HasField("template") else None
        node._template(template)
        wave_size = request.wave_size or 10
        t0 = time.monotonic()
        started = ready = failed = 0
        for wave, first in enumerate(range(0, request.count, wave_size), start=1):
            agents, _ = await node.spawn(min(wave_size, request.count - first), 0, template)
            started += len(agents)
            ok = sum(a.welcomed.is_set() for a in agents)
            ready += ok
            failed += len(agents) - ok
            yield ppb.SpawnProgress(
                wave=wave,
                started=started,
                ready=ready,
                failed=failed,
                elapsed_s=time.monotonic() - t0,
            )
            if first + wave_size < request.count:
                await asyncio.sleep(request.wave_interval_s)

    @rpc_errors
    async def StopAgents(
        self, request: ppb.StopAgentsRequest, context: grpc.aio.ServicerContext
    ) -> ppb.StopAgentsResponse:
        if not request.agent_ids and not request.count:
            raise InvalidArgumentError("give agent_ids or a count of agents to stop")
        stopped = await self.node.stop_agents(
            list(request.agent_ids), request.count, request.graceful
        )
        return ppb.StopAgentsResponse(stopped=stopped)

    @rpc_errors
    async def ListAgents(
        self, request: ppb.ListPoolAgentsRequest, context: grpc.aio.ServicerContext
    ) -> ppb.ListPoolAgentsResponse:
        node = self.node
        return ppb.ListPoolAgentsResponse(
            pool_id=node.pool_id,
            agents=[a.info() for a, _ in node.agents.values()],
            warm=len(node.warm),
        )

    @rpc_errors
    async def Drain(
        self, request: ppb.DrainPoolRequest, context: grpc.aio.ServicerContext
    ) -> ppb.DrainPoolResponse:
        limits.check_bytes("reason", request.reason, limits.REASON_BYTES)
        agents = [a for a, _ in self.node.agents.values()]
        for agent in agents:
            agent.draining = True
            agent.state = A.AGENT_STATE_DRAINING
            agent._send(
                cpb.AgentMessage(draining=cpb.AgentDraining(reason=request.reason or "pool drain"))
            )
        return ppb.DrainPoolResponse(draining=len(agents))


def check_count(count: int) -> None:
    if not 1 <= count <= MAX_SPAWN:
        raise InvalidArgumentError(f"count {count} is out of range: use 1-{MAX_SPAWN}")


async def serve(cfg: PoolConfig) -> None:
    node = PoolNode(cfg)
    stop = stop_event()
    runner = asyncio.ensure_future(node.run())
    done, _ = await asyncio.wait(
        {runner, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
    )
    node.stop.set()
    await runner
