"""`agentmesh up` refuses a port that is taken, and names the flag that moves it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from registry import etcd_server
from registry.etcd_server import free_port
from services import cli


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
