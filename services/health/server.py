"""Health monitor process: the Runner, one elected active monitor, its term's loops.

The active monitor's term runs three loops next to the servicer: a ticker (the core's
timers), the actuator (actions.py: carries out what the core orders) and the record
writer (store.py: `health/<agent>`, fenced by the term). Standbys follow the leader
and answer UNAVAILABLE with its address.
"""

from __future__ import annotations

import asyncio
import logging

from protos.agentmesh.v1 import health_pb2 as hpb
from protos.agentmesh.v1 import health_pb2_grpc as hpb_grpc
from registry import discovery
from registry.errors import StoreUnavailableError
from registry.etcd import WatchCompactedError
from registry.leadership import Term
from services._common import heap
from services._common.clock import Clock
from services._common.follow import RETRY_S, Leader, leading
from services._common.runner import Runner
from services.health import metrics
from services.health.actions import Actuator
from services.health.config import HealthConfig
from services.health.core import HealthCore
from services.health.servicer import HealthServicer
from services.health.store import read_records, write_records

log = logging.getLogger(__name__)

SERVICE = hpb.DESCRIPTOR.services_by_name["HealthMonitor"].full_name
ROLE = "health"


class HealthMonitorNode:
    """One monitor replica: `await node.run()` until SIGTERM (or `node.runner.stop()`)."""

    def __init__(self, cfg: HealthConfig, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.runner = runner = Runner(ROLE, cfg, [SERVICE], clock=clock)
        self.clock, self.etcd, self.endpoint = runner.clock, runner.etcd, runner.endpoint
        self.servicer = HealthServicer()
        hpb_grpc.add_HealthMonitorServicer_to_server(self.servicer, runner.server)
        self.leader = Leader(self.etcd, ROLE, self.clock, servicer=self.servicer)
        self.actuator = Actuator(self.etcd, self.clock)
        self.core: HealthCore | None = None
        self._stopping = False

    async def run(self) -> None:
        leadership = self.runner.leadership()
        jobs = (self.leader.follow, self.actuator.follow_pools, self.actuator.coordinator.follow)
        try:
            await self.runner.run(lambda: leadership.serve(self._lead), *jobs, drain=self._drain)
        finally:
            await self.actuator.close()
            await self.leader.close()

    async def _lead(self, term: Term) -> None:
        if self._stopping:
            await asyncio.Event().wait()  # won again while shutting down: hold, decide nothing
        started = self.clock.monotonic()
        records = await read_records(self.etcd)
        since = await self._revision()
        agents = await discovery.resolve_agents(self.etcd)
        node_id = self.runner.node_id
        core = HealthCore(
            self.cfg, self.clock, term=term.number, node_id=node_id, endpoint=self.endpoint
        )
        core.load(records, [(a.agent_id, a.pool_id) for a in agents])
        core.set_pools(self.actuator.pools.values())
        core.subscribers = self.servicer.subscribers
        self.core = self.servicer.core = self.actuator.core = core
        load_ms = round((self.clock.monotonic() - started) * 1000, 1)
        extra = {"term": term.number, "records": len(records), "registered_agents": len(agents)}
        stored, flush = {r.agent_id for r in records}, asyncio.Event()
        try:
            with metrics.active(core):
                async with leading(self.runner, self.leader), asyncio.TaskGroup() as group:
                    log.info("active health monitor", extra={**extra, "load_ms": load_ms})
                    group.create_task(self._tick(core), name="tick")
                    registrations = self._follow_registrations(core, since)
                    group.create_task(registrations, name="registrations")
                    group.create_task(self.actuator.run(core, term, flush, group), name="act")
                    write = write_records(self.etcd, self.clock, core, term.fenced, flush, stored)
                    group.create_task(write, name="flush")
        finally:
            self.core = self.actuator.core = None
            self.servicer.end_term()
            log.info("health monitor term over", extra={"term": term.number})

    async def _tick(self, core: HealthCore) -> None:
        blind_s = core.blind_s
        while not self._stopping:
            await self.clock.sleep(self.cfg.tick_s)
            core.tick()
            if core.blind_s > blind_s:
                log.warning(
                    "the health monitor did not run for a while (stopped, or its event loop "
                    "blocked); that time is not counted against any agent",
                    extra={"term": core.term, "blind_s": round(core.blind_s - blind_s, 2)},
                )
                blind_s = core.blind_s

    async def _revision(self) -> int:
        resp = await self.etcd.range(self.etcd.key("agents") + b"/", limit=1, keys_only=True)
        return int(resp.header.revision)

    async def _follow_registrations(self, core: HealthCore, since: int) -> None:
        """Tell the core which agents are registered in etcd (agents/<id>) as they come
        and go, from revision `since` on: only those are replaced through the AgentPool
        API. etcd away: the watch resumes; history compacted: list again."""
        prefix = self.etcd.key("agents") + b"/"
        while True:
            try:
                async for _, events in self.etcd.watch_forever(
                    prefix, prefix=True, start_revision=since + 1
                ):
                    ids = [
                        (e.kind, e.kv.key[len(prefix) :].decode(errors="replace")) for e in events
                    ]
                    core.registered(
                        [a for kind, a in ids if kind == "put"],
                        [a for kind, a in ids if kind != "put"],
                    )
            except WatchCompactedError:
                try:
                    since = await self._revision()
                    core.registered(a.agent_id for a in await discovery.resolve_agents(self.etcd))
                except StoreUnavailableError:
                    await self.clock.sleep(RETRY_S)
            except StoreUnavailableError:
                await self.clock.sleep(RETRY_S)
            except Exception:  # noqa: BLE001 - a follower that stops would end the term
                log.warning("following agent registrations failed; again", exc_info=True)
                await self.clock.sleep(RETRY_S)

    async def _drain(self) -> None:
        """Stop judging (streams are about to close because this process stops, not
        because agents failed) and close the streams, so they move to the next monitor."""
        self._stopping = True
        self.servicer.end_term()


async def serve(cfg: HealthConfig) -> None:
    node = HealthMonitorNode(cfg)
    heap.settle()  # startup's objects stay out of every collection
    await node.run()
