"""Agent pool configuration (AGENTMESH_<FIELD> variables and CLI flags).

An executor's own settings are its section (executors.EXECUTORS), not fields here.
"""

from __future__ import annotations

from dataclasses import dataclass

from services._common.config import ServiceConfig


@dataclass(frozen=True, kw_only=True)
class PoolConfig(ServiceConfig):
    pool_id: str = ""
    """Unique id of this pool (default: node_id, else pool-<pid>-<random>); agents are
    <pool_id>-a<n>."""
    agents: int = 0
    """Agents to start at boot."""
    batch_size: int = 50
    """Agents started in parallel per batch."""
    warm: int = 0
    """Agents kept pre-started (channel open, not taking work) for fast spawns and replacements."""
    capacity: int = 1
    """Tasks each agent runs at once."""
    kinds: tuple[str, ...] = ("echo", "sleep", "noop", "fail", "propose")
    """Task kinds the agents advertise (each needs a row in executors.EXECUTORS)."""
    roles: tuple[str, ...] = ()
    """Roles the agents advertise (tasks may require one)."""
    labels: tuple[str, ...] = ()
    """key=value labels the agents advertise."""
    sleep_ms: str = "lognormal:50:0.5"
    """Simulated work of the `sleep` executor: fixed:MS, uniform:LO:HI or lognormal:MEDIAN:SIGMA."""
    max_result_bytes: int = 512 * 1024
    """An output larger than this fails the task (not retried) on the agent, with an error
    saying so; keep it at or under the coordinator's (which fails it too)."""
    task_timeout_s: float = 300.0
    """Default per-attempt limit when a task sets none."""
    vote_policy: str = "always"
    """How the agents vote on proposals: always, never, abstain, silent,
    random:SEED[:P_APPROVE] or field:NAME[=VALUE] (see services/agent_pool/voter.py)."""
    vote_delay_ms: str = "0"
    """Think time before each vote (SIMULATED, like `sleep`): fixed:MS, uniform:LO:HI or
    lognormal:MEDIAN:SIGMA; 0 answers at once."""
    byzantine: tuple[str, ...] = ()
    """Faulty voters among the first agents, for tests and load tests: MODE:COUNT with
    MODE forge, equivocate, unknown-proposal, impersonate or silent."""
    heartbeat_interval_s: float = 1.0
    """How often each agent heartbeats to the health monitor (until the monitor says)."""
    flaky_agents: int = 0
    """SIMULATED fault for tests and the load test: the first N agents this pool starts
    fail every task they get (the error says so). Their replacements do not."""

    def label_map(self) -> dict[str, str]:
        out = {}
        for item in self.labels:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"label {item!r} must look like key=value")
            out[key] = value
        return out
