"""`agentmesh status` drawn from a snapshot (no sockets): what a person reads in the live
view, the one-shot lines scripts parse, and the CLI's checks of its options."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from typer.testing import CliRunner

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb
from services import cli
from services._common.clock import FakeClock
from services.observe.live import eta_text, print_once, render, sparkline
from services.observe.model import SwarmModel
from services.observe.web import allowed_hosts, is_loopback

S = tpb.TaskState


def draw(model: SwarmModel, rows: int = 20) -> str:
    console = Console(file=io.StringIO(), width=200, record=True, color_system=None)
    console.print(render(model.snapshot(), rows))
    return console.export_text()


def model_with_agents(n: int) -> SwarmModel:
    m = SwarmModel(FakeClock(start=1_795_900_000.0))
    m.apply_status(
        cpb.ClusterStatus(
            leader_id="c1",
            leader_endpoint="127.0.0.1:5000",
            term=42,
            queue_depth=12,
            task_counts={"QUEUED": 12, "SUCCEEDED": 3},
            services=[
                cpb.ServiceInstance(kind="coordinator", instance_id="c1", endpoint="127.0.0.1:5000")
            ],
        )
    )
    m.apply_service_health({"127.0.0.1:5000": "SERVING"})
    m.apply_agents(
        [
            cpb.AgentStatus(agent_id=f"a{i:03d}", pool_id="p1", capacity=2, inflight=i % 3 and 1)
            for i in range(n)
        ]
    )
    return m


def test_the_view_shows_leader_services_queue_counts_and_sections() -> None:
    m = model_with_agents(3)
    m.apply_queue_sample(
        [tpb.Task(task_id="q", state=S.TASK_STATE_QUEUED, spec=tpb.TaskSpec(priority=9))],
        complete=False,
    )
    text = draw(m)
    assert "leader c1 at 127.0.0.1:5000   term 42" in text
    assert "coordinator │ c1" in text
    assert "SERVING" in text
    assert "queue 12   by priority p9:1 (first 1 queued)" in text
    assert "(held now + finished in term 42): QUEUED 12  SUCCEEDED 3" in text
    assert "health monitor: not running" in text
    assert "alerts: none (alerts come from the health monitor)" in text
    assert "agents: 3 connected, by pool" in text


def test_agent_rows_are_capped_busiest_first_and_the_rest_counted() -> None:
    text = draw(model_with_agents(30), rows=5)
    assert "… 25 more (the dashboard lists all)" in text
    assert "a001 " in text  # busy (1 in flight)
    assert "a000 " not in text  # idle, below the cap


def test_values_from_the_cluster_are_not_read_as_markup() -> None:
    m = model_with_agents(0)
    m.apply_agents([cpb.AgentStatus(agent_id="[red]x[/red]", pool_id="[bold]p", capacity=1)])
    m.error("status", "UNAVAILABLE: [link=http://x]y")
    text = draw(m)
    assert "[red]x[/red]" in text
    assert "UNAVAILABLE: [link=http://x]y" in text


def test_sparkline_scales_to_the_maximum() -> None:
    assert sparkline([0, 1, 2, 4, 8]) == "▁▁▂▄█"
    assert sparkline([0, 0]) == "▁▁"
    assert sparkline([]) == ""
    assert len(sparkline(list(range(100)), width=10)) == 10


def test_eta_text() -> None:
    assert eta_text({"backlog": 0, "eta_s": 0.0}) == "backlog empty"
    assert eta_text({"backlog": 5, "eta_s": None}) == "5 left, nothing finishing: no ETA"
    assert eta_text({"backlog": 5, "eta_s": 0.2}) == "5 left, under a second"
    assert eta_text({"backlog": 5000, "eta_s": 125.0}) == "5,000 left, about 2 min 5 s"


def test_once_prints_the_lines_scripts_parse() -> None:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    status = cpb.ClusterStatus(
        leader_id="c1",
        leader_endpoint="127.0.0.1:5000",
        term=3,
        agents_connected=2,
        queue_depth=1,
        assignment_strategy="least-loaded",
        task_counts={"QUEUED": 1},
        standbys=[cpb.ServiceInstance(kind="coordinator", instance_id="c2", endpoint="h:2")],
        from_leader=True,
    )
    print_once(console, status)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert out.splitlines() == [
        "leader     c1 at 127.0.0.1:5000  term 3",
        "standby    c2 at h:2",
        "agents     2 connected   queue depth 1   strategy least-loaded",
        "tasks      QUEUED 1",
    ]


def test_once_says_when_the_figures_are_not_the_leaders() -> None:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    print_once(console, cpb.ClusterStatus(leader_id="c1", term=3, from_leader=False))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "agents     unknown: a standby answered" in out
    assert "tasks" not in out  # no counts rather than zeros


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status", "--group-by", "kind"], "--group-by"),
        (["status", "--json", "--watch-s", "-1"], "--watch-s"),
        (["dashboard", "--port", "70000"], "--port"),
        (["dashboard", "--group-by", "x"], "--group-by"),
    ],
)
def test_bad_options_exit_2_with_a_message(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("example.com", False),
    ],
)
def test_only_loopback_addresses_count_as_local(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_dashboard_on_loopback_answers_only_to_loopback_names() -> None:
    hosts = allowed_hosts("127.0.0.1", 8089)
    assert {"127.0.0.1:8089", "localhost:8089", "[::1]:8089", "localhost"} <= hosts
    assert "evil.example:8089" not in hosts
    assert allowed_hosts("0.0.0.0", 8089) == frozenset()  # bound wide on purpose: any name
