"""Agent pool configuration (AGENTMESH_<FIELD> variables and CLI flags).

An executor's own settings are its section (executors.EXECUTORS), not fields here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services._common.config import ServiceConfig
from services.coordinator import limits

POOL_ID_BYTES = limits.ID_BYTES - 16
"""Agents are <pool id>-a<n> and an agent id is at most ID_BYTES: room for n to grow."""
_POOL_ID_RE = re.compile(rf"^[A-Za-z0-9._-]{{1,{POOL_ID_BYTES}}}$")


def check_pool_id(pool_id: str) -> None:
    """ValueError unless `pool_id` makes valid agent ids. Any other started, and the
    coordinator refused every one of its agents' hellos, for ever, the pool running."""
    if not _POOL_ID_RE.fullmatch(pool_id):
        raise ValueError(
            f"--pool-id {limits.quote(pool_id)} must be 1-{POOL_ID_BYTES} characters of "
            "A-Z a-z 0-9 . _ - (its agents are <pool id>-a<n>, and an agent id is at most "
            f"{limits.ID_BYTES}; without --pool-id, --node-id is the pool's id)"
        )


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
