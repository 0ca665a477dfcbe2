"""Scenarios: how agents are brought up, what load runs, and which faults are injected.

Each scenario ends with the driver's exactly-once check, so a fault scenario
fails on any lost or doubly-completed task, whatever its timings say.

- steady:     closed loop (`concurrency` in flight) or open loop at `rate`.
- burst:      `burst_size` tasks at once every `burst_interval_s` (queueing and drain).
- spawn:      agents started cold in batches, in waves, and from the warm pool, each
              timed until every agent is connected; then a steady run on them.
- agent-kill: steady, and a third of the way in one agent-pool process is SIGKILLed;
              measures how fast the tasks its agents held are reassigned.
- leader-kill: steady with two coordinators; the leader is SIGKILLed; measures
              the time until tasks complete again under the new term.
- etcd-restart: steady; etcd is stopped for 3 s and started again with its data.
- etcd-kill:  steady; etcd is SIGKILLed `kills` times (writes in flight may or may
              not be applied) and started again from its data dir each time;
              measures, per kill, the time from etcd's return to the last task that
              was in flight at the kill finishing, and the coordinator's CPU while
              etcd was down. No leader change is involved (one coordinator).
- hang, flaky, monitor-kill: the health monitor's scenarios (see loadtest/health.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from loadtest import commits, etcd_disk
from loadtest.client import CHANNEL_OPTIONS, CoordinatorClient, RpcFailed
from loadtest.cpu import CpuSampler
from loadtest.driver import Action, Driver
from loadtest.metrics import LatencyRecorder
from loadtest.result import RunResult
from loadtest.target import Target, TargetError
from loadtest.workload import BurstSchedule, ProgressSink, Schedule, Workload, new_run_id
from protos.agentmesh.v1 import agent_pool_pb2 as ppb
from protos.agentmesh.v1 import agent_pool_pb2_grpc as ppb_grpc
from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb

log = logging.getLogger(__name__)

SCENARIOS = (
    "steady",
    "burst",
    "spawn",
    "agent-kill",
    "leader-kill",
    "etcd-restart",
    "etcd-kill",
    "hang",
    "flaky",
    "monitor-kill",
)
POOL_KIND = "agent-pool"
TEMPLATE_KINDS = ("noop", "sleep")
"""Kinds a cold-spawned agent advertises (an explicit template bypasses the warm pool)."""
POOL_RPC_TIMEOUT_S = 60.0


@dataclass(frozen=True, kw_only=True)
class ScenarioOptions:
    agents: int = 200
    """Agents the run needs connected (spawned through the pools when short)."""
    spawn_batch: int = 50
    """Agents a pool starts in parallel."""
    burst_size: int = 0
    """burst: tasks per burst (0: 10 per agent)."""
    burst_interval_s: float = 5.0
    kill_at_s: float = 0.0
    """agent-kill / leader-kill: seconds into the run (0: a third of the duration)."""
    ready_timeout_s: float = 60.0
    """Bound on waiting for agents to connect."""
    kills: int = 10
    """etcd-kill: how many times etcd is SIGKILLed."""
    etcd_down_s: float = 1.0
    """etcd-kill: how long etcd stays down each time (then it restarts, ~1 s more)."""
    kill_every_s: float = 0.0
    """etcd-kill: seconds from one kill to the next (0: spread over the rest of the run)."""
    stall_limit_s: float = 2.0
    """hang: the monitor's stall limit (the cluster is started with it)."""
    hang_every_s: float = 1.0
    """hang: one SIMULATED hung task this often."""
    block_s: float = 5.0
    """hang: how long the SIMULATED blocking call freezes its pool."""
    monitor_kill_every_s: float = 8.0
    """monitor-kill: SIGKILL the active health monitor this often."""


class Stopper:
    """Ctrl-C's first press: end the current run early but still check and report."""

    def __init__(self) -> None:
        self.requested = False
        self._driver: Driver | None = None

    def attach(self, driver: Driver) -> None:
        self._driver = driver
        if self.requested:
            driver.stop()

    def stop(self) -> None:
        self.requested = True
        if self._driver is not None:
            self._driver.stop()


# ---------------------------------------------------------------- pools


@dataclass(frozen=True)
class Pool:
    pool_id: str
    endpoint: str


async def discover_pools(
    client: CoordinatorClient, expect: int = 0, timeout_s: float = 30.0
) -> list[Pool]:
    """Agent pools registered in the cluster, from `GetStatus().services`.

    With `expect`, waits until that many are registered: a pool registers a moment
    after the coordinator leads, and agents spawned before that would all land on
    the pools that happened to be first.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        status = await client.status()
        pools = [Pool(s.instance_id, s.endpoint) for s in status.services if s.kind == POOL_KIND]
        if len(pools) >= expect or loop.time() >= deadline:
            if len(pools) < expect:
                raise TargetError(
                    f"{len(pools)} of {expect} agent pools registered after {timeout_s:g} s"
                )
            return sorted(pools, key=lambda p: p.pool_id)
        await asyncio.sleep(0.05)


class PoolClient:
    """The AgentPool API of one pool process, with deadlines."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._channel = grpc.aio.insecure_channel(pool.endpoint, options=CHANNEL_OPTIONS)
        self.stub = ppb_grpc.AgentPoolStub(self._channel)

    async def spawn(self, count: int, batch: int, cold: bool) -> ppb.SpawnAgentsResponse:
        req = ppb.SpawnAgentsRequest(count=count, batch_size=batch)
        if cold:
            req.template.CopyFrom(ppb.AgentTemplate(kinds=list(TEMPLATE_KINDS)))
        return await self.stub.SpawnAgents(req, timeout=POOL_RPC_TIMEOUT_S)  # type: ignore[no-any-return]

    async def waves(self, count: int, wave_size: int, interval_s: float) -> list[ppb.SpawnProgress]:
        req = ppb.SpawnWavesRequest(
            count=count,
            wave_size=wave_size,
            wave_interval_s=interval_s,
            template=ppb.AgentTemplate(kinds=list(TEMPLATE_KINDS)),
        )
        return [p async for p in self.stub.SpawnWaves(req, timeout=POOL_RPC_TIMEOUT_S)]

    async def stop_all(self) -> int:
        ids: list[str] = []
        page = ppb.ListPoolAgentsRequest()
        while True:
            listed = await self.stub.ListAgents(page, timeout=10.0)
            ids.extend(a.agent_id for a in listed.agents)
            if not listed.next_page_token:
                break
            page.page_token = listed.next_page_token
        if not ids:
            return 0
        resp = await self.stub.StopAgents(
            ppb.StopAgentsRequest(agent_ids=ids, graceful=False), timeout=POOL_RPC_TIMEOUT_S
        )
        return len(resp.stopped)

    async def close(self) -> None:
        await self._channel.close(grace=None)


def split(total: int, parts: int) -> list[int]:
    """`total` as evenly as possible over `parts` (the first ones get the remainder)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def wait_connected(
    client: CoordinatorClient, want: int, timeout_s: float, *, at_most: bool = False
) -> float:
    """Poll GetStatus until `agents_connected` ≥ want (≤ want with `at_most`); seconds waited."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    last = -1
    while loop.time() - t0 < timeout_s:
        last = int((await client.status()).agents_connected)
        if (last <= want) if at_most else (last >= want):
            return loop.time() - t0
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{last} agents connected after {timeout_s:g} s, waiting for {want}")


def _rss(target: Target) -> dict[str, int]:
    return dict(target.process_rss()) if target.process_rss is not None else {}


def _memory_per_agent(before: dict[str, int], after: dict[str, int], agents: int) -> dict[str, Any]:
    if not before or not after or agents <= 0:
        return {}
    pools = sum(after.get(k, 0) - v for k, v in before.items() if k.startswith("pool"))
    coords = sum(after.get(k, 0) - v for k, v in before.items() if k.startswith("coordinator"))
    return {
        "pool_rss_per_agent_kb": round(pools / agents / 1024, 1),
        "coordinator_rss_per_agent_kb": round(coords / agents / 1024, 1),
        "rss_mb_after": {k: round(v / 2**20, 1) for k, v in after.items()},
    }


async def spawn_agents(
    client: CoordinatorClient,
    target: Target,
    pools: list[Pool],
    count: int,
    *,
    batch: int,
    cold: bool,
    timeout_s: float,
    spawn_hist: LatencyRecorder | None = None,
) -> dict[str, Any]:
    """Start `count` more agents across `pools`; time until every one is connected."""
    if not pools:
        raise TargetError("no agent-pool is registered in the cluster (GetStatus().services)")
    base = int((await client.status()).agents_connected)
    rss_before = _rss(target)
    clients = [PoolClient(p) for p in pools]
    t0 = time.monotonic()
    try:
        resps = await asyncio.gather(
            *(
                c.spawn(n, batch, cold)
                for c, n in zip(clients, split(count, len(pools)), strict=True)
                if n
            )
        )
        rpc_s = time.monotonic() - t0
        ready_s = await wait_connected(client, base + count, timeout_s)
        ready_s = max(ready_s + rpc_s, rpc_s)
    finally:
        for c in clients:
            await c.close()
    if spawn_hist is not None:
        for resp in resps:
            for agent in resp.agents:
                if agent.spawn_ms > 0:
                    spawn_hist.record_ms(agent.spawn_ms)
    out: dict[str, Any] = {
        "agents": count,
        "cold": cold,
        "batch_size": batch,
        "all_ready_s": round(ready_s, 4),
        "pool_rpc_elapsed_s": [round(r.elapsed_s, 4) for r in resps],
        "from_warm": sum(int(r.from_warm) for r in resps),
    }
    out.update(_memory_per_agent(rss_before, _rss(target), count))
    return out


async def ensure_agents(
    client: CoordinatorClient, target: Target, options: ScenarioOptions, spawn_hist: LatencyRecorder
) -> dict[str, Any]:
    """Make `options.agents` agents connected, spawning the missing ones (timed)."""
    have = int((await client.status()).agents_connected)
    if have >= options.agents:
        return {"agents_connected": have, "spawned": 0}
    pools = await discover_pools(client, expect=target.pools)
    info = await spawn_agents(
        client,
        target,
        pools,
        options.agents - have,
        batch=options.spawn_batch,
        cold=False,
        timeout_s=options.ready_timeout_s,
        spawn_hist=spawn_hist,
    )
    return {"agents_connected": options.agents, "spawn": info}


async def spawn_phases(
    client: CoordinatorClient, target: Target, options: ScenarioOptions, spawn_hist: LatencyRecorder
) -> dict[str, Any]:
    """Cold batches, waves, warm pool: each from zero agents to all connected."""
    n = options.agents
    pools = await discover_pools(client, expect=target.pools)
    phases: dict[str, Any] = {}

    async def stop_all() -> None:
        clients = [PoolClient(p) for p in pools]
        try:
            await asyncio.gather(*(c.stop_all() for c in clients))
        finally:
            for c in clients:
                await c.close()
        await wait_connected(client, 0, options.ready_timeout_s, at_most=True)

    await stop_all()
    phases["cold_batch"] = await spawn_agents(
        client,
        target,
        pools,
        n,
        batch=options.spawn_batch,
        cold=True,
        timeout_s=options.ready_timeout_s,
        spawn_hist=spawn_hist,
    )
    await stop_all()
    clients = [PoolClient(p) for p in pools]
    t0 = time.monotonic()
    try:
        parts = split(n, len(pools))
        progress = await asyncio.gather(
            *(c.waves(k, max(1, k // 10), 0.1) for c, k in zip(clients, parts, strict=True) if k)
        )
        rpc_s = time.monotonic() - t0
        ready_s = rpc_s + await wait_connected(client, n, options.ready_timeout_s)
    finally:
        for c in clients:
            await c.close()
    phases["waves"] = {
        "agents": n,
        "waves_per_pool": [len(p) for p in progress],
        "all_ready_s": round(ready_s, 4),
        "failed": sum(p[-1].failed for p in progress if p),
    }
    await stop_all()
    phases["warm_pool"] = await spawn_agents(
        client,
        target,
        pools,
        n,
        batch=0,
        cold=False,
        timeout_s=options.ready_timeout_s,
    )
    # warm agents were resident before the spawn and the pool refills after it
    for key in ("pool_rss_per_agent_kb", "coordinator_rss_per_agent_kb", "rss_mb_after"):
        phases["warm_pool"].pop(key, None)
    if phases["warm_pool"]["from_warm"] == 0:
        phases["warm_pool"]["note"] = "the pools kept no warm agents (AGENTMESH_WARM=0)"
    return phases


# ---------------------------------------------------------------- faults


def agent_kill_action(client: CoordinatorClient, target: Target) -> Callable[[Driver], Any]:
    kill = target.require_kill("agent-kill")

    async def run(driver: Driver) -> dict[str, Any]:
        pools = await discover_pools(client)
        if len(pools) < 2:
            raise TargetError("agent-kill needs at least two pools (one survives to take over)")
        victim = pools[0]
        agents = {
            a.agent_id for a in (await client.list_agents()).agents if a.pool_id == victim.pool_id
        }
        held = await held_tasks(client, driver, agents)
        t_kill = driver.clock.monotonic()
        t_kill_wall = driver.clock.wall_us()
        await kill(victim.pool_id)
        driver.track_reassignment(held, t_kill, t_kill_wall)
        return {
            "killed": victim.pool_id,
            "agents_killed": len(agents),
            "tasks_held": len(held),
            "kill_took_s": round(driver.clock.monotonic() - t_kill, 4),
        }

    return run


async def held_tasks(client: CoordinatorClient, driver: Driver, agents: set[str]) -> dict[str, str]:
    """This run's tasks held by `agents` now, as the store says (the event stream may lag)."""
    request = cpb.ListTasksRequest(
        states=[tpb.TASK_STATE_ASSIGNED, tpb.TASK_STATE_RUNNING], page_size=1000
    )
    held: dict[str, str] = {}
    try:
        while True:
            resp = await client.call("ListTasks", request, timeout_s=5.0)
            for task in resp.tasks:
                if task.agent_id in agents and task.task_id in driver.inflight:
                    held[task.task_id] = task.agent_id
            if not resp.next_page_token:
                return held
            request.page_token = resp.next_page_token
    except RpcFailed:
        return {tid: a for tid, a in driver.holders().items() if a in agents}


def leader_kill_action(client: CoordinatorClient, target: Target) -> Callable[[Driver], Any]:
    kill = target.require_kill("leader-kill")

    async def run(driver: Driver) -> dict[str, Any]:
        status = await client.status()
        if not status.standbys:
            raise TargetError("leader-kill needs a standby coordinator (--coordinators 2)")
        old_leader, old_term = status.leader_id, status.term
        t_kill = driver.clock.monotonic()
        await kill(old_leader)
        elected: float | None = None
        first_done: float | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30.0
        while loop.time() < deadline and (elected is None or first_done is None):
            if elected is None:
                with contextlib.suppress(RpcFailed):
                    s = await client.call("GetStatus", cpb.GetStatusRequest(), timeout_s=1.0)
                    if s.leader_id and s.leader_id != old_leader and s.term != old_term:
                        elected = driver.clock.monotonic() - t_kill
            later = [t for term, t in driver.first_completion_in_term.items() if term > old_term]
            if later:
                first_done = min(later) - t_kill
            await asyncio.sleep(0.02)
        return {
            "killed": old_leader,
            "old_term": old_term,
            "new_leader_elected_s": round(elected, 4) if elected is not None else None,
            "first_completion_after_kill_s": round(first_done, 4)
            if first_done is not None
            else None,
        }

    return run


def etcd_restart_action(target: Target, down_s: float) -> Callable[[Driver], Any]:
    """etcd goes down for `down_s` under the running cluster, then comes back with
    its data: how long until tasks complete again, and (at the end, as always) that
    no acknowledged task was lost or completed twice."""
    if target.restart_etcd is None:
        raise TargetError("etcd-restart needs a cluster the harness started (no --target)")
    restart_etcd = target.restart_etcd

    async def run(driver: Driver) -> dict[str, Any]:
        before = driver.completed
        t_stop = driver.clock.monotonic()
        await restart_etcd(down_s)
        t_back = driver.clock.monotonic()
        completed_at_back = driver.completed
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30.0
        first_done: float | None = None
        while loop.time() < deadline:
            if driver.completed > completed_at_back:
                first_done = driver.clock.monotonic() - t_back
                break
            await asyncio.sleep(0.01)
        return {
            "etcd_down_s": round(t_back - t_stop, 3),
            "completed_while_down": completed_at_back - before,
            "first_completion_after_etcd_back_s": round(first_done, 4)
            if first_done is not None
            else None,
        }

    return run


@dataclass
class EtcdKill:
    """One SIGKILL of etcd, as the etcd-kill scenario saw it."""

    kill: int
    at_s: float
    """Seconds into the run."""
    in_flight: list[str]
    """Acknowledged tasks not yet terminal at the kill: the ones an outage may strand."""
    down_s: float
    back_mono: float
    """When etcd answered again (client monotonic clock)."""
    coordinator_cpu_pct: float
    """The coordinators' CPU while etcd was down, in % of one core."""
    restart_s: float = 0.0
    """How long etcd took to start and answer."""
    extra: dict[str, Any] = field(default_factory=dict)


def coordinator_cpu_s(target: Target) -> float:
    cpu = target.process_cpu() if target.process_cpu is not None else {}
    return sum(v for k, v in cpu.items() if k.startswith("coordinator"))


async def leader_term(client: CoordinatorClient, timeout_s: float = 30.0) -> int:
    """The root coordinator's term, once one answers GetStatus."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        with contextlib.suppress(RpcFailed):
            status = await client.call("GetStatus", cpb.GetStatusRequest(), timeout_s=2.0)
            if status.term:
                return int(status.term)
        if loop.time() > deadline:
            return 0
        await asyncio.sleep(0.1)


def etcd_kill_action(
    client: CoordinatorClient,
    target: Target,
    options: ScenarioOptions,
    interval_s: float,
    record: list[EtcdKill],
) -> Callable[[Driver], Any]:
    """SIGKILL etcd `options.kills` times, `interval_s` apart; each time keep it down for
    `options.etcd_down_s` and start it again from its data dir. Each kill goes into
    `record` as it happens (the run may end before the last one)."""
    if target.kill_etcd is None or target.start_etcd is None:
        raise TargetError("etcd-kill needs a cluster the harness started (no --target)")
    kill_etcd, start_etcd = target.kill_etcd, target.start_etcd

    async def run(driver: Driver) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        term_before = await leader_term(client)
        for i in range(options.kills):
            started = loop.time()
            in_flight = list(driver.inflight)
            cpu0, t0 = coordinator_cpu_s(target), loop.time()
            await kill_etcd()
            await asyncio.sleep(options.etcd_down_s)
            cpu1, t1 = coordinator_cpu_s(target), loop.time()
            await start_etcd()
            back = driver.clock.monotonic()
            record.append(
                EtcdKill(
                    kill=i + 1,
                    at_s=round(driver.elapsed(), 3),
                    in_flight=in_flight,
                    down_s=round(t1 - t0, 3),
                    back_mono=back,
                    coordinator_cpu_pct=100.0 * (cpu1 - cpu0) / max(1e-9, t1 - t0),
                    restart_s=round(loop.time() - t1, 3),
                )
            )
            if i + 1 < options.kills:
                await asyncio.sleep(max(0.0, interval_s - (loop.time() - started)))
        term_after = await leader_term(client)
        # the promise is kept without a failover: one term from the first kill to the last
        return {
            "kills": len(record),
            "etcd_down_s": options.etcd_down_s,
            "leader_term_before": term_before,
            "leader_term_after": term_after,
        }

    return run


def summarise_etcd_kills(
    kills: list[EtcdKill], done_at: Mapping[str, float], acknowledged: int, terminal: int
) -> dict[str, Any]:
    """Per kill and over all kills: how long after etcd's return the last task that was
    in flight at the kill finished (`done_at`: task id → when the run saw it terminal;
    absent = never), and the coordinators' CPU while etcd was down."""
    recovery = LatencyRecorder("stranded_after_etcd_back")
    per_kill = []
    never = 0
    for k in kills:
        finished = [done_at[t] for t in k.in_flight if t in done_at]
        missing = len(k.in_flight) - len(finished)
        never += missing
        last = max((max(0.0, t - k.back_mono) for t in finished), default=0.0)
        if not missing:
            recovery.record_s(last)
        per_kill.append(
            {
                "kill": k.kill,
                "at_s": k.at_s,
                "down_s": k.down_s,
                "restart_s": k.restart_s,
                "in_flight": len(k.in_flight),
                "last_finished_after_back_s": round(last, 3) if not missing else None,
                "never_finished": missing,
                "coordinator_cpu_pct": round(k.coordinator_cpu_pct, 1),
            }
        )
    cpus = [k.coordinator_cpu_pct for k in kills]
    return {
        "kills": len(kills),
        "acknowledged_terminal": f"{terminal}/{acknowledged}",
        "in_flight_at_kills": sum(len(k.in_flight) for k in kills),
        "never_finished": never,
        "last_stranded_after_back_p50_s": round(recovery.percentile_ms(50) / 1000, 3)
        if recovery.count
        else None,
        "last_stranded_after_back_max_s": round(recovery.percentile_ms(100) / 1000, 3)
        if recovery.count
        else None,
        "coordinator_cpu_down_p50_pct": round(statistics.median(cpus), 1) if cpus else None,
        "coordinator_cpu_down_max_pct": round(max(cpus), 1) if cpus else None,
        "per_kill": per_kill,
    }


# ---------------------------------------------------------------- the runner


async def run_agentmesh(
    scenario: str,
    target: Target,
    workload: Workload,
    options: ScenarioOptions,
    *,
    progress: ProgressSink | None = None,
    stopper: Stopper | None = None,
) -> RunResult:
    """One scenario against `target`; the result holds the exactly-once verdict."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    client = CoordinatorClient(target.coordinator_targets)
    spawn_hist = LatencyRecorder("spawn")
    health: Any = None
    try:
        if scenario == "spawn":
            setup = {"spawn_phases": await spawn_phases(client, target, options, spawn_hist)}
        else:
            setup = await ensure_agents(client, target, options, spawn_hist)
        schedule: Schedule | None = None
        actions: list[Action] = []
        etcd_kills: list[EtcdKill] = []
        watch_all = False
        kill_at = options.kill_at_s or workload.duration_s / 3
        if scenario == "burst":
            size = options.burst_size or 10 * options.agents
            schedule = BurstSchedule(size, options.burst_interval_s)
        elif scenario == "agent-kill":
            watch_all = True
            actions.append(Action(kill_at, "agent pool killed", agent_kill_action(client, target)))
        elif scenario == "leader-kill":
            actions.append(Action(kill_at, "leader killed", leader_kill_action(client, target)))
        elif scenario == "etcd-restart":
            actions.append(Action(kill_at, "etcd restarted", etcd_restart_action(target, 3.0)))
        elif scenario == "etcd-kill":
            kill_at = options.kill_at_s or min(5.0, workload.duration_s / 10)
            interval = options.kill_every_s or max(
                options.etcd_down_s + 2.0,
                (workload.duration_s - kill_at - 2.0) / max(1, options.kills),
            )
            actions.append(
                Action(
                    kill_at,
                    f"etcd SIGKILLed {options.kills}x",
                    etcd_kill_action(client, target, options, interval, etcd_kills),
                )
            )
        elif scenario in ("hang", "flaky", "monitor-kill"):
            from loadtest.health import HealthRun

            health = HealthRun(
                scenario,
                client,
                target,
                agents=options.agents,
                stall_limit_s=options.stall_limit_s,
                hang_every_s=options.hang_every_s,
                block_s=options.block_s,
                monitor_kill_every_s=options.monitor_kill_every_s,
            )
            watch_all = scenario == "hang"  # to see the frozen pool's tasks move
            actions.extend(health.actions(kill_at))
        driver = Driver(
            client,
            workload,
            run_id=new_run_id(),
            scenario=scenario,
            schedule=schedule,
            watch_all_states=watch_all,
            actions=actions,
            progress=progress,
            cpu=CpuSampler(target.process_pids) if target.process_pids is not None else None,
        )
        # the client's counters are the run's from here on
        if stopper is not None:
            stopper.attach(driver)
        if spawn_hist.count:
            driver.metrics.latencies["spawn"] = spawn_hist
        etcd = str(target.info.get("etcd", ""))
        metrics = [str(m) for m in target.info.get("coordinator_metrics", ()) if m]
        disk_before = await etcd_disk.scrape(etcd) if etcd else None
        commits_before = [await etcd_disk.scrape(m) for m in metrics]
        window_from = time.monotonic()
        result = await driver.run()
        window_s = time.monotonic() - window_from
        commits_after = [await etcd_disk.scrape(m) for m in metrics]
        disk_after = await etcd_disk.scrape(etcd) if disk_before else None
        if disk_before and disk_after:
            # how much of each durable commit is etcd's own disk
            result.extra["etcd_disk"] = etcd_disk.summarise(disk_before, disk_after)
        read = [(a, b) for a, b in zip(commits_before, commits_after, strict=True) if a and b]
        if read and (commits_summary := commits.summarise(read, window_s)):
            # how busy the leader's group commit was, and how long writes queued for it
            commits_summary["coordinators_read"] = len(read)
            commits_summary["coordinators"] = len(metrics)
            result.extra["commits"] = commits_summary
        if health is not None:
            result.extra["health"] = await health.finish(driver)
        result.extra.update(setup)
        if scenario == "etcd-kill":
            done_at = {tid: rec.done_at for tid, rec in driver.tasks.items() if rec.done_at}
            result.extra["etcd_kills"] = summarise_etcd_kills(
                etcd_kills,
                done_at,
                acknowledged=result.acknowledged,
                terminal=sum(result.terminal_states.values()),
            )
            for info in result.extra.get("actions", []):
                if "leader_term_before" in info:
                    result.extra["etcd_kills"]["leader_term_unchanged"] = (
                        info["leader_term_before"] == info["leader_term_after"] != 0
                    )
            if len(etcd_kills) < options.kills:
                result.notes.append(
                    f"etcd-kill: only {len(etcd_kills)} of {options.kills} kills fit in the run; "
                    "use a longer --duration or a smaller --kill-every"
                )
        if target.description:
            result.extra["cluster"] = target.description
        if target.info:
            result.extra["cluster_info"] = target.info
        if scenario == "agent-kill" and workload.executor == "noop":
            result.notes.append(
                "agent-kill with no-op tasks: agents hold tasks for microseconds, so few are "
                "caught in flight; --executor sleep measures reassignment better"
            )
        return result
    finally:
        if health is not None:
            await health.close()
        await client.close()
