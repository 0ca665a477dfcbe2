"""Tasks: `submit` (and wait with a progress bar and a summary), `tasks`, `task get|cancel`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from services._common.latency import HOUR_US, LatencyRecorder
from services.cli.common import (
    Cluster,
    Coordinator,
    Etcd,
    call,
    console,
    err_console,
    fail,
    id_column,
    mesh_client,
    parse_labels,
)
from services.coordinator import limits

task_app = typer.Typer(no_args_is_help=True, help="One task: get or cancel.")


TERMINAL_NAMES = {"SUCCEEDED", "CANCELLED", "DEAD_LETTER"}
MAX_COUNT = 100_000
# ListTasks calls `agentmesh tasks` makes at most (each reads up to 1,280 records)
LIST_CALLS = 100
"""`submit --count` at most: the CLI builds every copy in memory (about 1 KB each) and
the leader holds every queued task; `agentmesh loadtest` is the tool for load."""


async def submit_and_wait(client: Any, specs: list[Any], wait: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from protos.agentmesh.v1 import task_pb2 as tpb

    ids = [s.task_id for s in specs]
    pending = set()
    terminal: dict[str, Any] = {}
    events = client.watch_events() if wait else None
    nxt = asyncio.ensure_future(events.__anext__()) if events is not None else None
    t0 = time.monotonic()
    created = 0
    try:
        for i in range(0, len(specs), 500):
            resp = await client.submit_batch(specs[i : i + 500])
            for r in resp.results:
                created += r.created
                if r.task.state in (
                    tpb.TASK_STATE_SUCCEEDED,
                    tpb.TASK_STATE_CANCELLED,
                    tpb.TASK_STATE_DEAD_LETTER,
                ):
                    terminal[r.task.task_id] = r.task
                else:
                    pending.add(r.task.task_id)
        submitted_s = time.monotonic() - t0
        console.print(f"submitted {len(specs)} tasks ({created} new) in {submitted_s:.2f} s")
        if events is None or nxt is None:
            return
        with Progress(
            TextColumn("[bold]tasks"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            job = bar.add_task("tasks", total=len(ids), completed=len(terminal))
            last_poll = time.monotonic()
            while pending:
                done, _ = await asyncio.wait({nxt}, timeout=1.0)
                if done:
                    event = nxt.result()
                    nxt = asyncio.ensure_future(events.__anext__())
                    t = event.task
                    if (
                        t.task_id in pending
                        and tpb.TaskState.Name(t.state).removeprefix("TASK_STATE_")
                        in TERMINAL_NAMES
                    ):
                        pending.discard(t.task_id)
                        terminal[t.task_id] = t
                        bar.update(job, completed=len(terminal))
                # a missed event (failover) must not hang the wait
                if time.monotonic() - last_poll > 5:
                    last_poll = time.monotonic()
                    for task_id in list(pending)[:200]:
                        t = await client.get(task_id)
                        if (
                            tpb.TaskState.Name(t.state).removeprefix("TASK_STATE_")
                            in TERMINAL_NAMES
                        ):
                            pending.discard(task_id)
                            terminal[task_id] = t
                    bar.update(job, completed=len(terminal))
    finally:
        if nxt is not None:
            _drop(nxt)
    wall = time.monotonic() - t0
    summary(list(terminal.values()), wall)


def _drop(read: asyncio.Future[Any]) -> None:
    """Stop a pending read of the events stream. A read that already failed has its error
    taken: the command reports the error that ended the wait, and asyncio would print
    this one afterwards with a traceback ('Task exception was never retrieved')."""
    read.cancel()
    if read.done() and not read.cancelled():
        read.exception()


def summary(tasks: list[Any], wall_s: float) -> None:
    from collections import Counter

    from protos.agentmesh.v1 import task_pb2 as tpb

    states = Counter(tpb.TaskState.Name(t.state).removeprefix("TASK_STATE_") for t in tasks)
    e2e = LatencyRecorder("end_to_end", highest_us=HOUR_US)
    for t in tasks:
        if t.finished_at_us:
            e2e.record_us(t.finished_at_us - t.created_at_us)
    retried = sum(1 for t in tasks if t.attempts > 1)
    agents = len({t.agent_id for t in tasks})
    table = Table(title="summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("tasks", str(len(tasks)))
    for name, n in sorted(states.items()):
        table.add_row(f"  {name}", str(n))
    table.add_row("wall time", f"{wall_s:.2f} s")
    table.add_row("throughput", f"{len(tasks) / wall_s:.1f} tasks/s" if wall_s else "-")
    if e2e.count:
        p50, p95, p99 = e2e.percentiles_ms((50, 95, 99)).values()
        table.add_row("submit→done P50 / P95 / P99", f"{p50:.1f} / {p95:.1f} / {p99:.1f} ms")
    table.add_row("tasks retried (agent lost or failure)", str(retried))
    table.add_row("agents that ran tasks", str(agents))
    console.print(table)


def submit(
    kind: str = typer.Option(None, help="task kind (echo, sleep, noop, llm, fail, propose)"),
    payload: str = typer.Option("", help="payload text (JSON for sleep, fail, propose, llm)"),
    priority: int = typer.Option(0, help="0 (lowest) to 9"),
    count: int = typer.Option(1, help=f"submit this many copies (1-{MAX_COUNT:,})"),
    task_id: str = typer.Option(None, help="client-chosen id (idempotent)"),
    role: str = typer.Option("", help="required agent role"),
    label: list[str] = typer.Option([], help="required agent label key=value (repeatable)"),
    max_attempts: int = typer.Option(
        0, help=f"attempts before DEAD_LETTER, 0-{limits.MAX_ATTEMPTS_MAX} (0: default 3)"
    ),
    file: Path = typer.Option(
        None, help="JSONL file, one TaskSpec per line (fields as in the proto)"
    ),
    wait: bool = typer.Option(False, help="wait until every task is terminal, with a progress bar"),
    etcd: Etcd = None,
    coordinator: Coordinator = None,
    cluster: Cluster = None,
) -> None:
    """Submit tasks (from flags or a JSONL file)."""
    from google.protobuf import json_format

    from protos.agentmesh.v1 import task_pb2 as tpb

    if not 0 <= priority <= 9:
        fail(f"--priority {priority} is out of range: use 0 (lowest) to 9", 2)
    if not 1 <= count <= MAX_COUNT:
        fail(f"--count {count} is out of range: use 1 to {MAX_COUNT:,}", 2)
    if not 0 <= max_attempts <= limits.MAX_ATTEMPTS_MAX:
        fail(
            f"--max-attempts {max_attempts} is out of range: use 0 (the default) to "
            f"{limits.MAX_ATTEMPTS_MAX}",
            2,
        )
    specs: list[tpb.TaskSpec] = []
    if file is not None:
        if not file.exists():
            fail(f"{file} does not exist", 2)
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            fail(f"--file {file} cannot be read: {getattr(err, 'strerror', None) or err}", 2)
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                specs.append(json_format.Parse(line, tpb.TaskSpec()))
            except json_format.ParseError as err:
                fail(f"{file}:{n}: not a TaskSpec: {err}", 2)
        if not specs:
            fail(f"--file {file} holds no TaskSpec (one JSON object a line)", 2)
    else:
        if not kind:
            fail("give --kind (or --file)", 2)
        labels = parse_labels(label)
        for i in range(count):
            specs.append(
                tpb.TaskSpec(
                    kind=kind,
                    payload=payload.encode(),
                    priority=priority,
                    task_id=(task_id if count == 1 else f"{task_id}-{i}") if task_id else "",
                    role=role,
                    required_labels=labels,
                    max_attempts=max_attempts,
                )
            )

    async def go() -> None:
        async with mesh_client(etcd, coordinator, cluster) as client:
            for line in unrunnable(specs, (await client.agents()).agents):
                err_console.print(f"[yellow]note:[/yellow] {escape(line)}", soft_wrap=True)
            if wait:
                for s in specs:
                    if not s.task_id:
                        s.task_id = f"cli-{time.time_ns():x}-{len(s.kind)}{id(s) & 0xFFFF:04x}"
                await submit_and_wait(client, specs, wait=True)
            elif len(specs) == 1:
                resp = await client.submit(specs[0])
                console.print(
                    f"{resp.task.task_id} {'created' if resp.created else 'exists'} "
                    f"{tpb.TaskState.Name(resp.task.state).removeprefix('TASK_STATE_')}"
                )
            else:
                for i in range(0, len(specs), 500):
                    resp = await client.submit_batch(specs[i : i + 500])
                    for r in resp.results:
                        console.print(f"{r.task.task_id} {'created' if r.created else 'exists'}")

    call(go())


def unrunnable(specs: list[Any], agents: Any) -> list[str]:
    """A line for each kind (with its role and labels) that no connected agent runs: such
    tasks stay QUEUED, without a word, until an agent that can run them connects."""
    wanted: dict[tuple[str, str, tuple[tuple[str, str], ...]], int] = {}
    for s in specs:
        key = (s.kind, s.role, tuple(sorted(s.required_labels.items())))
        wanted[key] = wanted.get(key, 0) + 1
    lines = []
    for (kind, role, labels), n in wanted.items():
        if any(
            kind in a.kinds
            and (not role or role in a.roles)
            and all(a.labels.get(k) == v for k, v in labels)
            for a in agents
        ):
            continue
        what = f"kind {kind!r}" + (f" with role {role!r}" if role else "")
        what += "".join(f" and label {k}={v}" for k, v in labels)
        lines.append(
            f"no connected agent runs {what}: {n} task(s) stay QUEUED until one connects"
            + (
                " (an agent pool started with --kinds llm and ANTHROPIC_API_KEY)"
                if kind == "llm"
                else ""
            )
        )
    return lines


def _task_row(t: Any) -> list[str]:
    from protos.agentmesh.v1 import task_pb2 as tpb

    return [
        t.task_id,
        t.spec.kind,
        tpb.TaskState.Name(t.state).removeprefix("TASK_STATE_"),
        str(t.spec.priority),
        str(t.attempts),
        t.agent_id,
        (t.last_error or "")[:50],
    ]


def tasks(
    state: list[str] = typer.Option(
        [], help="only these states (QUEUED, ASSIGNED, SUCCEEDED, DEAD_LETTER, ...)"
    ),
    kind: str = typer.Option("", help="only this kind"),
    agent: str = typer.Option("", help="only tasks held by this agent"),
    limit: int = typer.Option(50, help=f"rows to show (1-{limits.PAGE_SIZE_MAX})"),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table"),
    etcd: Etcd = None,
    coordinator: Coordinator = None,
    cluster: Cluster = None,
) -> None:
    """List tasks."""
    from google.protobuf import json_format

    from protos.agentmesh.v1 import task_pb2 as tpb

    if not 1 <= limit <= limits.PAGE_SIZE_MAX:
        fail(f"--limit {limit} is out of range: use 1 to {limits.PAGE_SIZE_MAX}", 2)
    try:
        states = [tpb.TaskState.Value("TASK_STATE_" + s.upper()) for s in state]
    except ValueError:
        fail(
            f"unknown state in {state}; use {', '.join(n.removeprefix('TASK_STATE_') for n in tpb.TaskState.keys()[1:])}",
            2,
        )

    async def go() -> Any:
        async with mesh_client(etcd, coordinator, cluster) as client:
            # a sparse filter's pages can be empty with more to read: follow them (each
            # call reads a bounded number of records on the leader)
            return await client.list_filled(
                states=states, kind=kind, agent_id=agent, page_size=limit, max_calls=LIST_CALLS
            )

    resp = call(go())
    if as_json:
        for t in resp.tasks:
            print(json_format.MessageToJson(t, indent=None))
        return
    table = Table()
    id_column(table, "id", (t.task_id for t in resp.tasks))
    for col in ("kind", "state", "prio", "attempts", "agent", "last error"):
        table.add_column(col)
    for t in resp.tasks:
        table.add_row(*_task_row(t))
    console.print(table)
    if resp.next_page_token:
        console.print(
            f"(more: showing the first {len(resp.tasks)}; tasks after "
            f"{resp.next_page_token!r} were not looked at)"
        )


@task_app.command("get")
def task_get(
    task_id: str,
    as_json: bool = typer.Option(False, "--json", help="the Task proto as JSON (bytes in base64)"),
    etcd: Etcd = None,
    coordinator: Coordinator = None,
    cluster: Cluster = None,
) -> None:
    """Show one task: payload and result as text (base64 when not UTF-8), local times and
    durations. --json prints the proto JSON instead."""
    from google.protobuf import json_format

    from services.cli_format import format_task

    async def go() -> Any:
        async with mesh_client(etcd, coordinator, cluster) as client:
            return await client.get(task_id)

    task = call(go())
    # plain print, not rich: a payload's brackets must not be read as markup
    print(json_format.MessageToJson(task) if as_json else format_task(task))


@task_app.command("cancel")
def task_cancel(
    task_id: str,
    reason: str = typer.Option("", help="why (stored as last_error)"),
    etcd: Etcd = None,
    coordinator: Coordinator = None,
    cluster: Cluster = None,
) -> None:
    """Cancel a task that is not terminal yet."""
    from google.protobuf import json_format

    async def go() -> Any:
        async with mesh_client(etcd, coordinator, cluster) as client:
            return await client.cancel(task_id, reason)

    print(json_format.MessageToJson(call(go())))
