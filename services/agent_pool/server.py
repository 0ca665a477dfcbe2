"""Agent pool process: the Runner, the pool's core and its agents' three followed leaders
(coordinator, health monitor, consensus), and the pool's place in etcd."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Sequence

from protos.agentmesh.v1 import agent_pool_pb2_grpc as ppb_grpc
from registry import discovery
from registry.etcd import cmp_create, op_put
from services._common import heap
from services._common.clock import Clock
from services._common.errors import AlreadyExistsError, StoreUnavailableError
from services._common.follow import Leader
from services._common.runner import Runner
from services.agent_pool.agent import Agent, PoolContext
from services.agent_pool.config import PoolConfig, check_pool_id
from services.agent_pool.core import AgentPool
from services.agent_pool.executors import ExecutorContext, build_executors
from services.agent_pool.heartbeat import Heartbeater, TaskTracker
from services.agent_pool.servicer import SERVICE, PoolServicer
from services.agent_pool.voter import Policy, VoterInfo, VoterPool, parse_byzantine

log = logging.getLogger(__name__)

KIND = "agent-pool"
RETRY_S = 0.5
CLAIM_POLL_S = 0.25


class PoolNode:
    """One agent pool process: `await node.run()` until SIGTERM (or `node.runner.stop()`)."""

    def __init__(self, cfg: PoolConfig, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.pool_id = cfg.pool_id or cfg.node_id or f"pool-{os.getpid()}-{secrets.token_hex(2)}"
        check_pool_id(self.pool_id)
        runner = self.runner = Runner(KIND, cfg, [SERVICE], node_id=self.pool_id, clock=clock)
        clock, etcd, session = runner.clock, runner.etcd, runner.session
        self.coordinator = Leader(etcd, "coordinator", clock)
        self.tracker = TaskTracker(
            cfg.task_timeout_s, clock, flaky=lambda agent_id: agent_id in self.core.flaky
        )
        executors = build_executors(
            cfg.kinds, ExecutorContext(sleep_ms=cfg.sleep_ms, etcd=etcd, clock=clock)
        )
        context = PoolContext(
            pool_id=self.pool_id,
            lease_id=lambda: session.id,
            coordinator=self.coordinator,
            executors=self.tracker.wrap(executors),
            task_timeout_s=cfg.task_timeout_s,
            clock=clock,
            max_result_bytes=cfg.max_result_bytes,
        )
        # consensus: every agent votes on its own Participate stream (voter.py)
        self.voters = VoterPool(
            etcd,
            self.pool_id,
            lambda: session.id,
            Policy.parse(cfg.vote_policy),
            clock,
            parse_byzantine(cfg.byzantine),
            cfg.vote_delay_ms,
        )
        self.core = AgentPool(
            cfg,
            self.pool_id,
            clock,
            make_agent=lambda agent_id, template: Agent(agent_id, context, template),
            registry=_EtcdRegistry(self),
            voters=_VoteStreams(self.voters),
            executor_kinds=executors,
        )
        self.heartbeats = Heartbeater(
            etcd,
            self.pool_id,
            self.tracker,
            lambda: self.core.agents,
            self.core.on_health_directive,
            clock,
            cfg.heartbeat_interval_s,
            # the replacements the core starts on a `replace` directive: each one's first
            # heartbeat names the agent it replaced, so the monitor links the two
            replaces=self.core.replaces,
        )
        ppb_grpc.add_AgentPoolServicer_to_server(PoolServicer(self.core), runner.server)

    @property
    def endpoint(self) -> str:
        return self.runner.endpoint

    async def run(self) -> None:
        try:
            await self._claim_pool_id()
        except BaseException:
            await self.runner.server.stop(None)
            await self.runner.etcd.close()
            raise
        await self.runner.publish(agents="0")
        try:
            await self.runner.run(
                self.coordinator.follow,
                self.voters.follow,
                self.heartbeats.run,
                self._boot,
                self._follow_session,
                self._publish_count,
                drain=self._drain,
            )
        finally:
            await self.core.close()
            await self.voters.close()
            await self.coordinator.close()

    async def _claim_pool_id(self) -> None:
        """Take this pool's registration key only if no other live pool holds it.

        Two pools with one id would give out the same agent ids: the coordinator refuses
        the second hello for a connected id, so half the agents would never connect. A
        registration that outlives its lease's TTL belongs to a live pool (a crashed one's
        goes with its lease): refuse to start, saying so. This runs before the Runner
        registers (unconditionally) on its session; the key is taken on a lease of its
        own, which nothing refreshes: the session's registration replaces it at once.
        """
        runner, ttl_s = self.runner, self.cfg.lease_ttl_s
        etcd, clock = runner.etcd, runner.clock
        instance = discovery.Instance(KIND, self.pool_id, runner.endpoint, {"agents": "0"})
        key = discovery.key(etcd, instance)
        mine = 0
        deadline = clock.monotonic() + 2 * ttl_s + 1
        while True:
            try:
                held = await etcd.get(key)
                if held is None:
                    mine = await etcd.grant(ttl_s)
                    taken = await etcd.txn(
                        [cmp_create(key, 0)], [op_put(key, instance.encode(), mine)]
                    )
                    if taken.succeeded:
                        return
                    continue  # another took it meanwhile: judge it like any other
                if int(held.lease) == mine:
                    return  # ours: the reply of our own write was lost
            except StoreUnavailableError as err:
                log.warning("etcd unreachable at start; retrying", extra={"error": str(err)})
                # a crashed pool's lease gets a fresh TTL when etcd comes back
                deadline = max(deadline, clock.monotonic() + 2 * ttl_s + 1)
                await clock.sleep(RETRY_S)
                continue
            if clock.monotonic() > deadline:
                other = discovery.Instance.decode(held.value)
                refusal = AlreadyExistsError(
                    f"agent pool id {self.pool_id!r} is in use by a live pool at "
                    f"{other.endpoint} (etcd lease {int(held.lease):x}); start this one "
                    "with another --pool-id (or none: a unique one is generated)"
                )
                log.error("agent pool refused to start", extra={"error": str(refusal)})
                raise refusal
            await clock.sleep(CLAIM_POLL_S)  # a crashed pool's registration goes with its lease

    async def _boot(self) -> None:
        await self.runner.session.wait_ready()
        await self.runner.serving(True)
        await self.core.boot()

    async def _follow_session(self) -> None:
        """A lost lease takes every claim on it: on each new lease, publish the agents
        on it and reconnect them, so their hellos carry it."""
        session = self.runner.session
        seen = 0
        while True:
            await session.wait_ready()
            lost = session.lost
            if session.generation != seen:
                if seen:
                    log.warning(
                        "pool lease lost; agents re-registered and reconnected",
                        extra={"pool": self.pool_id, "agents": len(self.core.agents)},
                    )
                    if self.core.agents:
                        await self.core.rejoin()
                # the first lease is the one the agents boot with: nothing to rejoin
                seen = session.generation
            await lost.wait()

    async def _publish_count(self) -> None:
        """Keep the registration's `agents` metadata (GetStatus and the health monitor
        read it) current: one update at a time, the latest count each time."""
        published = 0
        while True:
            await self.core.count_changed.wait()
            self.core.count_changed.clear()
            count = len(self.core.agents)
            if count != published:
                await self.runner.publish(agents=str(count))
                published = count

    async def _drain(self) -> None:
        try:
            await self.core.drain_all()
        finally:
            # stopping on purpose: the monitor hears goodbye rather than silence
            await self.heartbeats.close()


class _EtcdRegistry:
    """Agents under agents/<id> and their public voting keys under keys/<id>, on the
    pool's lease. A registration etcd did not take is tried again while that lease lives (an
    etcd restart keeps it): given up, the agents spawned during a blip stayed out of
    agents/ (never replaced when their pool died) and keys/ (their BFT votes refused) for
    as long as the lease lived. A new lease publishes every agent anyway (rejoin)."""

    def __init__(self, node: PoolNode) -> None:
        self.node = node

    async def register(self, agents: Sequence[Agent]) -> None:
        node = self.node
        session, clock = node.runner.session, node.runner.clock
        lease, failed = session.id, False
        while lease:  # no lease yet: the first one publishes every agent (_follow_session)
            live = [a for a in agents if a.agent_id in node.core.agents]  # not stopped since
            records = [
                discovery.AgentRecord(
                    a.agent_id, node.pool_id, tuple(a.template.kinds), tuple(a.template.roles)
                )
                for a in live
            ]
            try:
                await discovery.register_agents(node.runner.etcd, lease, records)
                await node.voters.register([_voter_info(a) for a in live])
                if failed:
                    log.info("agent registration written after all")
                return
            except StoreUnavailableError as err:
                if session.id != lease:
                    return  # the new lease's rejoin publishes every agent there is
                if not failed:
                    log.warning("agent registration not written; again", extra={"error": str(err)})
                failed = True
                await clock.sleep(RETRY_S)

    async def deregister(self, agent_ids: Sequence[str]) -> None:
        # tried once: a record left behind names an agent that said goodbye, and it goes
        # with the lease; a shutdown (the lease revoked next) must not wait for etcd
        with contextlib.suppress(StoreUnavailableError):
            await discovery.deregister_agents(self.node.runner.etcd, agent_ids)
        with contextlib.suppress(StoreUnavailableError):
            await self.node.voters.deregister(agent_ids)


class _VoteStreams:
    def __init__(self, voters: VoterPool) -> None:
        self.voters = voters

    def start(self, agent: Agent) -> None:
        self.voters.start(_voter_info(agent))

    def stop(self, agent_id: str) -> None:
        self.voters.stop(agent_id)


def _voter_info(agent: Agent) -> VoterInfo:
    t = agent.template
    return VoterInfo(agent.agent_id, tuple(t.roles), dict(t.labels))


async def serve(cfg: PoolConfig) -> None:
    node = PoolNode(cfg)
    heap.settle()  # startup's objects stay out of every collection
    await node.run()
