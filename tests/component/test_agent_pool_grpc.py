"""The AgentPool service over real gRPC: an in-process PoolNode whose agents stream to an
in-process CoordinatorNode, both on port 0 and one real etcd."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from protos.agentmesh.v1 import agent_pool_pb2 as ppb
from protos.agentmesh.v1 import agent_pool_pb2_grpc as ppb_grpc
from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc
from protos.agentmesh.v1 import task_pb2 as tpb
from registry import discovery
from registry.etcd import Etcd
from registry.etcd_server import EtcdServer
from services._common.errors import AlreadyExistsError, StoreUnavailableError
from services.agent_pool.config import PoolConfig
from services.agent_pool.server import PoolNode
from services.client import MeshClient
from services.coordinator import limits
from services.coordinator.config import CoordinatorConfig
from services.coordinator.server import CoordinatorNode

# Bounds that only catch a hang: each awaited step normally takes milliseconds.
HANG_S = 20.0


async def within(awaitable: Any, timeout_s: float = HANG_S) -> Any:
    return await asyncio.wait_for(awaitable, timeout_s)


async def until(check: Any, timeout_s: float = HANG_S) -> None:
    """Wait for a condition that another process-like component brings about."""
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.02)


@dataclass
class Mesh:
    coordinator: CoordinatorNode
    pool_node: PoolNode
    pool: ppb_grpc.AgentPoolStub
    coord: cpb_grpc.CoordinatorStub


@contextlib.asynccontextmanager
async def running(node: Any, ready: Any, stop: Any = None) -> AsyncIterator[None]:
    runner = asyncio.ensure_future(node.run())
    try:
        async with asyncio.timeout(HANG_S):
            while not ready():
                if runner.done():
                    runner.result()  # surfaces why the node died
                await asyncio.sleep(0.01)
        yield
    finally:
        (stop or node.runner.stop)()
        await within(runner, 30)


@pytest.fixture
async def mesh(etcd_server: EtcdServer) -> AsyncIterator[Mesh]:
    cluster = f"test-{uuid.uuid4().hex}"
    coordinator = CoordinatorNode(
        CoordinatorConfig(
            etcd=etcd_server.endpoint, cluster=cluster, listen="127.0.0.1:0", grace_s=1.0
        )
    )
    pool_node = PoolNode(
        PoolConfig(
            etcd=etcd_server.endpoint,
            cluster=cluster,
            listen="127.0.0.1:0",
            sleep_ms="fixed:1",
            grace_s=2.0,
        )
    )
    async with (
        running(coordinator, lambda: coordinator.servicer.core is not None),
        running(pool_node, lambda: pool_node.runner.session.id, pool_node.runner.stop),
        grpc.aio.insecure_channel(pool_node.endpoint) as pool_channel,
        grpc.aio.insecure_channel(coordinator.endpoint) as coord_channel,
    ):
        yield Mesh(
            coordinator,
            pool_node,
            ppb_grpc.AgentPoolStub(pool_channel),
            cpb_grpc.CoordinatorStub(coord_channel),
        )


async def coordinator_agents(mesh: Mesh) -> dict[str, cpb.AgentStatus]:
    resp = await within(mesh.coord.ListAgents(cpb.ListAgentsRequest()))
    return {a.agent_id: a for a in resp.agents}


async def test_spawn_in_batches_makes_every_agent_ready(mesh: Mesh) -> None:
    resp = await within(mesh.pool.SpawnAgents(ppb.SpawnAgentsRequest(count=20, batch_size=5)))
    assert len(resp.agents) == 20
    assert len({a.agent_id for a in resp.agents}) == 20
    assert all(a.state == ppb.AGENT_STATE_READY for a in resp.agents)
    assert all(a.spawn_ms > 0 for a in resp.agents)
    assert all(a.pool_id == mesh.pool_node.pool_id for a in resp.agents)
    assert resp.elapsed_s > 0
    seen = await coordinator_agents(mesh)
    assert {a.agent_id for a in resp.agents} <= set(seen)
    assert all(seen[a.agent_id].pool_id == mesh.pool_node.pool_id for a in resp.agents)
    listed = await within(mesh.pool.ListAgents(ppb.ListPoolAgentsRequest()))
    assert len(listed.agents) == 20


async def test_spawn_with_a_template(mesh: Mesh) -> None:
    template = ppb.AgentTemplate(
        roles=["reviewer"], labels={"team": "x"}, kinds=["echo"], capacity=3
    )
    resp = await within(mesh.pool.SpawnAgents(ppb.SpawnAgentsRequest(count=2, template=template)))
    seen = await coordinator_agents(mesh)
    for agent in resp.agents:
        status = seen[agent.agent_id]
        assert (list(status.roles), dict(status.labels), list(status.kinds), status.capacity) == (
            ["reviewer"],
            {"team": "x"},
            ["echo"],
            3,
        )


async def test_spawn_waves_streams_progress_per_wave(mesh: Mesh) -> None:
    call = mesh.pool.SpawnWaves(ppb.SpawnWavesRequest(count=7, wave_size=3, wave_interval_s=0.01))
    progress = [p async for p in call]
    assert [p.wave for p in progress] == [1, 2, 3]
    assert [p.started for p in progress] == [3, 6, 7]
    assert [p.ready for p in progress] == [3, 6, 7]
    assert all(p.failed == 0 for p in progress)
    assert [p.elapsed_s for p in progress] == sorted(p.elapsed_s for p in progress)
    assert len(await coordinator_agents(mesh)) == 7


async def test_stop_agents_gracefully(mesh: Mesh) -> None:
    resp = await within(mesh.pool.SpawnAgents(ppb.SpawnAgentsRequest(count=4)))
    ids = [a.agent_id for a in resp.agents]
    stopped = await within(
        mesh.pool.StopAgents(ppb.StopAgentsRequest(agent_ids=ids[:2], graceful=True))
    )
    assert list(stopped.stopped) == ids[:2]

    async def gone() -> bool:
        return set(await coordinator_agents(mesh)) == set(ids[2:])

    await until(gone)
    listed = await within(mesh.pool.ListAgents(ppb.ListPoolAgentsRequest()))
    assert sorted(a.agent_id for a in listed.agents) == sorted(ids[2:])
    by_count = await within(mesh.pool.StopAgents(ppb.StopAgentsRequest(count=1, graceful=False)))
    assert list(by_count.stopped) == [ids[3]]


async def test_a_stopped_agent_leaves_no_voting_key_behind(mesh: Mesh) -> None:
    resp = await within(mesh.pool.SpawnAgents(ppb.SpawnAgentsRequest(count=2)))
    victim, other = (a.agent_id for a in resp.agents)
    node = mesh.pool_node
    etcd = node.runner.etcd
    assert await etcd.get(etcd.key("keys", victim)) is not None
    await within(mesh.pool.StopAgents(ppb.StopAgentsRequest(agent_ids=[victim])))
    # it stayed in keys/ (and its private key in the pool's memory) while the lease lived:
    # one more for every agent stopped or replaced
    assert await etcd.get(etcd.key("keys", victim)) is None
    assert victim not in node.voters.keys
    assert await etcd.get(etcd.key("keys", other)) is not None


async def test_a_graceful_stop_whose_caller_gave_up_still_lets_the_held_task_finish(
    mesh: Mesh,
) -> None:
    await within(mesh.pool.SpawnAgents(ppb.SpawnAgentsRequest(count=2)))
    core = mesh.pool_node.core
    async with MeshClient(coordinator=mesh.coordinator.endpoint) as client:
        # 1.2 s of work: under the pool's 2 s grace, longer than the caller's deadline
        sub = await within(client.submit(tpb.TaskSpec(kind="sleep", payload=b'{"ms": 1200}')))
        task_id = sub.task.task_id

        async def held() -> bool:
            return any(task_id in a.running for a in core.agents.values())

        await until(held)
        (victim,) = [a.agent_id for a in core.agents.values() if task_id in a.running]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.pool.StopAgents(
                ppb.StopAgentsRequest(agent_ids=[victim], graceful=True), timeout=0.3
            )
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        events = [e async for e in client.watch_task(task_id)]
    done = events[-1].task
    assert done.state == tpb.TASK_STATE_SUCCEEDED
    # cut short, the stop killed the task, which ran again on the other agent
    assert (done.agent_id, done.attempts) == (victim, 1)

    async def stopped() -> bool:
        return victim not in core.agents

    await until(stopped, 5.0)


async def test_agents_of_a_spawn_whose_deadline_passed_mid_registration_are_published(
    mesh: Mesh,
) -> None:
    node = mesh.pool_node
    registry = node.core.registry
    register = registry.register

    async def slow_etcd(agents: Any) -> None:
        await asyncio.sleep(0.5)  # the caller's deadline passes while this is under way
        await register(agents)

    registry.register = slow_etcd  # type: ignore[method-assign]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.pool.SpawnAgents(ppb.SpawnAgentsRequest(count=3), timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    ids = sorted(node.core.agents)
    assert len(ids) == 3  # they run (and take tasks) whatever the caller saw
    etcd = node.runner.etcd

    async def published() -> bool:
        records = {r.agent_id for r in await discovery.resolve_agents(etcd)}
        keys = [await etcd.get(etcd.key("keys", a)) for a in ids]
        return (
            records == set(ids)
            and all(k is not None for k in keys)
            and set(node.voters.tasks) == set(ids)
        )

    # cut short, they stayed out of agents/ and keys/ and never opened a vote stream
    await until(published, 5.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda pool: pool.SpawnAgents(ppb.SpawnAgentsRequest(count=0)),
        lambda pool: pool.SpawnAgents(ppb.SpawnAgentsRequest(count=10_001)),
        lambda pool: pool.SpawnAgents(
            ppb.SpawnAgentsRequest(count=1, template=ppb.AgentTemplate(kinds=["llm-x"]))
        ),
        lambda pool: pool.SpawnAgents(ppb.SpawnAgentsRequest(count=2, replaces="a-1")),
        lambda pool: pool.SpawnAgents(ppb.SpawnAgentsRequest(count=1, replaces="a 1")),
        lambda pool: pool.StopAgents(ppb.StopAgentsRequest()),
        lambda pool: pool.StopAgents(ppb.StopAgentsRequest(agent_ids=["not-mine"])),
        lambda pool: pool.ListAgents(ppb.ListPoolAgentsRequest(page_size=10_001)),
        lambda pool: pool.ListAgents(ppb.ListPoolAgentsRequest(page_token="x" * 129)),
    ],
    ids=[
        "count-0",
        "count-too-big",
        "unknown-kind",
        "replaces-with-count-2",
        "replaces-not-an-id",
        "stop-nothing",
        "stop-unknown",
        "list-page-size-too-big",
        "list-page-token-too-long",
    ],
)
async def test_bad_pool_requests_are_invalid_argument(mesh: Mesh, call: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await within(call(mesh.pool))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Traceback" not in (err.value.details() or "")


async def test_agents_spawned_during_an_etcd_blip_are_published_once_it_is_over(
    mesh: Mesh,
) -> None:
    node = mesh.pool_node
    etcd = node.runner.etcd
    lease = node.runner.session.id
    txn = etcd.txn
    loop = asyncio.get_running_loop()
    back_at = loop.time() + 1.0  # shorter than the lease's TTL: the pool keeps its lease

    async def blip(*args: Any, **kwargs: Any) -> Any:
        if loop.time() < back_at:
            raise StoreUnavailableError("etcd is unreachable (injected blip)")
        return await txn(*args, **kwargs)

    etcd.txn = blip  # type: ignore[method-assign]
    resp = await within(mesh.pool.SpawnAgents(ppb.SpawnAgentsRequest(count=2)))
    ids = {a.agent_id for a in resp.agents}

    async def published() -> bool:
        records = {r.agent_id for r in await discovery.resolve_agents(etcd)}
        keys = [await etcd.get(etcd.key("keys", a)) for a in ids]
        return records == ids and all(k is not None for k in keys)

    # given up after one try, they stayed out of agents/ and keys/ while the lease lived
    await until(published, 5.0)
    assert node.runner.session.id == lease


def largest_template() -> ppb.AgentTemplate:
    return ppb.AgentTemplate(
        roles=[f"r{i:03d}".ljust(limits.ROLE_BYTES, "x") for i in range(limits.ROLES_ITEMS)],
        labels={
            f"k{i:03d}".ljust(limits.LABEL_KEY_BYTES, "x"): "v" * limits.LABEL_VALUE_BYTES
            for i in range(limits.LABELS_ENTRIES)
        },
    )


async def test_agents_of_the_largest_template_are_spawned_and_listed_within_reply_limits(
    mesh: Mesh,
) -> None:
    big = largest_template()
    # 300 such agents make a 4.4 MB reply: the caller's gRPC refused it (RESOURCE_EXHAUSTED)
    # after all 300 had started, so a retry started 300 more
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await within(mesh.pool.SpawnAgents(ppb.SpawnAgentsRequest(count=300, template=big)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "count 1-212" in (err.value.details() or "")
    assert not mesh.pool_node.core.agents
    ids = []
    for count in (212, 88):
        resp = await within(
            mesh.pool.SpawnAgents(ppb.SpawnAgentsRequest(count=count, template=big))
        )
        ids += [a.agent_id for a in resp.agents]
    assert len(set(ids)) == 300
    # ListAgents pages by size: one answer of them all was refused the same way
    listed: list[str] = []
    pages = 0
    page = ppb.ListPoolAgentsRequest()
    while True:
        resp = await within(mesh.pool.ListAgents(page))
        pages += 1
        assert resp.ByteSize() <= limits.LIST_PAGE_BYTES + 1024
        listed += [a.agent_id for a in resp.agents]
        if not resp.next_page_token:
            break
        page.page_token = resp.next_page_token
    assert pages == 2
    assert sorted(listed) == sorted(ids)
    counted = await within(mesh.pool.ListAgents(ppb.ListPoolAgentsRequest(page_size=7)))
    assert [a.agent_id for a in counted.agents] == sorted(ids)[:7]
    assert counted.next_page_token == sorted(ids)[6]


async def test_spawn_waves_with_count_0_is_invalid_argument(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in mesh.pool.SpawnWaves(ppb.SpawnWavesRequest(count=0)):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "count" in (err.value.details() or "")


async def test_echo_tasks_through_the_client_all_succeed(mesh: Mesh) -> None:
    await within(mesh.pool.SpawnAgents(ppb.SpawnAgentsRequest(count=5, batch_size=5)))
    payloads = [f"payload-{i}".encode() for i in range(40)]
    async with MeshClient(coordinator=mesh.coordinator.endpoint) as client:
        resp = await client.submit_batch([tpb.TaskSpec(kind="echo", payload=p) for p in payloads])
        ids = [r.task.task_id for r in resp.results]
        assert all(r.created for r in resp.results)

        async def all_done() -> bool:
            tasks = [await client.get(tid) for tid in ids]
            return all(t.state == tpb.TASK_STATE_SUCCEEDED for t in tasks)

        await until(all_done)
        for tid, payload in zip(ids, payloads, strict=True):
            task = await client.get(tid)
            assert task.result == payload
            assert task.attempts == 1
        status = await client.status()
        assert status.task_counts["SUCCEEDED"] == 40
    listed = await within(mesh.pool.ListAgents(ppb.ListPoolAgentsRequest()))
    assert sum(a.completed for a in listed.agents) == 40


async def test_sleep_tasks_report_simulated_work(mesh: Mesh) -> None:
    await within(mesh.pool.SpawnAgents(ppb.SpawnAgentsRequest(count=2)))
    async with MeshClient(coordinator=mesh.coordinator.endpoint) as client:
        sub = await client.submit(tpb.TaskSpec(kind="sleep"))
        events = [e async for e in client.watch_task(sub.task.task_id)]
        last = events[-1].task
        assert last.state == tpb.TASK_STATE_SUCCEEDED
        assert b'"simulated": true' in last.result


async def test_a_second_pool_with_a_live_pools_id_is_refused_at_start(
    mesh: Mesh, etcd_server: EtcdServer
) -> None:
    # issue 8, item 3: two pools with one id hand out the same agent ids; the second
    # would orphan the first one's agents (or never connect its own)
    first = mesh.pool_node
    twin = PoolNode(
        PoolConfig(
            etcd=etcd_server.endpoint,
            cluster=first.cfg.cluster,
            listen="127.0.0.1:0",
            pool_id=first.pool_id,
        )
    )
    with pytest.raises(AlreadyExistsError, match=f"{first.pool_id!r} is in use by a live pool"):
        await within(twin.run())
    assert first.runner.session.id != 0
    status = await within(mesh.coord.GetStatus(cpb.GetStatusRequest()))
    pools = [s for s in status.services if s.kind == "agent-pool"]
    assert [(p.instance_id, p.endpoint) for p in pools] == [(first.pool_id, first.endpoint)]


async def test_a_pool_restarted_after_a_crash_takes_its_id_back(etcd_server: EtcdServer) -> None:
    # the crashed pool's registration lives until its lease expires: the new process
    # waits for that instead of refusing
    cluster = f"test-{uuid.uuid4().hex}"
    etcd = Etcd(etcd_server.endpoint, prefix=f"/agentmesh/{cluster}/")
    try:
        dead = await etcd.grant(2)  # never refreshed: the crashed process's lease
        await discovery.register(
            etcd, dead, discovery.Instance("agent-pool", "pool-x", "127.0.0.1:1")
        )
        node = PoolNode(
            PoolConfig(
                etcd=etcd_server.endpoint, cluster=cluster, listen="127.0.0.1:0", pool_id="pool-x"
            )
        )
        async with running(node, lambda: node.runner.session.id, node.runner.stop):

            async def registered() -> bool:
                found = await discovery.resolve(etcd, "agent-pool")
                return [i.endpoint for i in found] == [node.endpoint]

            await until(registered)
    finally:
        await etcd.close()


async def test_a_lost_pool_lease_is_replaced_and_every_agent_rejoins_on_the_new_one(
    mesh: Mesh,
) -> None:
    resp = await within(mesh.pool.SpawnAgents(ppb.SpawnAgentsRequest(count=3)))
    ids = sorted(a.agent_id for a in resp.agents)
    runner = mesh.pool_node.runner
    etcd = runner.etcd
    before = {a: s.connected_at_us for a, s in (await coordinator_agents(mesh)).items()}
    old = runner.session.id
    # etcd forgets the pool (as after a long partition): every key and claim on it goes
    await etcd.revoke(old)

    async def rejoined() -> bool:
        lease = runner.session.id
        if lease == old:
            return False
        records = await discovery.resolve_agents(etcd)
        if sorted(r.agent_id for r in records) != ids:
            return False
        held = [await etcd.get(discovery.agent_key(etcd, a)) for a in ids]
        if {int(kv.lease) for kv in held if kv is not None} != {lease}:
            return False
        now = await coordinator_agents(mesh)
        # each agent connected again, so its hello carries the new lease
        return all(a in now and now[a].connected_at_us > before[a] for a in ids)

    await until(rejoined)
    records = await discovery.resolve_agents(etcd)
    assert {r.pool_id for r in records} == {mesh.pool_node.pool_id}
    (pool,) = await discovery.resolve(etcd, "agent-pool")
    assert (pool.instance_id, pool.metadata) == (mesh.pool_node.pool_id, {"agents": "3"})
    async with MeshClient(coordinator=mesh.coordinator.endpoint) as client:
        sub = await client.submit(tpb.TaskSpec(kind="echo", payload=b"after"))
        events = [e async for e in client.watch_task(sub.task.task_id)]
        assert events[-1].task.state == tpb.TASK_STATE_SUCCEEDED
