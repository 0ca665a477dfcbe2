"""The swarm snapshot: what the cluster says (status, agents, events, samples) folded into
one JSON-able view, with a fake clock and proto fixtures (no sockets)."""

from __future__ import annotations

import json
import random

import pytest

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.clock import FakeClock
from services.observe.model import BucketLatency, Limits, SwarmModel

S = tpb.TaskState
T0 = 1_795_900_000.0  # seconds since the epoch: the fake clock's start


def clock() -> FakeClock:
    return FakeClock(start=T0)


def task(
    task_id: str,
    state: int,
    *,
    agent: str = "",
    kind: str = "sleep",
    priority: int = 0,
    attempts: int = 1,
    created_ms: float = 0.0,
    assigned_ms: float = 0.0,
    finished_ms: float = 0.0,
    cost: float = 0.0,
    tokens: tuple[int, int] = (0, 0),
    error: str = "",
) -> tpb.Task:
    """A task record; times in ms after T0 (0: not set)."""

    def us(ms: float) -> int:
        return int(T0 * 1e6 + ms * 1000) if ms else 0

    return tpb.Task(
        task_id=task_id,
        spec=tpb.TaskSpec(kind=kind, priority=priority),
        state=state,  # type: ignore[arg-type]
        agent_id=agent,
        attempts=attempts,
        created_at_us=us(created_ms),
        assigned_at_us=us(assigned_ms),
        finished_at_us=us(finished_ms),
        last_error=error,
        usage=tpb.TokenUsage(input_tokens=tokens[0], output_tokens=tokens[1], cost_usd=cost),
    )


def event(t: tpb.Task, previous: int) -> tpb.TaskEvent:
    return tpb.TaskEvent(task=t, previous_state=previous)  # type: ignore[arg-type]


def agent(
    agent_id: str, pool: str, *, inflight: int = 0, capacity: int = 1, roles: tuple[str, ...] = ()
) -> cpb.AgentStatus:
    return cpb.AgentStatus(
        agent_id=agent_id,
        pool_id=pool,
        roles=list(roles),
        capacity=capacity,
        inflight=inflight,
        completed=7,
        failed=1,
        latency_ema_ms=12.345,
    )


def status(term: int = 5, leader: str = "c1", queue_depth: int = 0) -> cpb.ClusterStatus:
    return cpb.ClusterStatus(
        leader_id=leader,
        leader_endpoint=f"127.0.0.1:{5000 + term}",
        term=term,
        standbys=[
            cpb.ServiceInstance(kind="coordinator", instance_id="c2", endpoint="127.0.0.1:6000")
        ],
        agents_connected=2,
        queue_depth=queue_depth,
        task_counts={"QUEUED": queue_depth, "SUCCEEDED": 40},
        services=[
            cpb.ServiceInstance(
                kind="coordinator", instance_id=leader, endpoint=f"127.0.0.1:{5000 + term}"
            ),
            cpb.ServiceInstance(kind="coordinator", instance_id="c2", endpoint="127.0.0.1:6000"),
            cpb.ServiceInstance(kind="agent-pool", instance_id="p1", endpoint="127.0.0.1:7000"),
        ],
        assignment_strategy="least-loaded",
    )


def finish(m: SwarmModel, task_id: str, *, agent_id: str = "a1", e2e_ms: float = 100.0) -> None:
    """One task's whole life on the events stream: created, assigned, succeeded."""
    m.apply_event(event(task(task_id, S.TASK_STATE_QUEUED, created_ms=1), S.TASK_STATE_UNSPECIFIED))
    m.apply_event(
        event(
            task(task_id, S.TASK_STATE_ASSIGNED, agent=agent_id, created_ms=1, assigned_ms=11),
            S.TASK_STATE_QUEUED,
        )
    )
    m.apply_event(
        event(
            task(
                task_id,
                S.TASK_STATE_SUCCEEDED,
                agent=agent_id,
                created_ms=1,
                assigned_ms=11,
                finished_ms=1 + e2e_ms,
            ),
            S.TASK_STATE_ASSIGNED,
        )
    )


def test_status_gives_leader_term_standbys_and_service_roles() -> None:
    m = SwarmModel(clock())
    m.apply_status(status())
    m.apply_service_health({"127.0.0.1:5005": "SERVING", "127.0.0.1:6000": "NOT_SERVING"})
    snap = m.snapshot()
    assert snap["leader"]["id"] == "c1"
    assert snap["leader"]["endpoint"] == "127.0.0.1:5005"
    assert snap["leader"]["term"] == 5
    assert snap["leader"]["standbys"] == [{"id": "c2", "endpoint": "127.0.0.1:6000"}]
    by_id = {s["id"]: s for s in snap["services"]}
    assert (by_id["c1"]["role"], by_id["c1"]["health"]) == ("leader", "SERVING")
    assert (by_id["c2"]["role"], by_id["c2"]["health"]) == ("standby", "NOT_SERVING")
    assert (by_id["p1"]["role"], by_id["p1"]["health"]) == ("", "UNKNOWN")
    assert snap["counts"]["leader"]["by_state"] == {"QUEUED": 0, "SUCCEEDED": 40}
    assert "totals in etcd" in snap["counts"]["leader"]["covers"]


def test_a_new_term_is_a_leader_change_and_a_gap_in_what_was_seen() -> None:
    m = SwarmModel(clock())
    m.apply_status(status(term=5))
    m.apply_status(status(term=5))
    assert m.snapshot()["leader"]["changes"] == []
    m.apply_status(status(term=9, leader="c2"))
    snap = m.snapshot()
    (change,) = snap["leader"]["changes"]
    assert (change["previous_term"], change["term"], change["leader_id"]) == (5, 9, "c2")
    assert snap["source"]["gaps"] == 1
    assert snap["counts"]["seen"]["gaps"] == 1


def test_leader_from_etcd_when_no_coordinator_answers_clears_the_live_figures() -> None:
    m = SwarmModel(clock())
    m.apply_status(status(term=5, queue_depth=30))
    m.apply_leader("c2", "127.0.0.1:6000", 12)
    snap = m.snapshot()
    assert (snap["leader"]["id"], snap["leader"]["term"]) == ("c2", 12)
    assert snap["queue"]["depth"] == 0  # only a leader knows it
    assert snap["counts"]["leader"]["by_state"] == {}
    assert snap["source"]["gaps"] == 1


def test_services_gone_from_the_registry_lose_their_health() -> None:
    m = SwarmModel(clock())
    m.apply_status(status())
    m.apply_service_health({"127.0.0.1:7000": "SERVING"})
    m.apply_services(
        [{"kind": "coordinator", "id": "c1", "endpoint": "127.0.0.1:5005"}], source="etcd"
    )
    assert "127.0.0.1:7000" not in m.service_health
    assert m.snapshot()["source"]["services_from"] == "etcd"


async def test_agents_show_the_task_they_run_and_for_how_long() -> None:
    c = clock()
    m = SwarmModel(c)
    m.apply_agents([agent("a1", "p1", inflight=1), agent("a2", "p1")])
    m.apply_event(event(task("t1", S.TASK_STATE_QUEUED, created_ms=1), S.TASK_STATE_UNSPECIFIED))
    m.apply_event(
        event(task("t1", S.TASK_STATE_ASSIGNED, agent="a1", assigned_ms=0.001), S.TASK_STATE_QUEUED)
    )
    await c.advance(1.5)
    m.apply_event(
        event(
            task("t1", S.TASK_STATE_RUNNING, agent="a1", assigned_ms=0.001), S.TASK_STATE_ASSIGNED
        )
    )
    # an agent's progress is relayed as an event without a change of state
    m.apply_event(
        event(task("t1", S.TASK_STATE_RUNNING, agent="a1", assigned_ms=0.001), S.TASK_STATE_RUNNING)
    )
    (group,) = m.snapshot()["agents"]["groups"]
    a1, a2 = group["agents"]
    (running,) = a1["tasks"]
    assert (running["task_id"], running["state"], running["progress_updates"]) == (
        "t1",
        "RUNNING",
        1,
    )
    assert running["for_ms"] == pytest.approx(1500, abs=1)
    assert (a1["inflight"], a1["capacity"], a1["load"], a1["latency_ema_ms"]) == (1, 1, 1.0, 12.35)
    assert a2["tasks"] == []
    assert (group["key"], group["count"], group["inflight"], group["capacity"]) == ("p1", 2, 1, 2)
    m.apply_event(event(task("t1", S.TASK_STATE_SUCCEEDED, agent="a1"), S.TASK_STATE_RUNNING))
    assert m.snapshot()["agents"]["groups"][0]["agents"][0]["tasks"] == []


def test_running_tasks_listed_per_agent_are_capped_and_the_rest_counted() -> None:
    m = SwarmModel(clock(), Limits(tasks_per_agent=2))
    m.apply_agents([agent("a1", "p1", inflight=5, capacity=5)])
    for i in range(5):
        m.apply_event(
            event(
                task(f"t{i}", S.TASK_STATE_ASSIGNED, agent="a1", assigned_ms=i + 1),
                S.TASK_STATE_UNSPECIFIED,
            )
        )
    a1 = m.snapshot()["agents"]["groups"][0]["agents"][0]
    assert [t["task_id"] for t in a1["tasks"]] == ["t0", "t1"]
    assert a1["tasks_more"] == 3


async def test_a_held_task_whose_end_was_missed_is_dropped_only_after_the_grace() -> None:
    c = clock()
    m = SwarmModel(c, Limits(held_grace_s=5.0))
    m.apply_event(
        event(task("t1", S.TASK_STATE_ASSIGNED, agent="a1", assigned_ms=1), S.TASK_STATE_QUEUED)
    )
    m.apply_event(
        event(task("t2", S.TASK_STATE_ASSIGNED, agent="gone", assigned_ms=1), S.TASK_STATE_QUEUED)
    )
    # ListAgents may answer before the assignment it raced: nothing dropped yet
    m.apply_agents([agent("a1", "p1", inflight=0)])
    assert set(m.held) == {"t1", "t2"}
    await c.advance(6)
    m.apply_agents([agent("a1", "p1", inflight=0)])
    assert m.held == {}


async def test_held_tasks_are_kept_while_their_agent_reports_them() -> None:
    c = clock()
    m = SwarmModel(c)
    m.apply_event(
        event(task("t1", S.TASK_STATE_ASSIGNED, agent="a1", assigned_ms=1), S.TASK_STATE_QUEUED)
    )
    await c.advance(60)
    m.apply_agents([agent("a1", "p1", inflight=1)])
    assert set(m.held) == {"t1"}


async def test_a_busy_agent_does_not_keep_a_finished_task_whose_end_was_missed() -> None:
    # under a backlog the agent is never idle (inflight 1 all the time): a task whose
    # terminal event was lost (a gap, a full watcher buffer) must still leave its row
    c = clock()
    m = SwarmModel(c, Limits(held_grace_s=5.0))
    m.apply_event(
        event(task("t1", S.TASK_STATE_RUNNING, agent="a1", assigned_ms=1), S.TASK_STATE_ASSIGNED)
    )
    await c.advance(1)
    m.apply_event(
        event(task("t2", S.TASK_STATE_RUNNING, agent="a1", assigned_ms=1001), S.TASK_STATE_ASSIGNED)
    )
    m.apply_agents([agent("a1", "p1", inflight=1)])
    assert set(m.held) == {"t1", "t2"}  # within the grace: ListAgents may have raced t2
    await c.advance(6)
    m.apply_agents([agent("a1", "p1", inflight=1)])
    a1 = m.snapshot()["agents"]["groups"][0]["agents"][0]
    assert [t["task_id"] for t in a1["tasks"]] == ["t2"]


async def test_a_task_that_finished_during_the_held_listing_is_not_shown_running() -> None:
    # the collector lists ASSIGNED/RUNNING tasks while events flow: the listing can be
    # older than the SUCCEEDED event applied before it
    c = clock()
    m = SwarmModel(c)
    m.apply_agents([agent("a1", "p1", inflight=1)])
    m.apply_event(
        event(task("t1", S.TASK_STATE_SUCCEEDED, agent="a1", assigned_ms=1), S.TASK_STATE_RUNNING)
    )
    m.seed_held(
        [
            task("t1", S.TASK_STATE_RUNNING, agent="a1", assigned_ms=1),
            task("t3", S.TASK_STATE_RUNNING, agent="a1", assigned_ms=2),
        ]
    )
    a1 = m.snapshot()["agents"]["groups"][0]["agents"][0]
    assert [t["task_id"] for t in a1["tasks"]] == ["t3"]
    # a later attempt of a task seen finished before (requeued, then held again) shows
    m.seed_held([task("t1", S.TASK_STATE_RUNNING, agent="a1", assigned_ms=9, attempts=2)])
    assert set(m.held) == {"t1", "t3"}


def test_seed_held_shows_tasks_assigned_before_the_stream_started() -> None:
    m = SwarmModel(clock())
    m.apply_agents([agent("a1", "p1", inflight=1)])
    m.seed_held(
        [
            task("t9", S.TASK_STATE_RUNNING, agent="a1", assigned_ms=1),
            task("q", S.TASK_STATE_QUEUED),
        ]
    )
    a1 = m.snapshot()["agents"]["groups"][0]["agents"][0]
    assert [t["task_id"] for t in a1["tasks"]] == ["t9"]


def test_agents_group_by_role() -> None:
    m = SwarmModel(clock(), group_by="role")
    m.apply_agents(
        [
            agent("a1", "p1", roles=("writer",)),
            agent("a2", "p2", roles=("writer",)),
            agent("a3", "p1"),
        ]
    )
    groups = {g["key"]: [a["id"] for a in g["agents"]] for g in m.snapshot()["agents"]["groups"]}
    assert groups == {"writer": ["a1", "a2"], "(no role)": ["a3"]}
    with pytest.raises(ValueError, match="group_by"):
        SwarmModel(clock(), group_by="kind")


async def test_throughput_per_bucket_and_now_over_complete_buckets() -> None:
    c = clock()
    m = SwarmModel(c, Limits(bucket_s=1.0, rate_window_s=10.0))
    m.stream_opened()
    for i in range(5):
        finish(m, f"a{i}")
    await c.advance(1)
    for i in range(3):
        finish(m, f"b{i}")
    await c.advance(1)
    snap = m.snapshot()
    thr = snap["throughput"]
    assert [b["finished"] for b in thr["series"]] == [5, 3, 0]
    assert [b["submitted"] for b in thr["series"]] == [5, 3, 0]
    # two complete seconds seen (the current one is not over): 8 tasks / 2 s
    assert thr["now_per_s"] == pytest.approx(4.0)
    assert thr["peak_per_s"] == 5.0
    assert thr["series"][0]["t_us"] == int(T0) * 1_000_000


async def test_quiet_time_shows_as_empty_buckets_and_the_ring_is_bounded() -> None:
    c = clock()
    m = SwarmModel(c, Limits(bucket_s=1.0, history=10, rate_window_s=5.0))
    m.stream_opened()
    finish(m, "t1")
    await c.advance(3)
    assert [b["finished"] for b in m.snapshot()["throughput"]["series"]] == [1, 0, 0, 0]
    await c.advance(100)
    finish(m, "t2")
    series = m.snapshot()["throughput"]["series"]
    assert len(series) == 10
    assert [b["finished"] for b in series] == [0] * 9 + [1]
    assert m.rate_per_s() == 0.0  # nothing finished in the last 5 complete seconds


def test_latency_from_the_record_times_of_succeeded_tasks() -> None:
    m = SwarmModel(clock())
    m.stream_opened()
    for i in range(100):
        finish(m, f"t{i}", e2e_ms=100.0 + i)  # created at 1 ms, assigned at 11 ms
    recent = m.snapshot()["latency"]["recent"]
    assert recent["e2e"]["n"] == 100
    assert recent["e2e"]["p50_ms"] == pytest.approx(150, rel=0.1)
    assert recent["e2e"]["max_ms"] == pytest.approx(199)
    assert recent["dispatch"]["p50_ms"] == pytest.approx(10, rel=0.1)
    assert recent["run"]["p95_ms"] == pytest.approx(185, rel=0.1)
    (point,) = m.snapshot()["latency"]["series"]
    assert point["n"] == 100
    assert point["e2e_p95_ms"] == pytest.approx(195, rel=0.1)


def test_a_record_without_times_adds_no_latency() -> None:
    m = SwarmModel(clock())
    m.apply_event(event(task("t", S.TASK_STATE_SUCCEEDED, agent="a1"), S.TASK_STATE_RUNNING))
    snap = m.snapshot()
    assert snap["latency"]["recent"]["e2e"] == {
        "n": 0,
        "p50_ms": None,
        "p95_ms": None,
        "p99_ms": None,
        "max_ms": None,
    }
    assert snap["counts"]["seen"]["by_state"] == {"SUCCEEDED": 1}


async def test_eta_is_the_backlog_over_the_finish_rate() -> None:
    c = clock()
    m = SwarmModel(c, Limits(rate_window_s=2.0))
    m.stream_opened()
    m.apply_status(status(queue_depth=90))
    m.apply_agents([agent("a1", "p1", inflight=10, capacity=10)])
    assert m.snapshot()["eta"]["eta_s"] is None  # nothing finishing yet: no ETA
    for i in range(20):
        finish(m, f"t{i}")
    await c.advance(1)
    for i in range(20):
        finish(m, f"u{i}")
    await c.advance(1)
    eta = m.snapshot()["eta"]
    assert (eta["queued"], eta["inflight"], eta["backlog"]) == (90, 10, 100)
    assert eta["rate_per_s"] == pytest.approx(20.0)
    assert eta["eta_s"] == pytest.approx(5.0)
    m.apply_status(status(queue_depth=0))
    m.apply_agents([agent("a1", "p1", inflight=0)])
    assert m.snapshot()["eta"]["eta_s"] == 0.0


def test_counts_seen_on_the_stream_say_what_they_cover() -> None:
    m = SwarmModel(clock())
    m.stream_opened()
    # created and claimed at once (an agent was free): still a submission
    m.apply_event(
        event(task("a", S.TASK_STATE_ASSIGNED, agent="a1", assigned_ms=1), S.TASK_STATE_UNSPECIFIED)
    )
    # a failed attempt that is retried is published as FAILED → QUEUED
    m.apply_event(
        event(task("a", S.TASK_STATE_QUEUED, attempts=1, error="boom"), S.TASK_STATE_FAILED)
    )
    m.apply_event(
        event(
            task("a", S.TASK_STATE_ASSIGNED, agent="a2", attempts=2, assigned_ms=2),
            S.TASK_STATE_QUEUED,
        )
    )
    m.apply_event(
        event(
            task("a", S.TASK_STATE_DEAD_LETTER, agent="a2", attempts=2, error="boom again"),
            S.TASK_STATE_RUNNING,
        )
    )
    # an agent lost: its task goes back to the queue without a failure
    m.apply_event(
        event(task("b", S.TASK_STATE_ASSIGNED, agent="a3", assigned_ms=1), S.TASK_STATE_QUEUED)
    )
    m.apply_event(event(task("b", S.TASK_STATE_QUEUED), S.TASK_STATE_ASSIGNED))
    m.apply_event(event(task("c", S.TASK_STATE_CANCELLED), S.TASK_STATE_QUEUED))
    seen = m.snapshot()["counts"]["seen"]
    assert seen["submitted"] == 1
    assert seen["by_state"] == {"CANCELLED": 1, "DEAD_LETTER": 1, "FAILED": 1, "REQUEUED": 1}
    assert "retried" in seen["covers"]
    assert "gaps" in seen["covers"]
    failures = m.snapshot()["recent_failures"]
    assert [(f["task_id"], f["state"], f["error"]) for f in failures] == [
        ("a", "DEAD_LETTER", "boom again"),
        ("a", "QUEUED", "boom"),
    ]
    series = m.snapshot()["throughput"]["series"]
    assert (series[-1]["failed_attempts"], series[-1]["dead_letter"], series[-1]["cancelled"]) == (
        1,
        1,
        1,
    )


def test_a_progress_event_is_not_a_change() -> None:
    m = SwarmModel(clock())
    t = task("t", S.TASK_STATE_SUCCEEDED, agent="a1")
    m.apply_event(event(t, S.TASK_STATE_SUCCEEDED))
    assert m.snapshot()["counts"]["seen"]["by_state"] == {}
    assert m.snapshot()["source"]["events"] == 1


def test_queue_by_priority_from_a_sample_says_when_it_is_partial() -> None:
    m = SwarmModel(clock())
    assert m.snapshot()["queue"]["covers"] == "not read yet"
    queued = [task(f"q{i}", S.TASK_STATE_QUEUED, priority=i % 3) for i in range(10)]
    m.apply_queue_sample(queued, complete=True)
    q = m.snapshot()["queue"]
    assert q["by_priority"] == {"2": 3, "1": 3, "0": 4}
    assert (q["sampled"], q["complete"], q["covers"]) == (10, True, "every queued task")
    m.apply_queue_sample(queued[:4], complete=False)
    q = m.snapshot()["queue"]
    assert q["sampled"] == 4
    assert "first 4 queued tasks" in q["covers"]


def test_optional_sections_say_whether_their_service_runs() -> None:
    m = SwarmModel(clock())
    m.apply_status(status())
    sections = m.snapshot()["sections"]
    assert sections["health"]["status"] == "not running"
    assert sections["consensus"]["status"] == "not running"
    s = status()
    s.services.append(
        cpb.ServiceInstance(kind="health", instance_id="h1", endpoint="127.0.0.1:8000")
    )
    m.apply_status(s)
    health = m.snapshot()["sections"]["health"]
    assert (health["status"], health["instances"]) == ("running", 1)
    m.apply_agents([agent("a1", "p1")])
    m.apply_section(
        "health",
        status="ok",
        data={"HEALTHY": 1},
        alerts=[{"kind": "STATE", "agent_id": "a1", "message": "slow"}],
        agent_health={"a1": {"state": "DEGRADED"}},
    )
    snap = m.snapshot()
    assert snap["sections"]["health"]["status"] == "ok"
    assert snap["sections"]["health"]["data"] == {"HEALTHY": 1}
    assert snap["alerts"] == [{"kind": "STATE", "agent_id": "a1", "message": "slow"}]
    assert snap["agents"]["groups"][0]["agents"][0]["health"] == {"state": "DEGRADED"}


def test_cost_per_agent_from_finished_tasks_and_none_until_any_reports_usage() -> None:
    m = SwarmModel(clock())
    m.apply_agents([agent("a1", "p1"), agent("a2", "p1")])
    finish(m, "free", agent_id="a2")
    snap = m.snapshot()
    assert snap["costs"]["total_usd"] is None
    assert [a["cost_usd"] for a in snap["agents"]["groups"][0]["agents"]] == [None, None]
    for i in range(2):
        m.apply_event(
            event(
                task(f"llm{i}", S.TASK_STATE_SUCCEEDED, agent="a1", cost=0.25, tokens=(100, 10)),
                S.TASK_STATE_RUNNING,
            )
        )
    snap = m.snapshot()
    a1 = snap["agents"]["groups"][0]["agents"][0]
    assert (a1["cost_usd"], a1["tokens"]) == (0.5, {"input": 200, "output": 20})
    assert (snap["costs"]["total_usd"], snap["costs"]["tasks_with_usage"]) == (0.5, 2)


def test_task_history_is_bounded_in_tasks_and_events() -> None:
    m = SwarmModel(clock(), Limits(task_histories=3, events_per_task=2))
    for i in range(5):
        finish(m, f"t{i}")
    assert m.history("t0") == []
    assert [h["to"] for h in m.history("t4")] == ["ASSIGNED", "SUCCEEDED"]
    assert m.history("t4")[0]["from"] == "QUEUED"
    assert len(m.histories) == 3


def test_held_tasks_are_bounded() -> None:
    m = SwarmModel(clock(), Limits(held_tasks=3))
    for i in range(5):
        m.apply_event(
            event(
                task(f"t{i}", S.TASK_STATE_ASSIGNED, agent="a", assigned_ms=1), S.TASK_STATE_QUEUED
            )
        )
    assert list(m.held) == ["t2", "t3", "t4"]


def test_stream_outages_count_as_gaps_only_after_it_was_up() -> None:
    m = SwarmModel(clock())
    m.stream_down("UNAVAILABLE: no leader")
    assert m.snapshot()["source"]["gaps"] == 0
    m.stream_up()
    m.stream_down("UNAVAILABLE: leader gone")
    m.stream_down("UNAVAILABLE: still gone")
    snap = m.snapshot()
    assert snap["source"]["gaps"] == 1
    assert snap["source"]["event_stream"] == "reconnecting"
    assert snap["source"]["errors"]["events"]["message"] == "UNAVAILABLE: still gone"
    m.stream_up()
    assert "events" not in m.snapshot()["source"]["errors"]


async def test_an_error_keeps_the_time_it_began() -> None:
    c = clock()
    m = SwarmModel(c)
    m.error("status", "UNAVAILABLE")
    await c.advance(5)
    m.error("status", "DEADLINE_EXCEEDED")
    err = m.snapshot()["source"]["errors"]["status"]
    assert err == {"message": "DEADLINE_EXCEEDED", "since_us": int(T0 * 1e6)}
    m.ok("status")
    assert m.snapshot()["source"]["errors"] == {}


def test_snapshot_is_plain_json() -> None:
    m = SwarmModel(clock())
    m.apply_status(status(queue_depth=3))
    m.apply_agents([agent("a1", "p1", inflight=1)])
    finish(m, "t1")
    doc = json.loads(json.dumps(m.snapshot()))
    assert doc["schema"] == 1
    for part in ("queue", "throughput", "latency", "eta", "costs"):
        assert doc[part]["covers"]
    assert m.snapshot(points=0)["throughput"]["series"] == []


def test_bucket_latency_percentiles_are_within_one_percent() -> None:
    rng = random.Random(7)
    values = sorted(rng.lognormvariate(3, 1) for _ in range(5000))
    h = BucketLatency()
    for v in values:
        h.add(v)
    for q in (50, 90, 95, 99):
        exact = values[int(q / 100 * len(values)) - 1]
        assert h.percentile(q) == pytest.approx(exact, rel=0.01)
    assert h.percentile(100) == pytest.approx(values[-1])
    assert BucketLatency().percentile(50) is None
    tiny = BucketLatency()
    tiny.add(0.0)  # a zero is counted at the floor, not lost
    assert tiny.count == 1


async def test_only_the_recent_window_keeps_histograms() -> None:
    c = clock()
    m = SwarmModel(c, Limits(bucket_s=1.0, history=100, rate_window_s=5.0))
    m.stream_opened()
    for second in range(20):
        for i in range(10):
            finish(m, f"t{second}-{i}", e2e_ms=100.0 + second)
        await c.advance(1)
    snap = m.snapshot()
    kept = [b for b in m.buckets if b.e2e.rec is not None]
    assert 0 < len(kept) <= 5  # the older buckets dropped theirs ...
    series = snap["latency"]["series"]
    # ... but still show the figures they had
    assert [p["n"] for p in series[:20]] == [10] * 20
    assert series[0]["e2e_p50_ms"] == pytest.approx(100, rel=0.01)
    assert series[19]["e2e_p50_ms"] == pytest.approx(119, rel=0.01)
