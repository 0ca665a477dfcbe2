"""scripts/ab_loadtest.py: the run order, and what it reads from a report."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

_SPEC = importlib.util.spec_from_file_location(
    "ab_loadtest", Path(__file__).resolve().parents[2] / "scripts" / "ab_loadtest.py"
)
assert _SPEC is not None
assert _SPEC.loader is not None
ab = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ab)


def report(s2r_p99: float, commits: bool = True) -> dict[str, Any]:
    run: dict[str, Any] = {
        "system": "agentmesh",
        "throughput": {"steady_per_s": 770.0},
        "latencies": {
            "submit_to_receive": {"p50_ms": 4.0, "p99_ms": s2r_p99},
            "end_to_end": {"p50_ms": 8.0, "p99_ms": 25.0},
        },
        "cpu": {
            "servers": {"ms_per_task": 1.67},
            "roles": {"coordinator": {"ms_per_task": 0.79}, "etcd": {"ms_per_task": 0.52}},
        },
        "extra": {},
    }
    if commits:
        run["extra"]["commits"] = {"busy_pct": 92.0, "wait": {"mean_ms": 0.9}}
    celery = {"system": "celery", "throughput": {"steady_per_s": 1.0}}
    return {"runs": [celery, run]}


def test_the_sides_alternate_which_goes_first() -> None:
    assert ab.order(3) == [("a", 1), ("b", 1), ("b", 2), ("a", 2), ("a", 3), ("b", 3)]


def test_figures_come_from_the_agentmesh_run_and_a_missing_one_is_none() -> None:
    assert ab.figures(report(16.0)) == [770.0, 4.0, 16.0, 8.0, 25.0, 1.67, 0.79, 0.52, 92.0, 0.9]
    # a tree from before the commit figures: those columns are empty, not an error
    assert ab.figures(report(16.0, commits=False))[-2:] == [None, None]


def test_medians_skip_missing_figures_and_rows_show_them_as_dashes() -> None:
    rows = [
        ab.figures(report(p99, commits=c)) for p99, c in ((10.0, True), (20.0, False), (12.0, True))
    ]
    med = ab.medians(rows)
    assert med[2] == 12.0
    assert med[-1] == 0.9
    assert ab.medians([[None], [None]]) == [None]
    line = ab.row("A median", [2837.0, 16.8, None])
    assert line.split("|")[1:] == ["    2,837 ", "     16.8 ", "        —"]
