"""`agentmesh up`: a local cluster of real processes, and a sample backlog through it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from services.agent_pool.config import PoolConfig
from services.cli.common import call, console, fail, run
from services.cli.serve import check_coordinator, check_pool
from services.cli.tasks import submit_and_wait
from services.coordinator import limits
from services.coordinator.config import CoordinatorConfig


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
    capacity: int = typer.Option(PoolConfig.capacity, help="tasks per agent at once"),
    sleep_ms: str = typer.Option(
        PoolConfig.sleep_ms, help="simulated latency of the `sleep` executor"
    ),
    strategy: str = typer.Option(CoordinatorConfig.strategy, help="assignment strategy"),
    backlog: int = typer.Option(
        0, help="submit this many simulated `sleep` tasks once ready, show progress and a summary"
    ),
    exit_when_done: bool = typer.Option(
        False, "--exit", help="stop the cluster after the backlog finishes"
    ),
    executor: str = typer.Option(
        "sleep",
        help="what the backlog runs: sleep (simulated) or llm (a few short real prompts "
        "through Claude; needs ANTHROPIC_API_KEY)",
    ),
    yes: bool = typer.Option(
        False, "--yes", "-y", help="run the llm backlog without asking after the cost estimate"
    ),
) -> None:
    """Start a local cluster (etcd, coordinators, health monitor, consensus, agent pools)
    as real processes. Ctrl-C stops it."""
    import signal

    from rich.markup import escape

    from registry.etcd_server import EtcdNotFoundError, find_etcd_binary
    from services.cluster import ClusterSpec, LocalCluster
    from services.llm_demo import EXECUTORS, LLM_KINDS, LLM_ROLES, llm_off_line

    if executor not in EXECUTORS:
        fail(f"--executor {executor!r}: use one of {', '.join(EXECUTORS)}", 2)
    if backlog < 0:
        fail(f"--backlog {backlog} is negative: use 0 (none) or more", 2)
    off = llm_off_line()
    if off is not None:
        # one line, whatever was asked: the demo works without a key, on simulated work
        fallback = "; the backlog runs simulated `sleep` tasks" if executor == "llm" else ""
        console.print(f"[yellow]{escape(off + fallback)}[/yellow]", soft_wrap=True)
        executor = "sleep"
    llm_specs = _llm_backlog(backlog, yes) if executor == "llm" and backlog else []

    if agents < 1 or pools < 1 or coordinators < 1 or health_monitors < 0 or consensus < 0:
        fail(
            "--agents, --pools and --coordinators must be at least 1, "
            "--health-monitors and --consensus at least 0",
            2,
        )
    if pools > agents:
        fail(f"--pools {pools} is more than --agents {agents}", 2)
    if problem := limits.agents_per_pool_problem(agents, pools):
        fail(problem, 2)
    try:
        # the checks `serve` makes, so a bad value stops `up` before anything starts
        # rather than as 'pool-1 exited during start'
        check_pool(PoolConfig(capacity=capacity, sleep_ms=sleep_ms))
        check_coordinator(CoordinatorConfig(strategy=strategy))
    except ValueError as err:
        fail(str(err), 2)
    try:
        find_etcd_binary()
    except EtcdNotFoundError as err:
        fail(str(err))
    import socket

    wanted = [
        *((p, "--etcd-port") for p in (etcd_port, etcd_port + 1)),
        *((p, "--port") for p in range(port, port + coordinators)),
        *((p, "--consensus-port") for p in range(consensus_port, consensus_port + consensus)),
    ]
    for p, flag in wanted:
        if not 1 <= p <= 65535:
            fail(f"{flag}: port {p} is out of range 1-65535", 2)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        fail(f"--data-dir {data_dir} cannot be created: {err.strerror or err}", 2)
    for p, flag in wanted:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", p)) == 0:
                fail(f"port {p} is in use (another cluster running?); stop it or pass {flag}")
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
            coordinator_metrics=True,
            env={"AGENTMESH_KINDS": LLM_KINDS, "AGENTMESH_ROLES": LLM_ROLES}
            if executor == "llm"
            else {},
        )
    )
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    t0 = time.monotonic()
    try:
        with console.status(
            "starting etcd, coordinators, health monitors, consensus and agent pools ..."
        ):
            cluster.start()
            ready_s = run(cluster.wait_ready(timeout_s=90))
            if consensus:
                run(cluster.wait_voters(agents, timeout_s=60))
        console.print(
            f"[green]cluster up[/green]: {agents} agents in {pools} pools ready in {time.monotonic() - t0:.2f} s "
            f"(agents connected {ready_s:.2f} s after the processes started)"
        )
        console.print(
            f"  etcd         {cluster.etcd_endpoint}   (export AGENTMESH_ETCD={cluster.etcd_endpoint})"
        )
        for ep, metrics in zip(
            cluster.coordinator_endpoints, cluster.coordinator_metrics, strict=True
        ):
            console.print(f"  coordinator  {ep}   (Prometheus: http://{metrics}/metrics)")
        if health_monitors:
            console.print(
                f"  health       {health_monitors} monitor(s); `agentmesh health agents` lists the agents"
            )
        for ep in cluster.consensus_endpoints:
            console.print(f"  consensus    {ep}   (agentmesh propose …, agentmesh decisions)")
        console.print(f"  logs         {cluster.log_dir}")
        if llm_specs:
            call(_run_llm_backlog(cluster.etcd_endpoint, llm_specs))
        elif backlog:
            call(_backlog(cluster.etcd_endpoint, backlog))
        if backlog and exit_when_done:
            return
        console.print("press Ctrl-C to stop")
        while True:
            time.sleep(1)
            dead = [n for n in cluster.dead() if n.startswith("coordinator")]
            if (
                consensus
                and len([n for n in cluster.dead() if n.startswith("consensus")]) == consensus
            ):
                fail(f"every consensus instance exited; see {cluster.log_dir}")
            if dead and len(dead) == len(cluster.coordinator_endpoints):
                fail(f"every coordinator exited; see {cluster.log_dir}")
    except KeyboardInterrupt:
        console.print("stopping ...")
    except (RuntimeError, TimeoutError) as err:
        fail(str(err))
    finally:
        cluster.stop()
        console.print("stopped")


async def _backlog(etcd: str, count: int) -> None:
    from protos.agentmesh.v1 import task_pb2 as tpb
    from services.client import MeshClient

    stamp = f"{int(time.time())}"
    specs = [
        tpb.TaskSpec(task_id=f"sample-{stamp}-{i:05d}", kind="sleep", priority=i % 10)
        for i in range(count)
    ]
    console.print(
        f"submitting a sample backlog of {count} [bold]simulated[/bold] `sleep` tasks (run {stamp})"
    )
    async with MeshClient(etcd=etcd) as client:
        await submit_and_wait(client, specs, wait=True)


MAX_LLM_BACKLOG = 24
"""The llm demo is a handful of short prompts, not a load test: real calls cost money."""


def _llm_backlog(count: int, yes: bool) -> list[Any]:
    """The llm sample tasks, after printing what they may cost and (unless --yes) asking."""
    from services._common import config
    from services.agent_pool.llm_config import LlmConfig
    from services.llm_demo import estimate, sample_specs

    if count > MAX_LLM_BACKLOG:
        console.print(f"--backlog {count} with --executor llm: running {MAX_LLM_BACKLOG} prompts")
        count = MAX_LLM_BACKLOG
    try:
        cfg = config.load(LlmConfig, section="llm")
    except ValueError as err:
        fail(str(err), 2)
    specs = sample_specs(count, f"{int(time.time())}")
    console.print(f"cost estimate: {estimate(specs, cfg).line()}", soft_wrap=True, markup=False)
    if not yes and not typer.confirm("run them?", default=False):
        fail("not started (pass --yes to skip the question)", 1)
    return specs


async def _run_llm_backlog(etcd: str, specs: list[Any]) -> None:
    from services.client import MeshClient
    from services.llm_demo import answer_line, spent_line

    console.print(f"submitting {len(specs)} [bold]real[/bold] llm tasks (one per role, in turn)")
    async with MeshClient(etcd=etcd) as client:
        await submit_and_wait(client, specs, wait=True)
        tasks = [await client.get(s.task_id) for s in specs]
    for t in tasks:
        console.print(answer_line(t), soft_wrap=True, markup=False)
    console.print(spent_line(tasks), soft_wrap=True, markup=False)
