"""One pool agent's handling of coordinator messages, without a stream: what it sends back."""

from __future__ import annotations

import asyncio

from protos.agentmesh.v1 import agent_pool_pb2 as ppb
from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.clock import FakeClock
from services._common.follow import Leader
from services.agent_pool.agent import Agent, PoolContext


def agent() -> Agent:
    clock = FakeClock()
    ctx = PoolContext(
        pool_id="p",
        lease_id=lambda: 1,
        coordinator=Leader(None, "coordinator", clock),  # type: ignore[arg-type]  # no etcd
        executors={},
        task_timeout_s=1.0,
        clock=clock,
    )
    a = Agent("p-a0001", ctx, ppb.AgentTemplate(kinds=["echo"], capacity=1))
    a._outbox = asyncio.Queue()
    return a


def assign(task_id: str, token: int) -> cpb.CoordinatorMessage:
    task = tpb.Task(task_id=task_id, claim_token=token, spec=tpb.TaskSpec(kind="echo"))
    return cpb.CoordinatorMessage(assign=cpb.Assign(task=task))


async def test_an_assign_that_crossed_draining_is_handed_back_not_ignored() -> None:
    # it used to be dropped: the task stayed ASSIGNED until the agent's stream ended
    a = agent()
    a.draining = True
    a._on_message(assign("t", 42))
    assert a.running == {}
    assert a._outbox is not None
    sent = a._outbox.get_nowait()
    assert sent is not None
    assert sent.WhichOneof("body") == "failure"
    failure = sent.failure
    assert (failure.task_id, failure.claim_token) == ("t", 42)
    assert failure.retryable
    assert failure.not_started  # the coordinator requeues it without counting an attempt
    assert "draining" in failure.error


async def test_an_assign_is_run_while_not_draining() -> None:
    a = agent()
    a._on_message(assign("t", 7))
    assert list(a.running) == ["t"]
    for _, runner in a.running.values():
        runner.cancel()
