"""The open loop's note when it sent under 95 % of what its schedule held."""

from __future__ import annotations

from loadtest.workload import Workload


def test_fell_behind_names_what_was_sent_against_what_was_due() -> None:
    w = Workload(max_tasks=100_001, duration_s=10.0, rate_per_s=10_000.0)
    assert w.fell_behind(95_000) == ""  # 95 % of the 100,000 due: kept up
    note = w.fell_behind(40_000)
    assert note.startswith("the open loop fell behind its schedule: it sent 40,000 of the")
    assert "100,000 tasks due in 10 s (4,000/s of the 10,000/s asked)" in note


def test_max_tasks_bounds_what_was_due_and_a_closed_loop_has_no_schedule() -> None:
    capped = Workload(max_tasks=500, duration_s=10.0, rate_per_s=10_000.0)
    assert capped.fell_behind(500) == ""
    assert "of the 500 tasks due" in capped.fell_behind(100)
    assert Workload(max_tasks=500, duration_s=10.0).fell_behind(1) == ""
