"""Coordinator process: serve, campaign, lead one term at a time, shut down cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
from typing import Any

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc
from registry import discovery
from registry.election import Election, candidates, current_leader, observe
from registry.etcd import Etcd
from registry.leadership import BACKOFF_BASE_S, BACKOFF_CAP_S, STABLE_TERM_S
from registry.lease import KeptLease
from services._common import config, telemetry
from services._common.clock import SystemClock
from services._common.errors import NotLeaderError, StoreUnavailableError
from services._common.grpcserver import (
    NOT_SERVING,
    SERVING,
    advertised,
    bind,
    build_server,
    shutdown,
    stop_event,
)
from services.agent_pool.llm_config import LlmConfig
from services.coordinator.admission import admissions
from services.coordinator.config import CoordinatorConfig
from services.coordinator.core import CoordinatorCore
from services.coordinator.limits import check_config
from services.coordinator.llm_admission import LlmGate
from services.coordinator.llm_costs import flush_costs, load_costs
from services.coordinator.servicer import (
    CoordinatorServicer,
    leader_value,
    parse_leader_value,
    split_services,
)
from services.coordinator.store import EtcdTaskStore
from services.coordinator.tasks import QUEUED

log = logging.getLogger(__name__)

SERVICE = cpb.DESCRIPTOR.services_by_name["Coordinator"].full_name


class CoordinatorNode:
    """One coordinator replica. `run()` until `stop` is set."""

    def __init__(self, cfg: CoordinatorConfig) -> None:
        self.cfg = cfg
        self.node_id = cfg.node_id or f"coordinator-{os.getpid()}-{secrets.token_hex(3)}"
        self.clock = SystemClock()
        self.etcd = Etcd(
            cfg.etcd, prefix=f"/agentmesh/{cfg.cluster}/", timeout_s=cfg.etcd_timeout_s
        )
        check_config(cfg)
        # the llm section (limits, budgets, prices): a wrong value stops the process here
        self.llm_cfg = config.load(LlmConfig, section="llm")
        self.servicer = CoordinatorServicer(self.status, cfg)
        self.servicer.health_term = self._health_term
        self.server, self.health = build_server([SERVICE])
        cpb_grpc.add_CoordinatorServicer_to_server(self.servicer, self.server)
        self.port = bind(self.server, cfg.listen)
        self.endpoint = advertised(cfg.listen, self.port, cfg.advertise)
        self.term = 0
        self.stop = asyncio.Event()
        self.failures = 0
        """Sessions or terms in a row that failed or ended within STABLE_TERM_S."""
        self._rng = random.Random()

    async def status(self) -> cpb.ClusterStatus:
        leader = await current_leader(self.etcd, "coordinator")
        all_candidates = await candidates(self.etcd, "coordinator")
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
                cpb.ServiceInstance(kind="coordinator", instance_id=node, endpoint=endpoint)
            )
        core = self.servicer.core
        if core is not None:
            status.agents_connected = len(core.agents)
            status.queue_depth = core.queue_depth()
            for name, count in core.counts().items():
                status.task_counts[name] = count
            core.llm.fill_status(
                status, (e.task for e in core.active.values() if e.task.state == QUEUED)
            )
        return status

    async def run(self) -> None:
        await self.server.start()
        await self.health.set("", SERVING)
        await self.health.set(SERVICE, NOT_SERVING)
        telemetry.start_metrics(self.cfg.metrics_port)
        log.info("coordinator listening", extra={"endpoint": self.endpoint, "node": self.node_id})
        terms = asyncio.ensure_future(self._terms())
        follow = asyncio.ensure_future(self._follow_leader())
        try:
            await self.stop.wait()
        finally:
            terms.cancel()
            follow.cancel()
            for t in (terms, follow):
                with contextlib.suppress(BaseException):
                    await t
            await shutdown(self.server, self.health, self.cfg.grace_s, [self._leave])
            await self.etcd.close()

    async def _leave(self) -> None:
        self.servicer.end_term("")
        with contextlib.suppress(Exception):
            await self._lease.revoke()  # our election key and registration go at once

    async def _follow_leader(self) -> None:
        """Keep `leader_endpoint` current so a standby can point clients at the leader."""
        while True:
            try:
                async for leader in observe(self.etcd, "coordinator"):
                    self.servicer.leader_endpoint = (
                        parse_leader_value(leader.value)[1] if leader else ""
                    )
            except StoreUnavailableError:
                await asyncio.sleep(0.5)

    async def _terms(self) -> None:
        """Campaign, lead until the term ends, campaign again: forever. Sessions that
        keep failing back off (see `_after`) instead of churning terms."""
        self._lease = KeptLease(self.etcd, self.cfg.lease_ttl_s, self.clock)
        while True:
            started = self.clock.monotonic()
            error: BaseException | None = None
            try:
                await self._one_session()
            except (StoreUnavailableError, NotLeaderError) as err:
                error = err
                log.warning("session ended; starting a new one", extra={"error": str(err)})
            except Exception as err:  # a bug must not leave a replica that never campaigns again
                error = err
                log.exception("session failed; starting a new one")
            await self._after(started, error)

    async def _stable_after(self, seconds: float) -> None:
        await self.clock.sleep(seconds)
        if self.failures:
            self.failures = 0
            log.info("this coordinator is healthy again")
            await self.health.set("", SERVING)

    async def _after(self, started: float, error: BaseException | None) -> None:
        """After a session or a term: one that failed, or ended within STABLE_TERM_S,
        counts as a failure. From the third in a row on, the replica says so (NOT_SERVING
        for the Coordinator service and overall: it serves nothing useful) and logs an
        error; each failure waits longer (jittered, doubling, capped) before campaigning
        again, so a load that cannot finish does not churn terms."""
        if error is None and self.clock.monotonic() - started >= STABLE_TERM_S:
            if self.failures:
                self.failures = 0
                await self.health.set("", SERVING)
            return
        self.failures += 1
        ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (self.failures - 1))
        delay = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
        if self.failures >= 3:
            await self.health.set("", NOT_SERVING)
            await self.health.set(SERVICE, NOT_SERVING)
            if self.failures == 3 or self.failures % 10 == 0:
                log.error(
                    "this coordinator keeps failing to lead; backing off",
                    extra={
                        "failures": self.failures,
                        "error": repr(error) if error else "term ended within seconds",
                        "retry_in_s": round(delay, 2),
                    },
                )
        await self.clock.sleep(delay)

    async def _one_session(self) -> None:
        lease = self._lease
        await lease.grant()
        instance = discovery.Instance("coordinator", self.node_id, self.endpoint)
        await discovery.register(self.etcd, lease.id, instance)
        keeper = asyncio.ensure_future(lease.keep_alive())
        try:
            while not lease.lost.is_set():
                # a replica that stays up this long (standby or leader) is healthy again
                stable = asyncio.ensure_future(self._stable_after(STABLE_TERM_S))
                try:
                    election = Election(
                        self.etcd,
                        "coordinator",
                        lease.id,
                        leader_value(self.node_id, self.endpoint),
                    )
                    campaign = asyncio.ensure_future(election.campaign())
                    lost = asyncio.ensure_future(lease.lost.wait())
                    try:
                        await asyncio.wait({campaign, lost}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        # Reaped whatever happens, shutdown included: a campaign left
                        # running fails with NotLeaderError once the lease is revoked, and
                        # asyncio logs "Task exception was never retrieved".
                        await _reap(lost, *(() if campaign.done() else (campaign,)))
                    if campaign.cancelled():
                        return  # the lease was lost before the campaign won
                    term = campaign.result()
                    started = self.clock.monotonic()
                    await self._lead(election, term)  # an error here ends the session instead
                finally:
                    stable.cancel()
                if not lease.lost.is_set():  # else the session ends, and _terms counts it
                    await self._after(started, None)
        finally:
            keeper.cancel()
            with contextlib.suppress(BaseException):
                await keeper
            with contextlib.suppress(Exception):
                await lease.revoke()

    async def _lead(self, election: Election, term: int) -> None:
        cfg = self.cfg
        store = EtcdTaskStore(self.etcd, election, self.clock, cfg.retention_s)
        core = CoordinatorCore(store, self.clock, cfg, term=term, node_id=self.node_id)
        core.subscribers = self.servicer.hub.subscribers
        core.on_progress = self.servicer.hub.progress
        core.llm = LlmGate(self.llm_cfg, self.clock)
        counter = telemetry.watch_core(core)
        started = self.clock.monotonic()
        records, claims, revision = await store.load()
        core.llm.load(await load_costs(self.etcd))
        orphans = core.load(records, claims)
        self.term = term
        self.servicer.core = core
        self.servicer.leader_endpoint = self.endpoint
        await self.health.set(SERVICE, SERVING)
        await self.health.set("", SERVING)  # serving again, even if recent terms failed
        telemetry.IS_LEADER.set(1)
        log.info(
            "elected root coordinator",
            extra={
                "term": term,
                "active_tasks": len(core.active),
                "orphaned_claims": len(orphans),
                "load_ms": round((self.clock.monotonic() - started) * 1000, 1),
            },
        )
        core.requeue_orphans(orphans)
        # the health monitor's ejections apply before the first dispatch (if etcd is
        # slow, dispatch starts anyway and they apply as soon as they are read)
        admitted = asyncio.Event()
        follow_health = asyncio.ensure_future(self._follow_admissions(core, admitted))
        try:
            await asyncio.wait_for(admitted.wait(), 2.0)
        except TimeoutError:
            pass
        except BaseException:
            follow_health.cancel()
            raise
        # agents reconnect within a second or two; what none reclaimed by then is requeued
        expiry = asyncio.get_running_loop().call_later(
            2 * cfg.lease_ttl_s + 1, core.expire_awaiting
        )
        jobs = [
            asyncio.ensure_future(core.run()),
            asyncio.ensure_future(self._watch_claims(core, store, revision + 1)),
            asyncio.ensure_future(election.wait_lost()),
            asyncio.ensure_future(self._lease.lost.wait()),
            follow_health,
            asyncio.ensure_future(core.reconcile_loop()),
            asyncio.ensure_future(flush_costs(self.etcd, core.llm, election.fenced_request)),
        ]
        try:
            done, _ = await asyncio.wait(jobs, return_when=asyncio.FIRST_COMPLETED)
            names = (
                "dispatch",
                "claims watch",
                "election key watch",
                "lease",
                "health records",
                "reconcile",
                "llm costs",
            )
            for job in done:
                why = (
                    "finished"
                    if job.cancelled() or job.exception() is None
                    else repr(job.exception())
                )
                log.warning(
                    "term ended", extra={"term": term, "by": names[jobs.index(job)], "why": why}
                )
        finally:
            log.info("stepping down", extra={"term": term})
            await self.health.set(SERVICE, NOT_SERVING)
            telemetry.IS_LEADER.set(0)
            core.deposed = core.deposed or NotLeaderError("term ended")
            core.subscribers.discard(counter)
            expiry.cancel()
            self.servicer.end_term("")
            if self.servicer.leader_endpoint == self.endpoint:
                self.servicer.leader_endpoint = ""  # no longer us; the observer fills it in
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            await core.close()
            self.term = 0
            with contextlib.suppress(Exception):
                await election.resign()

    async def _follow_admissions(self, core: CoordinatorCore, ready: asyncio.Event) -> None:
        """Keep the core's admissions equal to the health monitor's records."""
        while True:
            try:
                async for snapshot, limits in admissions(self.etcd):
                    if snapshot:
                        for agent_id in set(core.admission) - set(limits):
                            core.admit(agent_id, -1)
                    for agent_id, limit in limits.items():
                        core.admit(agent_id, limit)
                    ready.set()
            except StoreUnavailableError:
                await asyncio.sleep(0.5)

    async def _health_term(self) -> int:
        """The active health monitor's term now (0: none), read from etcd."""
        leader = await current_leader(self.etcd, "health")
        return leader.term if leader else 0

    async def _watch_claims(
        self, core: CoordinatorCore, store: EtcdTaskStore, start_revision: int
    ) -> None:
        async for task_id, token in store.claim_deletions(start_revision):
            core.claim_lost(task_id, token)


async def _reap(*tasks: asyncio.Future[Any]) -> None:
    """Cancel `tasks`, wait until they are done and retrieve their exceptions."""
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()


async def serve(cfg: CoordinatorConfig) -> None:
    node = CoordinatorNode(cfg)
    stop = stop_event()
    runner = asyncio.ensure_future(node.run())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({runner, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    node.stop.set()
    await runner
