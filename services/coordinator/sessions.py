"""Agent sessions (one per connected agent stream) and the strategies that pick
an agent for a task among the sessions with free capacity."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb

STRATEGIES = ("least-loaded", "round-robin", "weighted", "random")


@dataclass(eq=False)
class AgentSession:
    """One connected agent's Connect stream, as the leader sees it: what it can run,
    the claims it holds, and how it has done."""

    agent_id: str
    pool_id: str
    lease_id: int
    roles: frozenset[str]
    labels: dict[str, str]
    kinds: frozenset[str]
    capacity: int
    send: Callable[[cpb.CoordinatorMessage | None], None]
    """Queues a message to the agent; None closes the stream."""
    connected_at_us: int = 0
    inflight: set[str] = field(default_factory=set)
    completed: int = 0
    failed: int = 0
    latency_ema_ms: float = 0.0
    draining: bool = False
    order: int = 0
    admit: int = -1
    """Tasks the health monitor lets it hold at once: -1 no limit, 1 (half-open
    breaker), 0 (ejected or FAILED). From its `health/<agent>` record."""

    def free(self) -> int:
        if self.draining:
            return 0
        limit = self.capacity if self.admit < 0 else min(self.capacity, self.admit)
        return limit - len(self.inflight)

    def can_run(self, spec: tpb.TaskSpec) -> bool:
        if spec.kind not in self.kinds:
            return False
        if spec.role and spec.role not in self.roles:
            return False
        labels = self.labels
        return all(labels.get(k) == v for k, v in spec.required_labels.items())

    def status(self) -> cpb.AgentStatus:
        return cpb.AgentStatus(
            agent_id=self.agent_id,
            pool_id=self.pool_id,
            roles=sorted(self.roles),
            labels=self.labels,
            kinds=sorted(self.kinds),
            capacity=self.capacity,
            inflight=len(self.inflight),
            completed=self.completed,
            failed=self.failed,
            latency_ema_ms=self.latency_ema_ms,
            draining=self.draining,
            connected_at_us=self.connected_at_us,
            health_admission={-1: "", 0: "none"}.get(self.admit, "one"),
        )


class Strategy:
    """Picks an agent for a task among those with free capacity that can run it."""

    def __init__(self, name: str, rng: random.Random) -> None:
        if name not in STRATEGIES:
            raise ValueError(
                f"unknown assignment strategy {name!r}; use one of {', '.join(STRATEGIES)}"
            )
        self.name = name
        self.rng = rng
        self._rr = 0

    def pick(self, spec: tpb.TaskSpec, free: dict[str, AgentSession]) -> AgentSession | None:
        name = self.name
        if name == "least-loaded":
            best: AgentSession | None = None
            best_load = 2.0
            for agent in free.values():
                load = len(agent.inflight) / agent.capacity
                if load < best_load and agent.can_run(spec):
                    best, best_load = agent, load
                    if load == 0.0:
                        break
            return best
        candidates = [a for a in free.values() if a.can_run(spec)]
        if not candidates:
            return None
        if name == "round-robin":
            # the lowest connection order after the last pick, wrapping around
            after = [a for a in candidates if a.order > self._rr]
            chosen = min(after or candidates, key=lambda a: a.order)
            self._rr = chosen.order
            return chosen
        if name == "random":
            return self.rng.choice(candidates)
        return min(candidates, key=lambda a: weighted_score(a, spec))


def weighted_score(agent: AgentSession, spec: tpb.TaskSpec) -> float:
    """Lower is better: load dominates, then latency, minus label affinity.

    Affinity counts the agent's labels that the task's metadata mentions
    (e.g. metadata project=x prefers agents labelled project=x), so related
    work sticks to agents that have its context warm.
    """
    load = len(agent.inflight) / agent.capacity
    latency = agent.latency_ema_ms / (agent.latency_ema_ms + 100.0)
    affinity = sum(1 for k, v in spec.metadata.items() if agent.labels.get(k) == v)
    return load + 0.5 * latency - 0.25 * min(affinity, 4)
