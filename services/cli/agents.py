"""`agentmesh agents`: the agents connected to the root coordinator."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from services.cli.common import Cluster, Coordinator, Etcd, call, console, id_column, mesh_client


def agents(
    etcd: Etcd = None,
    coordinator: Coordinator = None,
    cluster: Cluster = None,
) -> None:
    """Agents connected to the root coordinator."""

    async def go() -> Any:
        async with mesh_client(etcd, coordinator, cluster) as client:
            return await client.agents()

    resp = call(go())
    table = Table(title=f"{len(resp.agents)} agents")
    id_column(table, "agent", (a.agent_id for a in resp.agents))
    for col in (
        "pool",
        "kinds",
        "roles",
        "inflight/cap",
        "done",
        "failed",
        "latency ema ms",
    ):
        table.add_column(col)
    for a in sorted(resp.agents, key=lambda a: a.agent_id):
        table.add_row(
            a.agent_id,
            a.pool_id,
            ", ".join(a.kinds),
            ", ".join(a.roles),
            f"{a.inflight}/{a.capacity}",
            str(a.completed),
            str(a.failed),
            f"{a.latency_ema_ms:.1f}",
        )
    console.print(table)
