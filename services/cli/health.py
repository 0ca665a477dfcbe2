"""`agentmesh health`: agents' health from the active monitor, and grpc.health.v1 checks."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from services.cli.common import Cluster, Etcd, call, console, fail, id_column, where

app = typer.Typer(
    no_args_is_help=True,
    help="Agents' health (from the active health monitor), and grpc.health.v1 checks.",
)

HEALTH_STATES = ("HEALTHY", "DEGRADED", "CRITICAL", "FAILED")


def alert_kind(kind: int) -> str:
    from protos.agentmesh.v1 import health_pb2 as hpb

    return str(hpb.AlertKind.Name(kind)).removeprefix("ALERT_KIND_").lower()


@app.command("check")
def health_check(
    target: str = typer.Argument(..., help="host:port of any agentmesh service"),
    service: str = typer.Option("", help="service name ('' = the whole process)"),
    timeout_s: float = typer.Option(3.0, help="deadline"),
) -> None:
    """Exit 0 when grpc.health.v1 reports SERVING (for container health checks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if not 0 < timeout_s <= 3600:  # also refuses nan
        fail(f"--timeout-s {timeout_s:g} is out of range: use more than 0, at most 3600", 2)
    try:
        with grpc.insecure_channel(target) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
    except grpc.RpcError as err:
        fail(f"{target}: {err.code().name}")  # type: ignore[attr-defined]
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(name)
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        raise typer.Exit(1)


@app.command("agents")
def health_agents(
    state: list[str] = typer.Option(
        [], help="only these states: HEALTHY, DEGRADED, CRITICAL, FAILED (repeatable)"
    ),
    as_json: bool = typer.Option(False, "--json", help="AgentHealth JSON lines instead of a table"),
    etcd: Etcd = None,
    monitor: str | None = typer.Option(None, help="a health monitor host:port (instead of etcd)"),
    cluster: Cluster = None,
) -> None:
    """Every agent's health as the active monitor sees it: state, breaker, response,
    latency baseline, tasks in flight, replacements."""
    from google.protobuf import json_format

    from protos.agentmesh.v1 import health_pb2 as hpb
    from services.health.client import HealthClient, NoMonitorError

    try:
        states = [hpb.HealthState.Value("HEALTH_STATE_" + x.upper()) for x in state]
    except ValueError:
        fail(f"unknown state in {state}; use {', '.join(HEALTH_STATES)}", 2)

    async def go() -> list[Any]:
        at = where(etcd, cluster)
        via: dict[str, Any] = {"monitor": monitor} if monitor else {"etcd": at.etcd}
        async with HealthClient(cluster=at.cluster, **via) as hc:
            return [a async for a in hc.agents(states)]

    try:
        agents = call(go())
    except NoMonitorError as err:
        fail(str(err))
    if as_json:
        for a in agents:
            print(json_format.MessageToJson(a, indent=None))
        return
    table = Table(title=f"{len(agents)} agents")
    id_column(table, "agent", (a.agent_id for a in agents))
    for col in (
        "pool",
        "state",
        "breaker",
        "response s",
        "latency ms (base/recent)",
        "tasks",
        "done/failed",
        "hung",
        "replaces / by",
        "reason",
    ):
        table.add_column(col)
    for a in agents:
        breaker = str(hpb.BreakerState.Name(a.breaker)).removeprefix("BREAKER_STATE_").lower()
        table.add_row(
            a.agent_id,
            a.pool_id,
            str(hpb.HealthState.Name(a.state)).removeprefix("HEALTH_STATE_"),
            breaker + (f" x{a.ejections}" if a.ejections else ""),
            f"{a.response_s:.1f}",
            f"{a.baseline_latency_ms:.0f} / {a.recent_latency_ms:.0f}"
            + (" !" if a.latency_alert else ""),
            str(a.tasks_in_flight),
            f"{a.completed}/{a.failed}",
            str(a.hung_tasks or ""),
            " / ".join(x for x in (a.replaces, a.replaced_by) if x),
            a.reason[:60],
        )
    console.print(table)


# ---------------------------------------------------------------- consensus
