"""A mixed run on a real cluster (etcd, a coordinator and two agent pools as processes):
eight clients submit valid tasks near the limits while one hostile client floods
oversized, undecodable and greedy requests, opens stalled watchers past the cap, and runs
a hostile agent. Target: 0 errors and 0 stuck tasks for the valid clients.

    nice -n 5 .venv/bin/pytest tests/integration/test_hostile_mixed.py -s

prints the counts.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc
from protos.agentmesh.v1 import task_pb2 as tpb
from registry.etcd import Etcd
from services.client import MeshClient

pytestmark = pytest.mark.integration

KiB, MiB = 1024, 1024 * 1024
CLIENTS = 8
TASKS_PER_CLIENT = 8
BIG = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]


def near_limit_spec(client: int, i: int) -> tpb.TaskSpec:
    """An echo task near every limit: its result is as large as its payload."""
    return tpb.TaskSpec(
        kind="echo",
        task_id=f"c{client}-t{i}",
        payload=bytes([65 + client]) * (500 * KiB),
        role="",
        metadata={f"key-{j:03d}".ljust(128, "k"): "v" * 1000 for j in range(64)},
        required_labels={},
    )


class Hostile:
    """One client doing everything the limits are for, in a loop, counting the answers."""

    def __init__(self, endpoint: str, etcd: str) -> None:
        self.endpoint = endpoint
        self.etcd = etcd
        self.answers: collections.Counter[str] = collections.Counter()
        self.requests = 0

    async def _one(self, attack: Callable[[], Any]) -> None:
        self.requests += 1
        try:
            await asyncio.wait_for(attack(), 15)
            self.answers["OK"] += 1
        except grpc.aio.AioRpcError as err:
            self.answers[err.code().name] += 1
        except TimeoutError:
            self.answers["HANG"] += 1

    async def run(self, stop: asyncio.Event) -> None:
        huge = "x" * 3 * MiB
        async with grpc.aio.insecure_channel(self.endpoint, options=BIG) as ch:
            stub = cpb_grpc.CoordinatorStub(ch)
            watchers = [
                stub.WatchEvents(cpb.WatchEventsRequest(view=cpb.TASK_VIEW_FULL)) for _ in range(70)
            ]  # never read: stalled, and past the cap of 64
            agent_task = asyncio.ensure_future(self._agent(ch, stop))
            attacks: list[Callable[[], Any]] = [
                lambda: stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo", role=huge))),
                lambda: stub.Submit(
                    cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo", required_labels={"l": huge}))
                ),
                lambda: stub.Submit(
                    cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo", metadata={"m": huge}))
                ),
                lambda: stub.Submit(cpb.SubmitRequest(spec=tpb.TaskSpec(kind=huge))),
                lambda: stub.CancelTask(cpb.CancelTaskRequest(task_id="c0-t0", reason=huge)),
                lambda: stub.GetTask(cpb.GetTaskRequest(task_id=huge)),
                lambda: stub.SubmitBatch(
                    cpb.SubmitBatchRequest(
                        specs=[tpb.TaskSpec(kind="echo", payload=b"p" * 600 * KiB)] * 10
                    )
                ),
                lambda: stub.SubmitBatch(
                    cpb.SubmitBatchRequest(specs=[tpb.TaskSpec(kind="echo", payload=b"q")] * 1001)
                ),
                lambda: stub.ListTasks(
                    cpb.ListTasksRequest(view=cpb.TASK_VIEW_FULL, page_size=1000)
                ),
                lambda: stub.ListAgents(cpb.ListAgentsRequest(page_size=1001)),
                lambda: ch.unary_unary("/agentmesh.v1.Coordinator/Submit")(
                    b"\x0a\xff\xff\xff\xff\x0f"
                ),
                lambda: ch.unary_unary("/agentmesh.v1.Coordinator/ListTasks")(b"\xff" * 100),
                lambda: stub.Submit(
                    cpb.SubmitRequest(spec=tpb.TaskSpec(kind="echo", payload=b"z" * 9 * MiB))
                ),
            ]
            i = 0
            try:
                while not stop.is_set() or i < 3 * len(attacks):
                    await self._one(attacks[i % len(attacks)])
                    i += 1
            finally:
                for w in watchers:
                    w.cancel()
                await agent_task

    async def _agent(self, ch: grpc.aio.Channel, stop: asyncio.Event) -> None:
        """An agent that runs nothing the good clients submit, and reports junk."""
        etcd = Etcd(self.etcd, prefix="/agentmesh/default/")
        lease = await etcd.grant(30)
        call = cpb_grpc.CoordinatorStub(ch).Connect()
        try:
            hello = cpb.AgentHello(
                agent_id="hostile-agent", lease_id=lease, kinds=["noop"], capacity=1
            )
            await call.write(cpb.AgentMessage(hello=hello))
            n = 0
            while not stop.is_set():
                task_id = f"c{n % CLIENTS}-t{n % TASKS_PER_CLIENT}"
                for msg in (
                    cpb.AgentMessage(
                        result=cpb.TaskResult(task_id=task_id, claim_token=n, output=b"r" * 3 * MiB)
                    ),
                    cpb.AgentMessage(
                        failure=cpb.TaskFailure(task_id=task_id, claim_token=n, error="e" * MiB)
                    ),
                    cpb.AgentMessage(
                        progress=cpb.TaskProgress(task_id=task_id, claim_token=n, fraction=0.5)
                    ),
                ):
                    self.requests += 1
                    await call.write(msg)
                n += 1
                await asyncio.sleep(0.05)
        except grpc.aio.AioRpcError as err:
            self.answers[f"agent stream {err.code().name}"] += 1
        finally:
            call.cancel()
            await etcd.revoke(lease)
            await etcd.close()


@pytest.mark.timeout(240)
async def test_eight_valid_clients_beside_a_hostile_one(cluster: Any) -> None:
    c = await cluster(agents=16, pools=2, capacity=2)
    endpoint = c.coordinator_endpoints[0]
    hostile = Hostile(endpoint, c.etcd_endpoint)
    stop = asyncio.Event()
    attacker = asyncio.ensure_future(hostile.run(stop))
    errors: list[str] = []
    t0 = time.monotonic()

    async def valid_client(n: int) -> list[str]:
        ids = []
        async with MeshClient(coordinator=endpoint, timeout_s=30) as client:
            for i in range(TASKS_PER_CLIENT):
                try:
                    resp = await client.submit(near_limit_spec(n, i))
                    ids.append(resp.task.task_id)
                except grpc.aio.AioRpcError as err:
                    errors.append(f"client {n} submit {i}: {err.code().name} {err.details()}")
        return ids

    try:
        await asyncio.sleep(0.5)  # the hostile client is under way first
        ids = [
            t for ts in await asyncio.gather(*(valid_client(n) for n in range(CLIENTS))) for t in ts
        ]
        states: dict[str, int] = {}
        async with MeshClient(coordinator=endpoint, timeout_s=30) as client:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                states = {tid: (await client.get(tid)).state for tid in ids}
                if all(s == tpb.TASK_STATE_SUCCEEDED for s in states.values()):
                    break
                await asyncio.sleep(0.25)
            for n in range(CLIENTS):  # each result is the client's own payload, whole
                task = await client.get(f"c{n}-t0")
                if task.result != near_limit_spec(n, 0).payload:
                    errors.append(f"client {n}: wrong result ({len(task.result)} bytes)")
    finally:
        stop.set()
        await asyncio.wait_for(attacker, 120)
    elapsed = time.monotonic() - t0
    succeeded = sum(s == tpb.TASK_STATE_SUCCEEDED for s in states.values())
    stuck = len(ids) - succeeded
    print(
        f"\nmixed run: {CLIENTS} valid clients, {len(ids)} tasks of 500 KiB echoed back "
        f"(payload + result ~1 MiB each): {succeeded} succeeded, {len(errors)} errors, "
        f"{stuck} stuck, in {elapsed:.1f} s; hostile client: {hostile.requests} requests, "
        f"answers {dict(sorted(hostile.answers.items()))}"
    )
    assert errors == []
    assert len(ids) == CLIENTS * TASKS_PER_CLIENT
    assert stuck == 0, {t: s for t, s in states.items() if s != tpb.TASK_STATE_SUCCEEDED}
    assert "INTERNAL" not in hostile.answers
    assert "UNKNOWN" not in hostile.answers
    assert "HANG" not in hostile.answers
