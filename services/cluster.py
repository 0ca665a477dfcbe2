"""A whole cluster on one machine, as real processes: etcd, coordinators, health
monitors, consensus instances, agent pools.

Used by `agentmesh up`, the integration tests and the load test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from registry.etcd_server import EtcdServer, free_port


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    data_dir: Path
    """etcd data and process logs live here; reusing it keeps the state across restarts."""
    agents: int = 200
    """Agents in all, split evenly across the pools."""
    pools: int = 2
    """Agent pool processes (several, so both cores are used)."""
    coordinators: int = 1
    """Coordinator replicas: one leads, the others stand by."""
    health_monitors: int = 1
    """Health monitor replicas: one is active, the others stand by (0: none)."""
    consensus: int = 1
    """Consensus instances: one is active, the others stand by (0: none)."""
    consensus_port: int = 0
    """First consensus instance's port; the others take the next ones (0: free ports)."""
    cluster: str = "default"
    etcd_port: int = 0
    """etcd client port (0: a free one)."""
    coordinator_port: int = 0
    """First coordinator's port; replicas take the next ones (0: free ports)."""
    capacity: int = 1
    """Tasks each agent runs at once."""
    sleep_ms: str = "lognormal:50:0.5"
    """Simulated latency of the `sleep` executor."""
    strategy: str = "least-loaded"
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for every service process."""
    coordinator_metrics: bool = False
    """Serve each coordinator's Prometheus /metrics on a free port of 127.0.0.1
    (`LocalCluster.coordinator_metrics` lists them)."""


class LocalCluster:
    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.data_dir = Path(spec.data_dir)
        self.log_dir = self.data_dir / "logs"
        # a fixed client port implies a fixed peer port: etcd stores its peer URL in
        # the data dir, and a restart with another one would not match it
        self.etcd = EtcdServer(
            self.data_dir / "etcd",
            client_port=spec.etcd_port,
            peer_port=spec.etcd_port + 1 if spec.etcd_port else 0,
            log_path=self.log_dir / "etcd.log",
        )
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.args: dict[str, list[str]] = {}
        first = spec.coordinator_port
        self.coordinator_endpoints = [
            f"127.0.0.1:{first + i if first else free_port()}" for i in range(spec.coordinators)
        ]
        self.coordinator_metrics = [
            f"127.0.0.1:{free_port()}" if spec.coordinator_metrics else ""
            for _ in self.coordinator_endpoints
        ]
        first = spec.consensus_port
        self.consensus_endpoints = [
            f"127.0.0.1:{first + i if first else free_port()}" for i in range(spec.consensus)
        ]

    @property
    def etcd_endpoint(self) -> str:
        return self.etcd.endpoint

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.spec.env)
        env["AGENTMESH_ETCD"] = self.etcd.endpoint
        env["AGENTMESH_CLUSTER"] = self.spec.cluster
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _spawn(self, name: str, args: list[str]) -> None:
        self.args[name] = args
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._env(),
            start_new_session=True,  # Ctrl-C reaches `up`, which stops children in order
        )
        log.close()

    def start(self) -> None:
        """Start etcd, then every service process (does not wait for agents)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.etcd.start()
        for i, endpoint in enumerate(self.coordinator_endpoints):
            metrics = self.coordinator_metrics[i]
            self._spawn(
                f"coordinator-{i + 1}",
                [
                    "serve",
                    "coordinator",
                    "--listen",
                    endpoint,
                    "--node-id",
                    f"coordinator-{i + 1}",
                    "--strategy",
                    self.spec.strategy,
                    *(["--metrics-port", metrics.rpartition(":")[2]] if metrics else []),
                ],
            )
        for i in range(self.spec.health_monitors):
            # port 0: the monitor binds a free port itself and publishes it in etcd (a
            # port picked here could be taken before the process binds it)
            self._spawn(
                f"health-{i + 1}",
                ["serve", "health", "--listen", "127.0.0.1:0", "--node-id", f"health-{i + 1}"],
            )
        for i, endpoint in enumerate(self.consensus_endpoints):
            self._spawn(
                f"consensus-{i + 1}",
                ["serve", "consensus", "--listen", endpoint, "--node-id", f"consensus-{i + 1}"],
            )
        per_pool = [
            self.spec.agents // self.spec.pools
            + (1 if i < self.spec.agents % self.spec.pools else 0)
            for i in range(self.spec.pools)
        ]
        for i, n in enumerate(per_pool):
            self._spawn(
                f"pool-{i + 1}",
                [
                    "serve",
                    "agent-pool",
                    "--pool-id",
                    f"pool-{i + 1}",
                    "--agents",
                    str(n),
                    "--capacity",
                    str(self.spec.capacity),
                    "--sleep-ms",
                    self.spec.sleep_ms,
                ],
            )

    def restart(self, name: str) -> None:
        self.stop_process(name)
        self._spawn(name, self.args[name])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            if sig == signal.SIGKILL:
                proc.wait(10)

    def stop_process(self, name: str, timeout_s: float = 15.0) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def stop(self) -> None:
        """Pools first (they drain), then coordinators, then etcd."""
        names = sorted(self.procs, key=lambda n: (not n.startswith("pool"), n))
        for name in names:
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for name in names:
            proc = self.procs[name]
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.etcd.stop()

    def dead(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is not None]

    async def wait_ready(self, timeout_s: float = 60.0, agents: int | None = None) -> float:
        """Wait until a leader serves, `agents` (default: all) are connected and (with
        health monitors) one monitor is active; returns seconds waited."""
        from services.client import MeshClient

        want = self.spec.agents if agents is None else agents
        t0 = time.monotonic()
        async with MeshClient(
            etcd=self.etcd.endpoint, cluster=self.spec.cluster, timeout_s=2.0, retry_s=1.0
        ) as client:
            while time.monotonic() - t0 < timeout_s:
                dead = [
                    n
                    for n in self.dead()
                    if n.startswith(("coordinator", "pool", "health", "consensus"))
                ]
                if dead:
                    raise RuntimeError(f"{', '.join(dead)} exited during start; see {self.log_dir}")
                try:
                    status = await client.status()
                    if (
                        status.leader_endpoint
                        and status.agents_connected >= want
                        and (not self.spec.health_monitors or await self._monitor_active())
                    ):
                        return time.monotonic() - t0
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(
            f"cluster not ready after {timeout_s}s (want {want} agents); see {self.log_dir}"
        )

    async def _monitor_active(self) -> bool:
        from services._common.follow import find_leader

        return bool(await find_leader(self.etcd.endpoint, "health", self.spec.cluster))

    async def wait_voters(self, voters: int, timeout_s: float = 60.0) -> float:
        """Wait until a consensus instance is active with `voters` agents connected to it."""
        from services.consensus.client import ConsensusClient

        t0 = time.monotonic()
        async with ConsensusClient(
            self.etcd.endpoint, self.spec.cluster, timeout_s=2.0, retry_s=1.0
        ) as client:
            while time.monotonic() - t0 < timeout_s:
                try:
                    status = await client.status()
                    if status.leader_endpoint and len(status.voters) >= voters:
                        return time.monotonic() - t0
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(
            f"{voters} voters not connected to consensus after {timeout_s}s; see {self.log_dir}"
        )
