"""Issue 8, one regression test per item (item 3, agent identity, lives with connect):
in-process coordinator and agent pool on port 0, a real etcd, real gRPC over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.agentmesh.v1 import agent_pool_pb2 as ppb
from protos.agentmesh.v1 import agent_pool_pb2_grpc as ppb_grpc
from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc
from protos.agentmesh.v1 import task_pb2 as tpb
from registry import discovery
from registry.errors import StoreRefusedError
from registry.etcd import Etcd
from registry.etcd_server import EtcdServer
from services._common import grpcserver
from services.agent_pool.config import PoolConfig
from services.agent_pool.server import PoolNode
from services.coordinator import limits
from services.coordinator.config import CoordinatorConfig
from services.coordinator.port import Write
from services.coordinator.server import SERVICE, CoordinatorNode
from services.coordinator.store import EtcdTaskStore

S = tpb.TaskState
KiB, MiB = 1024, 1024 * 1024
HANG_S = 20.0  # only catches a hang: each step normally takes milliseconds
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def within(awaitable: Any, timeout_s: float = HANG_S) -> Any:
    return await asyncio.wait_for(awaitable, timeout_s)


async def until(check: Any, timeout_s: float = HANG_S) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.02)


async def error_of(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await within(call)
    return err.value


@contextlib.asynccontextmanager
async def running(node: Any, ready: Any, stop: Any = None) -> AsyncIterator[None]:
    runner = asyncio.ensure_future(node.run())
    try:
        async with asyncio.timeout(HANG_S):
            while not ready():
                if runner.done():
                    runner.result()
                await asyncio.sleep(0.01)
        yield
    finally:
        (stop or node.runner.stop)()
        await within(runner, 30)


@dataclass
class Mesh:
    node: CoordinatorNode
    stub: cpb_grpc.CoordinatorStub
    channel: grpc.aio.Channel
    pool_node: PoolNode | None = None
    pool: ppb_grpc.AgentPoolStub | None = None


# a client that accepts what a default client would not: large pages (to see their size)
BIG = [("grpc.max_receive_message_length", 64 * MiB), ("grpc.max_send_message_length", 64 * MiB)]


@contextlib.asynccontextmanager
async def mesh_of(etcd_endpoint: str, pool: bool = False) -> AsyncIterator[Mesh]:
    cluster = f"test-{uuid.uuid4().hex}"
    node = CoordinatorNode(
        CoordinatorConfig(etcd=etcd_endpoint, cluster=cluster, listen="127.0.0.1:0", grace_s=1.0)
    )
    async with (
        running(node, lambda: node.servicer.core is not None),
        grpc.aio.insecure_channel(node.endpoint, options=BIG) as channel,
    ):
        mesh = Mesh(node, cpb_grpc.CoordinatorStub(channel), channel)
        if not pool:
            yield mesh
            return
        pool_node = PoolNode(
            PoolConfig(
                etcd=etcd_endpoint,
                cluster=cluster,
                listen="127.0.0.1:0",
                sleep_ms="fixed:1",
                grace_s=1.0,
            )
        )
        async with (
            running(pool_node, lambda: pool_node.runner.session.id, pool_node.runner.stop),
            grpc.aio.insecure_channel(pool_node.endpoint) as pool_channel,
        ):
            mesh.pool_node = pool_node
            mesh.pool = ppb_grpc.AgentPoolStub(pool_channel)
            yield mesh


@pytest.fixture
async def mesh(etcd_server: EtcdServer) -> AsyncIterator[Mesh]:
    async with mesh_of(etcd_server.endpoint) as m:
        yield m


@pytest.fixture
async def pooled(etcd_server: EtcdServer) -> AsyncIterator[Mesh]:
    async with mesh_of(etcd_server.endpoint, pool=True) as m:
        yield m


@pytest.fixture
async def lease(etcd: Etcd) -> AsyncIterator[int]:
    lease_id = await etcd.grant(30)
    try:
        yield lease_id
    finally:
        await etcd.revoke(lease_id)


class RawAgent:
    """An agent written by hand on Coordinator.Connect."""

    def __init__(self, stub: cpb_grpc.CoordinatorStub) -> None:
        self.call = stub.Connect()

    async def hello(self, agent_id: str, lease_id: int, **fields: Any) -> Any:
        fields.setdefault("kinds", ["echo"])
        fields.setdefault("capacity", 1)
        hello = cpb.AgentHello(agent_id=agent_id, pool_id="hand", lease_id=lease_id, **fields)
        await within(self.call.write(cpb.AgentMessage(hello=hello)))
        return await self.expect("welcome")

    async def send(self, **body: Any) -> None:
        await within(self.call.write(cpb.AgentMessage(**body)))

    async def expect(self, body: str) -> Any:
        msg = await within(self.call.read())
        assert msg is not grpc.aio.EOF, f"stream ended while waiting for {body}"
        assert msg.WhichOneof("body") == body, msg
        return getattr(msg, body)


@contextlib.asynccontextmanager
async def raw_agent(stub: cpb_grpc.CoordinatorStub) -> AsyncIterator[RawAgent]:
    agent = RawAgent(stub)
    try:
        yield agent
    finally:
        agent.call.cancel()


def assert_names(err: grpc.aio.AioRpcError, *parts: str) -> None:
    details = err.details() or ""
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), details[:200])
    for part in parts:
        assert part in details, details[:300]
    assert len(details) < 400  # names the field and the limit; never echoes the input


# ---------------------------------------------------------------- 1. one write, others' fate


@pytest.mark.parametrize(
    ("request_", "names"),
    [
        (tpb.TaskSpec(kind="echo", role="r" * 3 * MiB), ("spec.role", "128 bytes")),
        (tpb.TaskSpec(kind="echo", required_labels={"l": "v" * 3 * MiB}), ("required_labels",)),
        (tpb.TaskSpec(kind="echo", metadata={"m": "v" * 3 * MiB}), ("spec.metadata['m']",)),
    ],
    ids=["role", "label", "metadata"],
)
async def test_1_an_oversized_field_is_refused_naming_it(
    mesh: Mesh, request_: tpb.TaskSpec, names: tuple[str, ...]
) -> None:
    err = await error_of(mesh.stub.Submit(cpb.SubmitRequest(spec=request_)))
    assert_names(err, *names)


async def test_1_an_oversized_cancel_reason_is_refused(mesh: Mesh) -> None:
    sub = await within(mesh.stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo"))))
    err = await error_of(
        mesh.stub.CancelTask(cpb.CancelTaskRequest(task_id=sub.task.task_id, reason="x" * 3 * MiB))
    )
    assert_names(err, "reason", "1024 bytes")
    task = await within(mesh.stub.GetTask(cpb.GetTaskRequest(task_id=sub.task.task_id)))
    assert task.state == S.TASK_STATE_QUEUED


async def test_1_eight_clients_of_near_limit_tasks_all_succeed(mesh: Mesh) -> None:
    """Before: packed by count, 300 KiB tasks shared over-sized transactions and 27 of 80
    submits got INTERNAL."""

    async def client(n: int) -> list[bool]:
        async with grpc.aio.insecure_channel(mesh.node.endpoint) as ch:
            stub = cpb_grpc.CoordinatorStub(ch)
            return [
                (
                    await within(
                        stub.Submit(
                            cpb.SubmitRequest(
                                spec=tpb.TaskSpec(kind="echo", payload=bytes([n]) * 300 * KiB)
                            )
                        )
                    )
                ).created
                for _ in range(10)
            ]

    results = await asyncio.gather(*(client(n) for n in range(8)))
    assert [r for rs in results for r in rs] == [True] * 80
    batch = [tpb.TaskSpec(kind="echo", payload=b"b" * 200 * KiB) for _ in range(10)]
    resp = await within(mesh.stub.SubmitBatch(cpb.SubmitBatchRequest(specs=batch)))
    assert [r.created for r in resp.results] == [True] * 10


async def test_1_the_same_task_id_from_two_clients_at_once_is_one_task(mesh: Mesh) -> None:
    """Before: writes of one id queued together went into one transaction, which etcd
    refused whole ("duplicate key"), failing them and every other write in it (INTERNAL)."""

    def batch(prefix: str) -> cpb.SubmitBatchRequest:
        return cpb.SubmitBatchRequest(
            specs=[tpb.TaskSpec(kind="echo", task_id=f"{prefix}-{i}") for i in range(50)]
        )

    # busy transactions first, so the two batches of the same ids queue up together
    calls = [mesh.stub.SubmitBatch(batch(f"filler-{n}")) for n in range(6)]
    calls += [mesh.stub.SubmitBatch(batch("same")) for _ in range(4)]
    resps = await within(asyncio.gather(*calls))
    created = [r.created for resp in resps for r in resp.results]
    assert created.count(True) == 6 * 50 + 50
    same = [r.task.task_id for resp in resps[6:] for r in resp.results]
    assert sorted(set(same)) == sorted(f"same-{i}" for i in range(50))


async def test_1_the_largest_payload_echoed_back_finishes(mesh: Mesh, lease: int) -> None:
    """Before: an 800 KiB echo (under the 1 MiB payload limit) never finished: payload plus
    result went past etcd's limit and the agent was never told."""
    payload = b"p" * mesh.node.cfg.max_payload_bytes
    async with raw_agent(mesh.stub) as agent:
        await agent.hello("echoer", lease)
        sub = await within(
            mesh.stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo", payload=payload)))
        )
        task = (await agent.expect("assign")).task
        result = cpb.TaskResult(task_id=task.task_id, claim_token=task.claim_token, output=payload)
        await agent.send(result=result)
        ack = await agent.expect("ack")
        assert ack.accepted, ack.reason
    done = await within(mesh.stub.GetTask(cpb.GetTaskRequest(task_id=sub.task.task_id)))
    assert (done.state, len(done.result)) == (S.TASK_STATE_SUCCEEDED, len(payload))


async def test_1_an_oversized_result_fails_the_task_and_is_acked(mesh: Mesh, lease: int) -> None:
    """Before: a 3 MiB result got no acknowledgement and the task stayed ASSIGNED."""
    async with raw_agent(mesh.stub) as agent:
        await agent.hello("oversharer", lease)
        sub = await within(mesh.stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo"))))
        task = (await agent.expect("assign")).task
        result = cpb.TaskResult(
            task_id=task.task_id, claim_token=task.claim_token, output=b"r" * 3 * MiB
        )
        await agent.send(result=result)
        ack = await agent.expect("ack")
        assert ack.task_id == task.task_id
        assert "the limit is 524288 bytes" in ack.reason
    done = await within(mesh.stub.GetTask(cpb.GetTaskRequest(task_id=sub.task.task_id)))
    assert done.state == S.TASK_STATE_DEAD_LETTER
    assert "3145728 bytes" in done.last_error
    assert done.result == b""


async def test_1_a_write_etcd_refuses_fails_alone(mesh: Mesh) -> None:
    """A write etcd refuses (here one over its request limit, let past the store's own
    check) shares a transaction with others: only it fails, every other caller succeeds."""
    core = mesh.node.servicer.core
    assert core is not None
    store = core.store
    assert isinstance(store, EtcdTaskStore)
    store.max_write_bytes = 64 * MiB
    huge = tpb.Task(task_id="too-big", spec=tpb.TaskSpec(kind="echo", payload=b"x" * 2 * MiB))
    huge.state = S.TASK_STATE_QUEUED

    async def submit(i: int) -> bool:
        spec = tpb.TaskSpec(kind="echo", payload=b"s" * 20 * KiB, task_id=f"ok-{i}")
        return bool((await mesh.stub.Submit(cpb.SubmitRequest(spec=spec))).created)

    outcomes = await within(
        asyncio.gather(
            store.commit([Write(huge, expect_mod=0)]),
            *(submit(i) for i in range(40)),
            return_exceptions=True,
        )
    )
    assert isinstance(outcomes[0], StoreRefusedError)
    assert "too-big" in str(outcomes[0])
    assert outcomes[1:] == [True] * 40
    store.max_write_bytes = limits.WRITE_MAX_BYTES
    with pytest.raises(Exception, match="limit is"):  # the store's own check, before etcd
        await store.commit([Write(huge, expect_mod=0)])


# ---------------------------------------------------------------- 2. a leader that cannot load


async def test_2_a_leader_whose_load_keeps_failing_says_so_and_backs_off(
    etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = 0
    real_load = EtcdTaskStore.load

    async def failing_load(self: EtcdTaskStore) -> Any:
        nonlocal loads
        loads += 1
        raise StoreRefusedError("etcd refused the request (RESOURCE_EXHAUSTED: larger than max)")

    monkeypatch.setattr(EtcdTaskStore, "load", failing_load)
    node = CoordinatorNode(
        CoordinatorConfig(
            etcd=etcd_server.endpoint,
            cluster=f"test-{uuid.uuid4().hex}",
            listen="127.0.0.1:0",
            grace_s=1.0,
        )
    )
    async with (
        running(node, lambda: loads > 0),
        grpc.aio.insecure_channel(node.endpoint) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)

        async def status(service: str) -> int:
            resp = await within(health.Check(health_pb2.HealthCheckRequest(service=service)))
            return int(resp.status)

        async def failing() -> bool:
            return await status("") == NOT_SERVING

        await until(failing)
        assert await status(SERVICE) == NOT_SERVING
        await asyncio.sleep(4.0)
        # before: a new term every ~0.2 s (the term went from 6 to 811 in 45 s); with
        # backoff each wait is at least half of 0.2, 0.4, 0.8, 1.6 s ... doubling
        assert loads <= 8, f"{loads} terms in about 4 s: churning"

        monkeypatch.setattr(EtcdTaskStore, "load", real_load)

        async def serving() -> bool:
            return await status("") == SERVING and await status(SERVICE) == SERVING

        await until(serving, timeout_s=30)
        stub = cpb_grpc.CoordinatorStub(channel)
        sub = await within(stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo"))))
        assert sub.created


# ---------------------------------------------------------------- 4. unbounded hello fields


async def test_4_an_oversized_hello_is_refused_and_agents_page(mesh: Mesh, lease: int) -> None:
    big_labels = {f"l{i}": "v" * MiB for i in range(4)}
    for fields in ({"labels": big_labels}, {"kinds": ["echo"] * 100_000}):
        async with raw_agent(mesh.stub) as agent:
            hello = cpb.AgentHello(
                agent_id="bloated", lease_id=lease, capacity=1, **{"kinds": ["echo"], **fields}
            )
            await agent.send(hello=hello)
            err = await error_of(agent.call.read())
            assert_names(err, "hello.")
    agents = []
    for i in range(5):
        agent = RawAgent(mesh.stub)
        agents.append(agent)
        await agent.hello(f"agent-{i}", lease)
    try:
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            page = await within(
                mesh.stub.ListAgents(cpb.ListAgentsRequest(page_size=2, page_token=token))
            )
            seen.extend(a.agent_id for a in page.agents)
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert seen == [f"agent-{i}" for i in range(5)]
        assert pages == 3
    finally:
        for agent in agents:
            agent.call.cancel()


# ---------------------------------------------------------------- 5. ListTasks sizes


async def test_5_list_tasks_leaves_out_payloads_and_pages_by_size(mesh: Mesh) -> None:
    """Before: a default page of 300 KiB tasks was 20 MB, over every client's 4 MiB limit."""
    specs = [tpb.TaskSpec(kind="echo", payload=b"p" * 300 * KiB) for _ in range(20)]
    for i in range(0, 20, 5):
        await within(mesh.stub.SubmitBatch(cpb.SubmitBatchRequest(specs=specs[i : i + 5])))
    async with grpc.aio.insecure_channel(mesh.node.endpoint) as default_client:
        stub = cpb_grpc.CoordinatorStub(default_client)
        page = await within(stub.ListTasks(cpb.ListTasksRequest()))
        assert len(page.tasks) == 20
        assert all(t.spec.payload == b"" and t.spec.kind == "echo" for t in page.tasks)
        assert page.ByteSize() < 64 * KiB
        seen = 0
        token = ""
        while True:  # the full view pages by bytes, each page under a default client's limit
            full = await within(
                stub.ListTasks(
                    cpb.ListTasksRequest(view=cpb.TASK_VIEW_FULL, page_size=1000, page_token=token)
                )
            )
            assert full.ByteSize() <= limits.LIST_PAGE_BYTES
            assert all(len(t.spec.payload) == 300 * KiB for t in full.tasks)
            seen += len(full.tasks)
            token = full.next_page_token
            if not token:
                break
        assert seen == 20
    got = await within(mesh.stub.GetTask(cpb.GetTaskRequest(task_id=page.tasks[0].task_id)))
    assert len(got.spec.payload) == 300 * KiB  # GetTask keeps the whole task


# ---------------------------------------------------------------- 6. stalled watchers


async def test_6_watchers_are_capped(mesh: Mesh) -> None:
    cap = mesh.node.cfg.max_watchers
    calls = [mesh.stub.WatchEvents(cpb.WatchEventsRequest()) for _ in range(cap)]
    try:

        async def all_open() -> bool:
            return mesh.node.servicer.hub.watchers == cap

        await until(all_open)
        extra = mesh.stub.WatchEvents(cpb.WatchEventsRequest())
        err = await error_of(extra.read())
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"at most {cap} watchers" in (err.details() or "")
    finally:
        for call in calls:
            call.cancel()

    async def all_closed() -> bool:
        return mesh.node.servicer.hub.watchers == 0

    await until(all_closed)
    again = mesh.stub.WatchEvents(cpb.WatchEventsRequest())
    await within(mesh.stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo"))))
    assert (await within(again.read())).task.state == S.TASK_STATE_QUEUED
    again.cancel()


async def test_6_a_stalled_watcher_is_cut_off_at_its_buffer(mesh: Mesh, lease: int) -> None:
    """Before: the documented limit never fired (a stalled reader later read 165,008 events
    behind a 100,000 limit) and memory grew with every stalled watcher."""
    stalled = mesh.stub.WatchEvents(cpb.WatchEventsRequest(view=cpb.TASK_VIEW_FULL))
    async with raw_agent(mesh.stub) as agent:
        await agent.hello("chatty", lease)
        sub = await within(
            mesh.stub.Submit(
                cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo", payload=b"p" * 256 * KiB))
            )
        )
        task = (await agent.expect("assign")).task
        # 2,000 progress events of a 256 KiB task: 500 MiB for a watcher that never reads
        for i in range(2000):
            progress = cpb.TaskProgress(
                task_id=task.task_id, claim_token=task.claim_token, fraction=i / 2000
            )
            await agent.send(progress=progress)

        async def overflowed() -> bool:
            return mesh.node.servicer.hub.watchers == 1 and not mesh.node.servicer.hub.subscriptions

        await until(overflowed)
        read = 0

        async def drain() -> None:
            nonlocal read
            async for _ in stalled:
                read += 1

        err = await error_of(drain())
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert "behind" in (err.details() or "")
        assert read < 200  # the buffer (4 MiB) plus what was in flight on the connection
        done = await within(mesh.stub.GetTask(cpb.GetTaskRequest(task_id=sub.task.task_id)))
        assert done.state == S.TASK_STATE_ASSIGNED  # the task itself is untouched


# ---------------------------------------------------------------- 7. echoed input


async def test_7_error_messages_never_echo_the_input_whole(mesh: Mesh) -> None:
    """Before: a 1 MB kind came back in a 1 MB status message, which a default client
    refuses as oversized metadata, so the caller never saw the real error."""
    async with grpc.aio.insecure_channel(mesh.node.endpoint) as default_client:
        stub = cpb_grpc.CoordinatorStub(default_client)
        err = await error_of(stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="k" * MiB))))
        assert_names(err, "spec.kind", "is unknown")
        for call in (
            stub.GetTask(cpb.GetTaskRequest(task_id="t" * MiB)),
            stub.CancelTask(cpb.CancelTaskRequest(task_id="t" * MiB)),
            stub.ListTasks(cpb.ListTasksRequest(kind="k" * MiB)),
        ):
            assert_names(await error_of(call))


# ---------------------------------------------------------------- 8. malformed protobuf


async def test_8_undecodable_bytes_are_invalid_argument_without_a_stack_trace(
    mesh: Mesh, lease: int, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    garbage = b"\xff\xff\xff\xff\x0f\x0a\x05ab"
    caplog.set_level(logging.INFO)
    # a limiter of its own: earlier tests in this process may have used the shared one
    monkeypatch.setattr(grpcserver, "_undecodable_log", grpcserver.RateLimitedLog(grpcserver.log))
    ch = mesh.channel
    unary = ch.unary_unary("/agentmesh.v1.Coordinator/Submit")
    for _ in range(20):
        err = await error_of(unary(garbage))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert "not a valid message" in (err.details() or "")
        assert "DecodeError" not in (err.details() or "")
    watch = ch.unary_stream("/agentmesh.v1.Coordinator/WatchEvents")(garbage)
    err = await error_of(watch.read())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    connect = ch.stream_stream("/agentmesh.v1.Coordinator/Connect")()
    await connect.write(garbage)
    err = await error_of(connect.read())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    # after a hello that was welcomed, too
    connect = ch.stream_stream("/agentmesh.v1.Coordinator/Connect")()
    hello = cpb.AgentHello(agent_id="garbler", lease_id=lease, kinds=["echo"], capacity=1)
    await connect.write(cpb.AgentMessage(hello=hello).SerializeToString())
    welcome = cpb.CoordinatorMessage.FromString(await within(connect.read()))
    assert welcome.HasField("welcome")
    await connect.write(garbage)
    err = await error_of(connect.read())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    health = ch.unary_unary("/grpc.health.v1.Health/Check")
    assert (await error_of(health(garbage))).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    refused = [r for r in caplog.records if r.getMessage() == "undecodable request refused"]
    assert 1 <= len(refused) <= 2  # rate-limited, not one per call
    # and the server still answers
    ok = await within(mesh.stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo"))))
    assert ok.created


# ---------------------------------------------------------------- 9. the smaller ones


async def test_9_spawn_waves_with_a_nan_interval_spawns_nothing(pooled: Mesh) -> None:
    assert pooled.pool is not None
    assert pooled.pool_node is not None
    for bad in (float("nan"), float("inf"), -1.0, 3601.0):
        call = pooled.pool.SpawnWaves(
            ppb.SpawnWavesRequest(count=4, wave_size=2, wave_interval_s=bad)
        )
        err = await error_of(call.read())
        assert_names(err, "wave_interval_s")
    assert pooled.pool_node.core.agents == {}


async def test_9_stop_agents_with_a_duplicate_id_stops_it_once_and_deletes_its_key(
    pooled: Mesh,
) -> None:
    assert pooled.pool is not None
    assert pooled.pool_node is not None
    spawned = await within(pooled.pool.SpawnAgents(ppb.SpawnAgentsRequest(count=2)))
    victim = spawned.agents[0].agent_id
    stopped = await within(
        pooled.pool.StopAgents(ppb.StopAgentsRequest(agent_ids=[victim, victim]))
    )
    assert list(stopped.stopped) == [victim]
    etcd = pooled.pool_node.runner.etcd
    assert await etcd.get(etcd.key("agents", victim)) is None
    assert await etcd.get(etcd.key("agents", spawned.agents[1].agent_id)) is not None


async def test_9_pool_agent_count_in_status_is_live(pooled: Mesh) -> None:
    assert pooled.pool is not None
    assert pooled.pool_node is not None
    pool_id = pooled.pool_node.pool_id

    def count_is(n: int) -> Any:
        async def check() -> bool:
            status = await within(pooled.stub.GetStatus(cpb.GetStatusRequest()))
            pools = [s for s in status.services if s.instance_id == pool_id]
            return bool(pools) and pools[0].metadata["agents"] == str(n)

        return check

    await within(pooled.pool.SpawnAgents(ppb.SpawnAgentsRequest(count=3)))
    await until(count_is(3))
    await within(pooled.pool.StopAgents(ppb.StopAgentsRequest(count=1)))
    await until(count_is(2))
    found = await discovery.resolve(pooled.pool_node.runner.etcd, "agent-pool")
    assert [i.metadata["agents"] for i in found] == ["2"]


async def test_9_progress_reaches_watchers_only_from_the_holder(mesh: Mesh, lease: int) -> None:
    watch = mesh.stub.WatchEvents(cpb.WatchEventsRequest())
    async with raw_agent(mesh.stub) as holder, raw_agent(mesh.stub) as other:
        await holder.hello("holder", lease)
        sub = await within(mesh.stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo"))))
        task = (await holder.expect("assign")).task
        await other.hello("other", lease)
        token = task.claim_token
        await other.send(
            progress=cpb.TaskProgress(
                task_id=task.task_id, claim_token=token, fraction=0.9, message="forged"
            )
        )
        await holder.send(
            progress=cpb.TaskProgress(
                task_id=task.task_id, claim_token=token, fraction=0.5, message="half " * 500
            )
        )
        await holder.send(
            progress=cpb.TaskProgress(task_id=task.task_id, claim_token=token, fraction=7.0)
        )
        events = []
        while len(events) < 3:  # created ASSIGNED (a free agent), then two progress events
            events.append(await within(watch.read()))
        watch.cancel()
    assert events[0].task.state == S.TASK_STATE_ASSIGNED
    progress = [e for e in events if e.HasField("progress")]
    assert [p.task.task_id for p in progress] == [sub.task.task_id] * 2
    assert progress[0].progress.fraction == 0.5  # the forged 0.9 never reached watchers
    assert progress[0].progress.message.startswith("half half")
    assert len(progress[0].progress.message.encode()) <= limits.PROGRESS_MESSAGE_BYTES
    assert progress[1].progress.fraction == 1.0  # clamped
    assert progress[0].previous_state == progress[0].task.state


async def test_9_health_list_is_implemented(mesh: Mesh) -> None:
    health = health_pb2_grpc.HealthStub(mesh.channel)
    listed = await within(health.List(health_pb2.HealthListRequest()))
    assert listed.statuses[""].status == SERVING
    assert listed.statuses[SERVICE].status == SERVING
