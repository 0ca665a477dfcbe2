"""The agentmesh side of a run: submit, watch, measure, and check exactly-once.

Clients submit with SubmitBatch (or Submit when the batch size is 1) in closed
loop (a fixed number of tasks in flight) or open loop (a schedule: a rate or
bursts), and learn outcomes from one WatchEvents stream. Measurements:

- dispatch: `Task.received_at_us` (the agent's wall clock on receiving the
  assignment) minus the client's wall clock when the submit was acknowledged.
  Same host, same clock; an agent can beat the acknowledgement back to the
  client, and such negative samples are counted (`clamped_low`), not hidden;
- submit to receive: the same agent time minus the wall clock just before the
  submit RPC: never negative, an upper bound of dispatch;
- end to end: the client's monotonic clock from just before the submit RPC to
  the terminal event's arrival;
- throughput: terminal events per 1 s bucket.

A gap in the event stream (a reconnect, a failover) is covered by re-reading
the tasks still in flight with GetTask, so a missed event never stalls the
closed loop. The run ends with a scan of the store: every acknowledged id must
be in exactly one terminal state, and no id may have been completed twice
(two SUCCEEDED events under different claim tokens, or two different terminal
states).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from loadtest.client import CoordinatorClient, RpcFailed
from loadtest.metrics import RunMetrics
from loadtest.result import Marker, RunResult
from loadtest.workload import (
    BurstSchedule,
    ProgressSink,
    ProgressSnapshot,
    RateSchedule,
    Schedule,
    Workload,
    task_id,
)
from protos.agentmesh.v1 import task_pb2 as tpb

log = logging.getLogger(__name__)

S = tpb
TERMINAL = frozenset({S.TASK_STATE_SUCCEEDED, S.TASK_STATE_CANCELLED, S.TASK_STATE_DEAD_LETTER})
HELD = frozenset({S.TASK_STATE_ASSIGNED, S.TASK_STATE_RUNNING})

WARMUP_TIMEOUT_S = 20.0
FINAL_CHECK_TIMEOUT_S = 120.0
POLL_INTERVAL_S = 1.0
POLL_BATCH = 256
RESYNC_AFTER_S = (0.05, 0.5, 1.5)
"""After the event stream reopens: when to re-read every task in flight."""
MAX_OPEN_LOOP_RPCS = 64
"""Open loop: submit RPCs in flight at once. Past this the pacer waits and counts late tasks."""
LATE_AFTER_S = 0.01


def state_name(state: int) -> str:
    return str(tpb.TaskState.Name(state)).removeprefix("TASK_STATE_")


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def wall_us(self) -> int: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall_us(self) -> int:
        return time.time_ns() // 1000


@dataclass(frozen=True)
class Action:
    """Something a scenario does during the run (kill a process ...), at `at_s` after the start."""

    at_s: float
    label: str
    run: Callable[[Driver], Awaitable[dict[str, Any] | None]]


class _Rec:
    """One task's bookkeeping."""

    __slots__ = (
        "sent_mono",
        "sent_wall_us",
        "ack_wall_us",
        "acked",
        "terminal",
        "token",
        "success_tokens",
        "holder",
        "stash",
        "warmup",
        "via_poll",
        "done_at",
    )

    def __init__(self, sent_mono: float, sent_wall_us: int, warmup: bool = False) -> None:
        self.sent_mono = sent_mono
        self.sent_wall_us = sent_wall_us
        self.ack_wall_us = 0
        self.acked = False
        self.terminal = 0
        self.token = 0
        self.success_tokens: set[int] | None = None
        self.holder = ""
        self.stash: list[tuple[Any, float]] | None = None
        self.warmup = warmup
        self.via_poll = False
        self.done_at = 0.0


@dataclass
class Reassignment:
    """Tasks held by killed agents, and when each found a new home."""

    t_kill: float
    """Client monotonic clock just before the kill."""
    t_kill_wall_us: int
    """The same moment on the wall clock, to compare with the coordinator's `assigned_at_us`."""
    victims: dict[str, str]
    """task id → the agent that held it when its process was killed."""
    requeued: dict[str, float] = field(default_factory=dict)
    reassigned: dict[str, float] = field(default_factory=dict)
    """task id → seconds from the kill to the coordinator committing the new claim."""
    finished_by_victim: set[str] = field(default_factory=set)
    """Completed by the agent that held them (the result got out before the kill)."""


class Driver:
    """Runs one workload against a coordinator and returns a `RunResult`.

    Args:
        client: the coordinator client.
        workload: what to submit and the bounds.
        run_id: prefix of every task id of this run.
        scenario: the scenario name, for the report.
        schedule: open loop schedule (None: closed loop, or a rate when the workload has one).
        watch_all_states: watch every state change, not only terminal ones (needed to see
            reassignments; costs about four events per task instead of one).
        actions: scenario steps at fixed times (fault injection).
    """

    def __init__(
        self,
        client: CoordinatorClient,
        workload: Workload,
        *,
        run_id: str,
        scenario: str = "steady",
        schedule: Schedule | None = None,
        watch_all_states: bool = False,
        actions: Iterable[Action] = (),
        clock: Clock | None = None,
        progress: ProgressSink | None = None,
    ) -> None:
        self.client = client
        self.w = workload
        self.run_id = run_id
        self.prefix = task_id(run_id, 0)[: -len("00000000")]
        self.scenario = scenario
        if schedule is None and not workload.closed_loop:
            schedule = RateSchedule(workload.rate_per_s)
        self.schedule = schedule
        self.watch_all_states = watch_all_states
        self.actions = sorted(actions, key=lambda a: a.at_s)
        self.clock = clock or SystemClock()
        self.progress = progress
        self.metrics = RunMetrics(start_s=self.clock.monotonic())
        self.counters = client.counters = self.metrics.counters
        self.tasks: dict[str, _Rec] = {}
        self.inflight: dict[str, None] = {}
        """Acknowledged, not yet terminal; insertion order is submit order (oldest first)."""
        self.failed_submit: set[str] = set()
        self.duplicated: set[str] = set()
        self.markers: list[Marker] = []
        self.extra: dict[str, Any] = {}
        self.notes: list[str] = []
        self.reassignments: list[Reassignment] = []
        self.first_completion_in_term: dict[int, float] = {}
        """Leader term → when the first task finished under it (monotonic)."""
        self.submitted = 0
        self.acknowledged = 0
        self.completed = 0
        self.phase = "starting"
        self._seq = 0
        self._free = workload.concurrency
        self._slot = asyncio.Event()
        self._stop = asyncio.Event()
        self._submit_over = asyncio.Event()
        self._drained = asyncio.Event()
        self._warm = asyncio.Event()
        self._resync = asyncio.Event()
        self._recent: deque[float] = deque(maxlen=100_000)
        self._start = 0.0
        self._late = 0
        self._watch_error: BaseException | None = None

    # ------------------------------------------------------------ public

    def stop(self) -> None:
        """End the submit phase now (Ctrl-C): drain briefly, then check and report."""
        self._stop.set()
        self._submit_over.set()
        self._slot.set()

    def elapsed(self) -> float:
        return self.clock.monotonic() - self._start if self._start else 0.0

    def snapshot(self) -> ProgressSnapshot:
        now = self.clock.monotonic()
        recent = 0
        for t in reversed(self._recent):
            if now - t > 1.0:
                break
            recent += 1
        return ProgressSnapshot(
            system="agentmesh",
            phase=self.phase,
            elapsed_s=self.elapsed(),
            submitted=self.submitted,
            acknowledged=self.acknowledged,
            completed=self.completed,
            inflight=len(self.inflight),
            errors=self.counters["errors"],
            rate_last_s=float(recent),
            dispatch_p99_ms=self.metrics.latency("dispatch").percentile_ms(99.0),
        )

    def describe(self) -> str:
        mode = self.schedule.describe() if isinstance(self.schedule, BurstSchedule) else None
        return self.w.describe(mode)

    def holders(self) -> dict[str, str]:
        """In-flight task id → the agent last seen holding it (needs watch_all_states)."""
        return {tid: self.tasks[tid].holder for tid in self.inflight if self.tasks[tid].holder}

    def track_reassignment(
        self, victims: dict[str, str], t_kill: float, t_kill_wall_us: int
    ) -> Reassignment:
        r = Reassignment(t_kill=t_kill, t_kill_wall_us=t_kill_wall_us, victims=dict(victims))
        self.reassignments.append(r)
        return r

    async def run(self) -> RunResult:
        """Warm up, submit for the workload's duration, drain, check; bounded throughout.

        Raises:
            RuntimeError: the warm-up task found no agent, or the event stream stayed silent.
            RpcFailed: the coordinator refused or could not be reached within the retry time.
        """
        end = 0.0
        try:
            async with asyncio.TaskGroup() as tg:
                background = [
                    tg.create_task(self._watch_loop(), name="watch"),
                    tg.create_task(self._poll_loop(), name="poll"),
                ]
                if self.progress:
                    background.append(tg.create_task(self._progress_loop(), name="progress"))
                try:
                    await self._warmup()
                    self._start = self.clock.monotonic()
                    self.metrics.throughput.start_s = self._start
                    self.phase = "submitting"
                    background.append(tg.create_task(self._run_actions(), name="actions"))
                    await self._submit_phase(tg)
                    self.phase = "draining"
                    await self._drain()
                    end = self.clock.monotonic()
                finally:
                    for t in background:
                        t.cancel()
        except BaseExceptionGroup as group:
            # one failure is the usual case: raise it as itself, not wrapped
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        self.phase = "checking"
        if self.progress:
            self.progress(self.snapshot())
        result = await asyncio.wait_for(self._final_check(end - self._start), FINAL_CHECK_TIMEOUT_S)
        self.phase = "done"
        return result

    # ------------------------------------------------------------ specs

    def spec(self, tid: str) -> tpb.TaskSpec:
        if self.w.simulated:
            return tpb.TaskSpec(
                task_id=tid,
                kind="sleep",
                payload=json.dumps({"ms": self.w.sleep_ms}).encode(),
                metadata={"loadtest": self.run_id, "simulated": "true"},
            )
        return tpb.TaskSpec(task_id=tid, kind="noop", metadata={"loadtest": self.run_id})

    def _next_ids(self, n: int) -> list[str]:
        n = max(0, min(n, self.w.max_tasks - self._seq))
        ids = [task_id(self.run_id, self._seq + i) for i in range(n)]
        self._seq += n
        return ids

    # ------------------------------------------------------------ warm-up

    async def _warmup(self) -> None:
        """One task through the whole path: proves the watch is live and agents take work."""
        self.phase = "warm-up"
        tid = f"{self.prefix}warmup"
        self.tasks[tid] = _Rec(self.clock.monotonic(), self.clock.wall_us(), warmup=True)
        # the watch is opened by its own task; give it a moment to subscribe first
        await asyncio.sleep(0.05)
        resp = await self.client.submit(self.spec(tid))
        rec = self.tasks[tid]
        rec.acked = True
        rec.ack_wall_us = self.clock.wall_us()
        if resp.task.state in TERMINAL:
            self._warm.set()
        for ev, t in rec.stash or ():
            self._on_event(ev, t)
        rec.stash = None
        try:
            await asyncio.wait_for(self._warm.wait(), WARMUP_TIMEOUT_S)
        except TimeoutError:
            task = await self.client.get_task(tid)
            if self._watch_error is not None:
                raise RuntimeError(
                    f"WatchEvents failed: {self._watch_error}"
                ) from self._watch_error
            if task.state in TERMINAL:
                raise RuntimeError(
                    "the warm-up task finished but WatchEvents delivered no event for it"
                ) from None
            raise RuntimeError(
                f"no agent finished the warm-up task within {WARMUP_TIMEOUT_S:g} s "
                f"(state {state_name(task.state)}): are agents connected?"
            ) from None

    # ------------------------------------------------------------ submitting

    async def _submit_phase(self, tg: asyncio.TaskGroup) -> None:
        deadline = self._start + self.w.duration_s
        if self.schedule is None:
            submitters = [
                tg.create_task(self._closed_submitter(deadline), name=f"submitter-{i}")
                for i in range(self._submitter_count())
            ]
            await asyncio.gather(*submitters)
        else:
            await self._open_loop(tg, self.schedule, deadline)

    def _submitter_count(self) -> int:
        if self.w.clients:
            return self.w.clients
        # batches refill many slots per RPC; single submits need one caller per slot
        return 4 if self.w.batch_size > 1 else min(self.w.concurrency, 64)

    async def _take_slots(self, most: int, deadline: float) -> int:
        while self._free <= 0:
            if self._submit_over.is_set():
                return 0
            self._slot.clear()
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                return 0
            try:
                await asyncio.wait_for(self._slot.wait(), remaining)
            except TimeoutError:
                return 0
        if self._submit_over.is_set() or self.clock.monotonic() >= deadline:
            return 0
        n = min(self._free, most)
        self._free -= n
        return n

    def _release(self, n: int = 1) -> None:
        self._free += n
        self._slot.set()

    async def _closed_submitter(self, deadline: float) -> None:
        while not self._submit_over.is_set():
            n = await self._take_slots(self.w.batch_size, deadline)
            if n == 0:
                break
            ids = self._next_ids(n)
            if len(ids) < n:
                self._release(n - len(ids))
            if not ids:
                break
            await self._send(ids)
        self._submit_over.set()
        self._slot.set()

    async def _open_loop(self, tg: asyncio.TaskGroup, schedule: Schedule, deadline: float) -> None:
        rpcs = asyncio.Semaphore(MAX_OPEN_LOOP_RPCS)

        async def send(ids: list[str]) -> None:
            try:
                await self._send(ids)
            finally:
                rpcs.release()

        while not self._stop.is_set() and self._seq < self.w.max_tasks:
            now = self.clock.monotonic()
            if now >= deadline:
                break
            due = min(self.w.max_tasks, schedule.due(now - self._start))
            if due <= self._seq:
                wait = self._start + schedule.next_at(self._seq) - now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), max(0.0, min(wait, deadline - now)))
                continue
            ids = self._next_ids(min(due - self._seq, self.w.batch_size))
            lateness = now - (self._start + schedule.next_at(self._seq - len(ids)))
            if lateness > LATE_AFTER_S:
                self._late += len(ids)
            await rpcs.acquire()
            tg.create_task(send(ids))
        for _ in range(MAX_OPEN_LOOP_RPCS):  # every send has returned
            await rpcs.acquire()
        self._submit_over.set()

    async def _send(self, ids: list[str]) -> None:
        specs = [self.spec(tid) for tid in ids]
        t_send = self.clock.monotonic()
        wall = self.clock.wall_us()
        for tid in ids:
            self.tasks[tid] = _Rec(t_send, wall)
        self.submitted += len(ids)
        try:
            if len(specs) == 1 and self.w.batch_size == 1:
                results = [await self.client.submit(specs[0])]
            else:
                results = list((await self.client.submit_batch(specs)).results)
        except RpcFailed as err:
            self.counters.inc("errors")
            self.counters.inc("submit_failed_tasks", len(ids))
            log.warning("submit failed", extra={"error": str(err), "tasks": len(ids)})
            self.failed_submit.update(ids)
            if self.schedule is None:
                self._release(len(ids))
            return
        ack_mono = self.clock.monotonic()
        ack_wall = self.clock.wall_us()
        self.metrics.latency("submit_ack").record_s(ack_mono - t_send)
        for r in results:
            tid = r.task.task_id
            rec = self.tasks.get(tid)
            if rec is None or rec.acked:
                continue
            rec.acked = True
            rec.ack_wall_us = ack_wall
            self.acknowledged += 1
            if not r.created:
                self.counters.inc("submit_replays")
            if rec.terminal == 0:
                self.inflight[tid] = None
            if r.task.state in TERMINAL:
                self._on_task(r.task, S.TASK_STATE_UNSPECIFIED, ack_mono)
            stash, rec.stash = rec.stash, None
            for ev, t in stash or ():
                self._on_event(ev, t)

    # ------------------------------------------------------------ events

    async def _watch_loop(self) -> None:
        states: list[int] = [] if self.watch_all_states else sorted(TERMINAL)
        attempt = 0
        while True:
            call = self.client.watch_events(states)
            try:
                async for ev in call:
                    attempt = 0
                    self._on_event(ev, self.clock.monotonic())
                self.counters.inc("watch_reconnects")
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - a broken stream is reopened
                self._watch_error = err
                self.counters.inc("watch_reconnects")
                code = getattr(err, "code", None)
                if callable(code) and getattr(code(), "name", "") == "UNAVAILABLE":
                    self.client.follow(err)
            finally:
                cancel = getattr(call, "cancel", None)
                if cancel is not None:
                    cancel()
            # events were missed while the stream was down: re-read what is in flight
            self._resync.set()
            await self.client.backoff(attempt)
            attempt += 1

    def _on_event(self, ev: Any, now: float) -> None:
        task = ev.task
        rec = self.tasks.get(task.task_id)
        if rec is None:
            return
        if not rec.acked:
            if rec.stash is None:
                rec.stash = []
            rec.stash.append((ev, now))  # it beat its own acknowledgement here
            return
        self._on_task(task, ev.previous_state, now)

    def _on_task(self, task: Any, previous: int, now: float, *, via_poll: bool = False) -> None:
        tid = task.task_id
        rec = self.tasks[tid]
        state = task.state
        if state in HELD:
            if task.agent_id and task.agent_id != rec.holder:
                self._holder_changed(tid, task, now)
                rec.holder = task.agent_id
            return
        if state == S.TASK_STATE_QUEUED:
            if previous in HELD or previous == S.TASK_STATE_FAILED:
                self.counters.inc("requeued")
                for r in self.reassignments:
                    if tid in r.victims and tid not in r.requeued:
                        r.requeued[tid] = now - r.t_kill
            rec.holder = ""
            return
        if state not in TERMINAL:
            return
        if rec.terminal == 0:
            rec.terminal = state
            rec.token = task.claim_token
            if state == S.TASK_STATE_SUCCEEDED:
                rec.success_tokens = {task.claim_token}
            if task.agent_id:
                self._holder_changed(tid, task, now)
            self._complete(tid, rec, task, now, via_poll=via_poll)
            return
        # a second terminal record for the same task
        tokens = rec.success_tokens or set()
        if state == rec.terminal and (
            state != S.TASK_STATE_SUCCEEDED or task.claim_token in tokens
        ):
            self.counters.inc("replayed_events")
            return
        if state == S.TASK_STATE_SUCCEEDED:
            rec.success_tokens = tokens | {task.claim_token}
        self.duplicated.add(tid)
        self.counters.inc("claim_conflicts")

    def _holder_changed(self, tid: str, task: Any, now: float) -> None:
        for r in self.reassignments:
            old = r.victims.get(tid)
            if old is None or tid in r.reassigned or tid in r.finished_by_victim:
                continue
            if task.agent_id == old:
                if task.state in TERMINAL:
                    r.finished_by_victim.add(tid)
                continue
            # the coordinator's commit time of the new claim: free of this client's lag
            if task.assigned_at_us and task.assigned_at_us > r.t_kill_wall_us:
                took = (task.assigned_at_us - r.t_kill_wall_us) / 1e6
            else:
                took = now - r.t_kill
            r.reassigned[tid] = took
            self.metrics.latency("reassign").record_s(took)

    def _complete(self, tid: str, rec: _Rec, task: Any, now: float, *, via_poll: bool) -> None:
        if rec.warmup:
            self._warm.set()
            return
        self.inflight.pop(tid, None)
        rec.done_at = now
        if task.term not in self.first_completion_in_term and not via_poll:
            self.first_completion_in_term[task.term] = now
        self.completed += 1
        self._recent.append(now)
        m = self.metrics
        if via_poll:
            rec.via_poll = True
            self.counters.inc("completions_seen_by_poll")
            if task.finished_at_us:
                m.latency("end_to_end").record_us(task.finished_at_us - rec.sent_wall_us)
        else:
            m.latency("end_to_end").record_s(now - rec.sent_mono)
        m.throughput.record(now)
        if task.received_at_us and rec.ack_wall_us:
            if task.attempts <= 1:
                m.latency("dispatch").record_us(task.received_at_us - rec.ack_wall_us)
                # never negative: brackets dispatch from above (it includes the submit RPC)
                m.latency("submit_to_receive").record_us(task.received_at_us - rec.sent_wall_us)
            else:
                self.counters.inc("dispatch_skipped_retried")
        if state_name(task.state) != "SUCCEEDED":
            self.counters.inc("errors")
        if self.schedule is None:
            self._release()
        if self._submit_over.is_set() and not self.inflight:
            self._drained.set()

    # ------------------------------------------------------------ polling

    async def _poll_loop(self) -> None:
        """Re-read tasks whose outcome we may have missed (stream gaps, stragglers)."""
        stale_s = 5.0 + (self.w.sleep_ms / 1000.0 if self.w.simulated else 0.0)
        full_at: list[float] = []
        while True:
            now = self.clock.monotonic()
            timeout = (
                POLL_INTERVAL_S if not full_at else max(0.0, min(POLL_INTERVAL_S, full_at[0] - now))
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._resync.wait(), timeout)
            now = self.clock.monotonic()
            if self._resync.is_set():
                self._resync.clear()
                # the new stream subscribes on the server at some point after it is opened:
                # re-read everything in flight a few times while that settles
                full_at = [now + d for d in RESYNC_AFTER_S]
            everything = bool(full_at) and full_at[0] <= now
            while full_at and full_at[0] <= now:
                full_at.pop(0)
            ids: list[str] = []
            for tid in self.inflight:
                if not everything and now - self.tasks[tid].sent_mono < stale_s:
                    break
                ids.append(tid)
                if not everything and len(ids) >= POLL_BATCH:
                    break
            if ids:
                await self._poll(ids)

    async def _poll(self, ids: list[str]) -> None:
        sem = asyncio.Semaphore(32)

        async def one(tid: str) -> None:
            async with sem:
                try:
                    task = await self.client.get_task(tid)
                except RpcFailed:
                    return
            self.counters.inc("polls")
            if tid in self.inflight and task.state in TERMINAL:
                self._on_task(task, S.TASK_STATE_UNSPECIFIED, self.clock.monotonic(), via_poll=True)

        await asyncio.gather(*(one(t) for t in ids))

    # ------------------------------------------------------------ actions, progress

    async def _run_actions(self) -> None:
        for action in self.actions:
            wait = self._start + action.at_s - self.clock.monotonic()
            if wait > 0:
                try:
                    await asyncio.wait_for(self._stop.wait(), wait)
                    return
                except TimeoutError:
                    pass
            if self._submit_over.is_set():
                return
            self.markers.append(Marker(t_s=self.elapsed(), label=action.label))
            try:
                info = await action.run(self)
            except Exception as err:  # noqa: BLE001 - reported, the run goes on
                self.notes.append(f"action {action.label!r} failed: {err!r}")
                continue
            if info:
                self.extra.setdefault("actions", []).append({"label": action.label, **info})

    async def _progress_loop(self) -> None:
        assert self.progress is not None
        while True:
            self.progress(self.snapshot())
            await asyncio.sleep(0.25)

    async def _drain(self) -> None:
        if not self.inflight:
            return
        self._drained.clear()
        timeout = 2.0 if self._stop.is_set() else self.w.drain_timeout_s
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            # a last look before calling them unfinished
            await self._poll(list(self.inflight))

    # ------------------------------------------------------------ the final check

    async def _final_check(self, duration_s: float) -> RunResult:
        expected = {tid for tid, r in self.tasks.items() if not r.warmup and r.acked}
        maybe = set(self.failed_submit) - expected
        found: dict[str, Any] = {}
        try:
            async for task in self.client.list_all_tasks():
                if task.task_id.startswith(self.prefix):
                    found[task.task_id] = task
        except RpcFailed as err:
            self.notes.append(f"ListTasks scan failed ({err}); checked with GetTask per id")
        missing = [t for t in expected | maybe if t not in found]
        sem = asyncio.Semaphore(32)

        async def get(tid: str) -> None:
            async with sem:
                try:
                    found[tid] = await self.client.get_task(tid)
                except RpcFailed as err:
                    if err.code is not None and err.code.name != "NOT_FOUND":
                        self.counters.inc("errors")

        await asyncio.gather(*(get(t) for t in missing))
        late = {t for t in maybe if t in found}
        if late:
            self.counters.inc("acknowledged_late", len(late))
        lost: list[str] = []
        unfinished: list[str] = []
        unfinished_states: dict[str, int] = {}
        unfinished_examples: list[dict[str, Any]] = []
        states: dict[str, int] = {}
        retries = 0
        for tid in expected | late:
            task = found.get(tid)
            if task is None:
                lost.append(tid)
                continue
            if task.state not in TERMINAL:
                unfinished.append(tid)
                name = state_name(task.state)
                unfinished_states[name] = unfinished_states.get(name, 0) + 1
                if len(unfinished_examples) < 10:
                    unfinished_examples.append(
                        {
                            "task_id": tid,
                            "state": name,
                            "agent_id": task.agent_id,
                            "attempts": task.attempts,
                            "term": task.term,
                            "last_error": task.last_error,
                        }
                    )
                continue
            name = state_name(task.state)
            states[name] = states.get(name, 0) + 1
            retries += max(0, task.attempts - 1)
            rec = self.tasks.get(tid)
            if rec is not None and rec.terminal and rec.terminal != task.state:
                # the stream said one terminal state and the store holds another
                self.duplicated.add(tid)
                self.counters.inc("claim_conflicts")
        self.counters.inc("retries", retries)
        if self._late:
            self.counters.inc("late_submits", self._late)
        self._summarise_reassignments()
        if self._stop.is_set():
            self.notes.append(f"stopped early (Ctrl-C) after {duration_s:.1f} s of submitting")
        if unfinished:
            states_text = ", ".join(f"{k} {v}" for k, v in sorted(unfinished_states.items()))
            self.notes.append(
                f"{len(unfinished)} acknowledged task(s) were not terminal "
                f"{self.w.drain_timeout_s:g} s after submitting stopped ({states_text})"
            )
            self.extra["unfinished_examples"] = unfinished_examples
        return RunResult(
            system="agentmesh",
            scenario=self.scenario,
            metrics=self.metrics,
            duration_s=duration_s,
            submitted=self.submitted,
            acknowledged=self.acknowledged + len(late),
            completed=self.completed,
            terminal_states=states,
            lost=sorted(lost),
            unfinished=sorted(unfinished),
            duplicated=sorted(self.duplicated),
            markers=list(self.markers),
            notes=[self.describe(), *self.notes],
            extra={"run_id": self.run_id, **self.extra},
        )

    def _summarise_reassignments(self) -> None:
        for i, r in enumerate(self.reassignments):
            never = [
                t for t in r.victims if t not in r.reassigned and t not in r.finished_by_victim
            ]
            done = sorted(r.reassigned.values())
            self.extra[f"kill_{i + 1}"] = {
                "tasks_held_by_killed_agents": len(r.victims),
                "reassigned": len(done),
                "finished_by_killed_agent": len(r.finished_by_victim),
                "not_seen_reassigned": len(never),
                "reassign_max_s": round(done[-1], 4) if done else None,
                "reassign_p50_s": round(done[len(done) // 2], 4) if done else None,
                "requeue_max_s": round(max(r.requeued.values()), 4) if r.requeued else None,
            }
            for v in done:
                self.metrics.add_sample("reassign_s", v)
