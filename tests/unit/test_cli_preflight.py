"""`agentmesh up` and `agentmesh loadtest` refuse what cannot start, before they start
anything, and say which flag to change."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from registry import etcd_server
from registry.etcd_server import free_port
from services import cli
from services.coordinator import limits


@pytest.mark.parametrize("flag", ["--etcd-port", "--port", "--consensus-port"])
def test_up_names_the_flag_of_the_port_in_use(
    flag: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(etcd_server, "find_etcd_binary", lambda: "/usr/bin/etcd")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = {f: str(free_port()) for f in ("--etcd-port", "--port", "--consensus-port")}
        ports[flag] = str(busy)
        args = ["up", "--agents", "1", "--pools", "1", "--data-dir", str(tmp_path)]
        result = CliRunner().invoke(cli.app, [*args, *(x for kv in ports.items() for x in kv)])
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())
    assert f"port {busy} is in use (another cluster running?); stop it or pass {flag}" in said


@pytest.mark.parametrize("command", ["up", "loadtest"])
def test_more_agents_than_the_pools_can_start_is_a_usage_error(
    command: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(etcd_server, "find_etcd_binary", lambda: "/usr/bin/etcd")
    args = [command, "--agents", "500000", "--pools", "2"]
    if command == "up":
        args += ["--data-dir", str(tmp_path), "--etcd-port", str(free_port())]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.replace("│", " ").split())
    assert "--agents 500,000 over --pools 2 is 250,000 agents a pool" in said, said
    assert "use --pools 50 or more" in said, said
    assert "Traceback" not in result.output


def test_agents_per_pool_at_the_limit_are_fine() -> None:
    assert limits.agents_per_pool_problem(20_000, 2) == ""
    assert limits.agents_per_pool_problem(20_001, 2).endswith("use --pools 3 or more")


class NoCluster:
    """Stands in for LocalCluster: reaching it means `up` got as far as starting."""

    def __init__(self, spec: object) -> None:
        raise RuntimeError("up started a cluster")


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--capacity", "0"], "--capacity must be 1-1000"),
        (["--sleep-ms", "bogus"], "latency 'bogus' must be fixed:MS"),
        (["--strategy", "bogus"], "--strategy 'bogus' is unknown"),
        (["--backlog", "-1"], "--backlog -1 is negative"),
        (["--etcd-port", "70000"], "--etcd-port: port 70000 is out of range 1-65535"),
        (["--port", "-5"], "--port: port -5 is out of range 1-65535"),
        (["--health-monitors", "-1"], "--health-monitors and --consensus at least 0"),
        (["--data-dir", "/proc/agentmesh"], "--data-dir /proc/agentmesh cannot be created"),
    ],
)
def test_up_refuses_a_bad_value_before_it_starts_anything(
    args: list[str], said: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """These started etcd and every process and then said 'pool-1 exited during start;
    see <logs>' (exit 1), ran an empty backlog (exit 0), or ended in a traceback
    (OverflowError for a port, FileNotFoundError for a data dir)."""
    from services import cluster

    monkeypatch.setattr(etcd_server, "find_etcd_binary", lambda: "/usr/bin/etcd")
    monkeypatch.setattr(cluster, "LocalCluster", NoCluster)
    ports = [(f, str(free_port())) for f in ("--etcd-port", "--port", "--consensus-port")]
    base = ["up", "--agents", "2", "--pools", "1", "--data-dir", str(tmp_path), "--exit"]
    result = CliRunner().invoke(cli.app, [*base, *(x for kv in ports for x in kv), *args])
    assert result.exit_code == 2, (result.output, result.exception)
    assert said in " ".join(result.output.split()), result.output


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        ({"pool_id": "bad id"}, "--pool-id 'bad id' must be 1-112 characters of A-Z a-z 0-9 . _ -"),
        ({"pool_id": "a/b"}, "--pool-id 'a/b' must be"),
        ({"pool_id": "x" * 113}, "must be 1-112 characters"),
        ({"node_id": "n 1"}, "without --pool-id, --node-id is the pool's id"),
    ],
)
def test_an_agent_pool_refuses_an_id_that_makes_no_valid_agent_id(
    flags: dict[str, str], said: str
) -> None:
    """Such a pool started, and the coordinator refused every hello of its agents
    (INVALID_ARGUMENT agent_id) for ever: a pool running with no agent connected.
    `serve agent-pool` checks the config this way (exit 2)."""
    from services.agent_pool.config import PoolConfig
    from services.cli.serve import check_pool

    with pytest.raises(ValueError, match="must be 1-112 characters") as err:
        check_pool(PoolConfig(**flags))
    assert said in str(err.value)
    check_pool(PoolConfig(pool_id="pool-1.b_c"))
