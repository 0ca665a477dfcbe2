"""The Coordinator service over real gRPC: an in-process CoordinatorNode on port 0,
a real etcd, and hand-written agents on the Connect stream."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc
from protos.agentmesh.v1 import task_pb2 as tpb
from registry.election import candidates
from registry.etcd import Etcd
from registry.etcd_server import EtcdServer
from services.client import MeshClient
from services.coordinator import limits, server, servicer
from services.coordinator.config import CoordinatorConfig
from services.coordinator.llm_costs import flush_costs
from services.coordinator.server import CoordinatorNode
from services.observe.collector import MeshReader

S = tpb.TaskState
SERVICE = "agentmesh.v1.Coordinator"
# Bounds that only catch a hang: each awaited step normally takes milliseconds.
HANG_S = 10.0


async def within(awaitable: Any, timeout_s: float = HANG_S) -> Any:
    return await asyncio.wait_for(awaitable, timeout_s)


@contextlib.asynccontextmanager
async def running_coordinator(etcd_endpoint: str, **cfg: Any) -> AsyncIterator[CoordinatorNode]:
    """A coordinator node on port 0 in a cluster of its own, yielded once it leads."""
    node = CoordinatorNode(
        CoordinatorConfig(
            etcd=etcd_endpoint,
            cluster=f"test-{uuid.uuid4().hex}",
            listen="127.0.0.1:0",
            grace_s=1.0,
            **cfg,
        )
    )
    runner = asyncio.ensure_future(node.run())
    try:
        async with asyncio.timeout(HANG_S):
            while node.servicer.core is None:
                if runner.done():
                    runner.result()  # surfaces why the node died
                await asyncio.sleep(0.01)
        yield node
    finally:
        node.runner.stop()
        await within(runner, 30)


@pytest.fixture
async def node(etcd_server: EtcdServer) -> AsyncIterator[CoordinatorNode]:
    async with running_coordinator(etcd_server.endpoint) as n:
        yield n


@pytest.fixture
async def channel(node: CoordinatorNode) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(node.endpoint) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> cpb_grpc.CoordinatorStub:
    return cpb_grpc.CoordinatorStub(channel)


@pytest.fixture
async def lease(etcd: Etcd) -> AsyncIterator[int]:
    """A live etcd lease, as an agent pool's process holds one."""
    lease_id = await etcd.grant(30)
    try:
        yield lease_id
    finally:
        await etcd.revoke(lease_id)


class RawAgent:
    """An agent written by hand on Coordinator.Connect: hello, then whatever the test sends."""

    def __init__(self, stub: cpb_grpc.CoordinatorStub, agent_id: str) -> None:
        self.agent_id = agent_id
        self.call = stub.Connect()

    async def hello(
        self, lease_id: int, capacity: int = 1, kinds: tuple[str, ...] = ("echo",)
    ) -> cpb.Welcome:
        await self.send(
            cpb.AgentMessage(
                hello=cpb.AgentHello(
                    agent_id=self.agent_id,
                    pool_id="hand",
                    lease_id=lease_id,
                    kinds=kinds,
                    capacity=capacity,
                )
            )
        )
        welcome: cpb.Welcome = await self.expect("welcome")
        return welcome

    async def send(self, msg: cpb.AgentMessage) -> None:
        await within(self.call.write(msg))

    async def expect(self, body: str) -> Any:
        """The next message, which must be of kind `body`."""
        msg = await within(self.call.read())
        assert msg is not grpc.aio.EOF, f"stream ended while waiting for {body}"
        assert msg.WhichOneof("body") == body, msg
        return getattr(msg, body)

    async def report(self, task: tpb.Task, output: bytes = b"", token: int = 0) -> None:
        """Send a result (with the task's own claim token unless `token` says otherwise)."""
        res = cpb.TaskResult(
            task_id=task.task_id, claim_token=token or task.claim_token, output=output
        )
        await self.send(cpb.AgentMessage(result=res))

    async def result(self, task: tpb.Task, output: bytes, token: int = 0) -> cpb.ReportAck:
        await self.report(task, output, token)
        ack: cpb.ReportAck = await self.expect("ack")
        return ack

    def close(self) -> None:
        self.call.cancel()


@contextlib.asynccontextmanager
async def raw_agent(stub: cpb_grpc.CoordinatorStub, agent_id: str) -> AsyncIterator[RawAgent]:
    agent = RawAgent(stub, agent_id)
    try:
        yield agent
    finally:
        agent.close()


async def error_of(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await within(call)
    return err.value


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("request_", "names"),
    [
        (cpb.SubmitRequest(), "spec is required"),
        (cpb.SubmitRequest(spec=tpb.TaskSpec(payload=b"x")), "spec.kind is required"),
        (
            cpb.SubmitRequest(spec=tpb.TaskSpec(kind="teleport")),
            "spec.kind 'teleport' is unknown; use one of: echo",
        ),
        (
            cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo", priority=10)),
            "spec.priority 10 is out of range",
        ),
        (cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo", task_id="a b")), "spec.task_id"),
        (
            cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo", payload=b"x" * (512 * 1024 + 1))),
            "spec.payload is 524289 bytes; the limit is 524288 bytes",
        ),
    ],
)
async def test_bad_submit_is_invalid_argument_saying_what_to_fix(
    stub: cpb_grpc.CoordinatorStub, request_: cpb.SubmitRequest, names: str
) -> None:
    err = await error_of(stub.Submit(request_))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert names in (err.details() or "")
    assert "Traceback" not in (err.details() or "")


async def test_bad_batch_names_the_index(stub: cpb_grpc.CoordinatorStub) -> None:
    specs = [tpb.TaskSpec(kind="echo"), tpb.TaskSpec(kind="echo", priority=12)]
    err = await error_of(stub.SubmitBatch(cpb.SubmitBatchRequest(specs=specs)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "specs[1].priority" in (err.details() or "")
    err = await error_of(stub.SubmitBatch(cpb.SubmitBatchRequest()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    listed = await within(stub.ListTasks(cpb.ListTasksRequest()))
    assert list(listed.tasks) == []  # all or nothing


async def test_missing_ids_and_unknown_ids(stub: cpb_grpc.CoordinatorStub) -> None:
    err = await error_of(stub.GetTask(cpb.GetTaskRequest()))
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "task_id is required")
    err = await error_of(stub.GetTask(cpb.GetTaskRequest(task_id="no-such-task")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-task" in (err.details() or "")
    err = await error_of(stub.CancelTask(cpb.CancelTaskRequest(task_id="no-such-task")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await error_of(stub.ListTasks(cpb.ListTasksRequest(page_size=1001)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_size" in (err.details() or "")

    async def first_event() -> Any:
        async for event in stub.WatchTask(cpb.WatchTaskRequest(task_id="no-such-task")):
            return event

    err = await error_of(first_event())
    assert err.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------- the client API


async def test_submit_get_and_idempotent_replay(stub: cpb_grpc.CoordinatorStub) -> None:
    spec = tpb.TaskSpec(kind="echo", payload=b"hi", priority=3, metadata={"team": "a"})
    first = await within(stub.Submit(cpb.SubmitRequest(spec=spec)))
    assert first.created
    assert first.task.state == S.TASK_STATE_QUEUED
    assert first.task.spec.max_attempts == 3
    got = await within(stub.GetTask(cpb.GetTaskRequest(task_id=first.task.task_id)))
    assert got.spec.payload == b"hi"
    assert got.spec.metadata["team"] == "a"

    keyed = tpb.TaskSpec(kind="echo", idempotency_key="order-1")
    a = await within(stub.Submit(cpb.SubmitRequest(spec=keyed)))
    b = await within(stub.Submit(cpb.SubmitRequest(spec=keyed)))
    assert a.created
    assert not b.created
    assert a.task.task_id == b.task.task_id


async def _answers(call: Any) -> tuple[list[cpb.SubmitResponse], grpc.aio.AioRpcError | None]:
    """A SubmitStream's responses until it ends, and the error it ended with (or None)."""
    got: list[cpb.SubmitResponse] = []
    try:
        async with asyncio.timeout(HANG_S):
            async for response in call:
                got.append(response)
    except grpc.aio.AioRpcError as err:
        return got, err
    return got, None


async def test_submit_stream_answers_each_request_in_order(
    stub: cpb_grpc.CoordinatorStub,
) -> None:
    before = await within(stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo"))))
    ids = [f"st-{i}" for i in range(50)]
    ids.insert(25, before.task.task_id)  # a replay in the middle
    call = stub.SubmitStream(
        iter(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo", task_id=t)) for t in ids)
    )
    got, err = await _answers(call)
    assert err is None
    assert [r.task.task_id for r in got] == ids
    assert [r.created for r in got] == [t != before.task.task_id for t in ids]
    for response in got[:3]:
        stored = await within(stub.GetTask(cpb.GetTaskRequest(task_id=response.task.task_id)))
        assert stored.state == response.task.state


@pytest.mark.parametrize(
    ("bad", "names"),
    [
        (cpb.SubmitRequest(), "spec is required"),
        (cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo", priority=12)), "spec.priority 12"),
    ],
)
async def test_submit_stream_ends_at_a_refused_request_after_answering_the_earlier_ones(
    stub: cpb_grpc.CoordinatorStub, bad: cpb.SubmitRequest, names: str
) -> None:
    good = [cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo")) for _ in range(3)]
    got, err = await _answers(stub.SubmitStream(iter([*good, bad, *good])))
    assert err is not None
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert names in (err.details() or "")
    assert len(got) == 3
    assert all(r.created for r in got)
    for response in got:
        await within(stub.GetTask(cpb.GetTaskRequest(task_id=response.task.task_id)))


async def test_submit_stream_requests_read_before_the_client_left_are_written_once(
    stub: cpb_grpc.CoordinatorStub,
) -> None:
    # the unknown outcome: the client goes away without reading an answer, and
    # sends everything again; nothing is lost, nothing is made twice
    specs = [tpb.TaskSpec(kind="echo", task_id=f"gone-{i}") for i in range(20)]
    call = stub.SubmitStream()
    for spec in specs:
        await within(call.write(cpb.SubmitRequest(spec=spec)))
    await within(call.done_writing())
    async with asyncio.timeout(HANG_S):  # all read and written, no answer read
        for spec in specs:
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.GetTask(cpb.GetTaskRequest(task_id=spec.task_id))
                    break
                await asyncio.sleep(0.01)
    call.cancel()
    again = await within(stub.SubmitBatch(cpb.SubmitBatchRequest(specs=specs)))
    assert [r.created for r in again.results] == [False] * len(specs)
    listed = await within(stub.ListTasks(cpb.ListTasksRequest(page_size=100)))
    assert sorted(t.task_id for t in listed.tasks if t.task_id.startswith("gone-")) == sorted(
        s.task_id for s in specs
    )


async def test_the_python_client_streams_and_a_second_pass_replays(node: CoordinatorNode) -> None:
    # the client's unknown-outcome recipe: the same spec objects, sent again, are
    # replays (each got an idempotency key in place on the first pass)
    specs = [tpb.TaskSpec(kind="echo", payload=f"{i}".encode()) for i in range(5)]

    async def produced() -> AsyncIterator[tpb.TaskSpec]:
        for spec in specs:
            yield spec

    async with MeshClient(coordinator=node.endpoint) as client:
        first = [r async for r in client.submit_stream(produced())]
        again = [r async for r in client.submit_stream(specs)]
    assert [r.created for r in first] == [True] * 5
    assert all(spec.idempotency_key for spec in specs)
    assert [r.created for r in again] == [False] * 5
    assert [r.task.task_id for r in again] == [r.task.task_id for r in first]
    assert [r.task.spec.payload for r in first] == [s.payload for s in specs]


async def test_submit_stream_reads_no_further_while_the_limit_waits(
    node: CoordinatorNode, stub: cpb_grpc.CoordinatorStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servicer.limits, "SUBMIT_STREAM_PENDING", 3)
    core = node.servicer.core
    assert core is not None
    submit, started, go = core.submit, [], asyncio.Event()

    async def held(specs: Any) -> Any:
        started.append(specs[0].task_id)
        await go.wait()
        return await submit(specs)

    monkeypatch.setattr(core, "submit", held)
    ids = [f"held-{i}" for i in range(10)]
    call = stub.SubmitStream(
        iter(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo", task_id=t)) for t in ids)
    )
    async with asyncio.timeout(HANG_S):
        while len(started) < 3:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)  # time for a fourth, which must not come
    assert started == ids[:3]
    go.set()
    got, err = await _answers(call)
    assert err is None
    assert [r.task.task_id for r in got] == ids

    # and by bytes: three 100 KB requests against a 250 KB budget
    monkeypatch.setattr(servicer.limits, "SUBMIT_STREAM_PENDING_BYTES", 250_000)
    started.clear()
    go.clear()
    big = [f"big-{i}" for i in range(3)]
    call = stub.SubmitStream(
        iter(
            cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo", task_id=t, payload=b"x" * 100_000))
            for t in big
        )
    )
    async with asyncio.timeout(HANG_S):
        while len(started) < 2:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)  # the third must wait for an answer
    assert started == big[:2]
    go.set()
    got, err = await _answers(call)
    assert err is None
    assert [r.task.task_id for r in got] == big


async def test_the_dashboard_and_cli_find_a_rare_state_behind_a_backlog(
    node: CoordinatorNode, stub: cpb_grpc.CoordinatorStub
) -> None:
    # more queued tasks before it in key order than one ListTasks call reads: that call
    # answers an empty page with a token, which the dead-letter panel showed as "empty"
    first = servicer.LIST_MAX_READS * limits.LIST_READ_RECORDS + 20
    backlog = [tpb.TaskSpec(kind="echo", task_id=f"a-{i:05d}") for i in range(first)]
    for i in range(0, first, limits.BATCH_ITEMS):
        batch = backlog[i : i + limits.BATCH_ITEMS]
        await within(stub.SubmitBatch(cpb.SubmitBatchRequest(specs=batch)))
    await within(stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo", task_id="z-1"))))
    await within(stub.CancelTask(cpb.CancelTaskRequest(task_id="z-1", reason="test")))
    alone = await within(stub.ListTasks(cpb.ListTasksRequest(states=[S.TASK_STATE_CANCELLED])))
    assert not alone.tasks  # the server's bounded page, as documented
    assert alone.next_page_token

    async with MeshReader(coordinator=node.endpoint) as reader:  # the dashboard's and the view's
        resp = await within(reader.list_tasks(states=[S.TASK_STATE_CANCELLED], page_size=50))
    assert [t.task_id for t in resp.tasks] == ["z-1"]
    assert not resp.next_page_token
    async with MeshClient(coordinator=node.endpoint) as client:  # `agentmesh tasks`
        few = await within(
            client.list_filled(states=[S.TASK_STATE_CANCELLED], page_size=50, max_calls=1)
        )
    assert not few.tasks  # stopped at max_calls, saying where to go on
    assert few.next_page_token


async def test_list_filters_and_pages(stub: cpb_grpc.CoordinatorStub) -> None:
    specs = [
        tpb.TaskSpec(kind="sleep" if i % 3 == 0 else "echo", task_id=f"t-{i:02d}")
        for i in range(25)
    ]
    resp = await within(stub.SubmitBatch(cpb.SubmitBatchRequest(specs=specs)))
    assert [r.task.task_id for r in resp.results] == [s.task_id for s in specs]
    for tid in ("t-01", "t-02"):
        await within(stub.CancelTask(cpb.CancelTaskRequest(task_id=tid, reason="test")))

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await within(stub.ListTasks(cpb.ListTasksRequest(page_size=10, page_token=token)))
        assert len(page.tasks) <= 10
        seen.extend(t.task_id for t in page.tasks)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == [s.task_id for s in specs]  # key order, nothing twice or missed
    assert pages == 3

    sleeps = await within(stub.ListTasks(cpb.ListTasksRequest(kind="sleep")))
    assert [t.task_id for t in sleeps.tasks] == [f"t-{i:02d}" for i in range(0, 25, 3)]
    cancelled = await within(stub.ListTasks(cpb.ListTasksRequest(states=[S.TASK_STATE_CANCELLED])))
    assert [t.task_id for t in cancelled.tasks] == ["t-01", "t-02"]
    assert all(t.last_error == "test" for t in cancelled.tasks)
    queued_echo = await within(
        stub.ListTasks(cpb.ListTasksRequest(kind="echo", states=[S.TASK_STATE_QUEUED], page_size=5))
    )
    assert [t.task_id for t in queued_echo.tasks] == ["t-04", "t-05", "t-07", "t-08", "t-10"]
    assert queued_echo.next_page_token
    rest = await within(
        stub.ListTasks(
            cpb.ListTasksRequest(
                kind="echo",
                states=[S.TASK_STATE_QUEUED],
                page_size=100,
                page_token=queued_echo.next_page_token,
            )
        )
    )
    assert rest.tasks[0].task_id == "t-11"
    assert len(queued_echo.tasks) + len(rest.tasks) == 14
    none = await within(stub.ListTasks(cpb.ListTasksRequest(agent_id="nobody")))
    assert list(none.tasks) == []


# ---------------------------------------------------------------- agents on Connect


async def test_agent_gets_an_assignment_and_its_result_completes_the_task(
    stub: cpb_grpc.CoordinatorStub, node: CoordinatorNode, lease: int
) -> None:
    async with raw_agent(stub, "hand-1") as agent:
        welcome = await agent.hello(lease)
        assert welcome.term == node.term > 0
        agents = await within(stub.ListAgents(cpb.ListAgentsRequest()))
        assert [a.agent_id for a in agents.agents] == ["hand-1"]

        sub = await within(
            stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo", payload=b"ping")))
        )
        assign = await agent.expect("assign")
        task = assign.task
        assert (task.task_id, task.spec.payload, task.agent_id) == (
            sub.task.task_id,
            b"ping",
            "hand-1",
        )
        assert task.claim_token > 0
        running = await within(stub.GetTask(cpb.GetTaskRequest(task_id=task.task_id)))
        assert running.state == S.TASK_STATE_ASSIGNED

        ack = await agent.result(task, b"pong")
        assert ack.accepted, ack.reason
        done = await within(stub.GetTask(cpb.GetTaskRequest(task_id=task.task_id)))
        assert (done.state, done.result) == (S.TASK_STATE_SUCCEEDED, b"pong")
        again = await agent.result(task, b"twice")
        assert not again.accepted
        done = await within(stub.GetTask(cpb.GetTaskRequest(task_id=task.task_id)))
        assert done.result == b"pong"


async def test_watch_task_streams_to_the_terminal_state(
    stub: cpb_grpc.CoordinatorStub, lease: int
) -> None:
    sub = await within(stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo", payload=b"w"))))
    tid = sub.task.task_id
    watch = stub.WatchTask(cpb.WatchTaskRequest(task_id=tid))
    first = await within(watch.read())
    assert first.task.state == S.TASK_STATE_QUEUED
    async with raw_agent(stub, "watched") as agent:
        await agent.hello(lease)
        assign = await agent.expect("assign")
        accepted = cpb.TaskAccepted(
            task_id=tid, claim_token=assign.task.claim_token, received_at_us=1
        )
        await agent.send(cpb.AgentMessage(accepted=accepted))
        assert (await agent.result(assign.task, b"w")).accepted
    states = []
    while (event := await within(watch.read())) is not grpc.aio.EOF:
        states.append(event.task.state)
    assert states == [S.TASK_STATE_ASSIGNED, S.TASK_STATE_RUNNING, S.TASK_STATE_SUCCEEDED]
    assert watch.done()
    assert await watch.code() == grpc.StatusCode.OK


async def test_watching_a_finished_task_returns_it_and_ends(stub: cpb_grpc.CoordinatorStub) -> None:
    sub = await within(stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo"))))
    await within(stub.CancelTask(cpb.CancelTaskRequest(task_id=sub.task.task_id)))
    events = [e async for e in stub.WatchTask(cpb.WatchTaskRequest(task_id=sub.task.task_id))]
    assert [e.task.state for e in events] == [S.TASK_STATE_CANCELLED]


async def test_forged_claim_token_is_refused(stub: cpb_grpc.CoordinatorStub, lease: int) -> None:
    async with raw_agent(stub, "honest") as agent:
        await agent.hello(lease)
        sub = await within(stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo"))))
        task = (await agent.expect("assign")).task
        ack = await agent.result(task, b"forged", token=task.claim_token + 7)
        assert not ack.accepted
        assert "token" in ack.reason
        now = await within(stub.GetTask(cpb.GetTaskRequest(task_id=sub.task.task_id)))
        assert now.state == S.TASK_STATE_ASSIGNED
        assert now.result == b""
        assert (await agent.result(task, b"real")).accepted


async def _succeeded(stub: cpb_grpc.CoordinatorStub, task_id: str) -> None:
    for _ in range(int(HANG_S / 0.01)):
        got = await within(stub.GetTask(cpb.GetTaskRequest(task_id=task_id)))
        if got.state == S.TASK_STATE_SUCCEEDED:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"task {task_id} did not succeed")


async def test_an_accepted_ack_rides_on_the_next_assignment(
    stub: cpb_grpc.CoordinatorStub, lease: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # long enough that it can only come on the assignment, never alone
    monkeypatch.setattr(servicer, "ACK_RIDE_S", HANG_S * 3)
    async with raw_agent(stub, "rider") as agent:
        await agent.hello(lease)
        first = await within(stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo"))))
        task = (await agent.expect("assign")).task
        await agent.report(task)
        await _succeeded(stub, first.task.task_id)  # committed and published: the ack waits
        second = await within(stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo"))))
        msg = await within(agent.call.read())
        assert msg.WhichOneof("body") == "assign", msg
        assert msg.assign.task.task_id == second.task.task_id
        assert [(a.task_id, a.claim_token, a.accepted) for a in msg.acks] == [
            (task.task_id, task.claim_token, True)
        ]


async def test_a_refusal_goes_at_once_and_takes_the_waiting_acks_along(
    stub: cpb_grpc.CoordinatorStub, lease: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servicer, "ACK_RIDE_S", HANG_S * 3)
    async with raw_agent(stub, "refused") as agent:
        await agent.hello(lease, capacity=2)
        for _ in range(2):
            await within(stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo"))))
        one = (await agent.expect("assign")).task
        two = (await agent.expect("assign")).task
        await agent.report(one)
        await _succeeded(stub, one.task_id)
        await agent.report(two, token=two.claim_token + 7)
        msg = await within(agent.call.read())  # at once, not after ACK_RIDE_S
        assert msg.WhichOneof("body") == "ack", msg
        assert (msg.ack.task_id, msg.ack.accepted) == (two.task_id, False)
        assert "token" in msg.ack.reason
        assert [(a.task_id, a.accepted) for a in msg.acks] == [(one.task_id, True)]


async def test_acks_still_riding_are_sent_when_the_agent_hangs_up(
    stub: cpb_grpc.CoordinatorStub, lease: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servicer, "ACK_RIDE_S", HANG_S * 3)
    async with raw_agent(stub, "leaving") as agent:
        await agent.hello(lease)
        sub = await within(stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo"))))
        task = (await agent.expect("assign")).task
        await agent.report(task)
        await _succeeded(stub, sub.task.task_id)
        await within(agent.call.done_writing())
        ack = await agent.expect("ack")
        assert (ack.task_id, ack.accepted) == (task.task_id, True)
        assert await within(agent.call.read()) is grpc.aio.EOF


async def test_an_ack_with_nothing_to_ride_on_goes_alone_soon(
    stub: cpb_grpc.CoordinatorStub, lease: int
) -> None:
    async with raw_agent(stub, "alone") as agent:
        await agent.hello(lease)
        await within(stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo"))))
        task = (await agent.expect("assign")).task
        ack = await agent.result(task, b"done")  # after ACK_RIDE_S, within HANG_S
        assert (ack.task_id, ack.accepted) == (task.task_id, True)


async def test_cancel_reaches_the_agent(stub: cpb_grpc.CoordinatorStub, lease: int) -> None:
    async with raw_agent(stub, "cancelled") as agent:
        await agent.hello(lease)
        sub = await within(stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo"))))
        task = (await agent.expect("assign")).task
        out = await within(
            stub.CancelTask(cpb.CancelTaskRequest(task_id=sub.task.task_id, reason="stop"))
        )
        assert out.state == S.TASK_STATE_CANCELLED
        cancel = await agent.expect("cancel")
        assert (cancel.task_id, cancel.reason) == (task.task_id, "stop")
        assert not (await agent.result(task, b"late")).accepted


async def test_a_dropped_stream_requeues_to_another_agent(
    stub: cpb_grpc.CoordinatorStub, lease: int
) -> None:
    async with raw_agent(stub, "first") as first, raw_agent(stub, "second") as second:
        await first.hello(lease)
        sub = await within(
            stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo", payload=b"x")))
        )
        held = (await first.expect("assign")).task
        await second.hello(lease)
        first.close()  # the agent's process vanished from the network
        moved = (await second.expect("assign")).task
        assert moved.task_id == sub.task.task_id
        assert moved.attempts == 2
        assert moved.claim_token > held.claim_token
        assert (await second.result(moved, b"x")).accepted
        done = await within(stub.GetTask(cpb.GetTaskRequest(task_id=moved.task_id)))
        assert (done.state, done.agent_id) == (S.TASK_STATE_SUCCEEDED, "second")


async def test_a_lost_lease_requeues_its_claims(
    stub: cpb_grpc.CoordinatorStub, etcd: Etcd, lease: int
) -> None:
    doomed = await etcd.grant(30)
    async with raw_agent(stub, "doomed") as first:
        await first.hello(doomed)
        sub = await within(stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo"))))
        held = (await first.expect("assign")).task
        await etcd.revoke(doomed)  # the agent's process lost its lease; its stream is still up
        cancel = await first.expect("cancel")
        assert cancel.task_id == held.task_id
        async with raw_agent(stub, "survivor") as second:
            await second.hello(lease)
            moved = (await second.expect("assign")).task
            assert moved.task_id == sub.task.task_id
            assert moved.claim_token > held.claim_token
            assert not (await first.result(held, b"late")).accepted
            assert (await second.result(moved, b"ok")).accepted


async def test_first_message_must_be_hello(stub: cpb_grpc.CoordinatorStub) -> None:
    async with raw_agent(stub, "rude") as agent:
        await agent.send(cpb.AgentMessage(accepted=cpb.TaskAccepted(task_id="x")))
        err = await error_of(agent.call.read())
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "hello" in (err.details() or "")


async def test_hello_without_a_lease_is_refused(stub: cpb_grpc.CoordinatorStub) -> None:
    async with raw_agent(stub, "no-lease") as agent:
        hello = cpb.AgentHello(agent_id="no-lease", kinds=["echo"], capacity=1)
        await agent.send(cpb.AgentMessage(hello=hello))
        err = await error_of(agent.call.read())
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "lease_id" in (err.details() or "")


# ---------------------------------------------------------------- operators


async def test_status_shows_the_leader_and_term(
    stub: cpb_grpc.CoordinatorStub, node: CoordinatorNode
) -> None:
    await within(stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo"))))
    status = await within(stub.GetStatus(cpb.GetStatusRequest()))
    assert status.leader_endpoint == node.endpoint
    assert status.leader_id == node.node_id
    assert status.term == node.term > 0
    assert status.from_leader
    assert status.assignment_strategy == "least-loaded"
    assert status.queue_depth == 1
    assert status.task_counts["QUEUED"] == 1
    assert list(status.standbys) == []
    assert any(s.kind == "coordinator" and s.endpoint == node.endpoint for s in status.services)


async def test_reflection_lists_the_coordinator(channel: grpc.aio.Channel) -> None:
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask(
        req: reflection_pb2.ServerReflectionRequest,
    ) -> reflection_pb2.ServerReflectionResponse:
        call = refl.ServerReflectionInfo()
        try:
            await call.write(req)
            resp: reflection_pb2.ServerReflectionResponse = await call.read()
            return resp
        finally:
            call.cancel()

    listed = await within(ask(reflection_pb2.ServerReflectionRequest(list_services="")))
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    described = await within(
        ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE))
    )
    assert described.file_descriptor_response.file_descriptor_proto


async def test_health_reports_serving_once_elected(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in (SERVICE, ""):
        resp = await within(health.Check(health_pb2.HealthCheckRequest(service=service)))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_replicas_stop_without_a_lost_task_exception(
    etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A standby's campaign used to be left running at shutdown: when the leader's key
    # went after the standby's lease was revoked, it failed, and asyncio logged "Task
    # exception was never retrieved" (seen after etcd restarts, on SIGTERM to all).
    cluster = f"test-{uuid.uuid4().hex}"
    cfg = CoordinatorConfig(
        etcd=etcd_server.endpoint, cluster=cluster, listen="127.0.0.1:0", grace_s=1.0
    )
    leader = CoordinatorNode(cfg)
    standby = CoordinatorNode(cfg)
    lead = asyncio.ensure_future(leader.run())
    stand: asyncio.Future[None] | None = None
    etcd = Etcd(etcd_server.endpoint, prefix=f"/agentmesh/{cluster}/")
    # the standby keeps its etcd connection until the leader is gone, as a slower
    # shutdown would
    closing = asyncio.Event()
    close = standby.etcd.close

    async def late_close() -> None:
        await closing.wait()
        await close()

    standby.etcd.close = late_close  # type: ignore[method-assign]
    try:
        async with asyncio.timeout(HANG_S):
            while leader.servicer.core is None:
                await asyncio.sleep(0.01)
            stand = asyncio.ensure_future(standby.run())
            while len(await candidates(etcd, "coordinator")) < 2:
                await asyncio.sleep(0.01)
            standby.runner.stop()
            while len(await candidates(etcd, "coordinator")) > 1:  # its lease is revoked
                await asyncio.sleep(0.01)
            leader.runner.stop()
            await lead
            await asyncio.sleep(0.3)  # a campaign still running sees its predecessor go
    finally:
        closing.set()
        leader.runner.stop()
        standby.runner.stop()
        await within(asyncio.gather(lead, *(() if stand is None else (stand,))), 30)
        await etcd.close()
    for _ in range(3):
        gc.collect()
        await asyncio.sleep(0.05)
    assert "never retrieved" not in caplog.text


async def test_the_python_clients_watch_task_follows_a_standby_and_a_failover(
    etcd_server: EtcdServer,
) -> None:
    # MeshClient.watch_task raised UNAVAILABLE at a standby's refusal and at a failover,
    # while the README promises that reopening WatchTask on the new leader misses nothing
    cluster = f"test-{uuid.uuid4().hex}"
    cfg = CoordinatorConfig(
        etcd=etcd_server.endpoint, cluster=cluster, listen="127.0.0.1:0", grace_s=1.0
    )
    first, second = CoordinatorNode(cfg), CoordinatorNode(cfg)
    runs = [asyncio.ensure_future(first.run())]
    etcd = Etcd(etcd_server.endpoint, prefix=f"/agentmesh/{cluster}/")
    try:
        async with asyncio.timeout(HANG_S):
            while first.servicer.core is None:
                await asyncio.sleep(0.01)
            runs.append(asyncio.ensure_future(second.run()))
            while len(await candidates(etcd, "coordinator")) < 2:
                await asyncio.sleep(0.01)
        async with MeshClient(coordinator=second.endpoint, timeout_s=3.0) as at_standby:
            await within(at_standby.submit(tpb.TaskSpec(task_id="w-1", kind="echo")))
            redirected = at_standby.watch_task("w-1")  # asked of the standby first
            assert (await within(anext(redirected))).task.state == S.TASK_STATE_QUEUED
            await redirected.aclose()
        async with MeshClient(etcd=etcd_server.endpoint, cluster=cluster, timeout_s=3.0) as client:
            watch = client.watch_task("w-1")
            now = await within(anext(watch))
            assert now.task.state == S.TASK_STATE_QUEUED
            first.runner.stop()  # the leader goes; the standby takes over
            await within(runs[0], 30)
            async with asyncio.timeout(HANG_S):
                while second.servicer.core is None:
                    await asyncio.sleep(0.01)
            await within(client.cancel("w-1", "test"))
            states = [e.task.state async for e in watch]
        assert states[-1] == S.TASK_STATE_CANCELLED
        assert set(states) <= {S.TASK_STATE_QUEUED, S.TASK_STATE_CANCELLED}
    finally:
        first.runner.stop()
        second.runner.stop()
        await within(asyncio.gather(*runs, return_exceptions=True), 30)
        await etcd.close()


async def test_an_agent_id_in_use_on_another_lease_is_already_exists(
    stub: cpb_grpc.CoordinatorStub, etcd: Etcd, lease: int
) -> None:
    other = await etcd.grant(30)
    try:
        async with raw_agent(stub, "twin") as real, raw_agent(stub, "twin") as impostor:
            await real.hello(lease)
            await impostor.send(
                cpb.AgentMessage(
                    hello=cpb.AgentHello(
                        agent_id="twin", pool_id="other", lease_id=other, kinds=["echo"], capacity=1
                    )
                )
            )
            err = await error_of(impostor.call.read())
            assert err.code() == grpc.StatusCode.ALREADY_EXISTS
            assert "'twin' is connected already" in (err.details() or "")
            # the real agent is still reachable: it gets the next task
            sub = await within(stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo"))))
            assert (await real.expect("assign")).task.task_id == sub.task.task_id
    finally:
        await etcd.revoke(other)


async def test_a_stopping_leader_leaves_its_agents_claims_to_the_next_leader(
    etcd_server: EtcdServer,
) -> None:
    # On SIGTERM the leader steps down before it closes the agents' streams: a stream
    # that ends then must not requeue its claim (the agent still runs the task and takes
    # the claim to the next leader; a requeue would run it twice and use an attempt).
    cluster = f"test-{uuid.uuid4().hex}"
    node = CoordinatorNode(
        CoordinatorConfig(
            etcd=etcd_server.endpoint, cluster=cluster, listen="127.0.0.1:0", grace_s=5.0
        )
    )
    etcd = Etcd(etcd_server.endpoint, prefix=f"/agentmesh/{cluster}/")
    lease_id = await etcd.grant(30)
    runner = asyncio.ensure_future(node.run())
    try:
        async with asyncio.timeout(HANG_S):
            while node.servicer.core is None:
                await asyncio.sleep(0.01)
        async with (
            grpc.aio.insecure_channel(node.endpoint) as channel,
            raw_agent(cpb_grpc.CoordinatorStub(channel), "keeper") as agent,
        ):
            await agent.hello(lease_id)
            stub = cpb_grpc.CoordinatorStub(channel)
            await within(
                stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(task_id="t", kind="echo")))
            )
            assigned = (await agent.expect("assign")).task
            node.runner.stop()
            await within(runner, 30)
        stored = await etcd.get(etcd.key("tasks", "t"))
        assert stored is not None
        task = tpb.Task.FromString(stored.value)
        assert (task.state, task.agent_id, task.attempts) == (
            tpb.TASK_STATE_ASSIGNED,
            "keeper",
            1,
        )
        assert int(stored.mod_revision) == assigned.claim_token  # not written since
        claim = await etcd.get(etcd.key("claims", "t"))
        assert claim is not None
        assert int(claim.mod_revision) == assigned.claim_token
        assert await candidates(etcd, "coordinator") == []  # its candidacy went with it
    finally:
        node.runner.stop()
        await within(runner, 30)
        await etcd.revoke(lease_id)
        await etcd.close()


async def _watching(stub: cpb_grpc.CoordinatorStub, **request: Any) -> Any:
    """A WatchEvents call that is subscribed: a probe task's event has come through it."""
    call = stub.WatchEvents(cpb.WatchEventsRequest(**request))
    probe = f"probe-{uuid.uuid4().hex[:8]}"
    await within(stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(task_id=probe, kind="echo"))))
    while True:
        msg = await within(call.read())
        assert msg is not grpc.aio.EOF
        if any(e.task.task_id == probe for e in msg.batched or (msg,)):
            return call


async def _batches(call: Any, expected: int) -> list[list[tpb.TaskEvent]]:
    out: list[list[tpb.TaskEvent]] = []
    while sum(len(b) for b in out) < expected:
        msg = await within(call.read())
        assert msg is not grpc.aio.EOF
        assert not msg.HasField("task"), "a batch leaves its own fields empty"
        assert not msg.previous_state
        out.append(list(msg.batched))
    return out


async def test_watch_events_batches_what_queued_in_order_up_to_max_batch(
    stub: cpb_grpc.CoordinatorStub,
) -> None:
    call = await _watching(stub, max_batch=5)
    try:
        ids = [f"batched-{i:02d}" for i in range(12)]
        # one SubmitBatch publishes its 12 creations in one go, before the stream writes
        specs = [tpb.TaskSpec(task_id=i, kind="echo") for i in ids]
        await within(stub.SubmitBatch(cpb.SubmitBatchRequest(specs=specs)))
        batches = await _batches(call, len(ids))
        assert [len(b) for b in batches] == [5, 5, 2]
        events = [e for b in batches for e in b]
        assert [e.task.task_id for e in events] == ids
        assert all(e.task.state == S.TASK_STATE_QUEUED for e in events)
        assert all(e.previous_state == S.TASK_STATE_UNSPECIFIED for e in events)
        assert not any(e.task.spec.payload for e in events)  # the BASIC view still
    finally:
        call.cancel()


async def test_a_batch_stays_under_a_mebibyte_and_a_larger_event_goes_alone(
    stub: cpb_grpc.CoordinatorStub,
) -> None:
    call = await _watching(stub, max_batch=100, view=cpb.TASK_VIEW_FULL)
    try:
        payload = b"p" * 400_000  # two fit in 1 MiB, three do not
        specs = [tpb.TaskSpec(task_id=f"big-{i}", kind="echo", payload=payload) for i in range(5)]
        await within(stub.SubmitBatch(cpb.SubmitBatchRequest(specs=specs)))
        batches = await _batches(call, len(specs))
        assert [len(b) for b in batches] == [2, 2, 1]
        assert all(e.task.spec.payload == payload for b in batches for e in b)
    finally:
        call.cancel()


async def test_max_batch_over_the_limit_is_invalid_argument(stub: cpb_grpc.CoordinatorStub) -> None:
    err = await error_of(stub.WatchEvents(cpb.WatchEventsRequest(max_batch=1001)).read())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_batch 1001 is too large: use 2-1000" in (err.details() or "")


async def test_a_stopping_leader_writes_the_llm_spend_it_has_not_flushed_yet(
    etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The totals are flushed about once a second; a leader stopped with SIGTERM (a rolling
    # restart) dropped what it had charged since the last flush, so the next term's
    # budgets and totals forgot it. The periodic flush is held off here: only the
    # step-down can write the spend.
    def rarely(etcd: Any, gate: Any, fenced: Any) -> Any:
        return flush_costs(etcd, gate, fenced, interval_s=3600.0)

    monkeypatch.setattr(server, "flush_costs", rarely)
    lease_id = 0
    async with running_coordinator(etcd_server.endpoint) as node:
        etcd = Etcd(etcd_server.endpoint, prefix=f"/agentmesh/{node.cfg.cluster}/")
        lease_id = await etcd.grant(30)
        async with (
            grpc.aio.insecure_channel(node.endpoint) as channel,
            raw_agent(cpb_grpc.CoordinatorStub(channel), "spender") as agent,
        ):
            await agent.hello(lease_id, kinds=("llm",))
            stub = cpb_grpc.CoordinatorStub(channel)
            spec = tpb.TaskSpec(
                task_id="t", kind="llm", payload=b'{"prompt": "x"}', metadata={"project": "p"}
            )
            await within(stub.Submit(cpb.SubmitRequest(spec=spec)))
            task = (await agent.expect("assign")).task
            usage = tpb.TokenUsage(input_tokens=10, output_tokens=20, cost_usd=0.25)
            res = cpb.TaskResult(
                task_id="t", claim_token=task.claim_token, output=b"{}", usage=usage
            )
            await agent.send(cpb.AgentMessage(result=res))
            assert (await agent.expect("ack")).accepted
    # the context stopped the node as SIGTERM does, and waited for it
    try:
        stored = await etcd.get(etcd.key("costs", "project", "p"))
    finally:
        await etcd.revoke(lease_id)
        await etcd.close()
    assert stored is not None, "the spend since the last flush was lost at step-down"
    assert cpb.CostTotal.FromString(stored.value).usage.cost_usd == 0.25
