"""Ports for child processes: below the kernel's ephemeral range, never twice."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from registry import etcd_server
from registry.etcd_server import PORTS_FROM, free_port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_ports_come_from_below_the_ephemeral_range_and_never_twice() -> None:
    low = int(etcd_server.EPHEMERAL_RANGE_FILE.read_text().split()[0])
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(PORTS_FROM <= p < low for p in ports), [p for p in ports if p >= low][:5]
    assert all(_bindable(p) for p in ports[-20:])


def test_with_no_room_below_the_range_it_takes_the_kernels_pick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    narrow = tmp_path / "ip_local_port_range"
    narrow.write_text(f"{PORTS_FROM + 10}\t60999\n")
    monkeypatch.setattr(etcd_server, "EPHEMERAL_RANGE_FILE", narrow)
    port = free_port()
    assert port > 0
    assert _bindable(port)
