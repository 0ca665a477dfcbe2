"""The coordinator's core with a fake clock and an in-memory store: no sockets, no etcd.

Each test drives `run()` (the dispatcher) in the background and plays the agents
as plain `send` callbacks that collect what the coordinator tells them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.clock import FakeClock
from services._common.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    NotLeaderError,
    StoreUnavailableError,
)
from services.coordinator.config import CoordinatorConfig
from services.coordinator.core import MAX_BATCH, CoordinatorCore
from services.coordinator.tasks import backoff_s
from tests.unit.fakes import MemoryStore

S = tpb.TaskState
QUEUED, ASSIGNED, SUCCEEDED = S.TASK_STATE_QUEUED, S.TASK_STATE_ASSIGNED, S.TASK_STATE_SUCCEEDED
CANCELLED, DEAD_LETTER = S.TASK_STATE_CANCELLED, S.TASK_STATE_DEAD_LETTER


async def settle(rounds: int = 20) -> None:
    """Let the dispatcher and the writes it started run to their next real wait."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def spec(kind: str = "echo", **kw: Any) -> tpb.TaskSpec:
    return tpb.TaskSpec(kind=kind, **kw)


@dataclass
class FakeAgent:
    """An agent's end of the Connect stream: records every message it is sent."""

    agent_id: str
    lease_id: int
    messages: list[cpb.CoordinatorMessage] = field(default_factory=list)
    closed: bool = False

    def send(self, msg: cpb.CoordinatorMessage | None) -> None:
        if msg is None:  # the coordinator closes the stream
            self.closed = True
        else:
            self.messages.append(msg)

    def of(self, body: str) -> list[Any]:
        return [getattr(m, body) for m in self.messages if m.WhichOneof("body") == body]

    def assigned(self) -> list[tpb.Task]:
        return [a.task for a in self.of("assign")]

    def assigned_ids(self) -> list[str]:
        return [t.task_id for t in self.assigned()]

    def cancelled_ids(self) -> list[str]:
        return [c.task_id for c in self.of("cancel")]


@dataclass
class Harness:
    core: CoordinatorCore
    store: MemoryStore
    clock: FakeClock
    runner: asyncio.Task[None]
    events: list[tuple[tpb.Task, int]]
    _lease: list[int]

    def agent(
        self,
        agent_id: str,
        *,
        kinds: tuple[str, ...] = ("echo", "sleep", "fail"),
        capacity: int = 1,
        roles: tuple[str, ...] = (),
        labels: dict[str, str] | None = None,
        held: tuple[tuple[str, int], ...] = (),
        lease_id: int = 0,
    ) -> FakeAgent:
        """Connect an agent (each on a lease of its own unless given one)."""
        if not lease_id:
            self._lease[0] += 1
            lease_id = self._lease[0]
        fake = FakeAgent(agent_id, lease_id)
        hello = cpb.AgentHello(
            agent_id=agent_id,
            pool_id="pool-1",
            lease_id=lease_id,
            roles=roles,
            labels=labels or {},
            kinds=kinds,
            capacity=capacity,
            held_claims=[cpb.ClaimRef(task_id=t, claim_token=c) for t, c in held],
        )
        self.core.connect(hello, fake.send)
        return fake

    async def submit(self, *specs: tpb.TaskSpec) -> list[tpb.Task]:
        out = [task for task, _ in await self.core.submit(list(specs))]
        await settle()
        return out

    async def result(
        self, agent: FakeAgent, task: tpb.Task, output: bytes = b"ok", token: int = 0
    ) -> cpb.ReportAck:
        msg = cpb.TaskResult(
            task_id=task.task_id, claim_token=token or task.claim_token, output=output
        )
        ack = await self.core.report(agent.agent_id, msg)
        await settle()
        return ack

    async def failure(
        self, agent: FakeAgent, task: tpb.Task, *, retryable: bool, error: str = "boom"
    ) -> cpb.ReportAck:
        msg = cpb.TaskFailure(
            task_id=task.task_id, claim_token=task.claim_token, error=error, retryable=retryable
        )
        ack = await self.core.report(agent.agent_id, msg)
        await settle()
        return ack

    def state(self, task_id: str) -> int:
        """The durable state (what etcd holds)."""
        return self.store.task(task_id).state


MakeCore = Callable[..., Any]


@pytest.fixture
async def make_core() -> AsyncIterator[MakeCore]:
    """Build a core (term 7) with its dispatcher running; stopped at the test's end.

    Keyword arguments override CoordinatorConfig fields; `store=` shares a store
    between terms (a failover).
    """
    harnesses: list[Harness] = []

    async def make(
        store: MemoryStore | None = None, term: int = 7, clock: FakeClock | None = None, **cfg: Any
    ) -> Harness:
        store = store if store is not None else MemoryStore()
        clock = clock or FakeClock()
        core = CoordinatorCore(
            store,
            clock,
            CoordinatorConfig(**cfg),
            term=term,
            node_id=f"c{term}",
            rng=random.Random(term),
        )
        events: list[tuple[tpb.Task, int]] = []

        def record(task: tpb.Task, previous: int) -> None:
            snapshot = tpb.Task()
            snapshot.CopyFrom(task)
            events.append((snapshot, previous))

        core.subscribers.add(record)
        h = Harness(core, store, clock, asyncio.ensure_future(core.run()), events, [100 * term])
        harnesses.append(h)
        await settle()
        return h

    try:
        yield make
    finally:
        for h in harnesses:
            await stop(h)


async def stop(h: Harness) -> None:
    h.runner.cancel()
    with contextlib.suppress(BaseException):
        await h.runner
    await h.core.close()


@pytest.fixture
async def h(make_core: MakeCore) -> Harness:
    harness: Harness = await make_core()
    return harness


# ---------------------------------------------------------------- submit validation


@pytest.mark.parametrize(
    ("bad", "names"),
    [
        (tpb.TaskSpec(), "spec.kind"),
        (spec("teleport"), "spec.kind 'teleport' is unknown"),
        (spec(payload=b"x" * (512 * 1024 + 1)), "spec.payload"),
        (spec(priority=10), "spec.priority 10"),
        (spec(task_id="has spaces!"), "spec.task_id"),
        (spec(task_id="x" * 129), "spec.task_id"),
        (spec(max_attempts=101), "spec.max_attempts"),
        (spec(timeout_s=-1), "spec.timeout_s"),
        (spec(idempotency_key="k" * 257), "spec.idempotency_key"),
    ],
)
async def test_bad_spec_is_refused_naming_the_field(
    h: Harness, bad: tpb.TaskSpec, names: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=names) as err:
        await h.core.submit([bad])
    assert "Traceback" not in str(err.value)
    assert h.store.commits == 0


async def test_payload_at_the_limit_is_accepted(h: Harness) -> None:
    (task,) = await h.submit(spec(payload=b"x" * (512 * 1024), priority=9))
    assert task.state == QUEUED


async def test_batch_errors_name_the_index_and_write_nothing(h: Harness) -> None:
    with pytest.raises(InvalidArgumentError, match=r"specs\[1\]\.kind"):
        await h.core.submit([spec(), spec("nope"), spec()])
    with pytest.raises(InvalidArgumentError, match="appears twice"):
        await h.core.submit([spec(task_id="same"), spec(task_id="same")])
    with pytest.raises(InvalidArgumentError, match="specs is empty"):
        await h.core.submit([])
    with pytest.raises(InvalidArgumentError, match=f"at most {MAX_BATCH}"):
        await h.core.submit([spec() for _ in range(MAX_BATCH + 1)])
    assert h.store.commits == 0
    assert h.store.records == {}


async def test_a_batch_is_one_store_round_trip(h: Harness) -> None:
    results = await h.core.submit([spec() for _ in range(MAX_BATCH)])
    assert len({t.task_id for t, _ in results}) == MAX_BATCH
    assert all(created for _, created in results)
    assert h.store.commits == 1
    assert all(h.state(t.task_id) == QUEUED for t, _ in results)


# ---------------------------------------------------------------- idempotent submit


async def test_same_task_id_returns_the_existing_task(h: Harness) -> None:
    ((first, created),) = await h.core.submit([spec(task_id="job-1", payload=b"a")])
    ((again, created_again),) = await h.core.submit([spec(task_id="job-1", payload=b"b")])
    assert created
    assert not created_again
    assert again.task_id == "job-1"
    assert again.spec.payload == b"a"
    assert again.created_at_us == first.created_at_us
    assert len(h.store.records) == 1


async def test_same_idempotency_key_returns_the_existing_task(h: Harness) -> None:
    ((first, _),) = await h.core.submit([spec(idempotency_key="order-42")])
    await h.clock.advance(1)
    ((again, created),) = await h.core.submit([spec(idempotency_key="order-42")])
    assert not created
    assert again.task_id == first.task_id
    assert len(h.store.records) == 1


async def test_replay_of_a_finished_task_returns_its_terminal_record(h: Harness) -> None:
    a = h.agent("a1")
    (task,) = await h.submit(spec(task_id="done-once"))
    (assigned,) = a.assigned()
    assert (await h.result(a, assigned, b"out")).accepted
    ((again, created),) = await h.core.submit([spec(task_id="done-once")])
    assert not created
    assert again.state == SUCCEEDED
    assert again.result == b"out"
    assert a.assigned_ids() == [task.task_id]  # not run twice


async def test_a_batch_mixing_new_and_existing_ids(h: Harness) -> None:
    await h.core.submit([spec(task_id="old")])
    results = await h.core.submit([spec(task_id="old"), spec(task_id="new")])
    assert [(t.task_id, c) for t, c in results] == [("old", False), ("new", True)]


# ---------------------------------------------------------------- dispatch order and matching


async def test_higher_priority_first_and_fifo_within_one(h: Harness) -> None:
    await h.submit(
        spec(task_id="p0-a", priority=0),
        spec(task_id="p5-a", priority=5),
        spec(task_id="p9", priority=9),
        spec(task_id="p5-b", priority=5),
        spec(task_id="p0-b", priority=0),
    )
    a = h.agent("a1", capacity=1)
    order = []
    for _ in range(5):
        await settle()
        task = a.assigned()[-1]
        order.append(task.task_id)
        assert (await h.result(a, task)).accepted
    assert order == ["p9", "p5-a", "p5-b", "p0-a", "p0-b"]


async def test_tasks_go_only_to_agents_that_can_run_them(h: Harness) -> None:
    a = h.agent("coder", kinds=("echo",), roles=("coder",), labels={"gpu": "a100"}, capacity=10)
    await h.submit(
        spec("sleep", task_id="wrong-kind", priority=9),
        spec(task_id="wrong-role", role="reviewer", priority=9),
        spec(task_id="wrong-label", required_labels={"gpu": "h100"}, priority=9),
        spec(task_id="fits", role="coder", required_labels={"gpu": "a100"}),
        spec(task_id="any"),
    )
    # the unrunnable ones ahead of them (even at a higher priority) block nothing
    assert sorted(a.assigned_ids()) == ["any", "fits"]
    for tid in ("wrong-kind", "wrong-role", "wrong-label"):
        assert h.state(tid) == QUEUED
    b = h.agent(
        "reviewer",
        kinds=("echo", "sleep"),
        roles=("reviewer",),
        labels={"gpu": "h100"},
        capacity=10,
    )
    await settle()
    assert sorted(b.assigned_ids()) == ["wrong-kind", "wrong-label", "wrong-role"]


async def test_capacity_is_respected(h: Harness) -> None:
    a = h.agent("a1", capacity=2)
    await h.submit(*(spec(task_id=f"t{i}") for i in range(5)))
    assert a.assigned_ids() == ["t0", "t1"]
    assert h.core.agents["a1"].status().inflight == 2
    await h.result(a, a.assigned()[0])
    assert a.assigned_ids() == ["t0", "t1", "t2"]
    assert [h.state(f"t{i}") for i in range(5)] == [SUCCEEDED, ASSIGNED, ASSIGNED, QUEUED, QUEUED]


async def test_a_draining_agent_gets_nothing_new(h: Harness) -> None:
    a = h.agent("a1", capacity=5)
    h.core.drain("a1")
    await h.submit(spec(task_id="t"))
    assert a.assigned_ids() == []
    assert h.state("t") == QUEUED


# ---------------------------------------------------------------- strategies


async def test_least_loaded_picks_the_least_loaded_agent(h: Harness) -> None:
    busy = h.agent("busy", capacity=4)
    await h.submit(spec(task_id="b1"), spec(task_id="b2"))
    assert busy.assigned_ids() == ["b1", "b2"]
    idle = h.agent("idle", capacity=4)
    await h.submit(spec(task_id="n1"))
    await h.submit(spec(task_id="n2"))
    assert idle.assigned_ids() == ["n1", "n2"]  # 1/4 still beats 2/4
    await h.submit(spec(task_id="n3"))
    assert len(busy.assigned_ids()) + len(idle.assigned_ids()) == 5


async def test_load_is_relative_to_capacity(h: Harness) -> None:
    small = h.agent("small", capacity=1)
    big = h.agent("big", capacity=10)
    await h.submit(spec(task_id="t1"))
    await h.submit(spec(task_id="t2"))
    await h.submit(spec(task_id="t3"))
    assert small.assigned_ids() == ["t1"]
    assert big.assigned_ids() == ["t2", "t3"]


async def test_round_robin_cycles_through_agents(make_core: MakeCore) -> None:
    h = await make_core(strategy="round-robin")
    agents = [h.agent(f"a{i}", capacity=10) for i in range(3)]
    for i in range(7):
        await h.submit(spec(task_id=f"t{i}"))
    assert [a.assigned_ids() for a in agents] == [["t0", "t3", "t6"], ["t1", "t4"], ["t2", "t5"]]


async def test_round_robin_skips_agents_that_cannot_run_the_task(make_core: MakeCore) -> None:
    h = await make_core(strategy="round-robin")
    a = h.agent("a", kinds=("echo",), capacity=10)
    b = h.agent("b", kinds=("sleep",), capacity=10)
    c = h.agent("c", kinds=("echo",), capacity=10)
    for i in range(4):
        await h.submit(spec(task_id=f"e{i}"))
    assert a.assigned_ids() == ["e0", "e2"]
    assert c.assigned_ids() == ["e1", "e3"]
    assert b.assigned_ids() == []


async def test_a_task_behind_more_tasks_than_one_plan_scans_that_nobody_can_run_is_dispatched(
    make_core: MakeCore,
) -> None:
    """Tasks that need a label no agent has wait in front: a plan looks at a bounded
    number of tasks, and those used it all up, so nothing behind them was ever
    dispatched (the agents sat idle)."""
    h = await make_core()
    blocked = [spec(task_id=f"gpu-{i}", required_labels={"gpu": "none"}) for i in range(12_000)]
    for i in range(0, len(blocked), 1000):
        await h.core.submit(blocked[i : i + 1000])
    a = h.agent("a", capacity=1)
    await h.submit(spec(task_id="probe-1"))
    assert a.assigned_ids() == ["probe-1"]
    b = h.agent("b", capacity=1, labels={"gpu": "none"})  # FIFO holds among the rest
    await settle()
    assert b.assigned_ids() == ["gpu-0"]


async def test_weighted_prefers_label_affinity(make_core: MakeCore) -> None:
    h = await make_core(strategy="weighted")
    other = h.agent("other", capacity=10, labels={"project": "y"})
    warm = h.agent("warm", capacity=10, labels={"project": "x"})
    await h.submit(spec(task_id="x1", metadata={"project": "x"}))
    await h.submit(spec(task_id="x2", metadata={"project": "x"}))
    await h.submit(spec(task_id="y1", metadata={"project": "y"}))
    assert warm.assigned_ids() == ["x1", "x2"]
    assert other.assigned_ids() == ["y1"]


async def test_weighted_prefers_low_latency(make_core: MakeCore) -> None:
    h = await make_core(strategy="weighted")
    slow = h.agent("slow", capacity=4)
    fast = h.agent("fast", capacity=4)
    await h.submit(spec(task_id="warm-slow"), spec(task_id="warm-fast"))
    (on_slow,) = slow.assigned()
    (on_fast,) = fast.assigned()
    # the same work takes 2 s on one agent and 10 ms on the other (fake time)
    await h.clock.advance(0.01)
    await h.result(fast, on_fast)
    await h.clock.advance(2)
    await h.result(slow, on_slow)
    assert (
        h.core.agents["slow"].status().latency_ema_ms
        > 100 * h.core.agents["fast"].status().latency_ema_ms
    )
    await h.submit(spec(task_id="next"))
    assert fast.assigned_ids() == ["warm-fast", "next"]


async def test_random_only_picks_eligible_agents(make_core: MakeCore) -> None:
    h = await make_core(strategy="random")
    eligible = [h.agent(f"e{i}", kinds=("echo",), capacity=100) for i in range(3)]
    wrong = [h.agent(f"w{i}", kinds=("sleep",), capacity=100) for i in range(3)]
    await h.submit(*(spec(task_id=f"t{i:02d}") for i in range(60)))
    got = [len(a.assigned_ids()) for a in eligible]
    assert sum(got) == 60
    assert all(n > 0 for n in got)  # spread, not stuck on one
    assert all(a.assigned_ids() == [] for a in wrong)


def test_unknown_strategy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="least-loaded"):
        CoordinatorCore(
            MemoryStore(), FakeClock(), CoordinatorConfig(strategy="fastest"), term=1, node_id="c"
        )


# ---------------------------------------------------------------- results and claim tokens


async def test_result_with_the_claim_token_succeeds_exactly_once(h: Harness) -> None:
    a = h.agent("a1")
    (task,) = await h.submit(spec(payload=b"in"))
    (assigned,) = a.assigned()
    assert assigned.claim_token > 0
    assert assigned.attempts == 1
    assert h.store.claims[task.task_id][:2] == ("a1", assigned.claim_token)
    ack = await h.result(a, assigned, b"out")
    assert ack.accepted, ack.reason
    stored = h.store.task(task.task_id)
    assert (stored.state, stored.result, stored.agent_id) == (SUCCEEDED, b"out", "a1")
    assert task.task_id not in h.store.claims
    again = await h.result(a, assigned, b"other")
    assert not again.accepted
    assert "not in flight" in again.reason
    assert h.store.task(task.task_id).result == b"out"
    assert [e for e, _ in h.events if e.state == SUCCEEDED] == [stored]
    assert (await h.core.get(task.task_id)).state == SUCCEEDED
    assert h.core.counts()["SUCCEEDED"] == 1


async def test_two_store_round_trips_when_an_agent_is_free_at_submit(h: Harness) -> None:
    a = h.agent("a1")
    (task,) = await h.submit(spec())
    assert task.state == ASSIGNED  # created with its claim in one transaction
    await h.result(a, a.assigned()[0])
    assert h.store.commits == 2  # submit+claim, complete


async def test_three_store_round_trips_when_the_task_waits(h: Harness) -> None:
    await h.submit(spec(task_id="waits"))  # no agent yet: QUEUED
    a = h.agent("a1")
    await settle()
    await h.result(a, a.assigned()[0])
    assert h.store.commits == 3  # submit, claim, complete


async def test_fast_path_never_overtakes_waiting_tasks(h: Harness) -> None:
    a = h.agent("a1", capacity=1)
    await h.submit(spec(task_id="first"))
    await h.submit(spec(task_id="second", priority=9))  # a1 is busy: queued
    (first,) = a.assigned()
    await h.result(a, first)
    await h.submit(spec(task_id="third", priority=9))  # a1 is free, but "second" waits
    await settle()
    assert a.assigned_ids() == ["first", "second"]


@pytest.mark.parametrize("delta", [1, -1, 1000])
async def test_stale_or_forged_token_is_refused(h: Harness, delta: int) -> None:
    a = h.agent("a1")
    (task,) = await h.submit(spec())
    (assigned,) = a.assigned()
    ack = await h.result(a, assigned, b"forged", token=assigned.claim_token + delta)
    assert not ack.accepted
    assert "token" in ack.reason
    assert h.state(task.task_id) == ASSIGNED
    assert (await h.result(a, assigned, b"real")).accepted
    assert h.store.task(task.task_id).result == b"real"


async def test_a_report_from_another_agent_is_refused(h: Harness) -> None:
    a = h.agent("a1")
    b = h.agent("b1")
    (task,) = await h.submit(spec())
    holder, thief = (a, b) if a.assigned() else (b, a)
    (assigned,) = holder.assigned()
    ack = await h.result(thief, assigned, b"stolen")
    assert not ack.accepted
    assert "token" in ack.reason
    assert h.state(task.task_id) == ASSIGNED


async def test_a_refused_report_keeps_the_claim_counted(h: Harness) -> None:
    a = h.agent("a1", capacity=1)
    b = h.agent("b1", capacity=1, kinds=("sleep",))
    await h.submit(spec(task_id="held"))
    (assigned,) = a.assigned()
    ack = await h.result(a, assigned, token=assigned.claim_token + 1)
    assert not ack.accepted
    await h.submit(spec(task_id="next"))
    assert a.assigned_ids() == ["held"]  # capacity 1, still holding "held"
    h.core.disconnect("a1")
    await settle()
    assert h.state("held") == QUEUED  # the dropped stream released it
    assert b.assigned_ids() == []


# ---------------------------------------------------------------- failures and retries


async def test_retryable_failure_backs_off_then_dead_letters(h: Harness) -> None:
    a = h.agent("a1", capacity=1)
    (task,) = await h.submit(spec("fail", max_attempts=3))
    tid = task.task_id
    base = h.core.cfg.retry_base_s
    for attempt in (1, 2):
        (current,) = [t for t in a.assigned() if t.attempts == attempt]
        ack = await h.failure(a, current, retryable=True, error=f"flaky {attempt}")
        assert ack.accepted, ack.reason
        stored = h.store.task(tid)
        assert stored.state == QUEUED
        assert stored.last_error == f"flaky {attempt}"
        ceiling = base * 2 ** (attempt - 1)
        wait_s = (stored.not_before_us - h.clock.wall_us()) / 1e6
        assert ceiling / 2 <= wait_s <= ceiling
        # the agent is free, but the task waits out its backoff
        await h.clock.advance(ceiling / 2 * 0.9)
        await settle()
        assert len(a.assigned()) == attempt
        await h.clock.advance(ceiling)
        await settle()
        assert len(a.assigned()) == attempt + 1
    (last,) = [t for t in a.assigned() if t.attempts == 3]
    await h.failure(a, last, retryable=True, error="flaky 3")
    stored = h.store.task(tid)
    assert stored.state == DEAD_LETTER
    assert stored.last_error == "flaky 3"
    assert stored.attempts == 3
    await h.clock.advance(100)
    assert len(a.assigned()) == 3


async def test_non_retryable_failure_dead_letters_at_once(h: Harness) -> None:
    a = h.agent("a1")
    (task,) = await h.submit(spec("fail", max_attempts=5))
    await h.failure(a, a.assigned()[0], retryable=False, error="bad input")
    stored = h.store.task(task.task_id)
    assert (stored.state, stored.last_error, stored.attempts) == (DEAD_LETTER, "bad input", 1)
    assert h.core.agents["a1"].failed == 1


async def test_default_max_attempts_comes_from_config(make_core: MakeCore) -> None:
    h = await make_core(default_max_attempts=1)
    a = h.agent("a1")
    (task,) = await h.submit(spec("fail"))
    assert task.spec.max_attempts == 1
    await h.failure(a, a.assigned()[0], retryable=True)
    assert h.state(task.task_id) == DEAD_LETTER


@pytest.mark.parametrize("attempt", range(1, 12))
def test_backoff_stays_between_half_the_ceiling_and_the_ceiling(attempt: int) -> None:
    rng = random.Random(attempt)
    ceiling = min(30.0, 0.5 * 2 ** (attempt - 1))
    draws = [backoff_s(attempt, 0.5, 30.0, rng) for _ in range(200)]
    assert all(ceiling / 2 <= d <= ceiling for d in draws)
    assert max(draws) - min(draws) > 0  # jittered
    assert max(draws) <= 30.0


def test_backoff_is_capped() -> None:
    assert backoff_s(50, 0.5, 30.0, random.Random(1)) <= 30.0
    assert backoff_s(0, 0.5, 30.0, random.Random(1)) <= 0.5


# ---------------------------------------------------------------- lost agents and claims


async def test_disconnect_requeues_at_once_to_another_agent(h: Harness) -> None:
    a = h.agent("a1", capacity=2)
    await h.submit(spec(task_id="t1"), spec(task_id="t2"))
    assert sorted(a.assigned_ids()) == ["t1", "t2"]
    old = {t.task_id: t.claim_token for t in a.assigned()}
    h.core.disconnect("a1")
    await settle()
    assert h.state("t1") == QUEUED
    b = h.agent("b1", capacity=2)
    await settle()
    assert sorted(b.assigned_ids()) == ["t1", "t2"]
    for task in b.assigned():
        assert task.attempts == 2
        assert task.claim_token > old[task.task_id]
    # the old holder's late result counts for nothing
    stale = next(t for t in a.assigned() if t.task_id == "t1")
    ack = await h.core.report("a1", cpb.TaskResult(task_id="t1", claim_token=stale.claim_token))
    assert not ack.accepted
    assert (await h.result(b, b.assigned()[0])).accepted


async def test_lost_lease_requeues_and_drops_the_agent(h: Harness) -> None:
    a = h.agent("a1", capacity=1)
    await h.submit(spec(task_id="t"))
    (held,) = a.assigned()
    b = h.agent("b1", capacity=1)
    # etcd expires a1's lease: the claims watch reports each deleted claim
    for task_id, token in h.store.expire_lease(a.lease_id):
        h.core.claim_lost(task_id, token)
    await settle()
    assert "t" in a.cancelled_ids()
    assert [t.task_id for t in b.assigned()] == ["t"]
    assert b.assigned()[0].claim_token > held.claim_token
    assert h.store.claims["t"][0] == "b1"
    # a claim on a1's dead lease cannot be written: a1 is dropped and told to reconnect
    assert "a1" not in h.core.agents or h.core.agents["a1"].status().inflight == 0


async def test_an_agent_whose_lease_died_is_dropped_and_its_task_goes_elsewhere(h: Harness) -> None:
    a = h.agent("a1", capacity=1)
    h.store.expire_lease(a.lease_id)  # dead before any claim: only the claim write finds out
    await h.submit(spec(task_id="t"))
    assert a.assigned_ids() == []
    assert "a1" not in h.core.agents
    assert a.of("drain")
    b = h.agent("b1")
    await settle()
    assert b.assigned_ids() == ["t"]
    assert h.store.task("t").attempts == 1


async def test_claim_lost_with_an_old_token_changes_nothing(h: Harness) -> None:
    a = h.agent("a1")
    await h.submit(spec(task_id="t"))
    (held,) = a.assigned()
    h.core.claim_lost("t", held.claim_token - 1)
    await settle()
    assert h.state("t") == ASSIGNED
    assert a.cancelled_ids() == []


async def test_a_late_accepted_does_not_revive_a_lost_claim(h: Harness) -> None:
    a = h.agent("a1", capacity=1)
    await h.submit(spec(task_id="t"))
    (held,) = a.assigned()
    h.core.drain("a1")  # so the requeued task cannot go straight back to a1
    h.core.claim_lost("t", held.claim_token)
    await settle()
    assert h.state("t") == QUEUED
    # a1 sent "accepted" before it saw the cancel
    h.core.accepted("a1", cpb.TaskAccepted(task_id="t", claim_token=held.claim_token))
    b = h.agent("b1")
    await settle()
    assert b.assigned_ids() == ["t"]


async def test_agent_lost_on_its_last_attempt_dead_letters(h: Harness) -> None:
    a = h.agent("a1")
    await h.submit(spec(task_id="t", max_attempts=1))
    h.core.disconnect("a1")
    await settle()
    stored = h.store.task("t")
    assert stored.state == DEAD_LETTER
    assert "disconnected" in stored.last_error
    assert a.assigned_ids() == ["t"]


# ---------------------------------------------------------------- cancel


async def test_cancel_a_queued_task(h: Harness) -> None:
    (task,) = await h.submit(spec(task_id="t"))
    cancelled = await h.core.cancel("t", "not needed")
    assert cancelled.state == CANCELLED
    assert h.state("t") == CANCELLED
    assert h.store.task("t").last_error == "not needed"
    a = h.agent("a1")
    await settle()
    assert a.assigned_ids() == []


async def test_cancel_an_assigned_task_tells_the_agent(h: Harness) -> None:
    a = h.agent("a1", capacity=1)
    await h.submit(spec(task_id="t"), spec(task_id="after"))
    (held,) = a.assigned()
    cancelled = await h.core.cancel("t", "")
    await settle()
    assert cancelled.state == CANCELLED
    assert a.cancelled_ids() == ["t"]
    assert "t" not in h.store.claims
    assert h.state("t") == CANCELLED
    # its slot is free again, and its late result is refused
    assert a.assigned_ids() == ["t", "after"]
    assert not (await h.result(a, held)).accepted
    assert h.state("t") == CANCELLED


async def test_cancel_a_terminal_task_returns_it_unchanged(h: Harness) -> None:
    a = h.agent("a1")
    await h.submit(spec(task_id="t"))
    await h.result(a, a.assigned()[0], b"done")
    commits = h.store.commits
    again = await h.core.cancel("t", "too late")
    assert (again.state, again.result) == (SUCCEEDED, b"done")
    assert h.store.commits == commits


async def test_unknown_task_is_not_found(h: Harness) -> None:
    with pytest.raises(NotFoundError, match="nope"):
        await h.core.get("nope")
    with pytest.raises(NotFoundError):
        await h.core.cancel("nope", "")


# ---------------------------------------------------------------- leadership


async def test_a_deposed_store_stops_the_dispatcher_and_writes_nothing_more(h: Harness) -> None:
    await h.submit(spec(task_id="t"))
    h.store.deposed = True
    h.agent("a1")  # the dispatcher tries to claim "t" and finds the term over
    await settle()
    assert h.runner.done()
    with pytest.raises(NotLeaderError):
        h.runner.result()
    h.store.deposed = False  # even if the store would take it, the core does not write
    commits = h.store.commits
    with pytest.raises(NotLeaderError):
        await h.core.submit([spec()])
    with pytest.raises(NotLeaderError):
        await h.core.cancel("t", "")
    assert h.store.commits == commits
    assert h.state("t") == QUEUED


async def test_store_unavailable_fails_the_submit_but_keeps_leading(h: Harness) -> None:
    from services._common.errors import StoreUnavailableError

    h.store.fail_next = 1
    with pytest.raises(StoreUnavailableError):
        await h.core.submit([spec(task_id="t")])
    assert not h.runner.done()
    a = h.agent("a1")
    await h.submit(spec(task_id="t"))
    assert a.assigned_ids() == ["t"]


async def test_failover_requeues_orphaned_claims(make_core: MakeCore) -> None:
    old = await make_core(term=7)
    a = old.agent("a1")
    await old.submit(spec(task_id="orphan"), spec(task_id="waiting"))
    assert a.assigned_ids() == ["orphan"]
    await stop(old)
    old.store.expire_lease(a.lease_id)  # the agent's process died during the failover

    new = await make_core(store=old.store, term=9)
    records, claims = new.store.snapshot()
    orphans = new.core.load(records, claims)
    assert orphans == ["orphan"]
    new.core.requeue_orphans(orphans)
    await settle()
    assert new.state("orphan") == QUEUED
    b = new.agent("b1", capacity=2)
    await settle()
    assert sorted(b.assigned_ids()) == ["orphan", "waiting"]
    assert all(t.term == 9 for t in b.assigned())


async def test_failover_keeps_a_claim_the_agent_still_holds(make_core: MakeCore) -> None:
    old = await make_core(term=7)
    a = old.agent("a1")
    await old.submit(spec(task_id="t", payload=b"p"))
    (held,) = a.assigned()
    await stop(old)

    new = await make_core(store=old.store, term=9)
    assert new.core.load(*new.store.snapshot()) == []
    # the agent reconnects to the new leader, still working on "t", same lease
    again = new.agent("a1", capacity=1, held=(("t", held.claim_token),), lease_id=a.lease_id)
    other = new.agent("b1")
    await settle()
    assert again.cancelled_ids() == []
    assert new.state("t") == ASSIGNED
    assert other.assigned_ids() == []
    assert [m.WhichOneof("body") for m in again.messages] == ["welcome"]
    assert again.of("welcome")[0].term == 9
    ack = await new.result(again, held, b"finished")
    assert ack.accepted, ack.reason
    assert new.store.task("t").result == b"finished"


async def test_failover_requeues_a_claim_the_agent_never_received(make_core: MakeCore) -> None:
    # the old leader committed the claim and died before the Assign left: the agent's
    # lease is alive, so the claim is too, but the agent does not list it
    old = await make_core(term=7)
    a = old.agent("a1")
    await old.submit(spec(task_id="lost-in-flight"))
    await stop(old)

    new = await make_core(store=old.store, term=9)
    assert new.core.load(*new.store.snapshot()) == []
    again = new.agent("a1", capacity=1, held=(), lease_id=a.lease_id)
    await settle()
    assert new.state("lost-in-flight") == ASSIGNED
    assert again.assigned_ids() == ["lost-in-flight"]  # requeued, then dispatched afresh
    assert again.assigned()[0].term == 9


async def test_failover_requeues_claims_of_agents_that_never_come_back(make_core: MakeCore) -> None:
    old = await make_core(term=7)
    old.agent("a1")
    await old.submit(spec(task_id="stranded"))
    await stop(old)

    new = await make_core(store=old.store, term=9)
    new.core.load(*new.store.snapshot())
    b = new.agent("b1")
    await settle()
    assert b.assigned_ids() == []  # a1 may still reconnect: its claim is respected
    new.core.expire_awaiting()  # the grace period is over
    await settle()
    assert b.assigned_ids() == ["stranded"]


async def test_a_held_claim_that_is_gone_is_cancelled_on_reconnect(h: Harness) -> None:
    a = h.agent("a1", held=(("never-existed", 5),))
    assert a.cancelled_ids() == ["never-existed"]


async def test_load_adopts_queued_tasks_with_their_backoff(make_core: MakeCore) -> None:
    old = await make_core(term=7)
    a = old.agent("a1")
    await old.submit(spec("fail", task_id="t"))
    await old.failure(a, a.assigned()[0], retryable=True)
    not_before = old.store.task("t").not_before_us
    await stop(old)

    new = await make_core(store=old.store, term=9, clock=old.clock)
    new.core.load(*new.store.snapshot())
    b = new.agent("b1")
    await settle()
    assert b.assigned_ids() == []
    await new.clock.advance((not_before - new.clock.wall_us()) / 1e6 + 0.001)
    await settle()
    assert b.assigned_ids() == ["t"]


# ---------------------------------------------------------------- hello validation


@pytest.mark.parametrize(
    ("hello", "names"),
    [
        (cpb.AgentHello(lease_id=1, kinds=["echo"], capacity=1), "agent_id"),
        (cpb.AgentHello(agent_id="a", kinds=["echo"], capacity=1), "lease_id"),
        (cpb.AgentHello(agent_id="a", lease_id=1, kinds=["echo"], capacity=0), "capacity"),
        (cpb.AgentHello(agent_id="a", lease_id=1, capacity=1), "kinds"),
    ],
)
async def test_bad_hello_is_refused(h: Harness, hello: cpb.AgentHello, names: str) -> None:
    with pytest.raises(InvalidArgumentError, match=names):
        h.core.connect(hello, lambda _: None)
    assert h.core.agents == {}


# ---------------------------------------------------------------- writes whose outcome is unknown
#
# A commit that raises after it was sent (a deadline, a reset, etcd killed after it
# applied the write) may have landed. The core reads back before acting: every task
# still ends in exactly one terminal state, with the counts and events to match.


async def run_for(h: Harness, seconds: float, step: float = 0.25) -> None:
    """Let fake time pass (backoffs, probes, timers), settling after each step."""
    await settle()
    for _ in range(int(seconds / step)):
        await h.clock.advance(step)
        await settle()


async def finish(h: Harness, awaitable: Any, within_s: float = 30.0) -> Any:
    """Run `awaitable` while fake time passes; fail if it has not ended by `within_s`."""
    task = asyncio.ensure_future(awaitable)
    waited = 0.0
    await settle()
    while not task.done() and waited < within_s:
        await h.clock.advance(0.25)
        await settle()
        waited += 0.25
    assert task.done(), f"still waiting after {within_s} s of fake time"
    return task.result()


def terminal_events(h: Harness) -> collections.Counter[str]:
    """task id → how many terminal events the core published for it."""
    return collections.Counter(
        t.task_id for t, _ in h.events if t.state in (SUCCEEDED, CANCELLED, DEAD_LETTER)
    )


def assert_counts_match_the_store(h: Harness) -> None:
    assert {k: v for k, v in h.core.counts().items() if v} == h.store.states()


async def test_submit_whose_reply_is_lost_is_read_back_and_runs(h: Harness) -> None:
    h.store.lose_next = 1
    results = await finish(h, h.core.submit([spec(task_id=f"t{i}") for i in range(20)]))
    assert all(created for _, created in results)
    a = h.agent("a1", capacity=20)
    await settle()
    assert sorted(a.assigned_ids()) == sorted(f"t{i}" for i in range(20))
    for task in a.assigned():
        assert (await h.result(a, task)).accepted
    assert terminal_events(h) == {f"t{i}": 1 for i in range(20)}
    assert_counts_match_the_store(h)


async def test_fast_path_submit_whose_reply_is_lost_is_delivered(h: Harness) -> None:
    a = h.agent("a1")
    h.store.lose_next = 1
    ((task, created),) = await finish(h, h.core.submit([spec(task_id="t")]))
    assert created
    await settle()
    (assigned,) = a.assigned()
    assert (assigned.task_id, assigned.attempts) == ("t", 1)
    assert assigned.claim_token == h.store.claims["t"][1]
    assert (await h.result(a, assigned)).accepted
    assert h.state("t") == SUCCEEDED
    assert_counts_match_the_store(h)


async def test_fast_path_submit_that_did_not_land_frees_the_agent(h: Harness) -> None:
    a = h.agent("a1")
    h.store.fail_next = 1
    with pytest.raises(StoreUnavailableError):
        await finish(h, h.core.submit([spec(task_id="t")]))
    assert "t" not in h.store.records
    assert h.core.agents["a1"].status().inflight == 0
    await run_for(h, 3)
    await h.submit(spec(task_id="u"))  # the slot is free again
    assert a.assigned_ids() == ["u"]


async def test_assignment_whose_reply_is_lost_is_delivered(h: Harness) -> None:
    await h.submit(spec(task_id="t"))
    h.store.lose_next = 1
    a = h.agent("a1")
    await run_for(h, 3)
    (assigned,) = a.assigned()
    assert (assigned.task_id, assigned.attempts) == ("t", 1)
    assert assigned.claim_token == h.store.claims["t"][1]
    assert (await h.result(a, assigned)).accepted
    assert h.state("t") == SUCCEEDED
    assert terminal_events(h) == {"t": 1}
    assert_counts_match_the_store(h)


async def test_assignment_that_did_not_land_keeps_the_task_first_in_line(h: Harness) -> None:
    await h.submit(spec(task_id="first"), spec(task_id="second"))
    h.store.fail_next = 1
    a = h.agent("a1")
    await run_for(h, 3)
    assert a.assigned_ids() == ["first"]
    assert a.assigned()[0].attempts == 1


async def test_report_whose_reply_is_lost_is_accepted_once(h: Harness) -> None:
    a = h.agent("a1")
    await h.submit(spec(task_id="t"))
    (assigned,) = a.assigned()
    h.store.lose_next = 1
    msg = cpb.TaskResult(task_id="t", claim_token=assigned.claim_token, output=b"out")
    ack = await finish(h, h.core.report("a1", msg))
    assert ack.accepted, ack.reason
    assert h.store.task("t").result == b"out"
    assert h.core.agents["a1"].status().completed == 1
    assert terminal_events(h) == {"t": 1}
    assert_counts_match_the_store(h)


async def test_retryable_failure_whose_reply_is_lost_is_retried_once(h: Harness) -> None:
    a = h.agent("a1")
    await h.submit(spec("fail", task_id="t", max_attempts=2))
    (first,) = a.assigned()
    h.store.lose_next = 1
    msg = cpb.TaskFailure(task_id="t", claim_token=first.claim_token, error="x", retryable=True)
    assert (await finish(h, h.core.report("a1", msg))).accepted
    await run_for(h, 3)  # the backoff
    assert [t.attempts for t in a.assigned()] == [1, 2]
    await h.failure(a, a.assigned()[1], retryable=True)
    assert h.store.task("t").state == DEAD_LETTER
    assert h.store.task("t").attempts == 2
    assert_counts_match_the_store(h)


async def test_requeue_whose_reply_is_lost_publishes_it_once(h: Harness) -> None:
    h.agent("a1")
    await h.submit(spec(task_id="t"))
    h.store.lose_next = 1
    h.core.disconnect("a1")
    await run_for(h, 2)
    assert h.state("t") == QUEUED
    requeued = [t for t, prev in h.events if t.state == QUEUED and prev == ASSIGNED]
    assert len(requeued) == 1
    b = h.agent("b1")
    await settle()
    (again,) = b.assigned()
    assert again.attempts == 2
    assert (await h.result(b, again)).accepted
    assert_counts_match_the_store(h)


async def test_cancel_whose_reply_is_lost_says_cancelled(h: Harness) -> None:
    await h.submit(spec(task_id="t"))
    h.store.lose_next = 1
    got = await finish(h, h.core.cancel("t", "not needed"))
    assert got.state == CANCELLED
    a = h.agent("a1")
    await run_for(h, 2)
    assert a.assigned_ids() == []
    assert terminal_events(h) == {"t": 1}
    assert_counts_match_the_store(h)


async def test_cancel_of_a_running_task_whose_reply_is_lost(h: Harness) -> None:
    a = h.agent("a1")
    await h.submit(spec(task_id="t"))
    h.store.lose_next = 1
    got = await finish(h, h.core.cancel("t", ""))
    assert got.state == CANCELLED
    assert a.cancelled_ids() == ["t"]
    assert h.core.agents["a1"].status().inflight == 0
    assert_counts_match_the_store(h)


async def test_cancel_that_cannot_be_committed_is_an_error_and_keeps_the_task_queued(
    h: Harness,
) -> None:
    # issue 9, race 1: plan() dropped the entry from the ready queue while the cancel was
    # being written; the cancel failed and the task stayed QUEUED in no queue
    a = h.agent("a1", capacity=1)
    await h.submit(spec(task_id="first"), spec(task_id="t"))
    (first,) = a.assigned()
    gate = h.store.hold()
    h.store.fail_next = 1  # the cancel's commit: sent, never applied
    cancel = asyncio.ensure_future(h.core.cancel("t", ""))
    await settle()  # the cancel is being written
    # meanwhile the agent's slot frees: the dispatcher plans while the cancel is busy
    report = asyncio.ensure_future(
        h.core.report("a1", cpb.TaskResult(task_id="first", claim_token=first.claim_token))
    )
    await settle()
    gate.set()
    h.store.release()
    with pytest.raises(StoreUnavailableError):
        await finish(h, cancel)
    assert (await finish(h, report)).accepted
    await run_for(h, 3)
    assert a.assigned_ids() == ["first", "t"]
    assert h.state("t") == ASSIGNED


async def test_cancel_during_an_outage_is_unavailable_not_ok(h: Harness) -> None:
    await h.submit(spec(task_id="t"))
    h.store.down = True
    # this cancel's commit meets the outage: whether it landed is known only when etcd
    # answers again, so the caller is told UNAVAILABLE now and the core settles it later
    with pytest.raises(StoreUnavailableError, match="not known yet"):
        await finish(h, h.core.cancel("t", ""))
    # while the outage is known, a cancel is refused at once, without a write
    calls = h.store.calls
    with pytest.raises(StoreUnavailableError, match="not cancelled"):
        await h.core.cancel("t", "")
    assert h.store.calls == calls
    h.store.down = False
    await run_for(h, 3)  # the first cancel is settled: it had not landed
    assert h.state("t") == QUEUED
    a = h.agent("a1")
    await run_for(h, 1)
    assert a.assigned_ids() == ["t"]


async def test_a_submit_cut_off_by_etcd_dying_is_settled_when_etcd_returns(h: Harness) -> None:
    # etcd applies the create and dies before it replies (SIGKILL): the client cannot be
    # told whether the task exists, so it hears UNAVAILABLE at once, not after its deadline
    h.store.lose_next = 1
    h.store.die_with_lost_reply = True
    with pytest.raises(StoreUnavailableError, match="not known yet"):
        await finish(h, h.core.submit([spec(task_id="t")]))
    with pytest.raises(StoreUnavailableError):  # its retry, while etcd is still down
        await h.core.submit([spec(task_id="t")])
    h.store.down = False
    await run_for(h, 3)  # etcd is back: the leader reads the create back and holds it
    assert h.core.queue_depth() == 1
    ((again, created),) = await h.core.submit([spec(task_id="t")])
    assert not created
    a = h.agent("a1")
    await settle()
    assert a.assigned_ids() == ["t"]
    assert (await h.result(a, a.assigned()[0])).accepted
    assert terminal_events(h) == {"t": 1}


async def test_cancel_of_a_task_that_finished_meanwhile_says_so(h: Harness) -> None:
    a = h.agent("a1")
    await h.submit(spec(task_id="t"))
    (assigned,) = a.assigned()
    gate = h.store.hold()
    report = asyncio.ensure_future(
        h.core.report("a1", cpb.TaskResult(task_id="t", claim_token=assigned.claim_token))
    )
    await settle()
    cancel = asyncio.ensure_future(h.core.cancel("t", "too late"))
    await settle()
    gate.set()
    h.store.release()
    assert (await finish(h, report)).accepted
    got = await finish(h, cancel)
    assert got.state == SUCCEEDED
    assert terminal_events(h) == {"t": 1}


async def test_cancel_of_a_record_the_leader_does_not_hold_cancels_it(h: Harness) -> None:
    # left by a submit whose reply was lost (before this was fixed) or by another term
    h.store.put(tpb.Task(task_id="ghost", spec=spec(task_id="ghost", max_attempts=3), state=QUEUED))
    got = await finish(h, h.core.cancel("ghost", "cleanup"))
    assert got.state == CANCELLED
    assert h.state("ghost") == CANCELLED


# ---------------------------------------------------------------- a caller that goes away


async def test_a_submit_whose_caller_leaves_after_sending_still_takes_the_task(h: Harness) -> None:
    gate = h.store.hold()
    call = asyncio.ensure_future(h.core.submit([spec(task_id="t")]))
    await settle()
    call.cancel()  # the client's deadline: grpc cancels the handler
    await settle()
    gate.set()
    h.store.release()
    await settle()
    a = h.agent("a1")
    await run_for(h, 1)
    assert a.assigned_ids() == ["t"]
    # the client retries the same id: it is there, and it is not run twice
    ((again, created),) = await h.core.submit([spec(task_id="t")])
    assert not created
    assert again.state == ASSIGNED
    assert (await h.result(a, a.assigned()[0])).accepted
    assert terminal_events(h) == {"t": 1}


async def test_a_cancel_whose_caller_leaves_still_finishes(h: Harness) -> None:
    await h.submit(spec(task_id="t"))
    gate = h.store.hold()
    call = asyncio.ensure_future(h.core.cancel("t", ""))
    await settle()
    call.cancel()
    await settle()
    gate.set()
    h.store.release()
    a = h.agent("a1")
    await run_for(h, 1)
    assert h.state("t") == CANCELLED
    assert a.assigned_ids() == []
    assert_counts_match_the_store(h)


# ---------------------------------------------------------------- idempotent replays repair memory


async def test_submit_replay_adopts_a_queued_record_the_leader_does_not_hold(h: Harness) -> None:
    h.store.put(tpb.Task(task_id="ghost", spec=spec(task_id="ghost", max_attempts=3), state=QUEUED))
    ((task, created),) = await finish(h, h.core.submit([spec(task_id="ghost")]))
    assert not created
    assert task.state == QUEUED
    assert h.core.queue_depth() == 1
    a = h.agent("a1")
    await settle()
    assert a.assigned_ids() == ["ghost"]


async def test_submit_replay_delivers_an_assigned_record_its_agent_never_got(h: Harness) -> None:
    a = h.agent("a1")
    task = tpb.Task(
        task_id="ghost", spec=spec(task_id="ghost", max_attempts=3), state=ASSIGNED, attempts=1
    )
    task.agent_id = "a1"
    h.store.put(task, claim_lease=a.lease_id)
    ((got, created),) = await finish(h, h.core.submit([spec(task_id="ghost")]))
    assert not created
    await run_for(h, 1)
    (assigned,) = a.assigned()
    assert assigned.task_id == "ghost"
    assert assigned.attempts == 1
    assert (await h.result(a, assigned)).accepted
    assert h.state("ghost") == SUCCEEDED


# ---------------------------------------------------------------- an outage, waited out calmly


async def test_an_outage_is_waited_out_calmly(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    a = h.agent("a1", capacity=5)
    await h.submit(*(spec(task_id=f"t{i:02d}") for i in range(10)))  # 5 held, 5 waiting
    held = a.assigned()
    caplog.set_level(logging.INFO, logger="services.coordinator.core")
    caplog.clear()
    h.store.down = True
    # the agent reports what it held: its slots free at once, so the dispatcher has an
    # agent and tasks to match, and no etcd to write the claims to
    reports = [
        asyncio.ensure_future(
            h.core.report("a1", cpb.TaskResult(task_id=t.task_id, claim_token=t.claim_token))
        )
        for t in held
    ]
    calls = h.store.calls
    await run_for(h, 30)
    # about one probe a second, not a failed write per wake-up of the dispatcher
    assert h.store.calls - calls <= 60, h.store.calls - calls
    assert not any(r.done() for r in reports)
    noisy = [r.getMessage() for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    assert len(noisy) == 1, noisy
    h.store.down = False
    await run_for(h, 5)
    assert all(r.done() and r.result().accepted for r in reports)
    assert len(a.assigned()) == 10
    back = [
        r.getMessage() for r in caplog.records if r.levelname == "INFO" and "etcd" in r.getMessage()
    ]
    assert len(back) == 1, back
    assert_counts_match_the_store(h)


# ---------------------------------------------------------------- attempts are counted once


async def test_an_assignment_lost_in_failover_does_not_use_up_an_attempt(
    make_core: MakeCore,
) -> None:
    old = await make_core(term=7)
    a = old.agent("a1")
    await old.submit(spec(task_id="t", max_attempts=1))
    await stop(old)

    new = await make_core(store=old.store, term=9)
    new.core.load(*new.store.snapshot())
    again = new.agent("a1", capacity=1, held=(), lease_id=a.lease_id)  # it never got "t"
    await settle()
    (assigned,) = again.assigned()
    assert assigned.attempts == 1
    assert (await new.result(again, assigned)).accepted
    stored = new.store.task("t")
    assert (stored.state, stored.attempts) == (SUCCEEDED, 1)


# ---------------------------------------------------------------- issue 9, race 2: reconnects


async def test_a_reconnect_keeps_the_claims_the_agent_still_holds(h: Harness) -> None:
    a = h.agent("a1", capacity=1)
    await h.submit(spec(task_id="t"))
    (held,) = a.assigned()
    # the agent saw its stream break first and says hello on a new one while the
    # server's old stream is still open
    again = h.agent("a1", capacity=1, lease_id=a.lease_id, held=(("t", held.claim_token),))
    await run_for(h, 2)
    assert a.closed  # the old stream is closed explicitly
    assert h.state("t") == ASSIGNED
    assert again.cancelled_ids() == []
    assert (await h.result(again, held)).accepted
    stored = h.store.task("t")
    assert (stored.state, stored.attempts) == (SUCCEEDED, 1)


async def test_a_hello_before_the_disconnects_requeue_commits_keeps_the_claim(
    h: Harness,
) -> None:
    a = h.agent("a1", capacity=1)
    await h.submit(spec(task_id="t"))
    (held,) = a.assigned()
    h.core.disconnect("a1")  # the stream ended: its requeue is scheduled, not yet written
    again = h.agent("a1", capacity=1, lease_id=a.lease_id, held=(("t", held.claim_token),))
    await run_for(h, 2)
    assert h.state("t") == ASSIGNED
    assert again.cancelled_ids() == []
    assert (await h.result(again, held)).accepted
    assert h.store.task("t").attempts == 1


async def test_a_hello_while_the_requeue_is_being_written_is_told_the_claim_is_gone(
    h: Harness,
) -> None:
    a = h.agent("a1", capacity=1)
    await h.submit(spec(task_id="t"))
    (held,) = a.assigned()
    gate = h.store.hold()
    h.core.disconnect("a1")
    await settle()  # the requeue is on the wire: nothing can stop it now
    again = h.agent("a1", capacity=1, lease_id=a.lease_id, held=(("t", held.claim_token),))
    gate.set()
    h.store.release()
    await run_for(h, 2)
    # its claim is gone, so it is told to stop, and the task runs again (on it: it is free)
    assert "t" in again.cancelled_ids()
    assert not (await h.result(again, held)).accepted
    fresh = [t for t in again.assigned()]
    assert [t.task_id for t in fresh] == ["t"]
    assert (await h.result(again, fresh[0])).accepted
    assert terminal_events(h) == {"t": 1}


# ---------------------------------------------------------------- a draining agent's crossed assign


async def test_a_task_a_draining_agent_did_not_start_is_requeued_without_counting(
    h: Harness,
) -> None:
    a = h.agent("a1", capacity=1)
    await h.submit(spec(task_id="t", max_attempts=1))
    (assigned,) = a.assigned()
    h.core.drain("a1")  # the agent's "draining" crossed the assign
    msg = cpb.TaskFailure(
        task_id="t",
        claim_token=assigned.claim_token,
        error="agent is draining",
        retryable=True,
        not_started=True,
    )
    assert (await finish(h, h.core.report("a1", msg))).accepted
    b = h.agent("b1")
    await settle()
    (again,) = b.assigned()
    assert again.attempts == 1  # the attempt never started: it does not count
    assert (await h.result(b, again)).accepted
    assert h.state("t") == SUCCEEDED


async def test_not_started_from_an_agent_that_is_not_draining_counts(h: Harness) -> None:
    # only a draining agent may hand work back for free: anything else could loop a task
    a = h.agent("a1", capacity=1)
    await h.submit(spec(task_id="t", max_attempts=1))
    (assigned,) = a.assigned()
    msg = cpb.TaskFailure(
        task_id="t", claim_token=assigned.claim_token, retryable=True, not_started=True
    )
    assert (await finish(h, h.core.report("a1", msg))).accepted
    assert h.state("t") == DEAD_LETTER


# ---------------------------------------------------------------- agent identity (issue 8, item 3)


async def test_a_hello_for_a_connected_agent_on_another_lease_is_refused(h: Harness) -> None:
    real = h.agent("a1", capacity=1)
    with pytest.raises(AlreadyExistsError, match="a1"):
        h.agent("a1", capacity=1)  # another process (another lease) says it is a1
    assert not real.closed
    assert h.core.agents["a1"].lease_id == real.lease_id
    await h.submit(spec(task_id="t"))
    assert real.assigned_ids() == ["t"]


# ---------------------------------------------------------------- reconcile


async def test_reconcile_repairs_every_difference(h: Harness) -> None:
    h.agent("a1", capacity=5)
    await h.submit(spec(task_id="held"))
    h.core.drain("a1")
    await h.submit(spec(task_id="q1"), spec(task_id="q2"))
    # 1. a record memory never took in (a write whose outcome was never resolved)
    h.store.put(tpb.Task(task_id="ghost", spec=spec(task_id="ghost", max_attempts=3), state=QUEUED))
    # 2. a QUEUED task that fell out of every queue
    h.core.queue.ready[0].remove("q1")
    # 3. a task etcd says is finished
    done = h.store.task("q2")
    done.state = CANCELLED
    h.store.put(done)
    # 4. an ASSIGNED task no connected agent holds
    h.core.agents["a1"].inflight.discard("held")
    stats = await finish(h, h.core.reconcile())
    assert stats.adopted == 1
    assert stats.requeued == 1
    assert stats.enqueued == 1
    assert stats.finished == 1
    assert h.state("held") == QUEUED
    assert h.core.queue_depth() == 3  # held, q1, ghost
    b = h.agent("b1", capacity=5)
    await settle()
    assert sorted(b.assigned_ids()) == ["ghost", "held", "q1"]
    assert_counts_match_the_store(h)
    again = await finish(h, h.core.reconcile())
    assert again.repairs() == 0


async def test_reconcile_leaves_claims_awaiting_their_agent_after_takeover(
    make_core: MakeCore,
) -> None:
    old = await make_core(term=7)
    old.agent("a1")
    await old.submit(spec(task_id="t"))
    await stop(old)
    new = await make_core(store=old.store, term=9)
    new.core.load(*new.store.snapshot())
    stats = await finish(new, new.core.reconcile())
    assert stats.repairs() == 0
    assert new.state("t") == ASSIGNED


# ---------------------------------------------------------------- everything at once


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_every_task_ends_terminal_once_whatever_replies_are_lost(
    make_core: MakeCore, seed: int
) -> None:
    """Random lost replies and failed commits on every kind of write, with agents that
    drop their streams and come back, and clients that cancel: every task ends in one
    terminal state, published once; attempts never pass max_attempts; counts match."""
    rng = random.Random(seed)
    store = MemoryStore(chaos=random.Random(seed), lose_p=0.08, fail_p=0.08)
    h = await make_core(store=store)
    agents = {f"a{i}": h.agent(f"a{i}", capacity=2) for i in range(4)}
    leases = {name: fake.lease_id for name, fake in agents.items()}
    ids = [f"t{i:03d}" for i in range(120)]
    acked: set[str] = set()

    async def submit(batch: list[str]) -> None:
        specs = [spec("fail" if rng.random() < 0.1 else "echo", task_id=t) for t in batch]
        for _ in range(20):  # a client retries the same ids until acknowledged
            try:
                await h.core.submit(specs)
                acked.update(batch)
                return
            except StoreUnavailableError:
                await h.clock.sleep(0.3)

    async def agent_loop(name: str) -> None:
        done: set[int] = set()
        while True:
            fake = agents[name]
            for task in fake.assigned():
                if task.claim_token in done:
                    continue
                done.add(task.claim_token)
                if task.task_id in fake.cancelled_ids():
                    continue
                if task.spec.kind == "fail":
                    msg: Any = cpb.TaskFailure(
                        task_id=task.task_id, claim_token=task.claim_token, retryable=True
                    )
                else:
                    msg = cpb.TaskResult(task_id=task.task_id, claim_token=task.claim_token)
                h.core.run_in_background(_report(h, name, msg))
            # the stream drops; the agent comes back holding nothing
            if rng.random() < 0.02 and h.core.agents.get(name) is not None:
                h.core.disconnect(name)
                await h.clock.sleep(0.2)
                agents[name] = h.agent(name, capacity=2, lease_id=leases[name])
            await h.clock.sleep(0.05)

    loops = [asyncio.ensure_future(agent_loop(n)) for n in agents]
    clients = [asyncio.ensure_future(submit(ids[i : i + 10])) for i in range(0, len(ids), 10)]
    cancels = [
        asyncio.ensure_future(_cancel_later(h, t, rng.random())) for t in rng.sample(ids, 10)
    ]
    try:
        for _ in range(600):
            await h.clock.advance(0.1)
            await settle()
            if all(c.done() for c in clients) and all(
                h.store.task(t).state in (SUCCEEDED, CANCELLED, DEAD_LETTER) for t in acked
            ):
                break
        for c in cancels:
            c.cancel()
        store.chaos = None
        await finish(h, h.core.reconcile())
        await run_for(h, 5)
    finally:
        for loop in loops:
            loop.cancel()
    assert acked == set(ids)
    stuck = {
        t: h.store.task(t).state
        for t in acked
        if h.store.task(t).state not in (SUCCEEDED, CANCELLED, DEAD_LETTER)
    }
    assert not stuck
    assert terminal_events(h) == {t: 1 for t in acked}
    assert all(h.store.task(t).attempts <= h.store.task(t).spec.max_attempts for t in acked)
    assert_counts_match_the_store(h)
    assert h.store.claims == {}


async def _report(h: Harness, agent_id: str, msg: Any) -> None:
    with contextlib.suppress(StoreUnavailableError, NotLeaderError):
        await h.core.report(agent_id, msg)


async def _cancel_later(h: Harness, task_id: str, after: float) -> None:
    await h.clock.sleep(after * 3)
    with contextlib.suppress(StoreUnavailableError, NotFoundError):
        await h.core.cancel(task_id, "random cancel")
