"""The coordinator's side of the health monitor, with a fake clock and an in-memory
store: releasing a hung agent's claim (requeued, cancelled on the agent, a late result
refused), releasing every claim of a FAILED agent, and the admission an ejected or
half-open agent gets (kept across its reconnects)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import health_pb2 as hpb
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.clock import FakeClock
from services._common.errors import InvalidArgumentError
from services.coordinator import limits
from services.coordinator.admission import limit_of
from services.coordinator.config import CoordinatorConfig
from services.coordinator.core import CoordinatorCore
from tests.unit.fakes import MemoryStore

S = tpb.TaskState


async def settle(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


class Agent:
    def __init__(self, core: CoordinatorCore, agent_id: str, lease: int, capacity: int = 1):
        self.agent_id = agent_id
        self.messages: list[cpb.CoordinatorMessage] = []
        self.lease = lease
        self.capacity = capacity
        self.core = core

    def connect(self) -> Agent:
        hello = cpb.AgentHello(
            agent_id=self.agent_id,
            lease_id=self.lease,
            kinds=["sleep"],
            capacity=self.capacity,
        )
        self.core.connect(hello, self._send)
        return self

    def _send(self, msg: cpb.CoordinatorMessage | None) -> None:
        if msg is not None:
            self.messages.append(msg)

    def assigned(self) -> list[tpb.Task]:
        return [m.assign.task for m in self.messages if m.WhichOneof("body") == "assign"]

    def cancelled(self) -> list[str]:
        return [m.cancel.task_id for m in self.messages if m.WhichOneof("body") == "cancel"]


@pytest.fixture
async def core() -> AsyncIterator[CoordinatorCore]:
    c = CoordinatorCore(
        MemoryStore(),
        FakeClock(),
        CoordinatorConfig(),
        term=3,
        node_id="c1",
        rng=random.Random(1),
    )
    runner = asyncio.ensure_future(c.run())
    try:
        yield c
    finally:
        runner.cancel()
        with contextlib.suppress(BaseException):
            await runner
        await c.close()


async def submit(core: CoordinatorCore, n: int, **kw: Any) -> list[tpb.Task]:
    out = await core.submit([tpb.TaskSpec(kind="sleep", **kw) for _ in range(n)])
    await settle()
    return [t for t, _ in out]


async def test_releasing_a_hung_claim_requeues_it_elsewhere_and_refuses_the_late_result(
    core: CoordinatorCore,
) -> None:
    hung = Agent(core, "hung", 1).connect()
    (task,) = await submit(core, 1)
    (held,) = hung.assigned()
    other = Agent(core, "other", 2).connect()
    released, skipped = await core.release_claims(
        "hung", [(held.task_id, held.claim_token)], "no progress"
    )
    await settle()
    assert released == [(held.task_id, held.claim_token)]
    assert not skipped
    assert hung.cancelled() == [held.task_id]
    (again,) = other.assigned()
    assert again.task_id == held.task_id
    assert again.attempts == 2  # the released attempt counted
    assert "released by the health monitor: no progress" in again.last_error
    late = await core.report(
        "hung", cpb.TaskResult(task_id=held.task_id, claim_token=held.claim_token)
    )
    assert not late.accepted
    # asking again (a retry after a lost reply) changes nothing
    released, skipped = await core.release_claims(
        "hung", [(held.task_id, held.claim_token)], "no progress"
    )
    assert not released
    assert skipped == [(held.task_id, held.claim_token)]


async def test_a_released_task_waits_for_another_agent_before_its_own(
    core: CoordinatorCore,
) -> None:
    clock = core.clock
    assert isinstance(clock, FakeClock)
    hung = Agent(core, "hung", 1).connect()
    await submit(core, 1)
    (held,) = hung.assigned()
    other = Agent(core, "other", 2).connect()
    await submit(core, 1)
    (running,) = other.assigned()
    await core.release_claims("hung", [(held.task_id, held.claim_token)], "hung")
    await settle()
    assert len(hung.assigned()) == 1  # not handed back the task it hung on
    await core.report(
        "other", cpb.TaskResult(task_id=running.task_id, claim_token=running.claim_token)
    )
    await settle()
    assert [t.task_id for t in other.assigned()] == [running.task_id, held.task_id]
    await clock.advance(0.02)
    await submit(core, 1)
    assert len(hung.assigned()) == 2  # its slot is back once the task ran elsewhere


async def test_with_nobody_else_free_the_task_goes_back_after_a_while(
    core: CoordinatorCore,
) -> None:
    clock = core.clock
    assert isinstance(clock, FakeClock)
    hung = Agent(core, "hung", 1).connect()
    await submit(core, 1)
    (held,) = hung.assigned()
    await core.release_claims("hung", [(held.task_id, held.claim_token)], "hung")
    await settle()
    assert len(hung.assigned()) == 1
    for _ in range(110):
        await clock.advance(0.01)
    again = hung.assigned()
    assert [t.task_id for t in again] == [held.task_id, held.task_id]
    assert again[1].attempts == 2


async def test_a_stale_token_or_another_agents_claim_is_skipped(core: CoordinatorCore) -> None:
    a = Agent(core, "a", 1).connect()
    await submit(core, 1)
    (held,) = a.assigned()
    for agent_id, token in (("a", held.claim_token + 1), ("b", held.claim_token)):
        released, skipped = await core.release_claims(agent_id, [(held.task_id, token)], "x")
        assert not released
        assert skipped
    assert core.active[held.task_id].task.state == S.TASK_STATE_ASSIGNED


async def test_releasing_a_failed_agent_releases_every_claim_it_holds(
    core: CoordinatorCore,
) -> None:
    a = Agent(core, "a", 1, capacity=3).connect()
    await submit(core, 3)
    assert len(a.assigned()) == 3
    core.admit("a", 0)  # its record says FAILED: nothing new
    released, _ = await core.release_claims("a", [], "agent FAILED")
    await settle()
    assert sorted(t for t, _ in released) == sorted(t.task_id for t in a.assigned())
    assert all(e.task.state == S.TASK_STATE_QUEUED for e in core.active.values())
    assert len(a.assigned()) == 3  # nothing new went to it


async def test_a_released_task_out_of_attempts_is_dead_lettered(core: CoordinatorCore) -> None:
    a = Agent(core, "a", 1).connect()
    (task,) = await submit(core, 1, max_attempts=1)
    (held,) = a.assigned()
    released, _ = await core.release_claims("a", [(held.task_id, held.claim_token)], "hung")
    assert released
    assert held.task_id not in core.active
    assert core.finished["DEAD_LETTER"] == 1


async def test_an_ejected_agent_gets_nothing_new_and_half_open_gets_one(
    core: CoordinatorCore,
) -> None:
    a = Agent(core, "a", 1, capacity=4).connect()
    core.admit("a", 0)
    await submit(core, 3)
    assert not a.assigned()
    assert core.agents["a"].status().health_admission == "none"
    core.admit("a", 1)  # half-open: one task on trial
    await settle()
    (trial,) = a.assigned()
    assert core.agents["a"].status().health_admission == "none"  # the trial is spent
    ack = await core.report(
        "a", cpb.TaskResult(task_id=trial.task_id, claim_token=trial.claim_token)
    )
    assert ack.accepted
    await settle()
    # done, but no second task until the monitor has read the outcome
    assert len(a.assigned()) == 1
    core.admit("a", 1)  # the record written again (no outcome came): a new trial
    await settle()
    assert len(a.assigned()) == 2
    core.admit("a", -1)  # closed
    await settle()
    assert len(a.assigned()) == 3
    assert core.agents["a"].status().health_admission == ""


async def test_the_admission_outlives_a_reconnect(core: CoordinatorCore) -> None:
    core.admit("a", 0)  # the record was read before the agent connected
    a = Agent(core, "a", 1).connect()
    await submit(core, 1)
    assert not a.assigned()
    core.disconnect("a")
    b = Agent(core, "a", 2).connect()
    await settle()
    assert not b.assigned()


@pytest.mark.parametrize(
    ("agent_id", "claims", "reason"),
    [
        ("", [], "x"),
        ("a/b", [], "x"),
        ("a", [("t", 1)] * 1001, "x"),
        ("a", [], "r" * (limits.REASON_BYTES + 1)),
    ],
)
async def test_release_requests_over_a_limit_are_refused(
    core: CoordinatorCore, agent_id: str, claims: list[tuple[str, int]], reason: str
) -> None:
    with pytest.raises(InvalidArgumentError):
        await core.release_claims(agent_id, claims, reason)


def test_a_health_record_maps_to_an_admission_limit() -> None:
    def raw(admission: int) -> bytes:
        return hpb.AgentHealth(agent_id="a", admission=admission).SerializeToString()  # type: ignore[arg-type]

    assert limit_of(raw(hpb.ADMISSION_NONE)) == 0
    assert limit_of(raw(hpb.ADMISSION_ONE)) == 1
    assert limit_of(raw(hpb.ADMISSION_ALL)) == -1
    assert limit_of(raw(hpb.ADMISSION_UNSPECIFIED)) == -1
    assert limit_of(b"\xff\xff not a proto") == -1
