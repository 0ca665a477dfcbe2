"""Heartbeats from every agent of a pool to the active health monitor, and its directives.

Each agent has its own `HealthMonitor.Report` stream (all of a pool's share one HTTP/2
connection). The pool follows the monitor's election in etcd and moves the streams
when the active monitor changes, as agents do for the coordinator. A heartbeat
carries, per task in flight, its start and last progress; the tasks finished since
the last heartbeat with their latencies and errors; and the pool process's RSS and
CPU from /proc. Directives (pause, resume, drain, replace) go to the pool.

What an agent is running is learnt by wrapping the pool's executors (`TaskTracker.wrap`),
so the agent itself needs no hook. The wrapper also sees the executor's `progress`
callback (a streamed token, a finished step): a task that reports no progress for the
monitor's stall limit counts as hung.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from protos.agentmesh.v1 import health_pb2 as hpb
from protos.agentmesh.v1 import health_pb2_grpc as hpb_grpc
from protos.agentmesh.v1 import task_pb2 as tpb
from registry.election import current_leader, observe
from registry.errors import StoreUnavailableError
from registry.etcd import Etcd
from registry.leadership import parse_leader_value
from services._common.grpcserver import OPTIONS
from services.agent_pool.executors import Executor, ExecutorError, Outcome, Progress

log = logging.getLogger(__name__)

MAX_OUTCOMES = 64
URGENT_GAP_S = 0.01
"""At most one early heartbeat (after failures) per this long per agent."""
MAX_ERROR_BYTES = 512
PROCESS_STATS_EVERY_S = 0.5
FOLLOW_CHECK_S = 2.0
SILENT_WARN_S = 5.0
"""An agent whose heartbeats have not gone out for this long says so in the log."""
CHANNEL_OPTIONS = [
    *OPTIONS,
    # gRPC's default reconnect backoff grows to 120 s: a monitor that comes back (or a
    # new one on a reused port) would be unreachable for minutes after a few failures
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def _now_us() -> int:
    return time.time_ns() // 1000


# ---------------------------------------------------------------- what agents run


@dataclass(slots=True)
class _Running:
    token: int
    started_us: int
    timeout_s: float
    progress_us: int = 0


@dataclass
class AgentTrack:
    """One agent's tasks in flight, and how its tasks ended since the last heartbeat."""

    running: dict[str, _Running] = field(default_factory=dict)
    outcomes: collections.deque[hpb.TaskOutcome] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_OUTCOMES)
    )
    urgent: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a task failed: the next heartbeat leaves at once."""

    def progress(self, task_id: str) -> None:
        run = self.running.get(task_id)
        if run is not None:
            run.progress_us = _now_us()

    def take_outcomes(self) -> list[hpb.TaskOutcome]:
        out = list(self.outcomes)
        self.outcomes.clear()
        return out


class TaskTracker:
    """Every agent of the pool: its tasks in flight and outcomes, read by the heartbeats.

    Args:
        default_timeout_s: the pool's deadline for a task that sets none.
        flaky: agent id → True if that agent must fail every task (a SIMULATED fault).
    """

    def __init__(
        self, default_timeout_s: float, flaky: Callable[[str], bool] = lambda _: False
    ) -> None:
        self.default_timeout_s = default_timeout_s
        self.flaky = flaky
        self.agents: dict[str, AgentTrack] = {}

    def track(self, agent_id: str) -> AgentTrack:
        track = self.agents.get(agent_id)
        if track is None:
            track = self.agents[agent_id] = AgentTrack()
        return track

    def forget(self, agent_id: str) -> None:
        self.agents.pop(agent_id, None)

    def wrap(self, executors: Mapping[str, Executor]) -> dict[str, Executor]:
        return {kind: _Tracked(inner, self) for kind, inner in executors.items()}


class _Tracked:
    """An executor that tells the tracker when a task starts, moves and ends."""

    def __init__(self, inner: Executor, tracker: TaskTracker) -> None:
        self.inner = inner
        self.tracker = tracker

    async def run(self, task: tpb.Task, progress: Progress | None = None) -> Outcome:
        tracker = self.tracker
        track = tracker.track(task.agent_id)
        timeout_s = task.spec.timeout_s or tracker.default_timeout_s
        t0 = time.monotonic()
        track.running[task.task_id] = _Running(task.claim_token, _now_us(), timeout_s)

        def moved(fraction: float, message: str) -> None:
            track.progress(task.task_id)
            if progress is not None:
                progress(fraction, message)

        ok, error, retryable = False, "", True
        try:
            if tracker.flaky(task.agent_id):
                raise ExecutorError(
                    "SIMULATED fault: this agent fails every task (pool flaky_agents)",
                    retryable=True,
                )
            out = await self.inner.run(task, moved)
            ok = True
            return out
        except asyncio.CancelledError:
            if time.monotonic() - t0 < timeout_s * 0.99:
                error = ""  # cancelled (released, stopped): not the agent's failure
            else:
                error = f"timed out after {timeout_s:g} s"
            raise
        except ExecutorError as err:
            error, retryable = str(err), err.retryable
            raise
        except Exception as err:
            error = f"executor crashed: {type(err).__name__}: {err}"
            raise
        finally:
            held = track.running.get(task.task_id)
            if held is not None and held.token == task.claim_token:
                del track.running[task.task_id]
            if error:
                track.urgent.set()
            if ok or error:
                track.outcomes.append(
                    hpb.TaskOutcome(
                        task_id=task.task_id,
                        ok=ok,
                        latency_ms=(time.monotonic() - t0) * 1000.0,
                        error=_cut(error),
                        retryable=retryable,
                    )
                )


def _cut(text: str, limit: int = MAX_ERROR_BYTES) -> str:
    raw = text.encode()
    return text if len(raw) <= limit else raw[:limit].decode(errors="ignore")


# ---------------------------------------------------------------- the process


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def read_process_stats() -> tuple[int, float]:
    """(RSS bytes, CPU seconds) of this process, from /proc (os.times() without it)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            rss = int(f.read().split()[1]) * _PAGE
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return rss, (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, ValueError, IndexError):
        t = os.times()
        return 0, t.user + t.system


# ---------------------------------------------------------------- the streams


class Heartbeater:
    """One Report stream per agent of the pool, to whichever monitor etcd names active.

    Args:
        etcd: the pool's etcd client (to follow the monitor's election).
        pool_id: the pool's id.
        tracker: what each agent runs.
        agents: the pool's agents now (agent id → (Agent, task)); an agent that leaves
            this mapping says goodbye on its stream (a `leaving` heartbeat).
        on_directive: the pool's handler of drain and replace (pause and resume are
            kept here and reported in the heartbeats).
        interval_s: heartbeat period until the monitor's welcome says otherwise.
    """

    def __init__(
        self,
        etcd: Etcd,
        pool_id: str,
        tracker: TaskTracker,
        agents: Callable[[], Mapping[str, Any]],
        on_directive: Callable[[str, hpb.HealthDirective], None],
        interval_s: float = 1.0,
    ) -> None:
        self.etcd = etcd
        self.pool_id = pool_id
        self.tracker = tracker
        self.agents = agents
        self.on_directive = on_directive
        self.interval_s = interval_s
        self.incarnation = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.paused: set[str] = set()
        self.replaces: dict[str, str] = {}
        """A replacement's agent id → the agent it replaced (told to the monitor)."""
        self._leader = ""
        self._leader_changed = asyncio.Event()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing_channels: set[asyncio.Task[None]] = set()
        self._streams: dict[str, asyncio.Task[None]] = {}
        self._sent: dict[str, float] = {}
        """agent id → when its last heartbeat went out (monotonic)."""
        self._last_error = ""
        self._warned = False
        self._closing = asyncio.Event()
        self._stats = (0, 0.0)
        self._stats_at = 0.0

    async def run(self) -> None:
        """Follow the monitor and keep one stream per agent; until cancelled."""
        follow = asyncio.ensure_future(self._follow())
        try:
            while not self._closing.is_set():
                for agent_id, held in tuple(self.agents().items()):
                    stream = self._streams.get(agent_id)
                    if stream is None or stream.done():
                        agent = held[0] if isinstance(held, tuple) else held
                        self._streams[agent_id] = asyncio.ensure_future(self._agent_loop(agent))
                self._warn_if_silent()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), self.interval_s)
        finally:
            follow.cancel()
            for task in self._streams.values():
                task.cancel()
            await asyncio.gather(follow, *self._streams.values(), return_exceptions=True)
            for channel in self._channels.values():
                await channel.close()
            await asyncio.gather(*self._closing_channels, return_exceptions=True)

    def _warn_if_silent(self) -> None:
        """Once per episode: agents whose heartbeats have not gone out for SILENT_WARN_S
        (a monitor that stays out of reach must show in the pool's log)."""
        now = time.monotonic()
        silent = [a for a, t in self._sent.items() if now - t > SILENT_WARN_S]
        if silent and not self._warned:
            self._warned = True
            log.warning(
                "agents cannot report to the health monitor",
                extra={
                    "agents": len(silent),
                    "example": silent[0],
                    "monitor": self._leader or "none known",
                    "error": self._last_error,
                },
            )
        elif not silent and self._warned:
            self._warned = False
            log.info("every agent reports to the health monitor again")

    async def close(self, timeout_s: float = 2.0) -> None:
        """Say goodbye on every stream (the pool stops on purpose), bounded."""
        self._closing.set()
        streams = [t for t in self._streams.values() if not t.done()]
        if streams:
            await asyncio.wait(streams, timeout=timeout_s)

    # ---- the monitor ----

    async def _follow(self) -> None:
        """Follow the monitor's election, and read it again every FOLLOW_CHECK_S: a
        watch that died quietly must cost seconds, not every agent's FAILED."""
        check = asyncio.ensure_future(self._check_leader())
        try:
            while True:
                try:
                    async for leader in observe(self.etcd, "health"):
                        self._set_leader(parse_leader_value(leader.value)[1] if leader else "")
                except StoreUnavailableError:
                    await asyncio.sleep(0.5)
                except Exception:  # noqa: BLE001 - following must never stop
                    log.warning("following the health monitor failed; again", exc_info=True)
                    await asyncio.sleep(0.5)
        finally:
            check.cancel()

    async def _check_leader(self) -> None:
        while True:
            await asyncio.sleep(FOLLOW_CHECK_S)
            try:
                leader = await current_leader(self.etcd, "health")
            except Exception:  # noqa: BLE001 - the watch is the main path; try again later
                continue
            self._set_leader(parse_leader_value(leader.value)[1] if leader else "")

    def _set_leader(self, endpoint: str) -> None:
        if endpoint != self._leader:
            self._leader = endpoint
            log.info("health monitor", extra={"monitor": endpoint or "none"})
            self._leader_changed.set()
            self._leader_changed = asyncio.Event()
            # the streams move to the new monitor; a fresh channel for whatever comes next
            for old in [e for e in self._channels if e != endpoint]:
                channel = self._channels.pop(old)
                task = asyncio.ensure_future(channel.close(grace=1.0))
                self._closing_channels.add(task)
                task.add_done_callback(self._closing_channels.discard)

    def _stub(self, endpoint: str) -> hpb_grpc.HealthMonitorStub:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
            self._channels[endpoint] = channel
        return hpb_grpc.HealthMonitorStub(channel)

    # ---- one agent ----

    async def _agent_loop(self, agent: Any) -> None:
        agent_id = agent.agent_id
        delay = 0.05
        seq = 0
        self._sent[agent_id] = time.monotonic()
        try:
            while agent_id in self.agents() and not self._closing.is_set():
                endpoint = self._leader
                changed = self._leader_changed
                if endpoint:
                    try:
                        seq = await self._session(agent, endpoint, seq)
                        delay = 0.05
                    except Exception as err:  # noqa: BLE001 - any failed stream: reconnect
                        self._last_error = repr(err)
                        log.debug(
                            "report stream ended", extra={"agent": agent_id, "error": repr(err)}
                        )
                # jittered backoff; a new monitor ends it at once
                wait = delay / 2 + random.uniform(0, delay / 2)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), wait if endpoint else None)
                delay = min(delay * 2, 1.0)
        finally:
            if agent_id not in self.agents():
                self._sent.pop(agent_id, None)
                self.tracker.forget(agent_id)
                self.paused.discard(agent_id)
                self.replaces.pop(agent_id, None)

    async def _session(self, agent: Any, endpoint: str, seq: int) -> int:
        """One stream: heartbeats every interval until the monitor ends it, another
        monitor is elected, or the agent leaves (then a last `leaving` heartbeat)."""
        agent_id = agent.agent_id
        call = self._stub(endpoint).Report()
        reader = asyncio.ensure_future(self._read(agent_id, call))
        closing = asyncio.ensure_future(self._closing.wait())
        moved = asyncio.ensure_future(self._leader_changed.wait())
        try:
            seq += 1
            await call.write(self._heartbeat(agent, seq, 0.0, first=True))
            self._sent[agent_id] = time.monotonic()
            next_at = time.monotonic()
            track = self.tracker.track(agent_id)
            while True:
                next_at += self.interval_s
                while True:  # until the next heartbeat is due, sending early ones on failures
                    sleep = asyncio.ensure_future(
                        asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    )
                    urgent = asyncio.ensure_future(track.urgent.wait())
                    done, _ = await asyncio.wait(
                        {sleep, reader, moved, closing, urgent},
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    sleep.cancel()
                    urgent.cancel()
                    if reader in done:
                        reader.result()  # the monitor ended the stream: raise why
                        return seq
                    if moved in done:
                        if self._leader != endpoint:
                            return seq  # a new active monitor: reconnect there at once
                        moved = asyncio.ensure_future(self._leader_changed.wait())
                    if sleep in done or closing in done:
                        break
                    if urgent in done:
                        # a task failed: say so now, not up to an interval later, or an agent
                        # that fails fast burns through the queue before the breaker can act
                        track.urgent.clear()
                        seq += 1
                        await call.write(self._heartbeat(agent, seq, 0.0))
                        await asyncio.sleep(URGENT_GAP_S)
                lag = max(0.0, time.monotonic() - next_at)
                if lag > self.interval_s:
                    next_at = time.monotonic()  # after a frozen loop: no burst to catch up
                seq += 1
                leaving = agent_id not in self.agents() or self._closing.is_set()
                await call.write(self._heartbeat(agent, seq, lag, leaving=leaving))
                self._sent[agent_id] = time.monotonic()
                if leaving:
                    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        await call.done_writing()
                    return seq
        finally:
            for task in (reader, closing, moved):
                task.cancel()
            call.cancel()

    async def _read(self, agent_id: str, call: Any) -> None:
        async for directive in call:
            body = directive.WhichOneof("body")
            if body == "welcome":
                if directive.welcome.heartbeat_interval_s > 0:
                    self.interval_s = directive.welcome.heartbeat_interval_s
            elif body == "redirect":
                if directive.redirect.monitor_endpoint:
                    self._set_leader(directive.redirect.monitor_endpoint)
            elif body == "pause":
                self.paused.add(agent_id)
                log.warning(
                    "health monitor paused the agent",
                    extra={"agent": agent_id, "reason": directive.pause.reason},
                )
            elif body == "resume":
                self.paused.discard(agent_id)
                log.info(
                    "health monitor resumed the agent",
                    extra={"agent": agent_id, "reason": directive.resume.reason},
                )
            else:
                self.on_directive(agent_id, directive)

    def _heartbeat(
        self, agent: Any, seq: int, lag_s: float, *, first: bool = False, leaving: bool = False
    ) -> hpb.Heartbeat:
        now = time.monotonic()
        if now - self._stats_at >= PROCESS_STATS_EVERY_S:
            self._stats, self._stats_at = read_process_stats(), now
        track = self.tracker.track(agent.agent_id)
        hb = hpb.Heartbeat(
            agent_id=agent.agent_id,
            sent_at_us=_now_us(),
            seq=seq,
            tasks=[
                hpb.TaskInFlight(
                    task_id=task_id,
                    claim_token=run.token,
                    started_at_us=run.started_us,
                    last_progress_at_us=run.progress_us,
                    timeout_s=run.timeout_s,
                )
                for task_id, run in tuple(track.running.items())[:1000]
            ],
            outcomes=track.take_outcomes(),
            completed=agent.completed,
            failed=agent.failed,
            loop_lag_ms=min(lag_s * 1000.0, 3_600_000.0),
            process=hpb.ProcessStats(
                rss_bytes=self._stats[0], cpu_seconds=self._stats[1], agents=len(self.agents())
            ),
            paused=agent.agent_id in self.paused,
            draining=bool(agent.draining),
            leaving=leaving,
        )
        if first:
            t = agent.template
            hb.info.CopyFrom(
                hpb.AgentInfo(
                    pool_id=self.pool_id,
                    incarnation=self.incarnation,
                    kinds=list(t.kinds)[:32],
                    roles=list(t.roles)[:32],
                    labels=dict(list(t.labels.items())[:32]),
                    capacity=min(max(t.capacity, 1), 1000),
                    replaces=self.replaces.get(agent.agent_id, ""),
                )
            )
        return hb
