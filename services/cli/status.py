"""What the cluster does now: `status` (live, --once lines, --json) and the web `dashboard`."""

from __future__ import annotations

from typing import Any

import typer

from services.cli.common import (
    Cluster,
    Coordinator,
    Etcd,
    call,
    console,
    err_console,
    fail,
    mesh_client,
    run,
    where,
)
from services.cli.health import HEALTH_STATES, alert_kind


def status(
    once: bool = typer.Option(
        False, "--once", help="print once and exit (the plain lines scripts parse)"
    ),
    as_json: bool = typer.Option(False, "--json", help="the whole snapshot as JSON, once"),
    watch_s: float = typer.Option(
        0.0, help="with --json: follow the events stream this long first (throughput, latency)"
    ),
    group_by: str = typer.Option("pool", help="group agents by pool or role"),
    refresh_s: float = typer.Option(0.5, help="seconds between redraws of the live view"),
    etcd: Etcd = None,
    coordinator: Coordinator = None,
    cluster: Cluster = None,
) -> None:
    """Leader and term, services and their health, agents, queue by priority, throughput,
    latency, the backlog's ETA, task counts and alerts, live until Ctrl-C. --once and
    --json print once (so does a run whose output is not a terminal)."""
    if group_by not in ("pool", "role"):
        fail(f"--group-by {group_by!r}: use pool or role", 2)
    if not 0 <= watch_s <= 3600 or not 0.1 <= refresh_s <= 60:
        fail("--watch-s must be 0-3600 and --refresh-s 0.1-60", 2)
    if as_json:
        import json

        out = _observe(etcd, coordinator, cluster, group_by, "json", watch_s, refresh_s)
        print(out)
        source = json.loads(out)["source"]
        if not source["last_ok_us"]:  # not one reading succeeded: the cluster is not there
            errors: dict[str, dict[str, str]] = source["errors"]
            why = errors["status"]["message"] if "status" in errors else ""
            why = why or "; ".join(e.get("message", "") for e in errors.values())
            fail(f"nothing could be read: {why}")
    elif once or not console.is_terminal:
        _status_once(etcd, coordinator, cluster)
    else:
        _observe(etcd, coordinator, cluster, group_by, "live", watch_s, refresh_s)


def _status_once(etcd: str | None, coordinator: str | None, cluster: str | None) -> None:
    from services.observe.live import print_once

    async def go() -> tuple[Any, Any, str]:
        import grpc

        from services.health.client import HealthClient, NoMonitorError

        async with mesh_client(etcd, coordinator, cluster) as client:
            status = await client.status()
        monitors = [x.endpoint for x in status.services if x.kind == "health"]
        if not monitors:
            return status, None, "no health monitor runs (agentmesh serve health)"
        at = where(etcd, cluster)
        via: dict[str, Any] = {"monitor": monitors[0]} if coordinator else {"etcd": at.etcd}
        try:
            async with HealthClient(cluster=at.cluster, timeout_s=3.0, **via) as hc:
                return status, await hc.summary(), ""
        except NoMonitorError as err:
            return status, None, str(err)
        except grpc.aio.AioRpcError as err:
            return status, None, f"the health monitor did not answer ({err.code().name})"

    s, h, why = call(go())
    print_once(console, s)
    for line in llm_lines(s):
        console.print(line, soft_wrap=True, markup=False)
    if h is None:
        console.print(f"health     {why}")
        return
    counts = "  ".join(f"{k} {h.state_counts.get(k, 0)}" for k in HEALTH_STATES)
    console.print(
        f"health     {counts}   ejected {h.ejected}   half-open {h.half_open}   "
        f"(monitor {h.monitor_id}, term {h.term})"
    )
    console.print(f"alerts     {h.open_alert_count} open")
    from rich.markup import escape

    for alert in h.open_alerts:
        kind = alert_kind(alert.kind)
        console.print(f"  {kind:<13} {alert.agent_id:<24} {escape(alert.message)}")


def _observe(
    etcd: str | None,
    coordinator: str | None,
    cluster: str | None,
    group_by: str,
    mode: str,
    watch_s: float,
    refresh_s: float,
) -> str:
    """The live view (until Ctrl-C) or one JSON snapshot, read through a MeshReader."""
    from services._common.clock import SystemClock
    from services.health.feed import HealthFeed
    from services.observe.collector import Collector, MeshReader
    from services.observe.live import run_live, snapshot_json
    from services.observe.model import SwarmModel

    clock = SystemClock()

    at = where(etcd, cluster)

    async def go() -> str:
        reader = MeshReader(
            etcd=None if coordinator else at.etcd, coordinator=coordinator, cluster=at.cluster
        )
        model = SwarmModel(clock, cluster=at.cluster, group_by=group_by)
        collector = Collector(reader, model, clock, feeds=[HealthFeed()])
        try:
            if mode == "json":
                return await snapshot_json(collector, clock, watch_s)
            await run_live(collector, model, clock, console, refresh_s)
            return ""
        finally:
            await collector.close()
            await reader.close()

    try:
        return run(go())
    except KeyboardInterrupt:
        return ""  # Ctrl-C is how the live view ends


def dashboard(
    port: int = typer.Option(8089, help="HTTP port (0: a free one, printed)"),
    host: str = typer.Option(
        "127.0.0.1", help="bind address; anything but loopback exposes the cluster's data"
    ),
    group_by: str = typer.Option("pool", help="group agents by pool or role"),
    etcd: Etcd = None,
    coordinator: Coordinator = None,
    cluster: Cluster = None,
) -> None:
    """A read-only web dashboard of the cluster (the live status, charts of throughput
    and latency, agents, task search and pages, the dead-letter queue). Ctrl-C stops it."""
    from services.observe.web import is_loopback, serve_dashboard

    if group_by not in ("pool", "role"):
        fail(f"--group-by {group_by!r}: use pool or role", 2)
    if not 0 <= port <= 65535:
        fail(f"--port {port} is out of range 0-65535", 2)
    if not is_loopback(host):
        err_console.print(
            f"[yellow]warning:[/yellow] binding {host}, not loopback: anyone who can reach "
            "this address sees every task's payload and result (the dashboard has no login)"
        )

    def ready(url: str) -> None:
        console.print(f"dashboard at {url}  (read-only; Ctrl-C stops it)", highlight=False)

    at = where(etcd, cluster)
    try:
        run(
            serve_dashboard(
                host=host,
                port=port,
                etcd=None if coordinator else at.etcd,
                coordinator=coordinator,
                cluster=at.cluster,
                group_by=group_by,
                on_ready=ready,
            )
        )
    except KeyboardInterrupt:
        pass
    except OSError as err:
        fail(f"cannot serve on {host}:{port}: {err}")


def llm_lines(status: Any) -> list[str]:
    """Why llm tasks wait (the leader's rate-limit admission), budgets, and spend per model
    and project; nothing when the cluster has run no llm task and has no budget."""
    lines = [f"llm wait   {w}" for w in status.llm_waiting]
    for b in status.llm_budgets:
        lines.append(
            f"budget     {b.name}: ${b.spent_usd:,.4f} of ${b.cap_usd:,.2f} spent"
            + ("  (REACHED: new llm tasks refused)" if b.spent_usd >= b.cap_usd else "")
        )
    for c in status.llm_costs:
        if c.dimension in ("model", "project"):
            lines.append(
                f"llm {c.dimension:<7}{c.key or '(none)'}: {c.calls} calls, "
                f"{c.usage.input_tokens:,} in / {c.usage.output_tokens:,} out tokens, "
                f"${c.usage.cost_usd:,.4f}"
            )
    return lines
