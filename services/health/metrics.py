"""Prometheus metrics of the health monitor (served on `metrics_port` when set)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from prometheus_client import Counter, Gauge

from protos.agentmesh.v1 import health_pb2 as hpb
from services.health.core import HealthCore, state_name

AGENTS = Gauge(
    "agentmesh_health_agents", "Agents per health state, as the active monitor sees them", ["state"]
)
EJECTED = Gauge("agentmesh_health_ejected", "Agents whose circuit breaker is open")
OPEN_ALERTS = Gauge("agentmesh_health_open_alerts", "Alerts open now")
IS_ACTIVE = Gauge("agentmesh_health_is_active", "1 while this monitor is the active one")
ALERTS = Counter("agentmesh_health_alerts_total", "Alerts opened", ["kind"])
RECOVERIES = Counter(
    "agentmesh_health_recoveries_total",
    "Recovery actions carried out (release, replace, drain) and how they went",
    ["kind", "outcome"],
)
HEARTBEATS = Counter("agentmesh_health_heartbeats_total", "Heartbeats received")


def _count_of(core: HealthCore, state: str) -> Callable[[], float]:
    return lambda: core.counts()[state]


def watch(core: HealthCore) -> Callable[[hpb.HealthEvent], None]:
    """Point the gauges at this term's core (read at scrape time); the returned callback
    counts alerts and recoveries from its events (subscribe it for the term)."""
    for state in (
        hpb.HEALTH_STATE_HEALTHY,
        hpb.HEALTH_STATE_DEGRADED,
        hpb.HEALTH_STATE_CRITICAL,
        hpb.HEALTH_STATE_FAILED,
    ):
        name = state_name(state)
        AGENTS.labels(state=name).set_function(_count_of(core, name))
    EJECTED.set_function(lambda: core.summary().ejected)
    OPEN_ALERTS.set_function(lambda: len(core.alerts))

    def count(event: hpb.HealthEvent) -> None:
        body = event.WhichOneof("body")
        if body == "alert" and not event.alert.closed_at_us:
            kind = str(hpb.AlertKind.Name(event.alert.kind)).removeprefix("ALERT_KIND_")
            ALERTS.labels(kind=kind.lower()).inc()
        elif body == "recovery":
            kind = str(hpb.RecoveryKind.Name(event.recovery.kind)).removeprefix("RECOVERY_KIND_")
            outcome = "ok" if event.recovery.ok else "failed"
            RECOVERIES.labels(kind=kind.lower(), outcome=outcome).inc()

    return count


@contextlib.contextmanager
def active(core: HealthCore) -> Iterator[None]:
    """While this monitor is the active one: the gauges read `core` and its events are
    counted; `agentmesh_health_is_active` says so."""
    counter = watch(core)
    core.subscribers.add(counter)
    IS_ACTIVE.set(1)
    try:
        yield
    finally:
        IS_ACTIVE.set(0)
        core.subscribers.discard(counter)
