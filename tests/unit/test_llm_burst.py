"""The burst experiment's arithmetic: the limits it sets and the figures it reports."""

from __future__ import annotations

import math

import pytest

from loadtest.llm_burst import Plan, mean_ms, percentile, plan_limits, report
from protos.agentmesh.v1 import task_pb2 as tpb


def plan(**kw: object) -> Plan:
    fields: dict[str, object] = {
        "agents": 200,
        "tasks": 4,
        "pools": 2,
        "latency_ms": "fixed:2000",
        "output_tokens": "fixed:100",
        "max_tokens": 200,
        "prompt_bytes": 400,
        "limit_fraction": 0.5,
        "burst_s": 1.0,
        "max_attempts": 5,
        "model": "m",
    }
    fields.update(kw)
    return Plan(**fields)  # type: ignore[arg-type]


def test_mean_of_each_distribution() -> None:
    assert mean_ms("fixed:50") == 50
    assert mean_ms("uniform:10:30") == 20
    assert mean_ms("lognormal:100:0.5") == pytest.approx(100 * math.exp(0.125))
    with pytest.raises(ValueError, match="fixed:MS"):
        mean_ms("gamma:1:2")


def test_limits_are_the_fraction_of_what_the_agents_could_use() -> None:
    p = plan_limits(plan())
    assert p.potential_rpm == pytest.approx(200 / 2 * 60)  # one call at a time, 2 s each
    assert p.rpm == 3000
    assert p.itpm == 3000 * p.input_tokens
    assert p.otpm == 3000 * 200  # max_tokens is what the service holds while a call runs


def test_percentile_from_a_histogram_exact_to_a_thousandth() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50, rel=1e-3)
    assert percentile(values, 99) == pytest.approx(99, rel=1e-3)
    assert math.isnan(percentile([], 50))


def test_report_counts_429s_outcomes_and_throughput() -> None:
    p = plan_limits(plan())
    tasks = {
        f"t{i}": tpb.Task(
            task_id=f"t{i}",
            state=tpb.TASK_STATE_SUCCEEDED,
            attempts=1,
            created_at_us=0,
            finished_at_us=(i + 1) * 1_000_000,
        )
        for i in range(3)
    }
    tasks["t3"] = tpb.Task(
        task_id="t3", state=tpb.TASK_STATE_DEAD_LETTER, attempts=5, last_error="boom"
    )
    stats = {
        "requests": 10,
        "status": {"429": 2, "200": 8},
        "succeeded": 8,
        "input_tokens": 8 * p.input_tokens,
        "first_request_wall_s": 100.0,
        "last_reply_wall_s": 100.16,  # 8 calls in 0.16 s = 3000 per minute
    }
    doc = report(p, tasks, stats, wall_s=1.0, total_s=2.0)
    assert doc["simulated"] is True
    assert doc["calls_429"] == 2
    assert doc["calls_429_fraction"] == pytest.approx(0.2)
    assert doc["tasks"] == {"SUCCEEDED": 3, "DEAD_LETTER": 1}
    assert doc["task_attempts"] == 8
    assert doc["dead_letter_errors"] == {"boom": 1}
    assert doc["throughput"]["rpm_fraction_of_limit"] == pytest.approx(1.0)
    assert doc["end_to_end_ms"]["p50"] == pytest.approx(2000, rel=1e-3)
