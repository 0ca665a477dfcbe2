"""The health monitor over real gRPC: an in-process coordinator, agent pool and two monitor
replicas (one active) on port 0, against one real etcd, with short thresholds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from protos.agentmesh.v1 import agent_pool_pb2 as ppb
from protos.agentmesh.v1 import agent_pool_pb2_grpc as ppb_grpc
from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc
from protos.agentmesh.v1 import health_pb2 as hpb
from protos.agentmesh.v1 import health_pb2_grpc as hpb_grpc
from protos.agentmesh.v1 import task_pb2 as tpb
from registry.etcd_server import EtcdServer
from services._common.errors import LEADER_METADATA_KEY
from services.agent_pool.config import PoolConfig
from services.agent_pool.server import PoolNode
from services.client import MeshClient
from services.coordinator.config import CoordinatorConfig
from services.coordinator.server import CoordinatorNode
from services.health.client import HealthClient
from services.health.config import HealthConfig
from services.health.core import Replace
from services.health.server import HealthMonitorNode

S = tpb.TaskState
HANG_S = 20.0
KINDS = ("echo", "sleep", "noop", "fail", "hang")


async def within(awaitable: Any, timeout_s: float = HANG_S) -> Any:
    return await asyncio.wait_for(awaitable, timeout_s)


async def until(check: Callable[[], Awaitable[Any]], timeout_s: float = HANG_S) -> Any:
    async with asyncio.timeout(timeout_s):
        while True:
            got = await check()
            if got:
                return got
            await asyncio.sleep(0.05)


@dataclass
class Mesh:
    coordinator: CoordinatorNode
    pool_node: PoolNode
    monitors: list[HealthMonitorNode]
    pool: ppb_grpc.AgentPoolStub
    coord: cpb_grpc.CoordinatorStub

    def active(self) -> HealthMonitorNode:
        (active,) = [m for m in self.monitors if m.core is not None]
        return active


@contextlib.asynccontextmanager
async def running(start: Any, stop: Any, ready: Any) -> AsyncIterator[None]:
    runner = asyncio.ensure_future(start())
    try:
        async with asyncio.timeout(HANG_S):
            while not ready():
                if runner.done():
                    runner.result()
                await asyncio.sleep(0.01)
        yield
    finally:
        stop()
        await within(runner, 30)


MeshFactory = Callable[..., Any]


@pytest.fixture
async def make_mesh(etcd_server: EtcdServer) -> AsyncIterator[MeshFactory]:
    stack = contextlib.AsyncExitStack()

    async def make(flaky_agents: int = 0, **health: Any) -> Mesh:
        cluster = f"test-{uuid.uuid4().hex}"
        common: dict[str, Any] = dict(
            etcd=etcd_server.endpoint, cluster=cluster, listen="127.0.0.1:0"
        )
        coordinator = CoordinatorNode(
            CoordinatorConfig(**common, grace_s=1.0, task_kinds=KINDS, retry_base_s=0.05)
        )
        pool_node = PoolNode(
            PoolConfig(
                **common,
                sleep_ms="fixed:1",
                grace_s=2.0,
                kinds=KINDS,
                heartbeat_interval_s=0.2,
                flaky_agents=flaky_agents,
            )
        )
        thresholds: dict[str, Any] = dict(
            heartbeat_interval_s=0.2,
            degraded_after_s=1.0,
            critical_after_s=2.0,
            failed_after_s=3.0,
            reconnect_grace_s=1.5,
            takeover_grace_s=1.0,
            stall_limit_s=1.0,
            cancel_grace_s=1.0,
            ejection_base_s=1.0,
            grace_s=1.0,
        )
        thresholds.update(health)
        monitors = [
            HealthMonitorNode(HealthConfig(**common, node_id=f"h{i}", **thresholds))
            for i in range(2)
        ]
        await stack.enter_async_context(
            running(coordinator.run, coordinator.runner.stop, lambda: coordinator.servicer.core)
        )
        for m in monitors:
            await stack.enter_async_context(running(m.run, m.runner.stop, lambda: True))
        await stack.enter_async_context(
            running(pool_node.run, pool_node.runner.stop, lambda: pool_node.runner.session.id)
        )
        pool_channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(pool_node.endpoint)
        )
        coord_channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(coordinator.endpoint)
        )
        mesh = Mesh(
            coordinator,
            pool_node,
            monitors,
            ppb_grpc.AgentPoolStub(pool_channel),
            cpb_grpc.CoordinatorStub(coord_channel),
        )
        await until(lambda: _true(any(m.core is not None for m in monitors)))
        return mesh

    try:
        yield make
    finally:
        await stack.aclose()


async def _true(value: bool) -> bool:
    return value


async def spawn(mesh: Mesh, count: int) -> list[str]:
    resp = await within(mesh.pool.SpawnAgents(ppb.SpawnAgentsRequest(count=count)))
    return [a.agent_id for a in resp.agents]


async def summary(mesh: Mesh) -> hpb.HealthSummary:
    async with HealthClient(monitor=mesh.active().endpoint) as hc:
        return await hc.summary()


async def test_every_agent_reports_and_a_standby_points_to_the_active_monitor(
    make_mesh: MeshFactory,
) -> None:
    mesh = await make_mesh()
    ids = await spawn(mesh, 3)

    async def reporting() -> bool:
        s = await summary(mesh)
        return s.reporting == 3 and s.state_counts["HEALTHY"] == 3

    await until(reporting)
    active = mesh.active()
    async with HealthClient(monitor=active.endpoint) as hc:
        one = await hc.get(ids[0])
        assert one.pool_id == mesh.pool_node.pool_id
        assert one.info.capacity == 1
        assert "hang" in one.info.kinds
        assert one.connected
        assert one.rss_bytes > 0
        assert [a.agent_id async for a in hc.agents()] == sorted(ids)
    standby = next(m for m in mesh.monitors if m is not active)
    async with grpc.aio.insecure_channel(standby.endpoint) as channel:
        stub = hpb_grpc.HealthMonitorStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetHealthSummary(hpb.GetHealthSummaryRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (LEADER_METADATA_KEY, active.endpoint) in tuple(err.value.trailing_metadata())
    # the client follows the standby's pointer
    async with HealthClient(monitor=standby.endpoint) as hc:
        assert (await hc.summary()).monitor_id == active.runner.node_id


async def test_the_live_status_and_dashboard_feed_reads_the_active_monitor(
    make_mesh: MeshFactory,
) -> None:
    from services._common.clock import SystemClock
    from services.health.feed import HealthFeed
    from services.observe.model import SwarmModel

    mesh = await make_mesh()
    ids = await spawn(mesh, 2)
    await until(lambda: _true_async(summary(mesh), lambda s: s.reporting == 2))
    standby = next(m for m in mesh.monitors if m is not mesh.active())
    model = SwarmModel(SystemClock(), cluster="c")
    # any registered monitor will do: a standby points to the active one
    await HealthFeed().read([{"kind": "health", "endpoint": standby.endpoint}], model)
    section = model.sections["health"]
    assert section["status"] == "ok"
    assert section["data"]["state_counts"]["HEALTHY"] == 2
    assert set(model.agent_health) == set(ids)
    assert model.agent_health[ids[0]]["state"] == "HEALTHY"
    assert model.alerts == []


async def _true_async(coro: Any, check: Callable[[Any], bool]) -> bool:
    return check(await coro)


async def test_a_hung_task_is_released_and_finishes_on_another_agent(
    make_mesh: MeshFactory,
) -> None:
    mesh = await make_mesh()
    await spawn(mesh, 3)
    async with HealthClient(monitor=mesh.active().endpoint) as hc:
        events: list[hpb.HealthEvent] = []

        async def watch() -> None:
            async for e in hc.watch():
                events.append(e)

        watcher = asyncio.ensure_future(watch())
        try:
            async with MeshClient(coordinator=mesh.coordinator.endpoint) as client:
                sub = await client.submit(
                    tpb.TaskSpec(kind="hang", payload=json.dumps({"attempts": 1}).encode())
                )
                task_id = sub.task.task_id

                async def finished() -> tpb.Task | None:
                    t = await client.get(task_id)
                    return t if t.state == S.TASK_STATE_SUCCEEDED else None

                done = await until(finished)
            assert done.attempts == 2
            assert b'"fault": "hang"' in done.result
            assert "released by the health monitor" in done.last_error
            hung = [e.alert for e in events if e.WhichOneof("body") == "alert"]
            assert hung
            assert hung[0].kind == hpb.ALERT_KIND_HUNG_TASK
            assert hung[0].task_id == task_id
            assert hung[0].agent_id != done.agent_id  # it finished elsewhere
            releases = [
                e.recovery
                for e in events
                if e.WhichOneof("body") == "recovery"
                and e.recovery.kind == hpb.RECOVERY_KIND_RELEASE
            ]
            assert releases
            assert list(releases[0].task_ids) == [task_id]

            async def closed() -> bool:  # the coordinator's cancel stopped the executor
                return not (await hc.summary()).open_alert_count

            await until(closed)
        finally:
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await watcher


async def test_a_release_whose_reply_was_lost_still_counts_the_hang(
    make_mesh: MeshFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the coordinator applies the release, its reply is lost (a deadline, a reset): the
    # retry finds the claim gone, like one that moved on by itself; the monitor reads
    # the task back instead of deciding that the agent did not hang
    mesh = await make_mesh()
    await spawn(mesh, 3)
    monitor = mesh.active()
    actuator = monitor.actuator
    real_call = actuator._call_coordinator
    calls: list[cpb.ReleaseClaimsResponse] = []

    async def reply_lost_once(request: cpb.ReleaseClaimsRequest) -> Any:
        resp = await real_call(request)
        calls.append(resp)
        if len(calls) == 1:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                "reply lost (test)",
            )
        return resp

    monkeypatch.setattr(actuator, "_call_coordinator", reply_lost_once)
    async with MeshClient(coordinator=mesh.coordinator.endpoint) as client:
        sub = await client.submit(
            tpb.TaskSpec(kind="hang", payload=json.dumps({"attempts": 1}).encode())
        )
        task_id = sub.task.task_id

        async def finished() -> tpb.Task | None:
            t = await client.get(task_id)
            return t if t.state == S.TASK_STATE_SUCCEEDED else None

        done = await until(finished)

        async def retried() -> bool:
            return len(calls) == 2

        # the task runs elsewhere once the first call requeued it, which can be before
        # the retry's randomised back-off (up to 0.5 s) is over
        await until(retried)
    assert done.attempts == 2
    assert [len(r.released) for r in calls] == [1, 0]  # applied, then skipped on the retry

    async def counted() -> bool:
        return (await summary(mesh)).hung_released == 1

    await until(counted, timeout_s=5.0)  # after the read-back of the skipped task
    core = monitor.core
    assert core is not None
    assert sum(v.hung_tasks for v in core.agents.values()) == 1


async def test_a_flaky_agent_is_ejected_and_let_back_in_half_open(
    make_mesh: MeshFactory,
) -> None:
    mesh = await make_mesh(flaky_agents=1, ejection_base_s=2.0)
    ids = await spawn(mesh, 4)
    flaky = ids[0]
    assert flaky in mesh.pool_node.core.flaky

    async def all_reporting() -> bool:
        return (await summary(mesh)).reporting == 4

    # At most half of the agents the monitor knows may be ejected: were the flaky agent's
    # failures to reach it before the others' streams, it would be alone and kept in.
    await until(all_reporting)

    async def admission() -> str:
        resp = await mesh.coord.ListAgents(cpb.ListAgentsRequest(), timeout=5)
        return next(a.health_admission for a in resp.agents if a.agent_id == flaky)

    async with MeshClient(coordinator=mesh.coordinator.endpoint) as client:
        specs = [tpb.TaskSpec(kind="sleep", max_attempts=10) for _ in range(40)]
        sub = await client.submit_batch(specs)
        ids_submitted = [r.task.task_id for r in sub.results]

        async def ejected() -> bool:
            return await admission() == "none"

        await until(ejected)
        async with HealthClient(monitor=mesh.active().endpoint) as hc:
            health = await hc.get(flaky)
            assert health.breaker == hpb.BREAKER_STATE_OPEN
            assert "failures in a row" in health.reason

        async def half_open() -> bool:
            return await admission() == "one"

        await until(half_open)

        async def all_succeeded() -> bool:
            tasks = [await client.get(t) for t in ids_submitted]
            return all(t.state == S.TASK_STATE_SUCCEEDED for t in tasks)

        await until(all_succeeded)
        tasks = [await client.get(t) for t in ids_submitted]
        assert all(t.agent_id != flaky for t in tasks)


async def test_an_agent_replaced_on_a_directive_reports_whom_it_replaces(
    make_mesh: MeshFactory,
) -> None:
    # the `replace` directive (a released task its executor does not stop): the pool
    # starts a fresh agent that says whom it replaces, so the monitor links the two
    # (the line's failures, hence the escalation after max_replacements, carry over)
    mesh = await make_mesh()
    (old,) = await spawn(mesh, 1)
    core = mesh.active().core
    assert core is not None
    await until(lambda: _true(old in core.agents and core.agents[old].heard))
    core._order_replacement(core.agents[old], core._now(), "its executor does not stop")

    async def successor() -> str:
        return next((a for a in mesh.pool_node.core.agents if a != old), "")

    new = await until(successor)
    await until(lambda: _true(new in core.agents and core.agents[new].heard))
    async with HealthClient(monitor=mesh.active().endpoint) as hc:
        got = await hc.get(new)
    assert got.replaces == old
    assert got.info.replaces == old


async def test_a_replacement_ordered_again_starts_one_agent(make_mesh: MeshFactory) -> None:
    # a FAILED agent's replacement order went out and its outcome is unknown (a deadline,
    # or the monitor failed over and the next one orders it again): sent twice, it
    # must start one agent, which the monitor links to the agent it replaces
    mesh = await make_mesh()
    (old,) = await spawn(mesh, 1)
    monitor = mesh.active()
    core = monitor.core
    assert core is not None
    await until(lambda: _true(old in core.agents and core.agents[old].heard))
    pool = mesh.pool_node
    order = Replace(
        old, pool.pool_id, pool.endpoint, own_pool=True, info=core.agents[old].info, reason="t"
    )
    await within(monitor.actuator.replace(core, order))
    await within(monitor.actuator.replace(core, order))
    (new,) = pool.core.agents
    assert new != old
    await until(lambda: _true(new in core.agents and core.agents[new].heard))
    assert core.agents[new].replaces == old


async def test_report_streams_under_made_up_ids_make_no_pool_start_agents(
    make_mesh: MeshFactory,
) -> None:
    # anyone can open a Report stream: one per made-up id, then gone, used to make a
    # pool start a real agent for each (FAILED after reconnect_grace_s, "replaced")
    mesh = await make_mesh()
    (real,) = await spawn(mesh, 1)
    monitor = mesh.active()
    core = monitor.core
    assert core is not None
    await until(lambda: _true(real in core.agents and core.agents[real].heard))
    async with grpc.aio.insecure_channel(monitor.endpoint) as channel:
        for i in range(3):
            call = hpb_grpc.HealthMonitorStub(channel).Report()
            info = hpb.AgentInfo(pool_id="", capacity=1, kinds=["echo"])
            await call.write(hpb.Heartbeat(agent_id=f"ghost-{i}", sent_at_us=1, info=info))
            await within(call.read())
            call.cancel()
    ghosts = [f"ghost-{i}" for i in range(3)]
    await until(lambda: _true(all(core.agents[g].state == hpb.HEALTH_STATE_FAILED for g in ghosts)))
    await asyncio.sleep(0.5)  # what a replacement takes here, many times over
    assert list(mesh.pool_node.core.agents) == [real]
    assert not any(core.agents[g].replaced_by for g in ghosts)


async def test_a_heartbeat_over_a_limit_ends_the_stream_naming_the_field(
    make_mesh: MeshFactory,
) -> None:
    mesh = await make_mesh()
    async with grpc.aio.insecure_channel(mesh.active().endpoint) as channel:
        call = hpb_grpc.HealthMonitorStub(channel).Report()
        await call.write(
            hpb.Heartbeat(
                agent_id="hand-1", sent_at_us=1, info=hpb.AgentInfo(capacity=1, kinds=["x"])
            )
        )
        first = await within(call.read())
        assert first.WhichOneof("body") == "welcome"
        await call.write(
            hpb.Heartbeat(
                agent_id="hand-1",
                sent_at_us=2,
                outcomes=[hpb.TaskOutcome(task_id="t")] * 65,
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await within(_read_to_end(call))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "outcomes" in (err.value.details() or "")


async def test_a_stream_is_one_agents(make_mesh: MeshFactory) -> None:
    mesh = await make_mesh()
    async with grpc.aio.insecure_channel(mesh.active().endpoint) as channel:
        call = hpb_grpc.HealthMonitorStub(channel).Report()
        info = hpb.AgentInfo(capacity=1, kinds=["x"])
        await call.write(hpb.Heartbeat(agent_id="hand-1", sent_at_us=1, info=info))
        await call.write(hpb.Heartbeat(agent_id="hand-2", sent_at_us=2))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await within(_read_to_end(call))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "one stream per agent" in (err.value.details() or "")


async def test_a_live_agents_id_from_another_process_is_already_exists(
    make_mesh: MeshFactory,
) -> None:
    # an impostor (or a second pool started with a copied --pool-id) reporting under a
    # real agent's id: refused, and the real agent keeps its stream and its health
    mesh = await make_mesh()
    (real,) = await spawn(mesh, 1)
    core = mesh.active().core
    assert core is not None
    await until(lambda: _true(real in core.agents and core.agents[real].heard))
    view = core.agents[real]
    stream, incarnation = view.stream, view.info.incarnation
    async with grpc.aio.insecure_channel(mesh.active().endpoint) as channel:
        call = hpb_grpc.HealthMonitorStub(channel).Report()
        info = hpb.AgentInfo(pool_id="pool-x", incarnation="impostor", capacity=1, kinds=["x"])
        await call.write(hpb.Heartbeat(agent_id=real, sent_at_us=1, info=info, leaving=True))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await within(_read_to_end(call))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert f"{real!r} reports already" in (err.value.details() or "")
    assert core.agents.get(real) is view, "the impostor's leaving made the monitor forget it"
    assert view.stream == stream
    assert view.send is not None
    assert view.info.incarnation == incarnation
    async with HealthClient(monitor=mesh.active().endpoint) as hc:
        got = await hc.get(real)
    assert got.connected
    assert got.pool_id == mesh.pool_node.pool_id


async def _read_to_end(call: Any) -> None:
    while await call.read() is not grpc.aio.EOF:
        pass


async def test_release_claims_needs_the_active_monitors_term(make_mesh: MeshFactory) -> None:
    mesh = await make_mesh()
    term = mesh.active().core.term  # type: ignore[union-attr]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.coord.ReleaseClaims(
            cpb.ReleaseClaimsRequest(agent_id="a", health_term=term - 1), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    resp = await mesh.coord.ReleaseClaims(
        cpb.ReleaseClaimsRequest(agent_id="a", health_term=term), timeout=5
    )
    assert not resp.released
