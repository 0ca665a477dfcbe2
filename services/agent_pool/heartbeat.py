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
import itertools
import logging
import os
import random
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from protos.agentmesh.v1 import health_pb2 as hpb
from protos.agentmesh.v1 import health_pb2_grpc as hpb_grpc
from protos.agentmesh.v1 import task_pb2 as tpb
from registry.etcd import Etcd
from services._common.clock import Clock
from services._common.follow import Leader, reconnecting
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
PHASES = 10
"""Heartbeat phases per interval (see `spread`). Spread continuously, every heartbeat is
a wake-up of its own in the pool and the monitor: at 200 agents about 0.1 cores more
than all in one burst (measured at 100 tasks/s). In ten phases the beats of a phase
share their wake-ups: about 0.035 cores more, with bursts of a tenth of the agents."""
CHANNEL_OPTIONS = [
    *OPTIONS,
    # gRPC's default reconnect backoff grows to 120 s: a monitor that comes back (or a
    # new one on a reused port) would be unreachable for minutes after a few failures
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


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

    def progress(self, task_id: str, now_us: int) -> None:
        run = self.running.get(task_id)
        if run is not None:
            run.progress_us = now_us

    def take_outcomes(self) -> list[hpb.TaskOutcome]:
        out = list(self.outcomes)
        self.outcomes.clear()
        return out


class TaskTracker:
    """Every agent of the pool: its tasks in flight and outcomes, read by the heartbeats.

    Args:
        default_timeout_s: the pool's deadline for a task that sets none.
        clock: injected time.
        flaky: agent id → True if that agent must fail every task (a SIMULATED fault).
    """

    def __init__(
        self,
        default_timeout_s: float,
        clock: Clock,
        flaky: Callable[[str], bool] = lambda _: False,
    ) -> None:
        self.default_timeout_s = default_timeout_s
        self.clock = clock
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
        clock = tracker.clock
        track = tracker.track(task.agent_id)
        timeout_s = task.spec.timeout_s or tracker.default_timeout_s
        t0 = clock.monotonic()
        track.running[task.task_id] = _Running(task.claim_token, clock.wall_us(), timeout_s)

        def moved(fraction: float, message: str) -> None:
            track.progress(task.task_id, clock.wall_us())
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
            if clock.monotonic() - t0 < timeout_s * 0.99:
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
                        latency_ms=(clock.monotonic() - t0) * 1000.0,
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


def spread(now: float, interval_s: float, rng: random.Random) -> float:
    """The origin of a stream's heartbeat schedule (the first periodic one is due an
    interval after it): one of PHASES points of the interval before `now`, drawn.

    A pool starts the streams of the agents it spawned together in one pass, so on a
    common origin all of its agents would beat in the same millisecond, every interval:
    a burst of hundreds of messages through the pool and the monitor that tasks
    arriving then wait behind (it set the tail of the task latency at light load).
    """
    return now - rng.randrange(PHASES) / PHASES * interval_s


class Heartbeater:
    """One Report stream per agent of the pool, to whichever monitor etcd names active.

    Args:
        etcd: the pool's etcd client (to follow the monitor's election).
        pool_id: the pool's id.
        tracker: what each agent runs.
        agents: the pool's agents now (agent id → Agent); an agent that leaves this
            mapping says goodbye on its stream (a `leaving` heartbeat).
        on_directive: the pool's handler of drain and replace (pause and resume are
            kept here and reported in the heartbeats).
        clock: injected time.
        interval_s: heartbeat period until the monitor's welcome says otherwise.
        rng: picks each stream's phase within the interval (see `spread`).
        replaces: a replacement's agent id → the agent it replaced: the pool's own map
            (it fills it on a `replace` directive), told in each new stream's `info`.
    """

    def __init__(
        self,
        etcd: Etcd,
        pool_id: str,
        tracker: TaskTracker,
        agents: Callable[[], Mapping[str, Any]],
        on_directive: Callable[[str, hpb.HealthDirective], None],
        clock: Clock,
        interval_s: float = 1.0,
        rng: random.Random | None = None,
        replaces: dict[str, str] | None = None,
    ) -> None:
        self.pool_id = pool_id
        self.rng = rng or random.Random()
        self.tracker = tracker
        self.agents = agents
        self.on_directive = on_directive
        self.clock = clock
        self.interval_s = interval_s
        # the check on top of the watch: a watch that died quietly must cost seconds,
        # not every agent's FAILED
        self.monitor = Leader(
            etcd,
            "health",
            clock,
            options=CHANNEL_OPTIONS,
            recheck_s=FOLLOW_CHECK_S,
            close_stale=True,
        )
        self.incarnation = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.paused: set[str] = set()
        self.replaces: dict[str, str] = {} if replaces is None else replaces
        """A replacement's agent id → the agent it replaced (told to the monitor)."""
        self._streams: dict[str, asyncio.Task[None]] = {}
        self._reporting: set[str] = set()
        """Agents whose Report stream is open now."""
        self._sent: dict[str, float] = {}
        """agent id → when its last heartbeat went out (clock time)."""
        self._last_error = ""
        self._warned = False
        self._closing = asyncio.Event()
        self._stats = (0, 0.0)
        self._stats_at = -float("inf")

    async def run(self) -> None:
        """Follow the monitor and keep one stream per agent; until cancelled."""
        follow = asyncio.ensure_future(self.monitor.follow())
        try:
            while not self._closing.is_set():
                for agent_id, agent in tuple(self.agents().items()):
                    stream = self._streams.get(agent_id)
                    if stream is None or stream.done():
                        self._streams[agent_id] = asyncio.ensure_future(self._agent_loop(agent))
                self._warn_if_silent()
                with contextlib.suppress(TimeoutError):
                    await self.clock.wait_for(self._closing.wait(), self.interval_s)
            # closing: an open stream sends its goodbye and ends by itself (`close` bounds
            # the wait, the runner then cancels this job). Cancelled here, as the event that
            # woke this loop wakes them, they never sent it: a pool stopped with SIGTERM had
            # its agents declared FAILED and replaced. One waiting to reconnect has nobody
            # to tell (with no monitor it would wait out the bound).
            for agent_id, stream in self._streams.items():
                if agent_id not in self._reporting:
                    stream.cancel()
            await asyncio.gather(*self._streams.values(), return_exceptions=True)
        finally:
            follow.cancel()
            for task in self._streams.values():
                task.cancel()
            await asyncio.gather(follow, *self._streams.values(), return_exceptions=True)
            await self.monitor.close()

    def _warn_if_silent(self) -> None:
        """Once per episode: agents whose heartbeats have not gone out for SILENT_WARN_S
        (a monitor that stays out of reach must show in the pool's log)."""
        now = self.clock.monotonic()
        silent = [a for a, t in self._sent.items() if now - t > SILENT_WARN_S]
        if silent and not self._warned:
            self._warned = True
            log.warning(
                "agents cannot report to the health monitor",
                extra={
                    "agents": len(silent),
                    "example": silent[0],
                    "monitor": self.monitor.endpoint or "none known",
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
            with contextlib.suppress(TimeoutError):
                await self.clock.wait_for(asyncio.wait(streams), timeout_s)

    # ---- one agent ----

    async def _agent_loop(self, agent: Any) -> None:
        agent_id = agent.agent_id
        seqs = itertools.count(1)
        self._sent[agent_id] = self.clock.monotonic()

        async def session(endpoint: str) -> bool:
            await self._session(agent, endpoint, seqs)
            return True

        def failed(err: Exception) -> None:
            self._last_error = repr(err)
            log.debug("report stream ended", extra={"agent": agent_id, "error": repr(err)})

        try:
            await reconnecting(
                self.monitor,
                session,
                alive=lambda: agent_id in self.agents() and not self._closing.is_set(),
                on_error=failed,
            )
        finally:
            if agent_id not in self.agents():
                self._sent.pop(agent_id, None)
                self.tracker.forget(agent_id)
                self.paused.discard(agent_id)
                self.replaces.pop(agent_id, None)

    async def _session(self, agent: Any, endpoint: str, seqs: Iterator[int]) -> None:
        """One stream: heartbeats every interval until the monitor ends it, another
        monitor is elected, or the agent leaves (then a last `leaving` heartbeat)."""
        agent_id = agent.agent_id
        clock = self.clock
        call = hpb_grpc.HealthMonitorStub(self.monitor.channel(endpoint)).Report()
        self._reporting.add(agent_id)
        reader = asyncio.ensure_future(self._read(agent_id, call))
        closing = asyncio.ensure_future(self._closing.wait())
        moved = asyncio.ensure_future(self.monitor.moved_from(endpoint))
        try:
            await call.write(self._heartbeat(agent, next(seqs), 0.0, first=True))
            self._sent[agent_id] = clock.monotonic()
            next_at = spread(clock.monotonic(), self.interval_s, self.rng)
            track = self.tracker.track(agent_id)
            while True:
                next_at += self.interval_s
                while True:  # until the next heartbeat is due, sending early ones on failures
                    sleep = asyncio.ensure_future(
                        clock.sleep(max(0.0, next_at - clock.monotonic()))
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
                        return
                    if moved in done:
                        return  # a new active monitor: reconnect there at once
                    if sleep in done or closing in done:
                        break
                    if urgent in done:
                        # a task failed: say so now, not up to an interval later, or an agent
                        # that fails fast burns through the queue before the breaker can act
                        track.urgent.clear()
                        await call.write(self._heartbeat(agent, next(seqs), 0.0))
                        await clock.sleep(URGENT_GAP_S)
                lag = max(0.0, clock.monotonic() - next_at)
                if lag > self.interval_s:  # after a frozen loop: no burst to catch up
                    next_at = spread(clock.monotonic(), self.interval_s, self.rng)
                leaving = agent_id not in self.agents() or self._closing.is_set()
                await call.write(self._heartbeat(agent, next(seqs), lag, leaving=leaving))
                self._sent[agent_id] = clock.monotonic()
                if leaving:
                    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        await call.done_writing()
                    return
        finally:
            self._reporting.discard(agent_id)
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
                    self.monitor.redirected(directive.redirect.monitor_endpoint)
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
        now = self.clock.monotonic()
        if now - self._stats_at >= PROCESS_STATS_EVERY_S:
            self._stats, self._stats_at = read_process_stats(), now
        track = self.tracker.track(agent.agent_id)
        hb = hpb.Heartbeat(
            agent_id=agent.agent_id,
            sent_at_us=self.clock.wall_us(),
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
