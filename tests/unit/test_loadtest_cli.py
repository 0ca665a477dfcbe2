"""`agentmesh loadtest` / `python -m loadtest`: options, re-rendering, and smoke runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loadtest.cli import app
from loadtest.metrics import RunMetrics
from loadtest.report import write_json
from loadtest.result import RunResult, build_doc

runner = CliRunner()


def test_help_lists_the_options_the_issue_names() -> None:
    result = runner.invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in (
        "--agents",
        "--duration",
        "--rate",
        "--concurrency",
        "--scenario",
        "--out",
        "--compare",
        "--executor",
    ):
        assert option in result.output, option
    for scenario in ("steady", "burst", "spawn", "agent-kill"):
        assert scenario in result.output, scenario


def test_peer_only_needs_a_peer() -> None:
    result = runner.invoke(app, ["--peer-only"])
    assert result.exit_code == 2


def test_kill_scenarios_refuse_a_cluster_they_did_not_start() -> None:
    result = runner.invoke(app, ["--scenario", "agent-kill", "--target", "127.0.0.1:1"])
    assert result.exit_code == 2


def test_render_prints_the_summary_and_writes_html(tmp_path: Path) -> None:
    m = RunMetrics(start_s=0.0)
    m.latency("dispatch").record_ms(1.25)
    m.throughput.record(0.5)
    doc = build_doc(
        [
            RunResult(
                system="agentmesh",
                scenario="steady",
                metrics=m,
                duration_s=1.0,
                submitted=1,
                acknowledged=1,
                completed=1,
                terminal_states={"SUCCEEDED": 1},
            )
        ],
        params={"scenario": "steady"},
        simulated=False,
    )
    report = write_json(doc, tmp_path / "report.json")
    result = runner.invoke(app, ["render", str(report)], terminal_width=160)
    assert result.exit_code == 0, result.output
    assert "dispatch" in result.output
    assert "PASS" in result.output
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_celery_peer_alone_writes_a_report(tmp_path: Path) -> None:
    pytest.importorskip("celery")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "--peer-only",
            "--compare",
            "celery",
            "--max-tasks",
            "200",
            "--duration",
            "10",
            "--agents",
            "50",
            "--out",
            str(out),
            "--no-progress",
        ],
        terminal_width=160,
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "report.json").read_text())
    assert [r["system"] for r in doc["runs"]] == ["celery"]
    assert doc["runs"][0]["completed"] == 200
    assert doc["verdict"]["ok"] is True
    assert (out / "report.html").exists()


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_smoke_scenario_on_a_local_cluster_has_no_lost_or_duplicated_task(tmp_path: Path) -> None:
    """The short CI smoke run: a real cluster, a few seconds, fails on any loss or duplicate."""
    from registry.etcd_server import EtcdNotFoundError, find_etcd_binary

    try:
        find_etcd_binary()
    except EtcdNotFoundError as err:
        pytest.skip(str(err))
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["--agents", "20", "--duration", "3", "--out", str(out), "--no-progress"],
        terminal_width=160,
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "report.json").read_text())
    run = doc["runs"][0]
    assert run["system"] == "agentmesh"
    assert run["completed"] > 0
    assert run["lost_count"] == run["unfinished_count"] == run["duplicated_count"] == 0
    assert run["extra"]["spawn"]["agents"] == 20
