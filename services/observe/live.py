"""`agentmesh status` for people: a snapshot drawn with rich (pure: snapshot in,
renderable out), the live loop that redraws it, and the one-shot forms for scripts."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from services._common.clock import Clock
from services.cli_format import duration
from services.observe.collector import Collector
from services.observe.model import SwarmModel

SPARKS = "▁▂▃▄▅▆▇█"
DASH = "—"


def sparkline(values: list[int], width: int = 60) -> str:
    """The last `width` values as block characters scaled to their maximum."""
    values = values[-width:]
    top = max(values, default=0)
    if top <= 0:
        return SPARKS[0] * len(values)
    return "".join(SPARKS[min(len(SPARKS) - 1, v * (len(SPARKS) - 1) // top)] for v in values)


def clock_time(us: int) -> str:
    if not us:
        return DASH
    return dt.datetime.fromtimestamp(us / 1e6).strftime("%H:%M:%S")


def ms(value: float | None) -> str:
    return DASH if value is None else f"{value:.1f}"


def eta_text(eta: Mapping[str, Any]) -> str:
    if eta["backlog"] == 0:
        return "backlog empty"
    if eta["eta_s"] is None:
        return f"{eta['backlog']:,} left, nothing finishing: no ETA"
    if eta["eta_s"] < 1:
        return f"{eta['backlog']:,} left, under a second"
    return f"{eta['backlog']:,} left, about {duration(int(eta['eta_s'] * 1e6))}"


def _health_style(health: str) -> str:
    return "green" if health == "SERVING" else "yellow" if health == "UNKNOWN" else "red"


def render(snap: Mapping[str, Any], max_agent_rows: int = 20) -> RenderableType:
    """The whole view. Every value from the cluster is escaped (ids and errors may hold
    brackets that rich would read as markup)."""
    parts: list[RenderableType] = [_header(snap), _services(snap), _work(snap), _counts(snap)]
    parts.append(_agents(snap, max_agent_rows))
    parts.append(_sections(snap))
    return Group(*parts)


def _header(snap: Mapping[str, Any]) -> RenderableType:
    leader, source = snap["leader"], snap["source"]
    text = Text()
    text.append("agentmesh ", style="bold")
    text.append(f"cluster {snap['cluster']}   ")
    if leader["endpoint"]:
        text.append(f"leader {leader['id']} at {leader['endpoint']}", style="bold green")
        text.append(f"   term {leader['term']}")
    else:
        text.append("no leader elected", style="bold red")
    for sb in leader["standbys"]:
        text.append(f"   standby {sb['id']} at {sb['endpoint']}")
    stream = source["event_stream"]
    text.append(
        f"\nevents {stream}",
        style="green" if stream == "connected" else "yellow",
    )
    text.append(
        f" ({source['events']:,} seen since {clock_time(source['started_us'])}, "
        f"{source['gaps']} gap{'s' if source['gaps'] != 1 else ''})   "
        f"updated {clock_time(snap['generated_at_us'])}"
    )
    for change in leader["changes"][-3:]:
        text.append(
            f"\nleader changed at {clock_time(change['at_us'])}: term {change['previous_term']}"
            f" → {change['term']} ({change['leader_endpoint'] or 'none'})",
            style="yellow",
        )
    for name, err in source["errors"].items():
        text.append(
            f"\n{name}: {err['message']} (since {clock_time(err['since_us'])})", style="red"
        )
    return text


def _services(snap: Mapping[str, Any]) -> RenderableType:
    table = Table(title="services", title_justify="left", expand=False, show_edge=False)
    for col in ("kind", "id", "endpoint", "role", "health"):
        table.add_column(col)
    for svc in snap["services"]:
        table.add_row(
            escape(svc["kind"]),
            escape(svc["id"]),
            escape(svc["endpoint"]),
            svc["role"],
            Text(svc["health"], style=_health_style(svc["health"])),
        )
    if not snap["services"]:
        table.add_row(DASH, "none registered", "", "", "")
    return table


def _work(snap: Mapping[str, Any]) -> RenderableType:
    queue, thr, lat, eta = snap["queue"], snap["throughput"], snap["latency"], snap["eta"]
    text = Text()
    depth = queue["depth"]
    text.append("queue ", style="bold")
    text.append(DASH if depth is None else f"{depth:,}")
    if queue["by_priority"]:
        prio = "  ".join(f"p{p}:{n:,}" for p, n in queue["by_priority"].items())
        note = "" if queue["complete"] else f" (first {queue['sampled']:,} queued)"
        text.append(f"   by priority {prio}{note}")
    text.append(f"   in flight {eta['inflight']:,}   ")
    text.append("ETA ", style="bold")
    text.append(eta_text(eta))
    text.append("\nthroughput ", style="bold")
    text.append(
        f"{thr['now_per_s']:.1f}/s (last {thr['window_s']:g} s; peak {thr['peak_per_s']:.0f}/s)   "
    )
    text.append(sparkline([b["finished"] for b in thr["series"]]), style="cyan")
    rec = lat["recent"]
    text.append("\nlatency ", style="bold")
    text.append(
        f"(SUCCEEDED, last {rec['window_s']:g} s, {rec['e2e']['n']:,} tasks) "
        f"end to end p50/p95/p99 {ms(rec['e2e']['p50_ms'])}/{ms(rec['e2e']['p95_ms'])}/"
        f"{ms(rec['e2e']['p99_ms'])} ms   dispatch p50/p95 {ms(rec['dispatch']['p50_ms'])}/"
        f"{ms(rec['dispatch']['p95_ms'])} ms   run p50/p95 {ms(rec['run']['p50_ms'])}/"
        f"{ms(rec['run']['p95_ms'])} ms"
    )
    return text


def _counts(snap: Mapping[str, Any]) -> RenderableType:
    leader, seen = snap["counts"]["leader"], snap["counts"]["seen"]
    text = Text()
    text.append("tasks, leader ", style="bold")
    text.append(f"(held now + finished in term {leader['term']}): ")
    text.append("  ".join(f"{k} {v:,}" for k, v in leader["by_state"].items()) or DASH)
    text.append("\ntasks, seen ", style="bold")
    text.append(f"(changes since {clock_time(seen['since_us'])}, {seen['gaps']} gaps): ")
    parts = [f"submitted {seen['submitted']:,}"] + [
        f"{k}{' (retried)' if k == 'FAILED' else ''} {v:,}" for k, v in seen["by_state"].items()
    ]
    text.append("  ".join(parts))
    costs = snap["costs"]
    if costs["total_usd"] is not None:
        text.append(
            f"\ncost ${costs['total_usd']:.4f} ({costs['input_tokens']:,} tokens in, "
            f"{costs['output_tokens']:,} out, {costs['tasks_with_usage']:,} tasks seen)"
        )
    return text


def _agents(snap: Mapping[str, Any], max_rows: int) -> RenderableType:
    agents = snap["agents"]
    title = f"agents: {agents['total']:,} connected, by {agents['group_by']}"
    table = Table(title=title, title_justify="left", show_edge=False)
    for col in (
        "agent",
        "load",
        "running",
        "latency ema ms",
        "done",
        "failed",
        "health",
        "cost $",
    ):
        table.add_column(col, justify="right" if col in ("done", "failed", "cost $") else "left")
    rows = 0
    for group in agents["groups"]:
        table.add_row(
            Text(f"{group['key']} ({group['count']})", style="bold"),
            f"{group['inflight']}/{group['capacity']}",
            "",
            "",
            f"{group['completed']:,}",
            f"{group['failed']:,}",
            "",
            "",
        )
        # the busiest first: those are the ones an operator looks for
        members = sorted(group["agents"], key=lambda a: (-a["inflight"], a["id"]))
        for agent in members:
            if rows >= max_rows:
                break
            rows += 1
            table.add_row(*_agent_row(agent))
    hidden = agents["total"] - rows
    if hidden > 0:
        table.add_row(Text(f"… {hidden:,} more (the dashboard lists all)", style="dim"))
    return table


def _agent_row(agent: Mapping[str, Any]) -> list[RenderableType]:
    tasks = agent["tasks"]
    if tasks:
        first = tasks[0]
        age = f" {duration(int(first['for_ms'] * 1000))}" if first["for_ms"] is not None else ""
        running = f"{first['task_id']} {first['state'].lower()}{age}"
        if first["progress_updates"]:
            running += f" ({first['progress_updates']} progress)"
        more = len(tasks) - 1 + agent["tasks_more"]
        if more:
            running += f" +{more}"
    else:
        running = "idle" if not agent["inflight"] else f"{agent['inflight']} in flight"
    health = agent["health"]
    return [
        escape(agent["id"]) + (" (draining)" if agent["draining"] else ""),
        f"{agent['inflight']}/{agent['capacity']}",
        escape(running),
        f"{agent['latency_ema_ms']:.1f}",
        f"{agent['completed']:,}",
        f"{agent['failed']:,}",
        escape(str(health.get("state", DASH))) if health else DASH,
        f"{agent['cost_usd']:.4f}" if agent["cost_usd"] is not None else DASH,
    ]


def _sections(snap: Mapping[str, Any]) -> RenderableType:
    text = Text()
    for section in snap["sections"].values():
        text.append(f"{section['label']}: ", style="bold")
        text.append(f"{section['status']}")
        if section["message"]:
            text.append(f" ({section['message']})", style="dim")
        text.append("\n")
    text.append("alerts: ", style="bold")
    alerts = snap["alerts"]
    if not alerts:
        running = snap["sections"].get("health", {}).get("instances", 0)
        text.append("none" if running else "none (alerts come from the health monitor)")
    for alert in alerts[:10]:
        text.append(
            f"\n  {alert.get('kind', '')} {alert.get('agent_id', '')} {alert.get('message', '')}",
            style="red",
        )
    failures = snap["recent_failures"][:5]
    if failures:
        text.append("\nrecent failures:", style="bold")
        for f in failures:
            text.append(
                f"\n  {clock_time(f['at_us'])} {f['task_id']} {f['state']} "
                f"(attempt {f['attempts']}, {f['agent_id'] or DASH}): {f['error'][:100]}"
            )
    return text


# ---------------------------------------------------------------- the forms of `status`


def print_once(console: Console, s: cpb.ClusterStatus) -> None:
    """The one-shot form (what `status` printed before the live view; scripts parse it)."""
    console.print(f"leader     {s.leader_id or '-'} at {s.leader_endpoint or '-'}  term {s.term}")
    for sb in s.standbys:
        console.print(f"standby    {sb.instance_id} at {sb.endpoint}")
    if not s.from_leader:
        console.print("agents     unknown: a standby answered, or the new leader is still loading")
    else:
        console.print(
            f"agents     {s.agents_connected} connected   queue depth {s.queue_depth}   strategy {s.assignment_strategy}"
        )
        console.print(
            "tasks      " + ("  ".join(f"{k} {v}" for k, v in sorted(s.task_counts.items())) or "-")
        )
    for svc in sorted(s.services, key=lambda x: (x.kind, x.instance_id)):
        console.print(f"service    {svc.kind:<12} {svc.instance_id:<24} {svc.endpoint}")


async def snapshot_json(collector: Collector, clock: Clock, watch_s: float) -> str:
    """One reading of everything (and `watch_s` of the events stream first, since
    throughput and latency come only from it), as indented JSON."""
    if watch_s > 0:
        follow = asyncio.ensure_future(collector.follow_events())
        try:
            await collector.poll_once()
            await clock.sleep(watch_s)
        finally:
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)
    else:
        collector.model.stream = "not followed (--watch-s 0)"
    await collector.poll_once()
    return json.dumps(collector.model.snapshot(), indent=2, sort_keys=False)


async def run_live(
    collector: Collector,
    model: SwarmModel,
    clock: Clock,
    console: Console,
    refresh_s: float = 0.5,
) -> None:
    """Redraw until cancelled (Ctrl-C); the collector follows the cluster meanwhile."""
    await collector.poll_once()

    def rows() -> int:
        # the agents table gets what the terminal has left after the other panels
        return max(5, console.size.height - 26 - len(model.services))

    with Live(
        render(model.snapshot(points=120), rows()),
        console=console,
        refresh_per_second=max(1, round(1 / refresh_s)),
        screen=False,
        auto_refresh=False,
    ) as live:
        async with asyncio.TaskGroup() as group:
            group.create_task(collector.run())

            async def redraw() -> None:
                while True:
                    live.update(render(model.snapshot(points=120), rows()), refresh=True)
                    await clock.sleep(refresh_s)

            group.create_task(redraw())
