"""What the harness needs from a cluster: where to call, and how to hurt it.

Everything else (pools, agents, the leader) is found through the Coordinator
API itself: `GetStatus().services` lists every registered instance, agent pools
included (kind `agent-pool`, with their AgentPool endpoints), and
`GetStatus().leader_id` names the root coordinator. So a `Target` is small, and
any cluster, local processes or containers, can be wired to it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loadtest import cpu
from loadtest.cpu import cpu_seconds_from_stat

__all__ = ["Target", "TargetError", "cpu_seconds_from_stat", "read_cpu_seconds", "read_rss_bytes"]

KillFn = Callable[[str], Awaitable[None]]
"""instance id → returns once that process is dead (SIGKILL: no goodbye, no drain)."""
RestartFn = Callable[[str], Awaitable[None]]
EtcdRestartFn = Callable[[float], Awaitable[None]]
"""instance id → returns once that process was started again (not necessarily ready)."""
RssFn = Callable[[], Mapping[str, int]]
"""Resident memory in bytes per instance id, now."""
CpuFn = Callable[[], Mapping[str, float]]
"""CPU seconds (user + system) each process has used so far, per process name."""
EtcdFn = Callable[[], Awaitable[None]]
PidsFn = Callable[[], Mapping[str, int]]
"""Process name → pid of each server process alive now (etcd, coordinator-1, pool-2 ...)."""


class TargetError(RuntimeError):
    """A scenario needs something this target does not offer; the message says what."""


@dataclass(frozen=True, kw_only=True)
class Target:
    """A running cluster the load test drives.

    Instance ids are the ids the services register in etcd and report in
    `ClusterStatus.services[].instance_id`: a pool's `pool_id`, a coordinator's
    `node_id` (also `ClusterStatus.leader_id` for the leader).
    """

    coordinator_target: str
    """host:port of a coordinator; a standby points to the leader (`agentmesh-leader`)."""
    standby_targets: tuple[str, ...] = ()
    """Other coordinators' host:port, tried in turn when the current one is unreachable."""
    pools: int = 0
    """Agent-pool processes the cluster runs; the harness waits until this many have
    registered before spawning agents across them (0: take whatever is registered)."""
    kill: KillFn | None = None
    """SIGKILL the process of an instance id (agent-kill, leader-kill scenarios)."""
    restart: RestartFn | None = None
    """Start a killed instance again (optional; scenarios recover without it)."""
    restart_etcd: EtcdRestartFn | None = None
    """Stop etcd, keep it down for the given seconds, start it again with the same data
    (etcd-restart scenario)."""
    kill_etcd: EtcdFn | None = None
    """SIGKILL etcd now: no goodbye, requests in flight may or may not be applied
    (etcd-kill scenario)."""
    start_etcd: EtcdFn | None = None
    """Start etcd again from its data dir; returns once it answers."""
    process_rss: RssFn | None = None
    """Memory per process, for memory per agent (optional)."""
    process_cpu: CpuFn | None = None
    """CPU used so far per process (etcd-kill: the coordinator's CPU during outages)."""
    process_pids: PidsFn | None = None
    """The server processes' pids, for CPU per task (None: a cluster the harness did not
    start, whose processes it cannot see: the report says "not measured")."""
    description: str = ""
    """How this cluster was started, for the report."""
    info: dict[str, Any] = field(default_factory=dict)
    """Facts about the cluster for the report (process count, start time ...)."""

    @property
    def coordinator_targets(self) -> tuple[str, ...]:
        return (self.coordinator_target, *self.standby_targets)

    def require_kill(self, scenario: str) -> KillFn:
        if self.kill is None:
            raise TargetError(
                f"scenario {scenario!r} kills processes: it needs a cluster the harness "
                "started (no --target), or a Target with a kill function"
            )
        return self.kill


def read_rss_bytes(pid: int) -> int:
    """VmRSS of a live process from /proc (0 when it is gone or /proc is missing)."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def read_cpu_seconds(pid: int) -> float:
    """CPU seconds a live process has used (0 when it is gone or /proc is missing)."""
    return cpu.read_cpu_seconds(pid) or 0.0
