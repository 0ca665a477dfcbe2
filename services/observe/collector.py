"""Reads the cluster into a SwarmModel: the events stream, periodic GetStatus and
ListAgents, a bounded queue sample, grpc.health.v1 checks of every registered service,
and feeds for optional services (none on this branch yet; see `SectionFeed`).

Read-only by construction: the observers get a `MeshReader`, which has no method that
writes. Every call has a deadline; a failed reading becomes an error in the snapshot
and the loop goes on, so the view shows an outage instead of dying of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc
from protos.agentmesh.v1 import task_pb2 as tpb
from registry.etcd import Etcd
from services._common.clock import Clock
from services._common.errors import StoreUnavailableError
from services._common.follow import named_leader
from services.client import MeshClient
from services.observe.model import ASSIGNED, QUEUED, RUNNING, SwarmModel

log = logging.getLogger(__name__)

# What a reading may fail with when the cluster is in trouble (not a bug of ours).
READ_ERRORS = (grpc.aio.AioRpcError, StoreUnavailableError, OSError, TimeoutError)
# ListTasks calls one listing may take (each reads at most 1,280 records on the leader):
# DEAD_LETTER or held tasks behind ~10,000 others still show, at a bounded cost a poll
LIST_CALLS = 8


def describe(err: BaseException) -> str:
    """An error as one line for people."""
    if isinstance(err, grpc.aio.AioRpcError):
        details = (err.details() or "").splitlines()
        return f"{err.code().name}: {details[0] if details else ''}".rstrip(": ")
    return f"{type(err).__name__}: {err}".rstrip(": ")


class EventCall(Protocol):
    """The part of a grpc.aio server-streaming call the collector uses."""

    async def read(self) -> Any: ...

    def cancel(self) -> bool: ...


class MeshReader:
    """The read-only face of the cluster: GetStatus, ListAgents, ListTasks, GetTask,
    WatchEvents, and nothing that writes (the dashboard and the live view get only this).

    Args:
        etcd: etcd endpoints (the leader and the registry are looked up there).
        coordinator: a coordinator address, used when etcd is not given.
        cluster: the cluster name.
        timeout_s: deadline of each unary call.
        retry_s: how long a unary call follows redirects and retries UNAVAILABLE.
    """

    def __init__(
        self,
        etcd: str | None = None,
        coordinator: str | None = None,
        cluster: str = "default",
        timeout_s: float = 3.0,
        retry_s: float = 2.0,
    ) -> None:
        self._client = MeshClient(
            etcd=etcd,
            coordinator=coordinator,
            cluster=cluster,
            timeout_s=timeout_s,
            retry_s=retry_s,
        )
        self.etcd_endpoints = etcd
        self.coordinator = coordinator or ""
        self.cluster = cluster
        self.timeout_s = timeout_s
        self._etcd: Etcd | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def close(self) -> None:
        await self._client.close()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        if self._etcd is not None:
            await self._etcd.close()

    async def __aenter__(self) -> MeshReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def status(self) -> cpb.ClusterStatus:
        return await self._client.status()

    async def agents(self) -> Sequence[cpb.AgentStatus]:
        return list((await self._client.agents()).agents)

    async def list_tasks(
        self,
        states: Sequence[int] = (),
        kind: str = "",
        agent_id: str = "",
        page_size: int = 100,
        page_token: str = "",
    ) -> cpb.ListTasksResponse:
        # a page of a sparse filter can be empty with more to read: follow it a few calls
        return await self._client.list_filled(
            states=states,
            kind=kind,
            agent_id=agent_id,
            page_size=page_size,
            page_token=page_token,
            max_calls=LIST_CALLS,
        )

    async def get(self, task_id: str) -> tpb.Task:
        return await self._client.get(task_id)

    def open_events(self, endpoint: str) -> EventCall:
        """One WatchEvents call on `endpoint` (the leader). The caller reconnects, so it
        sees every break in the stream (a gap in what it saw)."""
        channel = self._channels.get(endpoint)
        if channel is None:
            for old in list(self._channels):  # one leader at a time: drop the old channel
                asyncio.ensure_future(self._channels.pop(old).close(grace=0.5))
            channel = self._channels[endpoint] = grpc.aio.insecure_channel(endpoint)
        call: EventCall = cpb_grpc.CoordinatorStub(channel).WatchEvents(cpb.WatchEventsRequest())
        return call

    async def registry(self) -> tuple[list[dict[str, Any]], tuple[str, str, int] | None]:
        """Registered services and the coordinator leader (id, endpoint, term), read from
        etcd directly: what the view shows when no coordinator answers."""
        from registry import discovery
        from registry.election import current_leader
        from registry.leadership import parse_leader_value

        if not self.etcd_endpoints:
            raise StoreUnavailableError("no etcd endpoints given (--coordinator mode)")
        if self._etcd is None:
            self._etcd = Etcd(
                self.etcd_endpoints, prefix=f"/agentmesh/{self.cluster}/", timeout_s=2.0
            )
        instances = await discovery.resolve(self._etcd)
        leader = await current_leader(self._etcd, "coordinator")
        found = None
        if leader is not None:
            node, endpoint = parse_leader_value(leader.value)
            found = (node, endpoint, leader.term)
        services = [
            {"kind": i.kind, "id": i.instance_id, "endpoint": i.endpoint, "metadata": i.metadata}
            for i in instances
        ]
        return services, found


class HealthChecker:
    """grpc.health.v1 Check("") of many endpoints at once, one channel kept per endpoint."""

    def __init__(self, timeout_s: float = 1.0) -> None:
        self.timeout_s = timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def check(self, endpoints: Sequence[str]) -> dict[str, str]:
        wanted = set(endpoints)
        for endpoint in [e for e in self._channels if e not in wanted]:
            await self._channels.pop(endpoint).close()
        results = await asyncio.gather(*(self._one(e) for e in sorted(wanted)))
        return dict(zip(sorted(wanted), results, strict=True))

    async def _one(self, endpoint: str) -> str:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = self._channels[endpoint] = grpc.aio.insecure_channel(endpoint)
        try:
            resp = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as err:
            return f"UNREACHABLE ({err.code().name})"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


class SectionFeed(Protocol):
    """Reads one optional service (the health monitor, consensus) into the model with
    `model.apply_section(kind, ...)`; called only while instances of `kind` are
    registered. A feed for the health monitor fills agent health and alerts."""

    kind: str

    async def read(self, instances: Sequence[Mapping[str, Any]], model: SwarmModel) -> None: ...


@dataclass(frozen=True, kw_only=True)
class Intervals:
    """How often each reading is taken, and how large the bounded ones are."""

    status_s: float = 1.0
    """GetStatus and ListAgents."""
    health_s: float = 5.0
    """grpc.health.v1 checks of every registered service."""
    queue_s: float = 5.0
    """The queue-by-priority sample."""
    sections_s: float = 5.0
    queue_page: int = 500
    """Queued tasks read per sample (one ListTasks page; the leader scans at most 20
    store pages of this size to fill it)."""
    held_page: int = 1000
    """Held tasks read once per (re)connection, so agents show what they run."""
    backoff_min_s: float = 0.2
    backoff_max_s: float = 5.0
    stream_up_after_s: float = 1.0
    """A WatchEvents call that has not failed this long counts as connected (an idle
    leader sends nothing, not even headers)."""


class Collector:
    """Keeps a SwarmModel current. `await poll_once()` for one reading of everything
    but the events; `await run()` to follow the cluster until cancelled.

    Args:
        reader: the read-only cluster client.
        model: the model it fills.
        clock: time for the loops (a fake clock in tests).
        intervals: how often and how much.
        feeds: readers of optional services, by kind.
        rng: jitter for reconnects.
    """

    def __init__(
        self,
        reader: MeshReader,
        model: SwarmModel,
        clock: Clock,
        *,
        intervals: Intervals | None = None,
        feeds: Sequence[SectionFeed] = (),
        checker: HealthChecker | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.reader = reader
        self.model = model
        self.clock = clock
        self.intervals = intervals or Intervals()
        self.feeds = list(feeds)
        self.checker = checker or HealthChecker()
        self.rng = rng or random.Random()
        self._pointed = ""  # a leader named by a standby's refusal
        self._seeded_term = -1

    async def close(self) -> None:
        await self.checker.close()

    # ------------------------------------------------------------ readings

    async def read_status(self) -> bool:
        """GetStatus (etcd's registry when it fails); whether a coordinator answered."""
        model = self.model
        try:
            model.apply_status(await self.reader.status())
        except READ_ERRORS as err:
            model.error("status", describe(err))
            await self._from_registry()
            return False
        return True

    async def _from_registry(self) -> None:
        """No coordinator answered: show what etcd says (services, leader)."""
        try:
            services, leader = await self.reader.registry()
        except (*READ_ERRORS, ValueError) as err:
            self.model.error("registry", describe(err))
            return
        self.model.ok("registry")
        self.model.apply_services(services, source="etcd")
        if leader is not None:
            self.model.apply_leader(*leader)

    async def read_agents(self) -> None:
        try:
            self.model.apply_agents(await self.reader.agents())
        except READ_ERRORS as err:
            self.model.error("agents", describe(err))

    async def read_queue(self) -> None:
        try:
            resp = await self.reader.list_tasks(
                states=[QUEUED], page_size=self.intervals.queue_page
            )
        except READ_ERRORS as err:
            self.model.error("queue", describe(err))
            return
        self.model.apply_queue_sample(resp.tasks, complete=not resp.next_page_token)

    async def read_health(self) -> None:
        endpoints = [s["endpoint"] for s in self.model.services if s["endpoint"]]
        self.model.apply_service_health(await self.checker.check(endpoints))

    async def read_sections(self) -> None:
        for feed in self.feeds:
            instances = [s for s in self.model.services if s["kind"] == feed.kind]
            if not instances:
                continue
            try:
                await feed.read(instances, self.model)
            except READ_ERRORS as err:
                self.model.apply_section(feed.kind, status="unavailable", message=describe(err))

    async def seed_held(self) -> None:
        """Once per leader term: the tasks agents held before the stream started."""
        term = self.model.term
        if term == self._seeded_term:
            return
        try:
            resp = await self.reader.list_tasks(
                states=[ASSIGNED, RUNNING], page_size=self.intervals.held_page
            )
        except READ_ERRORS as err:
            self.model.error("held", describe(err))
            return
        self.model.ok("held")
        self.model.seed_held(resp.tasks)
        self._seeded_term = term

    async def poll_once(self) -> None:
        """One reading of everything but the events stream."""
        # the leader-only reads would each wait out their retries when none answers
        if await self.read_status():
            await self.read_agents()
            await self.read_queue()
            await self.seed_held()
        await self.read_health()
        await self.read_sections()

    # ------------------------------------------------------------ loops

    async def run(self) -> None:
        """Follow the cluster until cancelled (the events stream and the polls)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.follow_events())
            group.create_task(self.poll_forever())

    async def poll_forever(self) -> None:
        iv = self.intervals
        due = {"health": 0.0, "queue": 0.0, "sections": 0.0}
        while True:
            now = self.clock.monotonic()
            if await self.read_status():
                await self.read_agents()
                await self.seed_held()
                if now >= due["queue"]:
                    await self.read_queue()
                    due["queue"] = now + iv.queue_s
            if now >= due["health"]:
                await self.read_health()
                due["health"] = now + iv.health_s
            if now >= due["sections"]:
                await self.read_sections()
                due["sections"] = now + iv.sections_s
            await self.clock.sleep(iv.status_s)

    def leader_endpoint(self) -> str:
        """Where to open the events stream: a standby's pointer, the leader GetStatus or
        etcd named, or the fixed coordinator address."""
        status = self.model.status
        known = status.leader_endpoint if status is not None else ""
        return self._pointed or known or self.reader.coordinator

    async def follow_events(self) -> None:
        """WatchEvents on the leader, reconnected with jittered backoff after every break
        (each break is a gap in what the model saw)."""
        iv = self.intervals
        backoff = iv.backoff_min_s
        while True:
            endpoint = self.leader_endpoint()
            if not endpoint:
                self.model.stream_down("no coordinator leader is known yet")
            else:
                lasted = await self._stream(endpoint)
                if lasted >= 5 * iv.stream_up_after_s:
                    backoff = iv.backoff_min_s
            await self.clock.sleep(self.rng.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, iv.backoff_max_s)

    async def _stream(self, endpoint: str) -> float:
        """One call until it breaks; returns how long it lasted in seconds."""
        started = self.clock.monotonic()
        self.model.stream_opened()
        call = self.reader.open_events(endpoint)
        pending: asyncio.Future[Any] = asyncio.ensure_future(call.read())
        up = False
        try:
            while True:
                if not up:
                    # an idle leader sends nothing: no failure for a while means connected
                    timer = asyncio.ensure_future(
                        self.clock.sleep(self.intervals.stream_up_after_s)
                    )
                    try:
                        await asyncio.wait({pending, timer}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        timer.cancel()
                    if not pending.done():
                        up = True
                        self.model.stream_up()
                        continue
                event = await pending
                if event is grpc.aio.EOF:
                    self.model.stream_down("the leader ended the events stream")
                    break
                if not up:
                    up = True
                    self.model.stream_up()
                self._pointed = ""
                self.model.apply_event(event)
                pending = asyncio.ensure_future(call.read())
        except grpc.aio.AioRpcError as err:
            # a standby's refusal names the leader; any other break: ask GetStatus again
            self._pointed = named_leader(err)
            self.model.stream_down(describe(err))
        finally:
            pending.cancel()
            call.cancel()
            with contextlib.suppress(BaseException):
                await pending
        return self.clock.monotonic() - started
