"""`agentmesh loadtest` / `python -m loadtest`: run a scenario, print and write the report.

Bounded: the submit phase lasts `--duration` at most and submits `--max-tasks`
at most, the drain `--drain-timeout`, every RPC carries a deadline. Local only:
the cluster and the Celery peer are started on 127.0.0.1 and stopped on the way
out. Ctrl-C once ends the run early and still checks and reports; twice aborts
(still stopping what was started).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from loadtest.client import RpcFailed
from loadtest.report import print_summary, write_all, write_html
from loadtest.result import RunResult, build_doc
from loadtest.scenarios import ScenarioOptions, Stopper, run_agentmesh
from loadtest.target import Target, TargetError
from loadtest.targets import evaluate
from loadtest.workload import BurstSchedule, ProgressSnapshot, Schedule, Workload
from services._common import heap
from services.coordinator import limits

T = TypeVar("T")

app = typer.Typer(
    help="Load-test agentmesh: 200+ concurrent agents, P50/P95/P99, faults, Celery side by side.",
    no_args_is_help=False,
    add_completion=False,
)
console = Console()

MAX_TASKS_PER_S = 10_000
"""Closed loop without --max-tasks: at most this many tasks per second of --duration."""


class Scenario(StrEnum):
    steady = "steady"
    burst = "burst"
    spawn = "spawn"
    agent_kill = "agent-kill"
    leader_kill = "leader-kill"
    etcd_restart = "etcd-restart"
    etcd_kill = "etcd-kill"
    hang = "hang"
    flaky = "flaky"
    monitor_kill = "monitor-kill"
    consensus = "consensus"


class ExecutorChoice(StrEnum):
    noop = "noop"
    sleep = "sleep"
    llm = "llm"


class Peer(StrEnum):
    none = "none"
    celery = "celery"


class SubmitMode(StrEnum):
    stream = "stream"
    rpc = "rpc"


# ---------------------------------------------------------------- live view


class LiveView:
    """A small table refreshed a few times a second (nothing when not on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._live: Live | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> LiveView:
        if self.enabled:
            self._live = Live(Table(), console=console, refresh_per_second=4, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def __call__(self, snapshot: ProgressSnapshot) -> None:
        snap = snapshot
        if self._live is None:
            return
        table = Table(title=f"{snap.system} · {snap.phase}", title_justify="left")
        for col in (
            "elapsed",
            "submitted",
            "acknowledged",
            "completed",
            "in flight",
            "done/s",
            "sent→received P99",
            "errors",
        ):
            table.add_column(col, justify="right")
        table.add_row(
            f"{snap.elapsed_s:.1f} s",
            f"{snap.submitted:,}",
            f"{snap.acknowledged:,}",
            f"{snap.completed:,}",
            f"{snap.inflight:,}",
            f"{snap.rate_last_s:,.0f}",
            f"{snap.submit_to_receive_p99_ms:.2f} ms",
            str(snap.errors),
        )
        with self._lock:
            self._live.update(table)

    def note(self, text: str) -> None:
        console.print(text)

    def sink(self) -> LiveView | None:
        """The progress sink to hand a run: None when nothing is shown, so the run does
        not build a snapshot (a percentile over its histogram) four times a second."""
        return self if self.enabled else None


# ---------------------------------------------------------------- running


def _run_async(make: Callable[[], Awaitable[T]], stopper: Stopper) -> T:
    """Run a coroutine; Ctrl-C once → stopper.stop(); again (or SIGTERM) → cancel it."""

    async def main() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        presses = 0

        def on_sigint() -> None:
            nonlocal presses
            presses += 1
            if presses == 1:
                console.print(
                    "[yellow]stopping early[/]: draining, checking and reporting "
                    "(Ctrl-C again to abort)"
                )
                stopper.stop()
            else:
                task.cancel()

        loop.add_signal_handler(signal.SIGINT, on_sigint)
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await make()
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)

    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


@contextlib.contextmanager
def _sync_interrupts(stop: threading.Event) -> Iterator[None]:
    """Threads-based runs (the Celery peer): first Ctrl-C sets `stop`, the second raises."""
    presses = 0

    def handler(signum: int, frame: Any) -> None:
        nonlocal presses
        presses += 1
        if presses == 1 and signum == signal.SIGINT:
            console.print("[yellow]stopping early[/] (Ctrl-C again to abort)")
            stop.set()
        else:
            raise KeyboardInterrupt

    old_int = signal.signal(signal.SIGINT, handler)
    old_term = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


async def _agentmesh(
    scenario: str,
    workload: Workload,
    options: ScenarioOptions,
    *,
    target_addr: str | None,
    pools: int,
    capacity: int,
    keep_cluster_dir: bool,
    view: LiveView,
    stopper: Stopper,
) -> RunResult:
    if target_addr:
        addrs = [a.strip() for a in target_addr.split(",") if a.strip()]
        target = Target(
            coordinator_target=addrs[0],
            standby_targets=tuple(addrs[1:]),
            description=f"existing cluster at {target_addr}",
        )
        return await run_agentmesh(
            scenario, target, workload, options, progress=view.sink(), stopper=stopper
        )
    from loadtest.cluster import local_cluster
    from loadtest.health import cluster_env, monitors_for

    warm = -(-options.agents // pools) if scenario == "spawn" else 0
    coordinators = 2 if scenario == "leader-kill" else 1
    monitors = monitors_for(scenario)
    view.note(
        f"starting a local cluster: etcd, {coordinators} coordinator(s), "
        f"{monitors} health monitor(s), {pools} agent pools"
    )
    async with local_cluster(
        pools=pools,
        coordinators=coordinators,
        capacity=capacity,
        warm_per_pool=warm,
        keep_data=keep_cluster_dir,
        health_monitors=monitors,
        env=cluster_env(scenario, options.stall_limit_s),
    ) as target:
        if keep_cluster_dir:
            view.note(f"cluster data and logs: {target.info.get('data_dir')}")
        return await run_agentmesh(
            scenario, target, workload, options, progress=view.sink(), stopper=stopper
        )


def _celery(
    workload: Workload, concurrency: int, view: LiveView, scenario: str, schedule: Schedule | None
) -> RunResult:
    from loadtest.celery_peer import CeleryPeerConfig, run_celery

    stop = threading.Event()
    with _sync_interrupts(stop):
        return run_celery(
            workload,
            config=CeleryPeerConfig(concurrency=concurrency),
            progress=view.sink(),
            stop=stop,
            schedule=schedule,
            scenario=scenario,
        )


def _default_max_tasks(
    duration: float, rate: float, scenario: str, burst_size: int, burst_interval: float
) -> int:
    if scenario == "burst":
        return burst_size * max(1, math.ceil(duration / burst_interval))
    if rate > 0:
        return int(rate * duration) + 1
    return max(1000, int(duration * MAX_TASKS_PER_S))


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    agents: int = typer.Option(
        200, help="agents connected during the run (spawned across the pools)"
    ),
    pools: int = typer.Option(2, help="agent-pool processes of the local cluster"),
    duration: float = typer.Option(30.0, help="seconds of submitting at most"),
    rate: float = typer.Option(0.0, help="open loop at this many tasks/s; 0 = closed loop"),
    concurrency: int = typer.Option(0, help="closed loop: tasks in flight (0: one per agent)"),
    scenario: Scenario = typer.Option(Scenario.steady, help="what to run"),
    executor: ExecutorChoice = typer.Option(
        ExecutorChoice.noop, help="noop, or sleep = SIMULATED work (labelled so everywhere)"
    ),
    sleep_ms: float = typer.Option(50.0, help="sleep executor: milliseconds per task"),
    out: Path | None = typer.Option(None, help="write report.json and report.html here"),
    compare: Peer = typer.Option(Peer.none, help="run the same workload on a peer in the same run"),
    max_tasks: int = typer.Option(0, help="tasks submitted at most (0: from duration and rate)"),
    batch_size: int = typer.Option(100, help="specs per SubmitBatch (1: Submit)"),
    submit: SubmitMode = typer.Option(
        SubmitMode.stream,
        help="open loop: stream = one SubmitStream call, each task in a message of its own "
        "as soon as it is due; rpc = a Submit, or a SubmitBatch of what is due, per send. "
        "The closed loop always uses SubmitBatch (--batch-size)",
    ),
    clients: int = typer.Option(0, help="closed loop: submit RPCs in flight (0: automatic)"),
    drain_timeout: float = typer.Option(
        30.0, help="seconds to wait for in-flight tasks at the end"
    ),
    burst_size: int = typer.Option(0, help="burst: tasks per burst (0: 10 per agent)"),
    burst_interval: float = typer.Option(5.0, help="burst: seconds between bursts"),
    kill_at: float = typer.Option(
        0.0,
        help="agent-kill/leader-kill/hang (the pool freeze): seconds in (0: a third of --duration)",
    ),
    stall_limit: float = typer.Option(
        2.0, help="hang: the health monitor's stall limit in seconds"
    ),
    hang_every: float = typer.Option(1.0, help="hang: one SIMULATED hung task every this many s"),
    block_s: float = typer.Option(
        5.0, help="hang: seconds the SIMULATED blocking call freezes its pool (0: no freeze)"
    ),
    monitor_kill_every: float = typer.Option(
        8.0, help="monitor-kill: SIGKILL the active health monitor every this many s"
    ),
    kills: int = typer.Option(10, help="etcd-kill: how many times etcd is SIGKILLed"),
    etcd_down: float = typer.Option(1.0, help="etcd-kill: seconds etcd stays down each time"),
    kill_every: float = typer.Option(
        0.0, help="etcd-kill: seconds between kills (0: spread over --duration)"
    ),
    capacity: int = typer.Option(1, help="tasks each agent runs at once"),
    spawn_batch: int = typer.Option(50, help="agents a pool starts in parallel"),
    target: str | None = typer.Option(
        None,
        help="join a running cluster at coordinator host:port[,host:port] instead of starting one",
    ),
    peer_only: bool = typer.Option(
        False, help="run only the --compare peer (no agentmesh cluster)"
    ),
    keep_cluster_dir: bool = typer.Option(False, help="keep the local cluster's data and logs"),
    progress: bool = typer.Option(True, help="live progress view (on a terminal)"),
    proposals: int = typer.Option(
        200, help="consensus: proposals per protocol (in flight at once: --concurrency, 0 = 4)"
    ),
    byzantine: str = typer.Option(
        "forge:1,equivocate:1,impersonate:1,unknown-proposal:1",
        help="consensus: faulty voters per pool, MODE:COUNT,...",
    ),
    dead_voters: int = typer.Option(2, help="consensus: voters per pool that never answer"),
) -> None:
    """Run a load-test scenario and report P50/P95/P99, throughput and the exactly-once check."""
    if ctx.invoked_subcommand:
        return
    if pools >= 1 and (problem := limits.agents_per_pool_problem(agents, pools)):
        raise typer.BadParameter(problem)
    if scenario == Scenario.consensus:
        _consensus(
            agents,
            pools,
            proposals,
            concurrency or 4,
            byzantine,
            dead_voters,
            out,
            keep_cluster_dir,
        )
        return
    if executor == ExecutorChoice.llm:
        _llm(agents, pools, max_tasks, out)
        return
    if agents < 1 or pools < 1 or duration <= 0:
        raise typer.BadParameter("--agents and --pools must be at least 1, --duration positive")
    if peer_only and compare == Peer.none:
        raise typer.BadParameter("--peer-only needs --compare celery")
    if kills < 1 or etcd_down < 0 or kill_every < 0:
        raise typer.BadParameter("--kills must be at least 1, --etcd-down and --kill-every ≥ 0")
    if target and scenario in (
        Scenario.agent_kill,
        Scenario.leader_kill,
        Scenario.etcd_restart,
        Scenario.etcd_kill,
        Scenario.hang,
        Scenario.flaky,
        Scenario.monitor_kill,
    ):
        raise typer.BadParameter(
            f"--scenario {scenario.value} kills processes: it needs the "
            "harness's own cluster (leave out --target)"
        )
    burst = burst_size or 10 * agents
    workload = Workload(
        max_tasks=max_tasks
        or _default_max_tasks(duration, rate, scenario.value, burst, burst_interval),
        duration_s=duration,
        rate_per_s=rate,
        concurrency=concurrency or agents * capacity,
        executor="noop" if executor == ExecutorChoice.noop else "sleep",  # llm returned above
        sleep_ms=sleep_ms,
        batch_size=batch_size,
        stream=submit == SubmitMode.stream,
        clients=clients,
        drain_timeout_s=drain_timeout,
    )
    options = ScenarioOptions(
        agents=agents,
        spawn_batch=spawn_batch,
        burst_size=burst,
        burst_interval_s=burst_interval,
        kill_at_s=kill_at,
        kills=kills,
        etcd_down_s=etcd_down,
        kill_every_s=kill_every,
        stall_limit_s=stall_limit,
        hang_every_s=hang_every,
        block_s=block_s,
        monitor_kill_every_s=monitor_kill_every,
    )
    params: dict[str, Any] = {
        "scenario": scenario.value,
        "agents": agents,
        "pools": pools,
        "capacity": capacity,
        "duration_s": duration,
        "rate": rate,
        "mode": "closed loop" if workload.closed_loop else "open loop",
        "concurrency": workload.concurrency,
        "executor": executor.value,
        "simulated": workload.simulated,
        "sleep_ms": sleep_ms if workload.simulated else None,
        "max_tasks": workload.max_tasks,
        "batch_size": batch_size,
        "submit": "SubmitBatch" if workload.closed_loop else submit.value,
        "drain_timeout_s": drain_timeout,
        "compare": compare.value,
        "target": target or "local cluster started by the harness",
    }
    if scenario == Scenario.etcd_kill:
        params.update(kills=kills, etcd_down_s=etcd_down, kill_every_s=kill_every)
    if workload.simulated:
        console.print(f"[bold yellow]SIMULATED WORK[/]: tasks sleep {sleep_ms:g} ms on the agents")
    mode = (
        f"open loop, bursts of {burst} every {burst_interval:g} s"
        if scenario == Scenario.burst
        else None
    )
    console.print(f"{scenario.value}: {workload.describe(mode)}")
    results: list[RunResult] = []
    stopper = Stopper()
    # the harness is on every task's path too (its submits, its event stream): both
    # systems' runs meet the same, shorter collections
    heap.settle()
    with LiveView(progress and console.is_terminal) as view:
        try:
            if not peer_only:
                results.append(
                    _run_async(
                        lambda: _agentmesh(
                            scenario.value,
                            workload,
                            options,
                            target_addr=target,
                            pools=pools,
                            capacity=capacity,
                            keep_cluster_dir=keep_cluster_dir,
                            view=view,
                            stopper=stopper,
                        ),
                        stopper,
                    )
                )
            if compare == Peer.celery and not stopper.requested:
                if scenario.value not in ("steady", "burst"):
                    console.print(
                        f"[dim]celery runs the steady workload ({scenario.value} has no "
                        "Celery counterpart here)[/]"
                    )
                from loadtest.celery_peer import PeerError

                bursts = (
                    BurstSchedule(burst, burst_interval) if scenario == Scenario.burst else None
                )
                peer_scenario = "burst" if bursts else "steady"
                try:
                    results.append(
                        _celery(workload, workload.concurrency, view, peer_scenario, bursts)
                    )
                except PeerError as err:
                    console.print(f"[red]celery peer failed[/]: {err}")
        except (asyncio.CancelledError, KeyboardInterrupt):
            console.print("[red]aborted[/]: everything started was stopped")
            raise typer.Exit(130) from None
        except (TargetError, TimeoutError, RuntimeError, RpcFailed) as err:
            console.print(f"[red]load test failed[/]: {err}")
            raise typer.Exit(2) from None
    if not results:
        raise typer.Exit(2)
    doc = build_doc(results, params=params, simulated=workload.simulated)
    doc["targets"] = evaluate(doc["runs"], params)
    print_summary(doc, console)
    if out is not None:
        json_path, html_path = write_all(doc, out)
        console.print(f"wrote {json_path} and {html_path}")
    raise typer.Exit(0 if doc["verdict"]["ok"] else 1)


def _consensus(
    voters: int,
    pools: int,
    proposals: int,
    concurrency: int,
    byzantine: str,
    dead: int,
    out: Path | None,
    keep: bool,
) -> None:
    from loadtest.consensus import ConsensusLoad, run_consensus, write

    if voters < 4 or pools < 1 or proposals < 1 or concurrency < 1:
        raise typer.BadParameter("consensus needs --agents >= 4, --pools, --proposals >= 1")
    load = ConsensusLoad(
        voters=voters,
        pools=pools,
        proposals=proposals,
        concurrency=concurrency,
        byzantine=byzantine,
        dead=dead,
    )
    try:
        doc = _run_async(lambda: run_consensus(load, console, keep), Stopper())
    except (TimeoutError, RuntimeError) as err:
        console.print(f"[red]load test failed[/]: {err}")
        raise typer.Exit(2) from None
    if out is not None:
        console.print(f"wrote {write(doc, out)}")
    raise typer.Exit(0 if doc["ok"] else 1)


@app.command()
def render(
    report: Path = typer.Argument(..., exists=True, dir_okay=False, help="a report.json"),
    html: Path | None = typer.Option(None, help="HTML output (default: next to the JSON)"),
) -> None:
    """Print the summary of a saved report.json and render its HTML again."""
    doc = json.loads(report.read_text(encoding="utf-8"))
    print_summary(doc, console)
    path = write_html(doc, html or report.with_suffix(".html"))
    console.print(f"wrote {path}")


def _llm(agents: int, pools: int, max_tasks: int, out: Path | None) -> None:
    """`--executor llm`: the burst experiment (loadtest/llm_burst.py) against the SIMULATED
    Messages API, without admission control and then with it, in one report."""
    from loadtest import llm_burst

    if agents < 1 or pools < 1 or pools > agents:
        raise typer.BadParameter("--agents and --pools must be at least 1, pools ≤ agents")
    argv = ["--agents", str(agents), "--pools", str(pools), "--tasks", str(max_tasks or 2000)]
    if out is not None:
        argv += ["--out", str(out / "llm-burst.json")]
    console.print(
        "[bold yellow]SIMULATED API[/]: llm tasks run the real SDK against loadtest.fake_anthropic"
        f" (limits at half of what {agents} agents could use), without admission, then with it"
    )
    llm_burst.main([*argv, "--compare"])
