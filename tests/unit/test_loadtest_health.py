"""The health scenarios' plumbing that needs no cluster: percentiles, what the cluster is
started with, how monitor events are read, and the targets a health run is held to."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.health import HealthWatch, cluster_env, monitors_for, percentiles
from loadtest.report import detail_lines
from loadtest.scenarios import SCENARIOS
from loadtest.targets import evaluate
from protos.agentmesh.v1 import health_pb2 as hpb


def test_percentiles_come_from_a_histogram_exact_to_a_thousandth() -> None:
    assert percentiles([]) == {"n": 0}
    got = percentiles([float(i) for i in range(1, 101)])
    assert got.keys() == {"n", "p50_s", "p99_s", "max_s"}
    assert got["n"] == 100
    for key, exact in (("p50_s", 50.0), ("p99_s", 99.0), ("max_s", 100.0)):
        assert got[key] == pytest.approx(exact, rel=1e-3)
    one = percentiles([2.0])
    assert one["p50_s"] == one["p99_s"] == one["max_s"] == pytest.approx(2.0, rel=1e-3)
    # a negative lateness is not hidden: it counts at the floor and is said
    assert percentiles([-0.5, 1.0])["clamped"] == 1


def test_each_scenario_starts_the_cluster_it_needs() -> None:
    assert {"hang", "flaky", "monitor-kill"} <= set(SCENARIOS)
    hang = cluster_env("hang", 2.5)
    assert hang["AGENTMESH_STALL_LIMIT_S"] == "2.5"
    assert "hang" in hang["AGENTMESH_KINDS"].split(",")
    assert "block" in hang["AGENTMESH_TASK_KINDS"].split(",")
    assert cluster_env("flaky", 2.0)["AGENTMESH_FLAKY_AGENTS"] == "1"
    assert cluster_env("steady", 2.0) == {}
    assert monitors_for("monitor-kill") == 2
    assert monitors_for("hang") == 1


def test_the_watch_keeps_failures_breaker_moves_and_hung_alerts() -> None:
    watch = HealthWatch(client=None)  # type: ignore[arg-type]

    def change(agent: str, state: int, breaker: int, at: int, removed: bool = False) -> None:
        watch._on(
            hpb.HealthEvent(
                at_us=at,
                change=hpb.HealthChange(
                    agent_id=agent,
                    previous=hpb.HEALTH_STATE_HEALTHY,
                    state=state,  # type: ignore[arg-type]
                    breaker=breaker,  # type: ignore[arg-type]
                    reason="why",
                    removed=removed,
                ),
            )
        )

    H, F = hpb.HEALTH_STATE_HEALTHY, hpb.HEALTH_STATE_FAILED
    CLOSED, OPEN = hpb.BREAKER_STATE_CLOSED, hpb.BREAKER_STATE_OPEN
    change("a", H, OPEN, 10)
    change("a", H, OPEN, 11)  # a move that left the breaker where it was
    change("a", H, CLOSED, 12)
    change("b", F, CLOSED, 20)
    change("c", F, CLOSED, 30, removed=True)  # forgotten (left), not a declaration
    watch._on(
        hpb.HealthEvent(
            alert=hpb.Alert(kind=hpb.ALERT_KIND_HUNG_TASK, task_id="t1", opened_at_us=5)
        )
    )
    watch._on(
        hpb.HealthEvent(
            alert=hpb.Alert(
                kind=hpb.ALERT_KIND_HUNG_TASK, task_id="t1", opened_at_us=5, closed_at_us=9
            )
        )
    )
    assert watch.breaker["a"] == [(10, OPEN), (12, CLOSED)]
    assert set(watch.failed) == {"b"}
    assert watch.hung == {"t1": 5}


def _run(health: dict[str, Any], ok: bool = True) -> dict[str, Any]:
    return {
        "system": "agentmesh",
        "latencies": {},
        "extra": {"health": health},
        "ok": ok,
        "lost_count": 0,
        "duplicated_count": 0,
    }


def test_hang_targets_the_stall_limit_plus_half_a_second_and_no_wrong_failure() -> None:
    health = {
        "stall_limit_s": 2.0,
        "hang_to_elsewhere": {"n": 10, "p50_s": 2.1, "p99_s": 2.4, "max_s": 2.45},
        "failed_declared": {"agents": 0, "wrongly": 0, "examples": {}},
    }
    targets = {t["name"]: t for t in evaluate([_run(health)], {"scenario": "hang"})}
    hang = targets["hung agent: its task running elsewhere"]
    assert hang["met"]
    assert "2.5 s" in hang["goal"]
    assert targets["agents wrongly declared FAILED"]["met"]
    assert targets["no lost, no doubly-completed task"]["met"]
    health["hang_to_elsewhere"]["max_s"] = 2.6
    health["failed_declared"]["wrongly"] = 1
    targets = {t["name"]: t for t in evaluate([_run(health)], {"scenario": "hang"})}
    assert not targets["hung agent: its task running elsewhere"]["met"]
    assert not targets["agents wrongly declared FAILED"]["met"]


def test_the_report_prints_the_health_figures() -> None:
    run = {
        "latencies": {},
        "extra": {"health": {"hang_to_elsewhere": {"n": 3, "p99_s": 2.2}, "kills": 2}},
    }
    lines = detail_lines(run)
    assert "health hang_to_elsewhere: n 3, p99_s 2.2" in lines
    assert "health kills: 2" in lines
