"""The report: JSON document, terminal summary and self-contained HTML."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from loadtest.cpu import ProcessCpu, summarise
from loadtest.metrics import RunMetrics
from loadtest.report import (
    print_summary,
    render_html,
    svg_histogram,
    svg_percentile_curve,
    svg_throughput,
    write_all,
)
from loadtest.result import Marker, RunResult, build_doc, compare
from loadtest.targets import evaluate


def make_result(
    system: str,
    *,
    scale: float = 1.0,
    per_s: int = 100,
    lost: int = 0,
    duplicated: int = 0,
    cpu_ms: float | None = None,
) -> RunResult:
    m = RunMetrics(start_s=0.0)
    for v in range(1, 1001):
        m.latency("dispatch").record_us(v * scale)
        m.latency("submit_to_receive").record_us(v * scale * 1.5)
        m.latency("end_to_end").record_us(v * scale * 10)
    for second in range(5):
        m.throughput.record(second + 0.5, per_s)
    return RunResult(
        system=system,
        scenario="steady",
        metrics=m,
        duration_s=5.0,
        submitted=5 * per_s,
        acknowledged=5 * per_s,
        completed=5 * per_s - lost,
        terminal_states={"SUCCEEDED": 5 * per_s - lost},
        lost=[f"lt-x-{i:08d}" for i in range(lost)],
        duplicated=[f"lt-x-{i:08d}" for i in range(duplicated)],
        markers=[Marker(t_s=2.0, label="agent pool killed")],
        cpu=(
            summarise(
                {"server-1": ProcessCpu(5 * per_s * cpu_ms / 1000, True)},
                completed=5 * per_s,
                window_s=5.0,
            )
            if cpu_ms is not None
            else {}
        ),
    )


PARAMS = {"scenario": "steady", "agents": 200, "rate": 0.0, "executor": "noop", "duration_s": 5.0}


@pytest.fixture
def doc() -> dict:
    results = [
        make_result("agentmesh", per_s=2500, cpu_ms=0.5),
        make_result("celery", scale=2.0, per_s=1000, cpu_ms=1.5),
    ]
    d = build_doc(results, params=PARAMS, simulated=False)
    d["targets"] = evaluate(d["runs"], PARAMS)
    return d


def test_json_holds_percentiles_counts_series_and_machine(doc: dict, tmp_path: Path) -> None:
    json_path, _ = write_all(doc, tmp_path)
    loaded = json.loads(json_path.read_text())
    run = loaded["runs"][0]
    assert run["system"] == "agentmesh"
    disp = run["latencies"]["dispatch"]
    # 1..1000 µs: P50 0.5 ms, P99 0.99 ms
    assert disp["p50_ms"] == pytest.approx(0.5, rel=1e-3)
    assert disp["p99_ms"] == pytest.approx(0.99, rel=1e-3)
    assert disp["count"] == 1000
    assert disp["percentile_curve"][-1][0] == 100.0
    assert sum(b[2] for b in disp["histogram"]) == 1000
    assert disp["hdr_base64"]
    assert run["throughput"]["series"] == [2500] * 5
    assert run["lost_count"] == 0
    assert run["duplicated_count"] == 0
    assert loaded["machine"]["cores"] >= 1
    assert loaded["machine"]["python"].count(".") == 2
    assert loaded["params"]["agents"] == 200
    assert loaded["verdict"] == {"ok": True, "failures": []}


def test_comparison_ratios_say_how_many_times_better(doc: dict) -> None:
    ratios = doc["comparison"]["ratios"]
    assert ratios["throughput_steady"] == pytest.approx(2.5)
    assert ratios["dispatch_p99"] == pytest.approx(2.0, rel=1e-2)
    assert ratios["submit_to_receive_p99"] == pytest.approx(2.0, rel=1e-2)
    # celery's servers spend 1.5 ms of CPU per task, agentmesh's 0.5: 3× less
    assert ratios["cpu_per_task_servers"] == pytest.approx(3.0)
    assert compare(doc["runs"][0], doc["runs"][0])["ratios"]["throughput_mean"] == 1.0


def test_targets_are_checked_where_the_run_measures_them(doc: dict) -> None:
    names = {t["name"]: t for t in doc["targets"]}
    assert names["throughput, no-op, durable state"]["met"] is True
    assert names["throughput vs Celery+Redis (same run)"]["met"] is True
    assert not any("failover" in n or "leader" in n for n in names)


def test_lost_and_duplicated_tasks_fail_the_verdict() -> None:
    d = build_doc([make_result("agentmesh", lost=2, duplicated=1)], params=PARAMS, simulated=False)
    assert d["verdict"]["ok"] is False
    assert any("2 acknowledged task(s) lost" in f for f in d["verdict"]["failures"])
    assert any("completed twice" in f for f in d["verdict"]["failures"])
    assert d["runs"][0]["lost"] == ["lt-x-00000000", "lt-x-00000001"]


def test_unfinished_tasks_fail_the_verdict() -> None:
    r = make_result("agentmesh")
    r.unfinished = ["lt-x-00000007"]
    d = build_doc([r], params=PARAMS, simulated=False)
    assert d["verdict"]["ok"] is False
    assert d["runs"][0]["unfinished_count"] == 1


def test_html_is_self_contained_with_every_section(doc: dict, tmp_path: Path) -> None:
    _, html_path = write_all(doc, tmp_path)
    html = html_path.read_text()
    assert html.startswith("<!DOCTYPE html>")
    for section in (
        "summary",
        "comparison",
        "targets",
        "exactly-once",
        "histograms",
        "percentiles",
        "throughput",
        "parameters",
        "machine",
        "verdict",
    ):
        assert f'id="{section}"' in html, section
    # three metrics × (histogram + percentile curve) + one throughput plot
    assert html.count("<svg") == 7
    assert '<table class="cpu">' in html
    assert "server CPU per task" in html
    # the headline dispatch figure is the one that is never negative
    assert html.index("Dispatch: submit sent → assignment received") < html.index(
        "Detail: submit acknowledged"
    )
    assert "<script" not in html
    # nothing fetched: the only URL is the SVG namespace
    urls = set(re.findall(r"https?://[^\s\"'<>]+", html))
    assert urls == {"http://www.w3.org/2000/svg"}
    assert "agent pool killed" in html  # the fault marker on the throughput plot
    assert "Simulated work" not in html


def test_simulated_work_is_labelled_everywhere() -> None:
    d = build_doc([make_result("agentmesh")], params=PARAMS, simulated=True)
    assert d["simulated"] is True
    assert d["runs"][0]["simulated"] is True
    html = render_html(d)
    assert 'id="simulated"' in html
    assert "simulated work" in html
    console = Console(record=True, width=120)
    print_summary(d, console)
    assert "SIMULATED WORK" in console.export_text()


def test_terminal_summary_shows_percentiles_ratios_and_verdict(doc: dict) -> None:
    console = Console(record=True, width=140)
    print_summary(doc, console)
    text = console.export_text()
    for needle in (
        "P50 ms",
        "P95 ms",
        "P99 ms",
        "dispatch",
        "end_to_end",
        "throughput_steady",
        "2.50×",
        "PASS",
        "exactly-once: lost 0",
        "submit sent → received P50",
        "server CPU 0.500 ms per task",
        "CPU ms per task",
        "cpu_per_task_servers",
    ):
        assert needle in text, needle


def test_a_run_on_a_cluster_the_harness_did_not_start_says_cpu_not_measured() -> None:
    d = build_doc([make_result("agentmesh")], params=PARAMS, simulated=False)
    assert d["runs"][0]["cpu"]["measured"] is False
    console = Console(record=True, width=140)
    print_summary(d, console)
    text = console.export_text()
    assert "CPU per task: not measured" in text
    assert "server CPU not measured" in text
    assert "not measured" in render_html(d)
    other = build_doc(
        [make_result("agentmesh"), make_result("celery", cpu_ms=1.0)],
        params=PARAMS,
        simulated=False,
    )
    assert "cpu_per_task_servers" not in other["comparison"]["ratios"]


def test_charts_are_valid_svg_even_without_data() -> None:
    import xml.etree.ElementTree as ET

    for svg in (
        svg_histogram("h", []),
        svg_percentile_curve("p", [("a", "#000", [])]),
        svg_throughput("t", []),
        svg_histogram("h", [("a", "#123456", [[0.1, 0.2, 5], [0.2, 0.3, 0]])]),
        svg_percentile_curve("p", [("a", "#123456", [[0.0, 0.1], [99.0, 2.0], [100.0, 9.0]])]),
        svg_throughput("t", [("a", "#123456", [3, 4, 5], 1.0)], [{"t_s": 1.0, "label": "x<y"}]),
    ):
        root = ET.fromstring(svg)
        assert root.tag.endswith("svg")


def test_json_round_trip_renders_the_same_html(doc: dict, tmp_path: Path) -> None:
    json_path, html_path = write_all(doc, tmp_path)
    again = render_html(json.loads(json_path.read_text()))
    assert again == html_path.read_text()


def test_a_percentile_on_the_clamp_floor_gets_no_ratio() -> None:
    base = make_result("agentmesh")
    for _ in range(3000):  # most samples ≤ 0: the agent beat the acknowledgement back
        base.metrics.latency("dispatch").record_us(-5)
    d = build_doc([base, make_result("celery")], params=PARAMS, simulated=False)
    ratios = d["comparison"]["ratios"]
    assert ratios["dispatch_p50"] is None
    assert ratios["dispatch_p99"] is not None
    assert "dispatch_p50" in d["comparison"]["omitted"]
    console = Console(record=True, width=160)
    print_summary(d, console)
    text = console.export_text()
    assert "3000 of 4000 samples (75.0 %) were ≤ 0" in text
    assert "n/a (at least that share" in text


def test_light_load_dispatch_target_is_checked_at_100_per_second() -> None:
    params = {**PARAMS, "rate": 100.0}
    d = build_doc([make_result("agentmesh")], params=params, simulated=False)
    targets = {t["name"]: t for t in evaluate(d["runs"], params)}
    light = targets["dispatch (submit sent → received) at light load (100 tasks/s)"]
    assert light["met"] is True  # submit sent → received P99 1.485 ms ≤ 2 ms
    assert light["measured"].startswith("P99 1.48")
    assert "throughput, no-op, durable state" not in targets  # open loop measures no peak
