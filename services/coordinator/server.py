"""Coordinator process: the Runner, one elected root leader, its term's loops.

The Runner serves the API (with health and reflection), keeps the session and the
registration, and shuts down in order; `Leadership` campaigns and backs off when terms
keep failing. A term builds a fresh `CoordinatorCore` on the task store, fenced by the
term's number, and runs the dispatcher, the claims watch, the health monitor's
admissions and the reconcile loop until any of them ends or the term does. Standbys
follow the leader so they can point clients and agents at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc
from registry import discovery
from registry.election import candidates, current_leader
from registry.errors import RegistryError
from registry.leadership import Leadership, Term, parse_leader_value
from services._common import config, heap, telemetry
from services._common.clock import Clock, Timer
from services._common.errors import StoreUnavailableError
from services._common.follow import Leader
from services._common.runner import Runner
from services.agent_pool.llm_config import LlmConfig
from services.coordinator import counts
from services.coordinator.admission import admissions
from services.coordinator.config import CoordinatorConfig
from services.coordinator.core import CoordinatorCore
from services.coordinator.limits import check_config
from services.coordinator.llm_admission import LlmGate
from services.coordinator.llm_costs import flush_costs, flush_last, load_costs
from services.coordinator.servicer import CoordinatorServicer, split_services
from services.coordinator.store import EtcdTaskStore
from services.coordinator.tasks import QUEUED

log = logging.getLogger(__name__)

SERVICE = cpb.DESCRIPTOR.services_by_name["Coordinator"].full_name
ROLE = "coordinator"
FOLLOW_RETRY_S = 0.5
"""A follower of etcd (the leader, the health records) whose watch broke tries again
after this long."""
ADMISSIONS_WAIT_S = 2.0
"""How long a new term waits for the health monitor's ejections before it dispatches."""


class CoordinatorNode:
    """One coordinator replica: `await node.run()` until SIGTERM (or `node.runner.stop()`)."""

    def __init__(self, cfg: CoordinatorConfig, clock: Clock | None = None) -> None:
        check_config(cfg)
        # the llm section (limits, budgets, prices): a wrong value stops the process here
        self.llm_cfg = config.load(LlmConfig, section="llm")
        self.cfg = cfg
        self.runner = Runner(ROLE, cfg, [SERVICE], clock=clock)
        self.clock = self.runner.clock
        self.etcd = self.runner.etcd
        self.servicer = CoordinatorServicer(self.status, cfg, self.clock)
        self.servicer.health_term = self._health_term
        cpb_grpc.add_CoordinatorServicer_to_server(self.servicer, self.runner.server)
        # standbys point clients and agents at the leader etcd names
        self.leader = Leader(self.etcd, ROLE, self.clock, servicer=self.servicer)
        self.leadership: Leadership | None = None
        self.term = 0
        self._stopping = False

    @property
    def node_id(self) -> str:
        return self.runner.node_id

    @property
    def endpoint(self) -> str:
        return self.runner.endpoint

    async def run(self) -> None:
        leadership = self.leadership = self.runner.leadership()
        try:
            await self.runner.run(
                lambda: leadership.serve(self._lead), self.leader.follow, drain=self._drain
            )
        finally:
            await self.leader.close()

    async def status(self) -> cpb.ClusterStatus:
        leader = await current_leader(self.etcd, ROLE)
        all_candidates = await candidates(self.etcd, ROLE)
        services = await discovery.resolve(self.etcd)
        status = cpb.ClusterStatus(
            services=split_services(services), assignment_strategy=self.cfg.strategy
        )
        if leader:
            status.leader_id, status.leader_endpoint = parse_leader_value(leader.value)
            status.term = leader.term
        for cand in all_candidates[1:]:
            node, endpoint = parse_leader_value(cand.value)
            status.standbys.append(
                cpb.ServiceInstance(kind=ROLE, instance_id=node, endpoint=endpoint)
            )
        core = self.servicer.core
        if core is not None:
            status.from_leader = True
            status.agents_connected = len(core.agents)
            status.queue_depth = core.queue_depth()
            for name, count in core.counts().items():
                status.task_counts[name] = count
            core.llm.fill_status(
                status, (e.task for e in core.active.values() if e.task.state == QUEUED)
            )
        return status

    # ---- one term ----

    async def _lead(self, term: Term) -> None:
        """Lead until a job of the term ends; Leadership cancels this when the term does."""
        if self._stopping:
            await asyncio.Event().wait()  # won again while shutting down: hold, lead nothing
        cfg = self.cfg
        store = EtcdTaskStore(self.etcd, term.election, self.clock, cfg.retention_s)
        core = CoordinatorCore(store, self.clock, cfg, term=term.number, node_id=self.node_id)
        core.subscribers = self.servicer.hub.subscribers
        core.on_progress = self.servicer.hub.progress
        core.llm = LlmGate(self.llm_cfg, self.clock)
        counter = telemetry.watch_core(core)
        started = self.clock.monotonic()
        jobs: list[asyncio.Task[None]] = []
        expiry: Timer | None = None
        try:
            records, claims, revision = await store.load()
            core.finished.update(await counts.load(self.etcd))  # earlier terms' finished tasks
            orphans = core.load(records, claims)
            core.llm.load(await load_costs(self.etcd))  # budgets survive a leader change
            self.term = term.number
            self.servicer.core = core
            self.leader.set(self.endpoint)
            await self.runner.serving(True)
            telemetry.IS_LEADER.set(1)
            log.info(
                "elected root coordinator",
                extra={
                    "term": term.number,
                    "active_tasks": len(core.active),
                    "orphaned_claims": len(orphans),
                    "load_ms": round((self.clock.monotonic() - started) * 1000, 1),
                },
            )
            core.requeue_orphans(orphans)
            # the health monitor's ejections apply before the first dispatch (if etcd is
            # slow, dispatch starts anyway and they apply as soon as they are read)
            admitted = asyncio.Event()
            jobs.append(asyncio.ensure_future(self._follow_admissions(core, admitted)))
            with contextlib.suppress(TimeoutError):
                await self.clock.wait_for(admitted.wait(), ADMISSIONS_WAIT_S)
            # agents reconnect within a second or two; what none reclaimed by then is requeued
            expiry = self.clock.call_later(2 * cfg.lease_ttl_s + 1, core.expire_awaiting)
            named: dict[str, Callable[[], Awaitable[None]]] = {
                "dispatch": core.run,
                "claims watch": lambda: self._watch_claims(core, store, revision + 1),
                "reconcile": core.reconcile_loop,
                "finished counts": lambda: counts.keep(
                    self.etcd, term.election, self.clock, core.finished
                ),
                "llm costs": lambda: flush_costs(self.etcd, core.llm, term.fenced),
            }
            jobs.extend(asyncio.ensure_future(job()) for job in named.values())
            names = ["health records", *named]
            done, _ = await asyncio.wait(jobs, return_when=asyncio.FIRST_COMPLETED)
            for job in done:
                why = (
                    "finished"
                    if job.cancelled() or job.exception() is None
                    else repr(job.exception())
                )
                log.warning(
                    "term ended",
                    extra={"term": term.number, "by": names[jobs.index(job)], "why": why},
                )
        finally:
            log.info("stepping down", extra={"term": term.number})
            await self.runner.serving(False)
            telemetry.IS_LEADER.set(0)
            core.step_down("term ended")
            core.subscribers.discard(counter)
            if expiry is not None:
                expiry.cancel()
            self.servicer.end_term("")
            if self.leader.endpoint == self.endpoint:
                self.leader.set("")  # no longer us; the follower names the next leader
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            await core.close()
            await counts.save_last(self.etcd, term.election, core.finished)
            await flush_last(self.etcd, core.llm, term.fenced)
            self.term = 0

    async def _drain(self) -> None:
        """On SIGTERM, before the server stops: step down first, so the streams that
        close now requeue nothing (their agents keep their claims and take them to the
        next leader), then resign, so a standby is elected without waiting for grace."""
        self._stopping = True
        core = self.servicer.core
        if core is not None:
            core.step_down("this coordinator is shutting down")
        self.servicer.end_term("")
        term = self.leadership.term if self.leadership is not None else None
        if term is not None:
            if core is not None:  # before resigning: afterwards the fence refuses it
                await counts.save_last(self.etcd, term.election, core.finished)
                await flush_last(self.etcd, core.llm, term.fenced)
            with contextlib.suppress(RegistryError, TimeoutError):
                await self.clock.wait_for(term.election.resign(), 1.0)

    # ---- following etcd ----

    async def _follow(self, follow: Callable[[], Awaitable[None]]) -> None:
        """Run a follower of etcd for good: a broken watch is started again."""
        while True:
            try:
                await follow()
            except StoreUnavailableError:
                await self.clock.sleep(FOLLOW_RETRY_S)

    async def _follow_admissions(self, core: CoordinatorCore, ready: asyncio.Event) -> None:
        """Keep the core's admissions equal to the health monitor's records."""

        async def go() -> None:
            async for snapshot, limits in admissions(self.etcd):
                if snapshot:
                    for agent_id in set(core.admission) - set(limits):
                        core.admit(agent_id, -1)
                for agent_id, limit in limits.items():
                    core.admit(agent_id, limit)
                ready.set()

        await self._follow(go)

    async def _health_term(self) -> int:
        """The active health monitor's term now (0: none), read from etcd."""
        leader = await current_leader(self.etcd, "health")
        return leader.term if leader else 0

    async def _watch_claims(
        self, core: CoordinatorCore, store: EtcdTaskStore, start_revision: int
    ) -> None:
        async for task_id, token in store.claim_deletions(start_revision):
            core.claim_lost(task_id, token)


async def serve(cfg: CoordinatorConfig) -> None:
    node = CoordinatorNode(cfg)
    heap.settle()  # startup's objects stay out of every collection
    await node.run()
