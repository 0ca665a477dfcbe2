"""Start and stop a local etcd server process (for `agentmesh up`, tests and load tests)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

INSTALL_HINT = (
    "etcd was not found. Install it with `sudo apt-get install -y etcd-server` (Debian/Ubuntu), "
    "or point AGENTMESH_ETCD_BIN at an etcd binary."
)


class EtcdNotFoundError(RuntimeError):
    pass


def find_etcd_binary() -> str:
    explicit = os.environ.get("AGENTMESH_ETCD_BIN")
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise EtcdNotFoundError(
                f"AGENTMESH_ETCD_BIN={explicit} is not an executable file. {INSTALL_HINT}"
            )
        return explicit
    found = shutil.which("etcd") or next(
        (p for p in ("/usr/bin/etcd", "/usr/local/bin/etcd") if os.access(p, os.X_OK)), None
    )
    if not found:
        raise EtcdNotFoundError(INSTALL_HINT)
    return found


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
PORTS_FROM = 10_000
"""Ports for child processes are picked from here up to the kernel's ephemeral range."""
_given: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a child process to listen on.

    It is picked below the kernel's ephemeral range, never twice by one process. A port
    the kernel gives for port 0 comes from that range, which is also where every outgoing
    connection takes its source port: in the time a child took to start and bind it, a
    connection could take it first. A consensus process of a CI run died of that.
    """
    try:
        low = int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    for _ in range(100 if low - PORTS_FROM >= 1000 else 0):
        port = PORTS_FROM + secrets.randbelow(low - PORTS_FROM)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken, or still in TIME_WAIT
        _given.add(port)
        return port
    with socket.socket() as s:  # no room below the ephemeral range: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """One etcd member on 127.0.0.1 with its own data dir.

    Args:
        data_dir: where etcd keeps its state; reused across restarts.
        client_port: 0 picks a free port.
        log_path: etcd's output goes here (default: data_dir/../etcd.log).
    """

    def __init__(
        self, data_dir: Path, client_port: int = 0, peer_port: int = 0, log_path: Path | None = None
    ) -> None:
        self.data_dir = Path(data_dir)
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.log_path = log_path or self.data_dir.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, timeout_s: float = 15.0) -> None:
        binary = find_etcd_binary()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            binary,
            "--name",
            "n1",
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"n1={peer}",
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "10m",
            # the load test writes several thousand small revisions a second
            "--quota-backend-bytes",
            str(4 * 1024**3),
            "--log-level",
            "warn",
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.log_path}")
            if self.healthy():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd did not become healthy within {timeout_s}s; see {self.log_path}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=0.5) as resp:
                return b"true" in resp.read()
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
