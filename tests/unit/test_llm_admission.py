"""The leader's llm gate (services/coordinator/llm_admission.py) with a fake clock."""

from __future__ import annotations

import heapq
import json
import random
from typing import Any

import pytest

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.clock import FakeClock
from services._common.llm_cost import BudgetReachedError
from services._common.ratelimit import ModelBuckets, ModelLimits
from services.agent_pool.llm_config import LlmConfig
from services.coordinator.llm_admission import LlmGate

MODEL = "claude-haiku-5-5"


def llm_task(i: int, *, max_tokens: int = 100, project: str = "", prompt: str = "x") -> tpb.Task:
    return tpb.Task(
        task_id=f"t-{i}",
        state=tpb.TASK_STATE_QUEUED,
        spec=tpb.TaskSpec(
            kind="llm",
            payload=json.dumps(
                {"prompt": prompt, "model": MODEL, "max_tokens": max_tokens}
            ).encode(),
            metadata={"project": project} if project else {},
        ),
    )


def gate(clock: FakeClock, **cfg: Any) -> LlmGate:
    cfg.setdefault("admission_headroom", 0.0)
    return LlmGate(LlmConfig(**cfg), clock)


def result(task: tpb.Task, inp: int, out: int, cost: float = 0.0, **headers: str) -> cpb.TaskResult:
    msg = cpb.TaskResult(
        task_id=task.task_id,
        usage=tpb.TokenUsage(input_tokens=inp, output_tokens=out, cost_usd=cost),
    )
    if headers:
        msg.ratelimit.model = MODEL
        msg.ratelimit.headers.update({k.replace("_", "-"): v for k, v in headers.items()})
    return msg


def test_other_kinds_and_unlimited_models_are_always_admitted() -> None:
    g = gate(FakeClock())
    assert g.admit(tpb.Task(task_id="e", spec=tpb.TaskSpec(kind="echo")))
    assert all(g.admit(llm_task(i)) for i in range(1000))  # no limits configured
    assert g.next_try_s() is None


def test_a_task_that_does_not_fit_stays_queued_and_status_says_why() -> None:
    clock = FakeClock()
    # 60 RPM over a 1 s burst window: one request a second
    g = gate(clock, limits=(f"{MODEL}=60/0/0",), admission_burst_s=1.0)
    tasks = [llm_task(i) for i in range(3)]
    assert g.admit(tasks[0])
    assert not g.admit(tasks[1])
    assert not g.admit(tasks[2])  # first come, first served: it waits behind t-1
    assert g.held(tasks[2])
    assert not g.held(tpb.Task(task_id="e", spec=tpb.TaskSpec(kind="echo")))
    wait = g.next_try_s()
    assert wait is not None
    assert 0.9 <= wait <= 1.0
    (line,) = g.waiting(tasks[1:])
    assert line.startswith(f"{MODEL}: waiting for requests per minute")
    assert "[2 llm task(s) queued]" in line
    clock._now += wait
    assert g.admit(tasks[1])
    assert not g.admit(tasks[2])


def test_output_is_debited_at_max_tokens_and_refunded_by_the_usage() -> None:
    clock = FakeClock()
    g = gate(clock, limits=(f"{MODEL}=0/0/6000",), admission_burst_s=1.0)  # 100 output tokens/s
    a, b = llm_task(1, max_tokens=100), llm_task(2, max_tokens=80)
    assert g.admit(a)
    assert not g.admit(b)  # a holds its whole max_tokens until it reports
    g.reported(a, "agent-1", result(a, 10, 20))
    assert g.admit(b)  # 80 of a's 100 came back


def test_the_buckets_follow_what_the_service_reports() -> None:
    clock = FakeClock()
    g = gate(clock, limits=(f"{MODEL}=600/0/0",), admission_burst_s=1.0)  # 10 per burst
    a = llm_task(0)
    assert g.admit(a)
    # the service says 0 left (someone else uses the account): believe it
    g.reported(a, "agent-1", result(a, 1, 1, anthropic_ratelimit_requests_remaining="0"))
    assert not g.admit(llm_task(1))


def test_remaining_is_credited_with_the_refill_since_it_was_read() -> None:
    clock = FakeClock()
    g = gate(clock, limits=(f"{MODEL}=600/0/0",), admission_burst_s=1.0)
    a = llm_task(0)
    assert g.admit(a)
    msg = result(a, 1, 1, anthropic_ratelimit_requests_remaining="0")
    msg.ratelimit.seen_at_us = clock.wall_us() - 500_000  # read 0.5 s ago: 5 refilled since
    g.reported(a, "agent-1", msg)
    assert sum(g.admit(llm_task(i)) for i in range(1, 10)) == 5


def test_a_429s_retry_after_pauses_the_model() -> None:
    clock = FakeClock()
    g = gate(clock, limits=(f"{MODEL}=6000/0/0",), admission_burst_s=1.0)
    a = llm_task(0)
    assert g.admit(a)
    failure = cpb.TaskFailure(task_id=a.task_id, retryable=True)
    failure.ratelimit.model = MODEL
    failure.ratelimit.headers["retry-after"] = "2"
    failure.ratelimit.seen_at_us = clock.wall_us()
    g.reported(a, "agent-1", failure)
    assert not g.admit(llm_task(1))
    assert "paused after a 429" in g.waiting([llm_task(1)])[0]
    clock._now += 2.01
    assert g.admit(llm_task(1))


def test_admission_off_lets_everything_through() -> None:
    g = gate(FakeClock(), limits=(f"{MODEL}=1/1/1",), admission=False)
    assert all(g.admit(llm_task(i)) for i in range(100))


def test_costs_are_totalled_per_agent_role_model_and_project_and_persisted() -> None:
    g = gate(FakeClock())
    a, b = llm_task(1, project="alpha"), llm_task(2)
    a.spec.role = "coder"
    g.reported(a, "agent-1", result(a, 1000, 100, cost=0.5))
    g.reported(b, "agent-2", result(b, 10, 10))  # no cost given: priced by the table
    totals = {(t.dimension, t.key): t for t in g.totals()}
    assert totals["project", "alpha"].usage.cost_usd == 0.5
    assert totals["role", "coder"].calls == 1
    assert totals["model", MODEL].calls == 2
    assert totals["model", MODEL].usage.input_tokens == 1010
    assert totals["agent", "agent-2"].usage.cost_usd == pytest.approx((10 * 0.1 + 10 * 0.5) / 1e6)
    assert g.agent_usage("agent-1")[0] == 1
    # a new term adopts what the last one wrote, and budgets count it
    records = g.take_dirty()
    assert g.take_dirty() == []
    again = gate(FakeClock(), project_budgets=("alpha=0.5",))
    again.load(records)
    assert {(t.dimension, t.key): t for t in again.totals()} == totals
    with pytest.raises(BudgetReachedError, match=r"project 'alpha' reached: \$0.50 of \$0.50"):
        again.check_budgets([llm_task(3, project="alpha").spec])


def test_budgets_refuse_new_llm_tasks_naming_the_budget_and_the_spend() -> None:
    g = gate(FakeClock(), budget_usd=1.0, project_budgets=("alpha=0.25",))
    spec = llm_task(1, project="alpha").spec
    g.check_budgets([spec])
    t = llm_task(1, project="alpha")
    g.reported(t, "agent-1", result(t, 1, 1, cost=0.3))
    with pytest.raises(BudgetReachedError) as info:
        g.check_budgets([tpb.TaskSpec(kind="echo"), spec])
    assert "budget of project 'alpha' reached: $0.30 of $0.25 spent" in str(info.value)
    g.check_budgets([llm_task(2, project="beta").spec, tpb.TaskSpec(kind="echo")])
    t2 = llm_task(2, project="beta")
    g.reported(t2, "agent-1", result(t2, 1, 1, cost=0.7))
    with pytest.raises(BudgetReachedError, match=r"budget cluster reached: \$1.00 of \$1.00"):
        g.check_budgets([llm_task(3, project="beta").spec])
    g.check_budgets([tpb.TaskSpec(kind="echo")])  # other kinds are never refused
    status = {b.name: (b.cap_usd, round(b.spent_usd, 2)) for b in g.budget_status()}
    assert status == {"cluster": (1.0, 1.0), "alpha": (0.25, 0.3)}


def simulate_burst(admission: bool, *, tasks: int = 3000, seed: int = 7) -> tuple[int, int, float]:
    """A burst through the gate into a simulated service with the same limits.

    40 agents; each call reaches the service 0-30 ms after it is admitted (dispatch and
    network jitter) and takes 200-600 ms; the service enforces RPM/OTPM with the same
    bucket semantics and answers 429 when a bucket is short. A refused call is retried by
    the agent after 1 s (retry-after), outside the gate. Returns (calls, 429s, the RPM
    used as a fraction of the limit while the burst ran)."""
    rng = random.Random(seed)
    clock = FakeClock(0.0)
    rpm, otpm = 3000, 3000 * 150  # 50 requests/s; max_tokens 150
    g = gate(
        clock,
        limits=(f"{MODEL}={rpm}/0/{otpm}",),
        admission_burst_s=1.0,
        admission=admission,
        admission_headroom=0.05,
    )
    server = ModelBuckets(ModelLimits(rpm, 0, otpm), 0.0, burst_s=1.0)
    queue = [llm_task(i, max_tokens=150) for i in range(tasks)]
    free_agents = 40
    events: list[tuple[float, int, str, Any]] = []  # (time, seq, what, task)
    seq = 0
    calls = refused = ok = 0
    first_ok = last_ok = 0.0

    def push(at: float, what: str, task: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, what, task))

    while queue or events:
        # the dispatcher: admit in order while agents are free
        while queue and free_agents and g.admit(queue[0]):
            free_agents -= 1
            push(clock._now + rng.uniform(0, 0.03), "arrive", queue.pop(0))
        if not events:
            wait = g.next_try_s()
            clock._now += wait if wait is not None else 0.001
            continue
        nxt = g.next_try_s()
        at, _, what, task = heapq.heappop(events)
        if queue and free_agents and nxt is not None and clock._now + nxt < at:
            push(at, what, task)  # put back: the dispatcher's timer fires first
            clock._now += nxt
            continue
        clock._now = max(clock._now, at)
        now = clock._now
        if what == "arrive":
            calls += 1
            if server.blocking(0, 150, now)[1] > 0:
                refused += 1
                push(now + 1.0, "arrive", task)  # the agent's own retry after retry-after
                continue
            server.take(0, 150, now)
            push(now + rng.uniform(0.2, 0.6), "done", task)
        else:
            out = rng.randint(50, 150)
            server.correct(0, out - 150, now)
            ok += 1
            first_ok = first_ok or now
            last_ok = now
            free_agents += 1
            g.reported(task, "agent", result(task, 10, out))
    rate = ok / max(1e-9, last_ok - first_ok) * 60
    return calls, refused, rate / rpm


def test_a_burst_through_admission_stays_inside_the_limits() -> None:
    calls, refused, used = simulate_burst(admission=True)
    assert refused <= 0.01 * calls
    assert used >= 0.9
    # and the same burst without the gate is a storm of 429s: the test can fail
    calls_off, refused_off, _ = simulate_burst(admission=False)
    assert refused_off > 0.1 * calls_off
