"""Prometheus metrics, and the hooks that tie OpenTelemetry traces (`tracing`) in."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from services._common import tracing

TASKS = Counter("agentmesh_tasks_total", "Task state changes made by this coordinator", ["state"])
QUEUE_DEPTH = Gauge("agentmesh_queue_depth", "Tasks waiting for an agent")
AGENTS = Gauge("agentmesh_agents_connected", "Agents connected to this coordinator")
IS_LEADER = Gauge("agentmesh_is_leader", "1 while this coordinator is the elected root")
_COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0)
COMMIT_SECONDS = Histogram(
    "agentmesh_etcd_commit_seconds",
    "Latency of one fenced etcd commit",
    buckets=_COMMIT_BUCKETS,
)
# The leader's group committer is a queue with one server (one transaction in flight):
# these three say how long task writes wait for it, how full its transactions are, and
# how busy it is. A busy rate near 1 means writes queue: latency grows with the load.
COMMIT_WAIT_SECONDS = Histogram(
    "agentmesh_etcd_commit_wait_seconds",
    "Time a task write waited in the group committer before its transaction went out",
    buckets=_COMMIT_BUCKETS,
)
COMMIT_WRITES = Histogram(
    "agentmesh_etcd_commit_writes",
    "Task writes packed into one etcd transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
COMMIT_BUSY_SECONDS = Counter(
    "agentmesh_etcd_commit_busy_seconds",
    "Time the group committer had a transaction in flight (its rate is the utilisation)",
)


def watch_core(core: Any) -> Any:
    """Point the gauges at this term's core (read at scrape time) and count transitions."""
    QUEUE_DEPTH.set_function(core.queue_depth)
    AGENTS.set_function(lambda: len(core.agents))
    by_state = {s: TASKS.labels(state=n.removeprefix("TASK_STATE_")) for n, s in _STATES.items()}

    # the same subscriber turns transitions into spans of the task's trace when tracing
    # is on (one callback to remove at the end of the term)
    traced = tracing.transitions(core.term, core.clock.wall_us)

    def count(task: Any, previous: int) -> None:
        if previous == -1:
            return
        if (child := by_state.get(task.state)) is not None:
            child.inc()
        if traced is not None:
            traced(task, previous)

    core.subscribers.add(count)
    return count  # the caller removes it at the end of the term


def _states() -> dict[str, int]:
    from protos.agentmesh.v1 import task_pb2

    return dict(task_pb2.TaskState.items())


_STATES = _states()


def start_metrics(port: int) -> None:
    if not port:
        return
    try:
        start_http_server(port, addr="127.0.0.1")
    except OSError as err:  # e.g. two replicas on one host: metrics off, service on
        logging.getLogger(__name__).warning(
            "metrics port unavailable", extra={"port": port, "error": str(err)}
        )


def server_interceptor(service_names: Sequence[str] = ()) -> Any | None:
    """Server spans for our RPCs when tracing is on (see `tracing`)."""
    return tracing.server_interceptor(service_names)
