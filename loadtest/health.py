"""Health scenarios (issue 11): hung work, a frozen pool, a flaky agent, monitor failover.

Every fault is SIMULATED by something that says so: the `hang` and `block` executors
(their outputs carry "simulated": true) and pools whose first agent fails every task
(AGENTMESH_FLAKY_AGENTS; the error says SIMULATED). Each scenario runs the usual
steady load next to its faults and ends with the driver's exactly-once check.

- hang: every `hang_every_s`, one task that hangs on its first attempt (a coroutine that
  never returns while its agent's streams stay open); at `kill_at`, one task that blocks
  its pool's event loop for `block_s` (a synchronous time.sleep). Figures: hung task's
  start (its first assignment) → running elsewhere (its second assignment); the monitor's
  detection → running elsewhere; a frozen pool's tasks → running elsewhere.
- flaky: the pools' first agents fail every task. Figures: failures before the ejection,
  first failure → ejection, ejections and trials (half-open) per flaky agent.
- monitor-kill: two monitors; the active one is SIGKILLed every `monitor_kill_every_s`
  and started again. Figures: kill → standby active; kill → every agent reporting to it.

Every scenario also counts the agents the monitor declared FAILED over the whole run
(its events, plus the FAILED records at the end, so nothing said during a watch's
reconnect is missed) and how many of them wrongly: an agent is rightly FAILED only when
it stopped answering for `failed_after_s` (a pool frozen longer than that, or killed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import grpc

from loadtest.audit import HELD, TERMINAL
from loadtest.client import CHANNEL_OPTIONS, CoordinatorClient, RpcFailed
from loadtest.driver import Action, Driver
from loadtest.target import Target, TargetError
from protos.agentmesh.v1 import health_pb2 as hpb
from protos.agentmesh.v1 import health_pb2_grpc as hpb_grpc
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.errors import LEADER_METADATA_KEY
from services._common.latency import HOUR_US, LatencyRecorder

log = logging.getLogger(__name__)

HEALTH_SCENARIOS = ("hang", "flaky", "monitor-kill")
FAULT_KINDS = "echo,sleep,noop,fail,hang,block"
FAILED_AFTER_S = 10.0
"""The monitor's default `failed_after_s` (the scenarios leave it as it is)."""
SETTLE_TIMEOUT_S = 60.0


def cluster_env(scenario: str, stall_limit_s: float) -> dict[str, str]:
    """What the local cluster's processes need for `scenario` (all SIMULATED faults)."""
    if scenario == "hang":
        return {
            "AGENTMESH_TASK_KINDS": FAULT_KINDS,
            "AGENTMESH_KINDS": FAULT_KINDS,
            "AGENTMESH_STALL_LIMIT_S": f"{stall_limit_s:g}",
        }
    if scenario == "flaky":
        # ejections of 5 s (not 30): a short run shows the trials and the growth
        return {"AGENTMESH_FLAKY_AGENTS": "1", "AGENTMESH_EJECTION_BASE_S": "5"}
    return {}


def monitors_for(scenario: str) -> int:
    return 2 if scenario == "monitor-kill" else 1


def percentiles(values: Sequence[float]) -> dict[str, Any]:
    """Count, P50, P99 and max of `values` (seconds) from an HdrHistogram (exact to 0.1 %,
    up to an hour), rounded to the millisecond. Values under 1 µs (a negative lateness)
    count at 1 µs, and how many there were is said."""
    if not values:
        return {"n": 0}
    rec = LatencyRecorder.of_seconds("", values, highest_us=HOUR_US)
    p = rec.percentiles_ms((50.0, 99.0))
    out: dict[str, Any] = {
        "n": rec.count,
        "p50_s": round(p[50.0] / 1000, 3),
        "p99_s": round(p[99.0] / 1000, 3),
        "max_s": round(rec.max_ms() / 1000, 3),
    }
    if rec.clamped_low or rec.clamped_high:
        out["clamped"] = rec.clamped_low + rec.clamped_high
    return out


class HealthWatch:
    """The active monitor (found through GetStatus().services) and its events, followed
    across monitor failovers for the whole run."""

    def __init__(self, client: CoordinatorClient) -> None:
        self.client = client
        self.failed: dict[str, tuple[int, str]] = {}
        """agent id → (when, why) of its FAILED declaration."""
        self.breaker: dict[str, list[tuple[int, int]]] = {}
        """agent id → its breaker's moves (monitor wall clock µs, state)."""
        self.hung: dict[str, int] = {}
        """task id → when the monitor raised its hung-task alert."""
        self.reconnects = 0
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, endpoint: str) -> hpb_grpc.HealthMonitorStub:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
            self._channels[endpoint] = channel
        return hpb_grpc.HealthMonitorStub(channel)

    async def active(self) -> tuple[str, hpb.HealthSummary] | None:
        """(endpoint, summary) of the active monitor, or None while none answers."""
        try:
            status = await self.client.status()
        except RpcFailed:
            return None
        for svc in status.services:
            if svc.kind != "health":
                continue
            try:
                s = await self._stub(svc.endpoint).GetHealthSummary(
                    hpb.GetHealthSummaryRequest(), timeout=2.0
                )
                return svc.endpoint, s
            except grpc.aio.AioRpcError as err:
                for key, value in err.trailing_metadata() or ():
                    if key == LEADER_METADATA_KEY and value:
                        with contextlib.suppress(grpc.aio.AioRpcError):
                            s = await self._stub(str(value)).GetHealthSummary(
                                hpb.GetHealthSummaryRequest(), timeout=2.0
                            )
                            return str(value), s
        return None

    async def run(self) -> None:
        """Watch the active monitor's events; reopen on the next one when it goes."""
        while True:
            found = await self.active()
            if found is None:
                await asyncio.sleep(0.1)
                continue
            try:
                async for event in self._stub(found[0]).WatchHealth(hpb.WatchHealthRequest()):
                    self._on(event)
            except grpc.aio.AioRpcError:
                pass
            self.reconnects += 1
            await asyncio.sleep(0.05)

    def _on(self, event: hpb.HealthEvent) -> None:
        body = event.WhichOneof("body")
        if body == "change":
            c = event.change
            if c.state == hpb.HEALTH_STATE_FAILED and c.previous != c.state and not c.removed:
                self.failed.setdefault(c.agent_id, (event.at_us, c.reason))
            moves = self.breaker.setdefault(c.agent_id, [])
            if not moves or moves[-1][1] != c.breaker:
                moves.append((event.at_us, c.breaker))
        elif (
            body == "alert"
            and event.alert.kind == hpb.ALERT_KIND_HUNG_TASK
            and not event.alert.closed_at_us
        ):
            self.hung.setdefault(event.alert.task_id, event.alert.opened_at_us)

    async def failed_records(self) -> dict[str, str]:
        """The FAILED agents the active monitor holds now (records outlive a failover)."""
        found = await self.active()
        if found is None:
            return {}
        out: dict[str, str] = {}
        token = ""
        while True:
            resp = await self._stub(found[0]).ListAgentHealth(
                hpb.ListAgentHealthRequest(
                    states=[hpb.HEALTH_STATE_FAILED], page_size=1000, page_token=token
                ),
                timeout=5.0,
            )
            for a in resp.agents:
                out[a.agent_id] = a.reason
            token = resp.next_page_token
            if not token:
                return out

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(grace=None)


class HealthRun:
    """The faults and figures of one health scenario around a Driver run."""

    def __init__(
        self,
        scenario: str,
        client: CoordinatorClient,
        target: Target,
        *,
        agents: int,
        stall_limit_s: float,
        hang_every_s: float,
        block_s: float,
        monitor_kill_every_s: float,
    ) -> None:
        if scenario not in HEALTH_SCENARIOS:
            raise ValueError(f"{scenario!r} is not a health scenario")
        if scenario == "monitor-kill" and target.kill is None:
            raise TargetError("monitor-kill kills processes: it needs the harness's own cluster")
        self.scenario = scenario
        self.client = client
        self.target = target
        self.agents = agents
        self.stall_limit_s = stall_limit_s
        self.hang_every_s = hang_every_s
        self.block_s = block_s
        self.kill_every_s = monitor_kill_every_s
        self.watch = HealthWatch(client)
        self.hangs: dict[str, tuple[int, str]] = {}
        """hung task id → (its first assignment's time, the agent it hung on)."""
        self.frozen: dict[str, Any] = {}
        self.frozen_pools: list[tuple[str, float]] = []
        """(pool id, how long it froze): agents of these may rightly be FAILED."""
        self.kills: list[dict[str, Any]] = []
        self.failures: list[tuple[int, str]] = []
        """(client wall clock µs, agent id) of every failed attempt the coordinator retried."""
        self._tasks: list[asyncio.Task[Any]] = []
        self._pending: set[asyncio.Task[Any]] = set()

    # ---- wiring into the driver ----

    def actions(self, kill_at_s: float) -> list[Action]:
        out = [Action(0.2, f"{self.scenario} faults started", self._start)]
        if self.scenario == "hang" and self.block_s > 0:
            out.append(Action(kill_at_s, "pool frozen (SIMULATED blocking call)", self._freeze))
        return out

    async def _start(self, driver: Driver) -> dict[str, Any]:
        self._tasks.append(asyncio.ensure_future(self.watch.run()))
        if self.scenario == "hang":
            self._tasks.append(asyncio.ensure_future(self._inject_hangs(driver)))
        elif self.scenario == "monitor-kill":
            self._tasks.append(asyncio.ensure_future(self._kill_monitors(driver)))
        else:
            self._tasks.append(asyncio.ensure_future(self._watch_failures()))
        return {}

    async def close(self) -> None:
        for task in (*self._tasks, *self._pending):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._pending, return_exceptions=True)
        await self.watch.close()

    # ---- hang ----

    async def _inject_hangs(self, driver: Driver) -> None:
        payload = json.dumps({"attempts": 1, "ms": 10}).encode()
        n = 0
        while driver.elapsed() < driver.w.duration_s - 1.0 and driver.phase == "submitting":
            task_id = f"hang-{driver.run_id}-{n:04d}"
            n += 1
            try:
                await self.client.submit(
                    tpb.TaskSpec(task_id=task_id, kind="hang", payload=payload)
                )
            except RpcFailed as err:
                log.warning("hang task not submitted", extra={"error": str(err)})
            else:
                job = asyncio.ensure_future(self._first_assignment(task_id, self.hangs))
                self._pending.add(job)
                job.add_done_callback(self._pending.discard)
            await asyncio.sleep(self.hang_every_s)

    async def _first_assignment(self, task_id: str, into: dict[str, tuple[int, str]]) -> None:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            with contextlib.suppress(RpcFailed):
                t = await self.client.get_task(task_id)
                if t.state in HELD and t.agent_id:
                    into[task_id] = (t.assigned_at_us, t.agent_id)
                    return
            await asyncio.sleep(0.01)

    async def _freeze(self, driver: Driver) -> dict[str, Any]:
        from loadtest.scenarios import held_tasks

        task_id = f"block-{driver.run_id}"
        payload = json.dumps({"attempts": 1, "block_s": self.block_s}).encode()
        await self.client.submit(tpb.TaskSpec(task_id=task_id, kind="block", payload=payload))
        first: dict[str, tuple[int, str]] = {}
        await self._first_assignment(task_id, first)
        if task_id not in first:
            return {"error": "the blocking task was never assigned"}
        at_us, agent = first[task_id]
        pool = agent.rsplit("-a", 1)[0]
        agents = {a.agent_id for a in (await self.client.list_agents()).agents if a.pool_id == pool}
        held = await held_tasks(self.client, driver, agents)
        driver.track_reassignment(held, driver.clock.monotonic(), at_us)
        self.frozen_pools.append((pool, self.block_s))
        self.frozen = {"task": task_id, "pool": pool, "agent": agent, "at_us": at_us}
        return {"frozen_pool": pool, "tasks_held": len(held), "block_s": self.block_s}

    # ---- flaky ----

    async def _watch_failures(self) -> None:
        states = [tpb.TASK_STATE_QUEUED, tpb.TASK_STATE_DEAD_LETTER]
        while True:
            call = self.client.watch_events(states)
            try:
                async for event in call:
                    if event.previous_state == tpb.TASK_STATE_FAILED or (
                        event.task.state == tpb.TASK_STATE_DEAD_LETTER
                    ):
                        self.failures.append((time.time_ns() // 1000, event.task.agent_id))
            except grpc.aio.AioRpcError:
                pass
            finally:
                call.cancel()
            await asyncio.sleep(0.1)

    # ---- monitor-kill ----

    async def _kill_monitors(self, driver: Driver) -> None:
        kill, restart = self.target.kill, self.target.restart
        assert kill is not None
        while driver.elapsed() + self.kill_every_s < driver.w.duration_s:
            await asyncio.sleep(self.kill_every_s)
            found = await self.watch.active()
            if found is None:
                continue
            old = found[1]
            if old.reporting < self.agents:
                continue  # the last switch has not settled: no figure to take
            t0 = time.monotonic()
            await kill(old.monitor_id)
            facts: dict[str, Any] = {"killed": old.monitor_id, "term": old.term}
            while time.monotonic() - t0 < 30.0:
                now = await self.watch.active()
                if now is not None and now[1].term > old.term:
                    facts.setdefault("active_s", round(time.monotonic() - t0, 3))
                    if now[1].reporting >= self.agents:
                        facts["all_reporting_s"] = round(time.monotonic() - t0, 3)
                        facts["failed_declared"] = now[1].failed_declared
                        break
                await asyncio.sleep(0.02)
            self.kills.append(facts)
            if restart is not None:
                await restart(old.monitor_id)

    # ---- figures ----

    async def finish(self, driver: Driver) -> dict[str, Any]:
        """After the driver's run: settle the injected tasks, then the figures."""
        out: dict[str, Any] = {}
        try:
            if self.scenario == "hang":
                out.update(await self._hang_figures(driver))
            elif self.scenario == "flaky":
                out.update(await self._flaky_figures())
            else:
                out["monitor_failover_active"] = percentiles(
                    [k["active_s"] for k in self.kills if "active_s" in k]
                )
                out["monitor_failover_all_reporting"] = percentiles(
                    [k["all_reporting_s"] for k in self.kills if "all_reporting_s" in k]
                )
                out["monitor_kills"] = len(self.kills)
                for k in self.kills:
                    for name in ("active_s", "all_reporting_s"):
                        if name in k:
                            driver.metrics.add_sample(f"monitor_{name}", k[name])
            records = {}
            with contextlib.suppress(grpc.aio.AioRpcError):
                records = await self.watch.failed_records()
            failed = dict(self.watch.failed)
            for agent_id, why in records.items():
                failed.setdefault(agent_id, (0, why))
            rightly = {
                a
                for a in failed
                if any(a.startswith(p + "-") and s >= FAILED_AFTER_S for p, s in self.frozen_pools)
            }
            wrongly = sorted(set(failed) - rightly)
            out["failed_declared"] = {
                "agents": len(failed),
                "wrongly": len(wrongly),
                "examples": {a: failed[a][1] for a in wrongly[:5]},
            }
        finally:
            await self.close()
        return out

    async def _settled(self, task_id: str) -> Any:
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            t = await self.client.get_task(task_id)
            if t.state in TERMINAL or time.monotonic() > deadline:
                return t
            await asyncio.sleep(0.2)

    async def _hang_figures(self, driver: Driver) -> dict[str, Any]:
        to_elsewhere: list[float] = []
        detected_to_elsewhere: list[float] = []
        detection_late: list[float] = []
        wrong = 0
        same_agent = 0
        rows: list[dict[str, Any]] = []
        origin = min((f for f, _ in self.hangs.values()), default=0)
        for task_id, (first_us, agent) in sorted(self.hangs.items()):
            t = await self._settled(task_id)
            if t.state != tpb.TASK_STATE_SUCCEEDED or t.attempts < 2:
                wrong += 1
                continue
            if t.agent_id == agent:
                same_agent += 1
            took = (t.assigned_at_us - first_us) / 1e6
            to_elsewhere.append(took)
            driver.metrics.add_sample("hang_to_elsewhere_s", took)
            opened = self.watch.hung.get(task_id)
            row: dict[str, Any] = {
                "task": task_id,
                "at_s": round((first_us - origin) / 1e6, 3),
                "took_s": round(took, 3),
            }
            if opened:
                detected_to_elsewhere.append((t.assigned_at_us - opened) / 1e6)
                detection_late.append((opened - first_us) / 1e6 - self.stall_limit_s)
                row["detected_late_s"] = round(detection_late[-1], 3)
                row["detected_to_elsewhere_s"] = round(detected_to_elsewhere[-1], 3)
            rows.append(row)
        out: dict[str, Any] = {
            "stall_limit_s": self.stall_limit_s,
            "hang_to_elsewhere": percentiles(to_elsewhere),
            "detected_to_elsewhere": percentiles(detected_to_elsewhere),
            "detected_after_stall_limit": percentiles(detection_late),
            "hung_tasks": {
                "injected": len(self.hangs),
                "not_succeeded_after_a_retry": wrong,
                "retried_on_the_same_agent": same_agent,
            },
            "slowest_hangs": sorted(rows, key=lambda r: -float(r["took_s"]))[:3],
        }
        if self.frozen:
            t = await self._settled(self.frozen["task"])
            r = driver.reassignments[0] if driver.reassignments else None
            out["frozen_pool"] = {
                "pool": self.frozen["pool"],
                "block_s": self.block_s,
                "blocking_task_elsewhere_s": round(
                    (t.assigned_at_us - self.frozen["at_us"]) / 1e6, 3
                )
                if t.state == tpb.TASK_STATE_SUCCEEDED and t.attempts >= 2
                else None,
                "at_s": round((self.frozen["at_us"] - origin) / 1e6, 3),
                "tasks_held": len(r.victims) if r else 0,
                "tasks_to_elsewhere": percentiles(sorted(r.reassigned.values()) if r else []),
                "finished_by_frozen_pool": len(r.finished_by_victim) if r else 0,
            }
        return out

    async def _flaky_figures(self) -> dict[str, Any]:
        flaky = sorted({a for _, a in self.failures if a.endswith("-a0001")})
        per_agent: dict[str, Any] = {}
        to_ejection: list[float] = []
        for agent_id in flaky:
            moves = self.watch.breaker.get(agent_id, [])
            opens = [t for t, b in moves if b == hpb.BREAKER_STATE_OPEN]
            mine = [t for t, a in self.failures if a == agent_id]
            facts: dict[str, Any] = {
                "failed_attempts": len(mine),
                "ejections": len(opens),
                "trials": sum(1 for _, b in moves if b == hpb.BREAKER_STATE_HALF_OPEN),
                "closed_after_trial": sum(1 for _, b in moves if b == hpb.BREAKER_STATE_CLOSED),
            }
            if opens and mine:
                # a failure is retried (and seen here) a few ms after the agent said so
                n = sum(1 for t in mine if t <= opens[0] + 100_000)
                facts["failed_before_ejection"] = n
                facts["first_failure_to_ejection_s"] = round((opens[0] - min(mine)) / 1e6, 3)
                to_ejection.append((opens[0] - min(mine)) / 1e6)
            per_agent[agent_id] = facts
        others = sum(1 for _, a in self.failures if a not in flaky)
        return {
            "flaky_agents": per_agent,
            "first_failure_to_ejection": percentiles(to_ejection),
            "failed_attempts_on_other_agents": others,
        }
