"""The `agentmesh` command."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from services._common import config as configlib

T = TypeVar("T")

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="agentmesh: a gRPC mesh that coordinates hundreds of AI agents.",
)
serve_app = typer.Typer(no_args_is_help=True, help="Run one service process.")
task_app = typer.Typer(no_args_is_help=True, help="One task: get or cancel.")
health_app = typer.Typer(
    no_args_is_help=True,
    help="Agents' health (from the active health monitor), and grpc.health.v1 checks.",
)
app.add_typer(serve_app, name="serve")
app.add_typer(task_app, name="task")
app.add_typer(health_app, name="health")
console = Console()
err_console = Console(stderr=True)

ETCD_HELP = "etcd endpoints host:port[,host:port] [env AGENTMESH_ETCD]"
DEFAULT_ETCD = "127.0.0.1:2379"


def _run(coro: Coroutine[Any, Any, T]) -> T:
    from services._common.grpcserver import install_uvloop

    install_uvloop()
    return asyncio.run(coro)


def _etcd(value: str | None) -> str:
    return value or os.environ.get("AGENTMESH_ETCD") or DEFAULT_ETCD


def _cluster(value: str | None) -> str:
    return value or os.environ.get("AGENTMESH_CLUSTER") or "default"


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


# ---------------------------------------------------------------- serve


@serve_app.command("coordinator")
def serve_coordinator(
    etcd: str = typer.Option(None, help=ETCD_HELP),
    cluster: str = typer.Option(None, help="cluster name (key prefix) [env AGENTMESH_CLUSTER]"),
    listen: str = typer.Option(
        None, help="bind address host:port [env AGENTMESH_LISTEN; default 127.0.0.1:50051]"
    ),
    advertise: str = typer.Option(None, help="address published in etcd [env AGENTMESH_ADVERTISE]"),
    node_id: str = typer.Option(None, help="replica id [env AGENTMESH_NODE_ID]"),
    strategy: str = typer.Option(
        None, help="least-loaded | round-robin | weighted | random [env AGENTMESH_STRATEGY]"
    ),
    lease_ttl_s: int = typer.Option(
        None, help="session lease TTL in seconds [env AGENTMESH_LEASE_TTL_S; default 2]"
    ),
    metrics_port: int = typer.Option(
        None, help="Prometheus /metrics port, 0 off [env AGENTMESH_METRICS_PORT]"
    ),
) -> None:
    """The coordinator: campaigns for root; the leader serves the API and dispatches."""
    from services._common import logs
    from services.coordinator.config import CoordinatorConfig
    from services.coordinator.limits import check_config
    from services.coordinator.server import serve
    from services.coordinator.sessions import STRATEGIES

    try:
        cfg = configlib.load(
            CoordinatorConfig,
            dict(
                etcd=etcd,
                cluster=cluster,
                listen=listen,
                advertise=advertise,
                node_id=node_id,
                strategy=strategy,
                lease_ttl_s=lease_ttl_s,
                metrics_port=metrics_port,
            ),
        )
        check_config(cfg)
    except ValueError as err:
        _fail(str(err), 2)
    if cfg.strategy not in STRATEGIES:
        _fail(f"--strategy {cfg.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}", 2)
    logs.setup("coordinator", cfg.node_id or str(os.getpid()))
    try:
        _run(serve(cfg))
    except OSError as err:
        _fail(str(err))


@serve_app.command("agent-pool")
def serve_agent_pool(
    etcd: str = typer.Option(None, help=ETCD_HELP),
    cluster: str = typer.Option(None, help="cluster name (key prefix) [env AGENTMESH_CLUSTER]"),
    listen: str = typer.Option(
        None, help="bind address host:port [env AGENTMESH_LISTEN; default 127.0.0.1:0]"
    ),
    advertise: str = typer.Option(None, help="address published in etcd [env AGENTMESH_ADVERTISE]"),
    pool_id: str = typer.Option(
        None, help="pool id; agents are <pool-id>-a<n> [env AGENTMESH_POOL_ID]"
    ),
    agents: int = typer.Option(
        None, help="agents to start at boot [env AGENTMESH_AGENTS; default 0]"
    ),
    batch_size: int = typer.Option(
        None, help="agents started in parallel [env AGENTMESH_BATCH_SIZE; default 50]"
    ),
    warm: int = typer.Option(None, help="pre-started idle agents kept ready [env AGENTMESH_WARM]"),
    capacity: int = typer.Option(
        None, help="tasks per agent at once [env AGENTMESH_CAPACITY; default 1]"
    ),
    kinds: str = typer.Option(
        None, help="comma-separated task kinds the agents run [env AGENTMESH_KINDS]"
    ),
    roles: str = typer.Option(None, help="comma-separated roles [env AGENTMESH_ROLES]"),
    labels: str = typer.Option(
        None, help="comma-separated key=value labels [env AGENTMESH_LABELS]"
    ),
    sleep_ms: str = typer.Option(
        None, help="simulated latency of `sleep`: fixed:MS | uniform:LO:HI | lognormal:MEDIAN:SIGMA"
    ),
    vote_policy: str = typer.Option(
        None,
        help="how agents vote: always | never | abstain | silent | random:SEED[:P] | "
        "field:NAME[=VALUE] [env AGENTMESH_VOTE_POLICY; default always]",
    ),
    vote_delay_ms: str = typer.Option(
        None,
        help="SIMULATED think time before each vote: fixed:MS | uniform:LO:HI | "
        "lognormal:MEDIAN:SIGMA [env AGENTMESH_VOTE_DELAY_MS; default 0]",
    ),
    byzantine: str = typer.Option(
        None,
        help="faulty voters among the first agents (tests, load tests): MODE:COUNT,... with "
        "MODE forge | equivocate | unknown-proposal | impersonate | silent [env AGENTMESH_BYZANTINE]",
    ),
) -> None:
    """An agent pool: hosts many agents, each with its own stream to the root coordinator."""
    from services._common import logs
    from services.agent_pool.config import PoolConfig
    from services.agent_pool.executors import parse_latency
    from services.agent_pool.server import serve

    def split(v: str | None) -> tuple[str, ...] | None:
        return None if v is None else tuple(p.strip() for p in v.split(",") if p.strip())

    try:
        cfg = configlib.load(
            PoolConfig,
            dict(
                etcd=etcd,
                cluster=cluster,
                listen=listen,
                advertise=advertise,
                pool_id=pool_id,
                agents=agents,
                batch_size=batch_size,
                warm=warm,
                capacity=capacity,
                kinds=split(kinds),
                roles=split(roles),
                labels=split(labels),
                sleep_ms=sleep_ms,
                vote_policy=vote_policy,
                vote_delay_ms=vote_delay_ms,
                byzantine=split(byzantine),
            ),
        )
        cfg.label_map()
        parse_latency(cfg.sleep_ms)
        from services.agent_pool.voter import Policy, parse_byzantine

        Policy.parse(cfg.vote_policy)
        parse_byzantine(cfg.byzantine)
        parse_latency(cfg.vote_delay_ms)
    except ValueError as err:
        _fail(str(err), 2)
    if not 1 <= cfg.capacity <= 1000:
        _fail("--capacity must be 1-1000", 2)
    logs.setup("agent-pool", cfg.pool_id or str(os.getpid()))
    from services._common.errors import AlreadyExistsError

    try:
        _run(serve(cfg))
    except (OSError, ValueError, AlreadyExistsError) as err:
        _fail(str(err))


@serve_app.command("health")
def serve_health(
    etcd: str = typer.Option(None, help=ETCD_HELP),
    cluster: str = typer.Option(None, help="cluster name (key prefix) [env AGENTMESH_CLUSTER]"),
    listen: str = typer.Option(
        None, help="bind address host:port [env AGENTMESH_LISTEN; default 127.0.0.1:0]"
    ),
    advertise: str = typer.Option(None, help="address published in etcd [env AGENTMESH_ADVERTISE]"),
    node_id: str = typer.Option(None, help="replica id [env AGENTMESH_NODE_ID]"),
    lease_ttl_s: int = typer.Option(
        None, help="session lease TTL in seconds [env AGENTMESH_LEASE_TTL_S; default 2]"
    ),
    metrics_port: int = typer.Option(
        None, help="Prometheus /metrics port, 0 off [env AGENTMESH_METRICS_PORT]"
    ),
    stall_limit_s: float = typer.Option(
        None,
        help="a task without progress this long is hung and requeued [env AGENTMESH_STALL_LIMIT_S; default 60]",
    ),
    failed_after_s: float = typer.Option(
        None, help="no heartbeat this long: FAILED [env AGENTMESH_FAILED_AFTER_S; default 10]"
    ),
) -> None:
    """A health monitor: replicas elect one active monitor; the others stand by.
    Every threshold is an AGENTMESH_<FIELD> variable (see services/health/config.py)."""
    from services._common import logs
    from services.health.config import HealthConfig
    from services.health.server import serve

    try:
        cfg = configlib.load(
            HealthConfig,
            dict(
                etcd=etcd,
                cluster=cluster,
                listen=listen,
                advertise=advertise,
                node_id=node_id,
                lease_ttl_s=lease_ttl_s,
                metrics_port=metrics_port,
                stall_limit_s=stall_limit_s,
                failed_after_s=failed_after_s,
            ),
        )
    except (ValueError, TypeError) as err:
        _fail(str(err), 2)
    logs.setup("health", cfg.node_id or str(os.getpid()))
    try:
        _run(serve(cfg))
    except OSError as err:
        _fail(str(err))


@serve_app.command("consensus")
def serve_consensus(
    etcd: str = typer.Option(None, help=ETCD_HELP),
    cluster: str = typer.Option(None, help="cluster name (key prefix) [env AGENTMESH_CLUSTER]"),
    listen: str = typer.Option(
        None, help="bind address host:port [env AGENTMESH_LISTEN; default 127.0.0.1:0]"
    ),
    advertise: str = typer.Option(None, help="address published in etcd [env AGENTMESH_ADVERTISE]"),
    node_id: str = typer.Option(None, help="instance id [env AGENTMESH_NODE_ID]"),
    lease_ttl_s: int = typer.Option(
        None, help="session lease TTL in seconds [env AGENTMESH_LEASE_TTL_S; default 2]"
    ),
    default_timeout_s: float = typer.Option(
        None, help="timeout of a proposal that sets none [env AGENTMESH_DEFAULT_TIMEOUT_S; 30]"
    ),
    metrics_port: int = typer.Option(
        None, help="Prometheus /metrics port, 0 off [env AGENTMESH_METRICS_PORT]"
    ),
) -> None:
    """The consensus service: one elected active instance collects votes and commits decisions."""
    from services._common import logs
    from services.consensus.config import ConsensusConfig
    from services.consensus.server import serve

    try:
        cfg = configlib.load(
            ConsensusConfig,
            dict(
                etcd=etcd,
                cluster=cluster,
                listen=listen,
                advertise=advertise,
                node_id=node_id,
                lease_ttl_s=lease_ttl_s,
                default_timeout_s=default_timeout_s,
                metrics_port=metrics_port,
            ),
        )
    except ValueError as err:
        _fail(str(err), 2)
    if not 0 < cfg.default_timeout_s <= 3600:
        _fail("--default-timeout-s must be more than 0 and at most 3600", 2)
    logs.setup("consensus", cfg.node_id or str(os.getpid()))
    try:
        _run(serve(cfg))
    except OSError as err:
        _fail(str(err))


# ---------------------------------------------------------------- up


@app.command()
def up(
    agents: int = typer.Option(200, help="agents in all, split across the pools"),
    pools: int = typer.Option(2, help="agent pool processes"),
    coordinators: int = typer.Option(1, help="coordinator replicas (one leads)"),
    health_monitors: int = typer.Option(1, help="health monitor replicas (one is active; 0: none)"),
    consensus: int = typer.Option(1, help="consensus instances (one is active; 0: none)"),
    data_dir: Path = typer.Option(
        Path(".agentmesh"), help="etcd data and logs; reused across restarts"
    ),
    etcd_port: int = typer.Option(2379, help="etcd client port"),
    port: int = typer.Option(50051, help="first coordinator port (replicas take the next ones)"),
    consensus_port: int = typer.Option(
        50071, help="first consensus port (standbys take the next ones)"
    ),
    capacity: int = typer.Option(1, help="tasks per agent at once"),
    sleep_ms: str = typer.Option(
        "lognormal:50:0.5", help="simulated latency of the `sleep` executor"
    ),
    strategy: str = typer.Option("least-loaded", help="assignment strategy"),
    backlog: int = typer.Option(
        0, help="submit this many simulated `sleep` tasks once ready, show progress and a summary"
    ),
    exit_when_done: bool = typer.Option(
        False, "--exit", help="stop the cluster after the backlog finishes"
    ),
) -> None:
    """Start a local cluster (etcd, coordinators, health monitor, consensus, agent pools)
    as real processes. Ctrl-C stops it."""
    import signal

    from registry.etcd_server import EtcdNotFoundError, find_etcd_binary
    from services.cluster import ClusterSpec, LocalCluster

    if agents < 1 or pools < 1 or coordinators < 1 or health_monitors < 0 or consensus < 0:
        _fail("--agents, --pools and --coordinators must be at least 1", 2)
    if pools > agents:
        _fail(f"--pools {pools} is more than --agents {agents}", 2)
    try:
        find_etcd_binary()
    except EtcdNotFoundError as err:
        _fail(str(err))
    import socket

    for p in [
        etcd_port,
        etcd_port + 1,
        *range(port, port + coordinators),
        *range(consensus_port, consensus_port + consensus),
    ]:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", p)) == 0:
                _fail(
                    f"port {p} is in use (another cluster running?); stop it or pass --etcd-port/--port"
                )
    cluster = LocalCluster(
        ClusterSpec(
            data_dir=data_dir,
            agents=agents,
            pools=pools,
            coordinators=coordinators,
            consensus=consensus,
            consensus_port=consensus_port,
            health_monitors=health_monitors,
            etcd_port=etcd_port,
            coordinator_port=port,
            capacity=capacity,
            sleep_ms=sleep_ms,
            strategy=strategy,
        )
    )
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    t0 = time.monotonic()
    try:
        with console.status(
            "starting etcd, coordinators, health monitors, consensus and agent pools ..."
        ):
            cluster.start()
            ready_s = _run(cluster.wait_ready(timeout_s=90))
            if consensus:
                _run(cluster.wait_voters(agents, timeout_s=60))
        console.print(
            f"[green]cluster up[/green]: {agents} agents in {pools} pools ready in {time.monotonic() - t0:.2f} s "
            f"(agents connected {ready_s:.2f} s after the processes started)"
        )
        console.print(
            f"  etcd         {cluster.etcd_endpoint}   (export AGENTMESH_ETCD={cluster.etcd_endpoint})"
        )
        for ep in cluster.coordinator_endpoints:
            console.print(f"  coordinator  {ep}")
        if health_monitors:
            console.print(
                f"  health       {health_monitors} monitor(s); `agentmesh health agents` lists the agents"
            )
        for ep in cluster.consensus_endpoints:
            console.print(f"  consensus    {ep}   (agentmesh propose …, agentmesh decisions)")
        console.print(f"  logs         {cluster.log_dir}")
        if backlog:
            _call(_backlog(cluster.etcd_endpoint, backlog))
            if exit_when_done:
                return
        console.print("press Ctrl-C to stop")
        while True:
            time.sleep(1)
            dead = [n for n in cluster.dead() if n.startswith("coordinator")]
            if (
                consensus
                and len([n for n in cluster.dead() if n.startswith("consensus")]) == consensus
            ):
                _fail(f"every consensus instance exited; see {cluster.log_dir}")
            if dead and len(dead) == len(cluster.coordinator_endpoints):
                _fail(f"every coordinator exited; see {cluster.log_dir}")
    except KeyboardInterrupt:
        console.print("stopping ...")
    except (RuntimeError, TimeoutError) as err:
        _fail(str(err))
    finally:
        cluster.stop()
        console.print("stopped")


async def _backlog(etcd: str, count: int) -> None:
    from protos.agentmesh.v1 import task_pb2 as tpb
    from services.client import MeshClient

    run = f"{int(time.time())}"
    specs = [
        tpb.TaskSpec(task_id=f"sample-{run}-{i:05d}", kind="sleep", priority=i % 10)
        for i in range(count)
    ]
    console.print(
        f"submitting a sample backlog of {count} [bold]simulated[/bold] `sleep` tasks (run {run})"
    )
    async with MeshClient(etcd=etcd) as client:
        await _submit_and_wait(client, specs, wait=True)


TERMINAL_NAMES = {"SUCCEEDED", "CANCELLED", "DEAD_LETTER"}


async def _submit_and_wait(client: Any, specs: list[Any], wait: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from protos.agentmesh.v1 import task_pb2 as tpb

    ids = [s.task_id for s in specs]
    pending = set()
    terminal: dict[str, Any] = {}
    events = client.watch_events() if wait else None
    first_event = asyncio.ensure_future(events.__anext__()) if events is not None else None
    t0 = time.monotonic()
    created = 0
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
    if not wait or events is None or first_event is None:
        if first_event is not None:
            first_event.cancel()
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
        nxt: asyncio.Future[Any] = first_event
        while pending:
            done, _ = await asyncio.wait({nxt}, timeout=1.0)
            if done:
                event = nxt.result()
                nxt = asyncio.ensure_future(events.__anext__())
                t = event.task
                if (
                    t.task_id in pending
                    and tpb.TaskState.Name(t.state).removeprefix("TASK_STATE_") in TERMINAL_NAMES
                ):
                    pending.discard(t.task_id)
                    terminal[t.task_id] = t
                    bar.update(job, completed=len(terminal))
            if time.monotonic() - last_poll > 5:  # a missed event (failover) must not hang the wait
                last_poll = time.monotonic()
                for task_id in list(pending)[:200]:
                    t = await client.get(task_id)
                    if tpb.TaskState.Name(t.state).removeprefix("TASK_STATE_") in TERMINAL_NAMES:
                        pending.discard(task_id)
                        terminal[task_id] = t
                bar.update(job, completed=len(terminal))
        nxt.cancel()
    wall = time.monotonic() - t0
    _summary(list(terminal.values()), wall)


def _summary(tasks: list[Any], wall_s: float) -> None:
    from collections import Counter

    from loadtest.metrics import LatencyRecorder
    from protos.agentmesh.v1 import task_pb2 as tpb

    states = Counter(tpb.TaskState.Name(t.state).removeprefix("TASK_STATE_") for t in tasks)
    e2e = LatencyRecorder("end_to_end")
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
        p50, p95, p99 = (e2e.percentile_ms(q) for q in (50, 95, 99))
        table.add_row("submit→done P50 / P95 / P99", f"{p50:.1f} / {p95:.1f} / {p99:.1f} ms")
    table.add_row("tasks retried (agent lost or failure)", str(retried))
    table.add_row("agents that ran tasks", str(agents))
    console.print(table)


# ---------------------------------------------------------------- client commands


def _client(etcd: str | None, coordinator: str | None, cluster: str | None) -> Any:
    from services.client import MeshClient

    return MeshClient(
        etcd=None if coordinator else _etcd(etcd),
        coordinator=coordinator,
        cluster=_cluster(cluster),
    )


def _call(coro: Coroutine[Any, Any, T]) -> T:
    import grpc

    try:
        return _run(coro)
    except grpc.aio.AioRpcError as err:
        _fail(f"{err.code().name}: {err.details()}")
    raise AssertionError("unreachable")


COORD_HELP = "a coordinator host:port (instead of finding the leader in etcd)"


@app.command()
def submit(
    kind: str = typer.Option(None, help="task kind (echo, sleep, noop, llm, fail)"),
    payload: str = typer.Option("", help="payload text (JSON for sleep/fail)"),
    priority: int = typer.Option(0, help="0 (lowest) to 9"),
    count: int = typer.Option(1, help="submit this many copies"),
    task_id: str = typer.Option(None, help="client-chosen id (idempotent)"),
    role: str = typer.Option("", help="required agent role"),
    label: list[str] = typer.Option([], help="required agent label key=value (repeatable)"),
    max_attempts: int = typer.Option(0, help="attempts before DEAD_LETTER (0: default 3)"),
    file: Path = typer.Option(
        None, help="JSONL file, one TaskSpec per line (fields as in the proto)"
    ),
    wait: bool = typer.Option(False, help="wait until every task is terminal, with a progress bar"),
    etcd: str = typer.Option(None, help=ETCD_HELP),
    coordinator: str = typer.Option(None, help=COORD_HELP),
    cluster: str = typer.Option(None, help="cluster name"),
) -> None:
    """Submit tasks (from flags or a JSONL file)."""
    from google.protobuf import json_format

    from protos.agentmesh.v1 import task_pb2 as tpb

    if not 0 <= priority <= 9:
        _fail(f"--priority {priority} is out of range: use 0 (lowest) to 9", 2)
    if count < 1:
        _fail("--count must be at least 1", 2)
    specs: list[tpb.TaskSpec] = []
    if file is not None:
        if not file.exists():
            _fail(f"{file} does not exist", 2)
        for n, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                specs.append(json_format.Parse(line, tpb.TaskSpec()))
            except json_format.ParseError as err:
                _fail(f"{file}:{n}: not a TaskSpec: {err}", 2)
    else:
        if not kind:
            _fail("give --kind (or --file)", 2)
        labels = {}
        for item in label:
            k, sep, v = item.partition("=")
            if not sep:
                _fail(f"--label {item!r} must be key=value", 2)
            labels[k] = v
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
        async with _client(etcd, coordinator, cluster) as client:
            if wait:
                for s in specs:
                    if not s.task_id:
                        s.task_id = f"cli-{time.time_ns():x}-{len(s.kind)}{id(s) & 0xFFFF:04x}"
                await _submit_and_wait(client, specs, wait=True)
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

    _call(go())


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


@app.command()
def tasks(
    state: list[str] = typer.Option(
        [], help="only these states (QUEUED, ASSIGNED, SUCCEEDED, DEAD_LETTER, ...)"
    ),
    kind: str = typer.Option("", help="only this kind"),
    agent: str = typer.Option("", help="only tasks held by this agent"),
    limit: int = typer.Option(50, help="rows to show (1-1000)"),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table"),
    etcd: str = typer.Option(None, help=ETCD_HELP),
    coordinator: str = typer.Option(None, help=COORD_HELP),
    cluster: str = typer.Option(None, help="cluster name"),
) -> None:
    """List tasks."""
    from google.protobuf import json_format

    from protos.agentmesh.v1 import task_pb2 as tpb

    try:
        states = [tpb.TaskState.Value("TASK_STATE_" + s.upper()) for s in state]
    except ValueError:
        _fail(
            f"unknown state in {state}; use {', '.join(n.removeprefix('TASK_STATE_') for n in tpb.TaskState.keys()[1:])}",
            2,
        )

    async def go() -> Any:
        async with _client(etcd, coordinator, cluster) as client:
            return await client.list(states=states, kind=kind, agent_id=agent, page_size=limit)

    resp = _call(go())
    if as_json:
        for t in resp.tasks:
            print(json_format.MessageToJson(t, indent=None))
        return
    table = Table()
    for col in ("id", "kind", "state", "prio", "attempts", "agent", "last error"):
        table.add_column(col)
    for t in resp.tasks:
        table.add_row(*_task_row(t))
    console.print(table)
    if resp.next_page_token:
        console.print(f"(more: showing the first {len(resp.tasks)})")


@task_app.command("get")
def task_get(
    task_id: str,
    as_json: bool = typer.Option(False, "--json", help="the Task proto as JSON (bytes in base64)"),
    etcd: str = typer.Option(None, help=ETCD_HELP),
    coordinator: str = typer.Option(None, help=COORD_HELP),
    cluster: str = typer.Option(None, help="cluster name"),
) -> None:
    """Show one task: payload and result as text (base64 when not UTF-8), local times and
    durations. --json prints the proto JSON instead."""
    from google.protobuf import json_format

    from services.cli_format import format_task

    async def go() -> Any:
        async with _client(etcd, coordinator, cluster) as client:
            return await client.get(task_id)

    task = _call(go())
    # plain print, not rich: a payload's brackets must not be read as markup
    print(json_format.MessageToJson(task) if as_json else format_task(task))


@task_app.command("cancel")
def task_cancel(
    task_id: str,
    reason: str = typer.Option("", help="why (stored as last_error)"),
    etcd: str = typer.Option(None, help=ETCD_HELP),
    coordinator: str = typer.Option(None, help=COORD_HELP),
    cluster: str = typer.Option(None, help="cluster name"),
) -> None:
    """Cancel a task that is not terminal yet."""
    from google.protobuf import json_format

    async def go() -> Any:
        async with _client(etcd, coordinator, cluster) as client:
            return await client.cancel(task_id, reason)

    print(json_format.MessageToJson(_call(go())))


@app.command()
def agents(
    etcd: str = typer.Option(None, help=ETCD_HELP),
    coordinator: str = typer.Option(None, help=COORD_HELP),
    cluster: str = typer.Option(None, help="cluster name"),
) -> None:
    """Agents connected to the root coordinator."""

    async def go() -> Any:
        async with _client(etcd, coordinator, cluster) as client:
            return await client.agents()

    resp = _call(go())
    table = Table(title=f"{len(resp.agents)} agents")
    for col in (
        "agent",
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
            ",".join(a.kinds),
            ",".join(a.roles),
            f"{a.inflight}/{a.capacity}",
            str(a.completed),
            str(a.failed),
            f"{a.latency_ema_ms:.1f}",
        )
    console.print(table)


@app.command()
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
    etcd: str = typer.Option(None, help=ETCD_HELP),
    coordinator: str = typer.Option(None, help=COORD_HELP),
    cluster: str = typer.Option(None, help="cluster name"),
) -> None:
    """Leader and term, services and their health, agents, queue by priority, throughput,
    latency, the backlog's ETA, task counts and alerts, live until Ctrl-C. --once and
    --json print once (so does a run whose output is not a terminal)."""
    if group_by not in ("pool", "role"):
        _fail(f"--group-by {group_by!r}: use pool or role", 2)
    if not 0 <= watch_s <= 3600 or not 0.1 <= refresh_s <= 60:
        _fail("--watch-s must be 0-3600 and --refresh-s 0.1-60", 2)
    if as_json:
        print(_observe(etcd, coordinator, cluster, group_by, "json", watch_s, refresh_s))
    elif once or not console.is_terminal:
        _status_once(etcd, coordinator, cluster)
    else:
        _observe(etcd, coordinator, cluster, group_by, "live", watch_s, refresh_s)


def _status_once(etcd: str | None, coordinator: str | None, cluster: str | None) -> None:
    from services.observe.live import print_once

    async def go() -> tuple[Any, Any, str]:
        import grpc

        from services.health.client import HealthClient, NoMonitorError

        async with _client(etcd, coordinator, cluster) as client:
            status = await client.status()
        monitors = [x.endpoint for x in status.services if x.kind == "health"]
        if not monitors:
            return status, None, "no health monitor runs (agentmesh serve health)"
        where: dict[str, Any] = {"monitor": monitors[0]} if coordinator else {"etcd": _etcd(etcd)}
        try:
            async with HealthClient(cluster=_cluster(cluster), timeout_s=3.0, **where) as hc:
                return status, await hc.summary(), ""
        except NoMonitorError as err:
            return status, None, str(err)
        except grpc.aio.AioRpcError as err:
            return status, None, f"the health monitor did not answer ({err.code().name})"

    s, h, why = _call(go())
    print_once(console, s)
    if h is None:
        console.print(f"health     {why}")
        return
    counts = "  ".join(f"{k} {h.state_counts.get(k, 0)}" for k in _HEALTH_STATES)
    console.print(
        f"health     {counts}   ejected {h.ejected}   half-open {h.half_open}   "
        f"(monitor {h.monitor_id}, term {h.term})"
    )
    console.print(f"alerts     {h.open_alert_count} open")
    from rich.markup import escape

    for alert in h.open_alerts:
        kind = _alert_kind(alert.kind)
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

    async def go() -> str:
        reader = MeshReader(
            etcd=None if coordinator else _etcd(etcd),
            coordinator=coordinator,
            cluster=_cluster(cluster),
        )
        model = SwarmModel(clock, cluster=_cluster(cluster), group_by=group_by)
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
        return _run(go())
    except KeyboardInterrupt:
        return ""  # Ctrl-C is how the live view ends


@app.command()
def dashboard(
    port: int = typer.Option(8089, help="HTTP port (0: a free one, printed)"),
    host: str = typer.Option(
        "127.0.0.1", help="bind address; anything but loopback exposes the cluster's data"
    ),
    group_by: str = typer.Option("pool", help="group agents by pool or role"),
    etcd: str = typer.Option(None, help=ETCD_HELP),
    coordinator: str = typer.Option(None, help=COORD_HELP),
    cluster: str = typer.Option(None, help="cluster name"),
) -> None:
    """A read-only web dashboard of the cluster (the live status, charts of throughput
    and latency, agents, task search and pages, the dead-letter queue). Ctrl-C stops it."""
    from services.observe.web import is_loopback, serve_dashboard

    if group_by not in ("pool", "role"):
        _fail(f"--group-by {group_by!r}: use pool or role", 2)
    if not 0 <= port <= 65535:
        _fail(f"--port {port} is out of range 0-65535", 2)
    if not is_loopback(host):
        err_console.print(
            f"[yellow]warning:[/yellow] binding {host}, not loopback: anyone who can reach "
            "this address sees every task's payload and result (the dashboard has no login)"
        )

    def ready(url: str) -> None:
        console.print(f"dashboard at {url}  (read-only; Ctrl-C stops it)", highlight=False)

    try:
        _run(
            serve_dashboard(
                host=host,
                port=port,
                etcd=None if coordinator else _etcd(etcd),
                coordinator=coordinator,
                cluster=_cluster(cluster),
                group_by=group_by,
                on_ready=ready,
            )
        )
    except KeyboardInterrupt:
        pass
    except OSError as err:
        _fail(f"cannot serve on {host}:{port}: {err}")


_HEALTH_STATES = ("HEALTHY", "DEGRADED", "CRITICAL", "FAILED")


def _alert_kind(kind: int) -> str:
    from protos.agentmesh.v1 import health_pb2 as hpb

    return str(hpb.AlertKind.Name(kind)).removeprefix("ALERT_KIND_").lower()


@health_app.command("check")
def health_check(
    target: str = typer.Argument(..., help="host:port of any agentmesh service"),
    service: str = typer.Option("", help="service name ('' = the whole process)"),
    timeout_s: float = typer.Option(3.0, help="deadline"),
) -> None:
    """Exit 0 when grpc.health.v1 reports SERVING (for container health checks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(target) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
    except grpc.RpcError as err:
        _fail(f"{target}: {err.code().name}")  # type: ignore[attr-defined]
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(name)
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        raise typer.Exit(1)


@health_app.command("agents")
def health_agents(
    state: list[str] = typer.Option(
        [], help="only these states: HEALTHY, DEGRADED, CRITICAL, FAILED (repeatable)"
    ),
    as_json: bool = typer.Option(False, "--json", help="AgentHealth JSON lines instead of a table"),
    etcd: str = typer.Option(None, help=ETCD_HELP),
    monitor: str = typer.Option(None, help="a health monitor host:port (instead of etcd)"),
    cluster: str = typer.Option(None, help="cluster name"),
) -> None:
    """Every agent's health as the active monitor sees it: state, breaker, response,
    latency baseline, tasks in flight, replacements."""
    from google.protobuf import json_format

    from protos.agentmesh.v1 import health_pb2 as hpb
    from services.health.client import HealthClient, NoMonitorError

    try:
        states = [hpb.HealthState.Value("HEALTH_STATE_" + x.upper()) for x in state]
    except ValueError:
        _fail(f"unknown state in {state}; use {', '.join(_HEALTH_STATES)}", 2)

    async def go() -> list[Any]:
        where: dict[str, Any] = {"monitor": monitor} if monitor else {"etcd": _etcd(etcd)}
        async with HealthClient(cluster=_cluster(cluster), **where) as hc:
            return [a async for a in hc.agents(states)]

    try:
        agents = _call(go())
    except NoMonitorError as err:
        _fail(str(err))
    if as_json:
        for a in agents:
            print(json_format.MessageToJson(a, indent=None))
        return
    table = Table(title=f"{len(agents)} agents")
    for col in (
        "agent",
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

PROTOCOL_NAMES = ("quorum", "fast", "bft", "ordered")


def _protocol(name: str) -> int:
    from protos.agentmesh.v1 import consensus_pb2 as pb

    if name.lower() not in PROTOCOL_NAMES:
        _fail(f"--protocol {name!r} is unknown; use {', '.join(PROTOCOL_NAMES)}", 2)
    return int(pb.Protocol.Value("PROTOCOL_" + name.upper()))


def _decision_row(d: Any) -> list[str]:
    from protos.agentmesh.v1 import consensus_pb2 as pb

    outcome = pb.Outcome.Name(d.outcome).removeprefix("OUTCOME_")
    if d.option:
        outcome += f" {d.option}"
    return [
        d.proposal_id,
        pb.Protocol.Name(d.protocol).removeprefix("PROTOCOL_"),
        outcome,
        str(d.round),
        f"{d.votes_counted}/{d.eligible} (need {d.threshold})",
        f"{d.participation:.0%}",
        f"{d.latency_ms:.1f}",
        ",".join(
            f"{e.agent_id}:{pb.Fault.Name(e.fault).removeprefix('FAULT_')}" for e in d.excluded
        )[:60]
        or "-",
        str(d.sequence or "-"),
        d.topic[:40],
    ]


def _decision_table(decisions: list[Any], title: str = "") -> Table:
    table = Table(title=title or None)
    for col in (
        "proposal",
        "protocol",
        "outcome",
        "round",
        "votes",
        "participation",
        "latency ms",
        "excluded",
        "seq",
        "topic",
    ):
        table.add_column(col)
    for d in decisions:
        table.add_row(*_decision_row(d))
    return table


@app.command()
def propose(
    topic: str = typer.Argument(..., help="what is being decided (1-256 bytes)"),
    payload: str = typer.Option("", help="context for the voters (at most 64 KiB)"),
    option: list[str] = typer.Option([], help="a choice (repeat; none: approve or reject)"),
    protocol: str = typer.Option("quorum", help="quorum | fast | bft | ordered"),
    role: str = typer.Option("", help="only agents with this role vote"),
    label: list[str] = typer.Option([], help="only agents with this label key=value (repeatable)"),
    agent: list[str] = typer.Option([], help="exactly these agents vote (repeatable)"),
    quorum: int = typer.Option(0, help="votes a choice needs (raises the protocol's threshold)"),
    timeout_s: float = typer.Option(30.0, help="seconds until TIMED_OUT"),
    max_faulty: int = typer.Option(0, help="BFT: faulty voters tolerated (0: the most n allows)"),
    proposal_id: str = typer.Option(None, "--id", help="client-chosen id (makes retries safe)"),
    wait: bool = typer.Option(True, help="wait for the decision (--no-wait returns at once)"),
    as_json: bool = typer.Option(False, "--json", help="print the response as proto JSON"),
    etcd: str = typer.Option(None, help=ETCD_HELP),
    cluster: str = typer.Option(None, help="cluster name"),
) -> None:
    """Open a proposal for the agents to vote on, and (by default) wait for its decision."""
    from google.protobuf import json_format

    from protos.agentmesh.v1 import consensus_pb2 as pb
    from services.consensus.client import ConsensusClient

    if sum(bool(x) for x in (role, label, agent)) > 1:
        _fail("give at most one of --role, --label, --agent", 2)
    req = pb.ProposeRequest(
        proposal_id=proposal_id or "",
        topic=topic,
        payload=payload.encode(),
        options=option,
        protocol=_protocol(protocol),  # type: ignore[arg-type]
        quorum=quorum,
        timeout_s=timeout_s,
        max_faulty=max_faulty,
        wait=wait,
        proposer=f"cli:{os.environ.get('USER', '')}",
    )
    if role:
        req.voters.role = role
    elif label:
        for item in label:
            k, sep, v = item.partition("=")
            if not sep:
                _fail(f"--label {item!r} must be key=value", 2)
            req.voters.labels.labels[k] = v
    elif agent:
        req.voters.agents.agent_ids.extend(agent)
    else:
        req.voters.all = True

    async def go() -> Any:
        async with ConsensusClient(_etcd(etcd), _cluster(cluster)) as client:
            return await client.propose(req)

    resp = _call(go())
    if as_json:
        print(json_format.MessageToJson(resp))
        return
    p = resp.proposal
    console.print(
        f"proposal {p.proposal_id} ({'created' if resp.created else 'exists'}): "
        f"{len(p.voters)} voters, threshold {p.threshold}"
    )
    if resp.HasField("decision"):
        console.print(_decision_table([resp.decision]))
        for v in resp.decision.winning_votes[:5]:
            console.print(f"  {v.agent_id}: {v.reason}", markup=False)


@app.command()
def decisions(
    proposal_id: str = typer.Argument(None, help="show this one decision"),
    protocol: str = typer.Option("", help="only this protocol"),
    limit: int = typer.Option(50, help="rows to show (1-1000)"),
    watch: bool = typer.Option(False, help="then follow new decisions as they are committed"),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table"),
    etcd: str = typer.Option(None, help=ETCD_HELP),
    cluster: str = typer.Option(None, help="cluster name"),
) -> None:
    """Decisions in commit order (the order every observer sees), or one by id."""
    from google.protobuf import json_format

    from services.consensus.client import ConsensusClient

    proto = _protocol(protocol) if protocol else 0

    def show(items: list[Any]) -> None:
        if as_json:
            for d in items:
                print(json_format.MessageToJson(d, indent=None))
        else:
            console.print(_decision_table(items))

    async def go() -> None:
        async with ConsensusClient(_etcd(etcd), _cluster(cluster)) as client:
            if proposal_id:
                d = await client.decision(proposal_id)
                show([d])
                for v in d.winning_votes:
                    console.print(f"  {v.agent_id}: {v.reason}", markup=False)
                return
            resp = await client.list_decisions(protocol=proto, page_size=limit)
            show(list(resp.decisions))
            if not watch:
                return
            after = resp.decisions[-1].revision if resp.decisions else 0
            async for d in client.watch_decisions(proto, after):
                show([d])

    with contextlib.suppress(KeyboardInterrupt):
        _call(go())


def _mount_loadtest() -> None:
    try:
        from loadtest.cli import app as loadtest_app
    except ImportError:  # pragma: no cover - the harness is part of the package
        return
    app.add_typer(loadtest_app, name="loadtest")


_mount_loadtest()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
