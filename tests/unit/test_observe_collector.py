"""The collector's loops over a scripted fake cluster and a fake clock (no sockets): the
events stream follows a standby's pointer to the leader, counts an idle stream as
connected, backs off between failures, and the polls fall back to etcd's registry
without waiting on leader-only reads when no coordinator answers."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence
from typing import Any

import grpc

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.clock import FakeClock
from services._common.errors import LEADER_METADATA_KEY
from services.observe.collector import Collector, Intervals
from services.observe.model import SwarmModel

S = tpb.TaskState
IDLE = object()


def unavailable(details: str, leader: str = "") -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata((LEADER_METADATA_KEY, leader)) if leader else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), trailing, details)


class FakeCall:
    """A WatchEvents call that plays a script: events, an error, EOF, or idles."""

    def __init__(self, script: Sequence[Any] = ()) -> None:
        self.script = list(script)
        self.cancelled = False

    async def read(self) -> Any:
        if not self.script or self.script[0] is IDLE:
            await asyncio.Event().wait()  # an idle leader sends nothing
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeReader:
    coordinator = ""

    def __init__(self, calls: Sequence[FakeCall] = ()) -> None:
        self.calls = list(calls)
        self.opened: list[str] = []
        self.status_error: BaseException | None = None
        self.leader_only_reads = 0

    def open_events(self, endpoint: str) -> FakeCall:
        self.opened.append(endpoint)
        return self.calls.pop(0) if self.calls else FakeCall([unavailable("down")])

    async def status(self) -> cpb.ClusterStatus:
        if self.status_error is not None:
            raise self.status_error
        return cpb.ClusterStatus(leader_id="c1", leader_endpoint="A:1", term=3)

    async def agents(self) -> list[cpb.AgentStatus]:
        self.leader_only_reads += 1
        return []

    async def list_tasks(self, **_: Any) -> cpb.ListTasksResponse:
        self.leader_only_reads += 1
        return cpb.ListTasksResponse()

    async def registry(self) -> tuple[list[dict[str, Any]], tuple[str, str, int] | None]:
        return [{"kind": "coordinator", "id": "c2", "endpoint": "B:2"}], ("c2", "B:2", 9)


class NoChecks:
    async def check(self, endpoints: Sequence[str]) -> dict[str, str]:
        return {e: "SERVING" for e in endpoints}

    async def close(self) -> None:
        pass


def make(reader: FakeReader, clock: FakeClock) -> tuple[Collector, SwarmModel]:
    model = SwarmModel(clock)
    model.apply_status(cpb.ClusterStatus(leader_id="c1", leader_endpoint="A:1", term=3))
    collector = Collector(
        reader,  # type: ignore[arg-type]
        model,
        clock,
        intervals=Intervals(backoff_min_s=0.2, backoff_max_s=5.0, stream_up_after_s=1.0),
        checker=NoChecks(),  # type: ignore[arg-type]
        rng=random.Random(1),
    )
    return collector, model


def done(task_id: str) -> tpb.TaskEvent:
    return tpb.TaskEvent(
        task=tpb.Task(task_id=task_id, state=S.TASK_STATE_SUCCEEDED, agent_id="a1"),
        previous_state=S.TASK_STATE_RUNNING,
    )


async def run_for(
    collector: Collector, clock: FakeClock, seconds: float, step: float = 0.05
) -> None:
    job = asyncio.ensure_future(collector.follow_events())
    try:
        for _ in range(round(seconds / step)):
            await clock.advance(step)
    finally:
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job


async def test_a_standbys_pointer_sends_the_stream_to_the_leader() -> None:
    clock = FakeClock()
    reader = FakeReader(
        [FakeCall([unavailable("standby", leader="B:2")]), FakeCall([done("t1"), done("t2"), IDLE])]
    )
    collector, model = make(reader, clock)
    await run_for(collector, clock, 2.0)
    assert reader.opened == ["A:1", "B:2"]
    assert model.seen["SUCCEEDED"] == 2
    assert model.stream == "connected"
    assert model.gaps == 0  # it was never up before the refusal


async def test_an_idle_stream_counts_as_connected_only_after_a_while() -> None:
    clock = FakeClock()
    reader = FakeReader([FakeCall([IDLE])])
    collector, model = make(reader, clock)
    job = asyncio.ensure_future(collector.follow_events())
    try:
        await clock.advance(0)  # the call opens now
        await clock.advance(0.5)
        assert model.stream == "connecting"
        await clock.advance(0.6)
        assert model.stream == "connected"
    finally:
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
    assert reader.calls == []


async def test_a_broken_stream_is_a_gap_and_reconnects() -> None:
    clock = FakeClock()
    reader = FakeReader(
        [
            FakeCall([done("t1"), grpc.aio.EOF]),
            FakeCall([done("t2"), IDLE]),
        ]
    )
    collector, model = make(reader, clock)
    await run_for(collector, clock, 1.0)
    assert reader.opened == ["A:1", "A:1"]
    assert model.seen["SUCCEEDED"] == 2
    assert model.gaps == 1
    assert model.stream == "connected"


async def test_failures_back_off_instead_of_spinning() -> None:
    clock = FakeClock()
    reader = FakeReader()  # every call fails at once
    collector, model = make(reader, clock)
    await run_for(collector, clock, 20.0)
    # jittered 0.1-0.2, 0.2-0.4, ... capped at 2.5-5 s: a handful of tries in 20 s
    assert 5 <= len(reader.opened) <= 12
    assert model.stream == "reconnecting"
    assert model.errors["events"][0] == "UNAVAILABLE: down"


async def test_without_a_leader_the_polls_read_etcd_and_skip_leader_only_reads() -> None:
    clock = FakeClock()
    reader = FakeReader()
    collector, model = make(reader, clock)
    reader.status_error = unavailable("no coordinator leader is elected yet")
    await collector.poll_once()
    assert reader.leader_only_reads == 0
    snap = model.snapshot()
    assert snap["source"]["services_from"] == "etcd"
    assert (snap["leader"]["id"], snap["leader"]["endpoint"], snap["leader"]["term"]) == (
        "c2",
        "B:2",
        9,
    )
    assert snap["services"][0]["health"] == "SERVING"
    assert snap["source"]["errors"]["status"]["message"].startswith("UNAVAILABLE")
    # the stream goes where etcd says the leader is
    assert collector.leader_endpoint() == "B:2"
    reader.status_error = None
    await collector.poll_once()
    assert reader.leader_only_reads == 3  # agents, the queue sample, the held tasks
