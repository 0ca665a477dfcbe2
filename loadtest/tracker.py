"""What a run knows of each task: its record, the events stream, polls, reassignments.

Outcomes come from one WatchEvents stream. A gap in it (a reconnect, a failover) is
covered by re-reading the tasks still in flight with GetTask, so a missed event never
stalls the closed loop. Measurements taken here:

- dispatch: `Task.received_at_us` (the agent's wall clock on receiving the
  assignment) minus the client's wall clock when the submit was acknowledged.
  Same host, same clock; an agent can beat the acknowledgement back to the
  client, and such negative samples are counted (`clamped_low`), not hidden;
- submit to receive: the same agent time minus the wall clock just before the
  submit RPC: never negative, an upper bound of dispatch;
- end to end: the client's monotonic clock from just before the submit RPC to
  the terminal event's arrival;
- throughput: terminal events per 1 s bucket;
- reassign: a killed agent's task, from the kill to its next claim;
- the latency split (`HOPS`): where one task's end-to-end time goes, from the
  timestamps the task record carries (all wall clocks of one host).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from loadtest.audit import HELD, TERMINAL, repeats_first, state_name
from loadtest.client import CoordinatorClient, RpcFailed
from loadtest.metrics import LatencyRecorder, RunMetrics
from protos.agentmesh.v1 import task_pb2 as tpb

POLL_INTERVAL_S = 1.0
POLL_BATCH = 256
POLL_CONCURRENCY = 32
"""GetTask calls in flight at once when re-reading tasks."""
WATCH_BATCH = 256
"""Events per WatchEvents message at most: at thousands of tasks a second one message
per event costs the leader and the harness more than the events themselves."""
RESYNC_AFTER_S = (0.05, 0.5, 1.5)
"""After the event stream reopens: when to re-read every task in flight."""


HOPS = (
    ("submit_in", "submit sent → coordinator's Submit handler (created_at)"),
    ("queued", "created → claim decided (assigned_at; 0 on the submit fast path)"),
    ("claim_to_agent", "assigned → agent received (claim commit, stream write, pool)"),
    ("run_and_report", "agent received → coordinator handles the result (finished_at)"),
    ("complete_to_seen", "finished → client sees the terminal event (commit, watch)"),
)
"""One task's path, hop by hop: name and what it spans."""


def task_hops(sent_wall_us: int, task: Any, seen_wall_us: int) -> tuple[int, ...] | None:
    """The task's end-to-end time cut at the timestamps its record carries, in µs, one
    value per `HOPS` entry (they add up to seen − sent); None when one is missing."""
    marks = (
        sent_wall_us,
        task.created_at_us,
        task.assigned_at_us,
        task.received_at_us,
        task.finished_at_us,
        seen_wall_us,
    )
    if not all(marks):
        return None
    return tuple(b - a for a, b in zip(marks, marks[1:], strict=False))


def split_summary(hops: dict[str, LatencyRecorder]) -> dict[str, Any]:
    """Per hop: P50, P99 and mean in ms, and its share of the summed means (the means
    add up where percentiles do not)."""
    means = {name: rec.summary().mean_ms for name, rec in hops.items() if rec.count}
    total = sum(means.values())
    return {
        name: {
            "p50_ms": round(hops[name].percentile_ms(50.0), 3),
            "p99_ms": round(hops[name].percentile_ms(99.0), 3),
            "mean_ms": round(mean, 3),
            "share_pct": round(100.0 * mean / total, 1) if total > 0 else None,
            "count": hops[name].count,
        }
        for name, mean in means.items()
    }


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def wall_us(self) -> int: ...


class Record:
    """One task's bookkeeping."""

    __slots__ = (
        "ack_wall_us",
        "acked",
        "done_at",
        "holder",
        "sent_mono",
        "sent_wall_us",
        "stash",
        "success_tokens",
        "terminal",
        "token",
        "via_poll",
        "warmup",
    )

    def __init__(self, sent_mono: float, sent_wall_us: int, warmup: bool = False) -> None:
        self.sent_mono = sent_mono
        self.sent_wall_us = sent_wall_us
        self.ack_wall_us = 0
        self.acked = False
        self.terminal = 0
        """The terminal state seen first (0: none yet)."""
        self.token = 0
        self.success_tokens: set[int] | None = None
        self.holder = ""
        self.stash: list[tuple[Any, float]] | None = None
        """Events that beat the task's own acknowledgement here, applied after it."""
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

    def figures(self) -> dict[str, Any]:
        never = [
            t for t in self.victims if t not in self.reassigned and t not in self.finished_by_victim
        ]
        took = LatencyRecorder.of_seconds("reassign", self.reassigned.values())
        return {
            "tasks_held_by_killed_agents": len(self.victims),
            "reassigned": took.count,
            "finished_by_killed_agent": len(self.finished_by_victim),
            "not_seen_reassigned": len(never),
            "reassign_max_s": round(took.max_ms() / 1000, 4) if took.count else None,
            "reassign_p50_s": round(took.percentile_ms(50) / 1000, 4) if took.count else None,
            "requeue_max_s": round(max(self.requeued.values()), 4) if self.requeued else None,
        }


class Tracker:
    """Follows every task of a run from its submit to its terminal state.

    Args:
        client: the coordinator client (events, GetTask).
        metrics: where latencies, throughput and counters go.
        clock: the run's clock.
        watch_all_states: watch every state change, not only terminal ones (needed to
            see reassignments; costs about four events per task instead of one).
        stale_after_s: a task in flight this long is re-read with GetTask.
        on_done: called after each task of the run (not the warm-up) completes.
    """

    def __init__(
        self,
        client: CoordinatorClient,
        metrics: RunMetrics,
        clock: Clock,
        *,
        watch_all_states: bool = False,
        stale_after_s: float = 5.0,
        on_done: Callable[[], None] = lambda: None,
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.counters = metrics.counters
        self.clock = clock
        self.watch_all_states = watch_all_states
        self.stale_after_s = stale_after_s
        self.on_done = on_done
        self.records: dict[str, Record] = {}
        self.hops: dict[str, LatencyRecorder] = {}
        """The latency split, one recorder per `HOPS` entry (first attempts seen on the stream)."""
        self.inflight: dict[str, None] = {}
        """Acknowledged, not yet terminal; insertion order is submit order (oldest first)."""
        self.duplicated: set[str] = set()
        """Ids seen completed twice while the run went."""
        self.reassignments: list[Reassignment] = []
        self.first_completion_in_term: dict[int, float] = {}
        """Leader term → when the first task finished under it (monotonic)."""
        self.completed = 0
        self.warm = asyncio.Event()
        """Set when the warm-up task completes."""
        self.watch_error: BaseException | None = None
        self._resync = asyncio.Event()
        self._recent: deque[float] = deque(maxlen=100_000)

    # ------------------------------------------------------------ records

    def sent(self, ids: list[str], mono: float, wall_us: int, *, warmup: bool = False) -> None:
        """`ids` are about to be submitted (at `mono` / `wall_us`)."""
        for tid in ids:
            self.records[tid] = Record(mono, wall_us, warmup)

    def acknowledged(self, task: tpb.Task, now: float, wall_us: int) -> bool:
        """The submit of `task` was acknowledged; False when it was already, or is unknown."""
        rec = self.records.get(task.task_id)
        if rec is None or rec.acked:
            return False
        rec.acked = True
        rec.ack_wall_us = wall_us
        if rec.terminal == 0 and not rec.warmup:
            self.inflight[task.task_id] = None
        if task.state in TERMINAL:
            self.on_task(task, tpb.TASK_STATE_UNSPECIFIED, now)
        stash, rec.stash = rec.stash, None
        for ev, t in stash or ():
            self.on_event(ev, t)
        return True

    def run_ids(self) -> set[str]:
        """The acknowledged ids of the run (the warm-up task left out)."""
        return {tid for tid, r in self.records.items() if not r.warmup and r.acked}

    def first_terminal(self) -> dict[str, int]:
        """id → the terminal state seen first, for the ids that have one."""
        return {tid: r.terminal for tid, r in self.records.items() if r.terminal}

    def holders(self) -> dict[str, str]:
        """In-flight task id → the agent last seen holding it (needs watch_all_states)."""
        return {tid: self.records[tid].holder for tid in self.inflight if self.records[tid].holder}

    def recent(self, window_s: float = 1.0) -> int:
        """Completions in the last `window_s`."""
        now = self.clock.monotonic()
        n = 0
        for t in reversed(self._recent):
            if now - t > window_s:
                break
            n += 1
        return n

    def track_reassignment(
        self, victims: dict[str, str], t_kill: float, t_kill_wall_us: int
    ) -> Reassignment:
        r = Reassignment(t_kill=t_kill, t_kill_wall_us=t_kill_wall_us, victims=dict(victims))
        self.reassignments.append(r)
        return r

    def reassignment_figures(self) -> dict[str, Any]:
        """`kill_<n>` → one kill's figures; every reassignment time is kept as a sample."""
        out: dict[str, Any] = {}
        for i, r in enumerate(self.reassignments):
            out[f"kill_{i + 1}"] = r.figures()
            for v in sorted(r.reassigned.values()):
                self.metrics.add_sample("reassign_s", v)
        return out

    # ------------------------------------------------------------ events

    async def watch_loop(self) -> None:
        states: list[int] = [] if self.watch_all_states else sorted(TERMINAL)
        attempt = 0
        while True:
            call = self.client.watch_events(states, max_batch=WATCH_BATCH)
            try:
                async for msg in call:
                    attempt = 0
                    now = self.clock.monotonic()
                    for ev in msg.batched or (msg,):  # (an older leader does not batch)
                        self.on_event(ev, now)
                self.counters.inc("watch_reconnects")
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - a broken stream is reopened
                self.watch_error = err
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

    def on_event(self, ev: Any, now: float) -> None:
        task = ev.task
        rec = self.records.get(task.task_id)
        if rec is None:
            return
        if not rec.acked:
            if rec.stash is None:
                rec.stash = []
            rec.stash.append((ev, now))  # it beat its own acknowledgement here
            return
        self.on_task(task, ev.previous_state, now)

    def on_task(self, task: Any, previous: int, now: float, *, via_poll: bool = False) -> None:
        tid = task.task_id
        rec = self.records[tid]
        state = task.state
        if state in HELD:
            if task.agent_id and task.agent_id != rec.holder:
                self._holder_changed(tid, task, now)
                rec.holder = task.agent_id
            return
        if state == tpb.TASK_STATE_QUEUED:
            if previous in HELD or previous == tpb.TASK_STATE_FAILED:
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
            if state == tpb.TASK_STATE_SUCCEEDED:
                rec.success_tokens = {task.claim_token}
            if task.agent_id:
                self._holder_changed(tid, task, now)
            self._complete(tid, rec, task, now, via_poll=via_poll)
            return
        tokens = rec.success_tokens or set()
        if repeats_first(rec.terminal, tokens, state, task.claim_token):
            self.counters.inc("replayed_events")
            return
        if state == tpb.TASK_STATE_SUCCEEDED:
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

    def hop(self, name: str) -> LatencyRecorder:
        rec = self.hops.get(name)
        if rec is None:
            rec = self.hops[name] = LatencyRecorder(name)
        return rec

    def _complete(self, tid: str, rec: Record, task: Any, now: float, *, via_poll: bool) -> None:
        if rec.warmup:
            self.warm.set()
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
            if task.attempts <= 1:
                cut = task_hops(rec.sent_wall_us, task, self.clock.wall_us())
                if cut is not None:
                    for (name, _), value_us in zip(HOPS, cut, strict=True):
                        self.hop(name).record_us(value_us)
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
        self.on_done()

    # ------------------------------------------------------------ polling

    async def poll_loop(self) -> None:
        """Re-read tasks whose outcome we may have missed (stream gaps, stragglers)."""
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
                if not everything and now - self.records[tid].sent_mono < self.stale_after_s:
                    break
                ids.append(tid)
                if not everything and len(ids) >= POLL_BATCH:
                    break
            if ids:
                await self.poll(ids)

    async def poll(self, ids: list[str]) -> None:
        sem = asyncio.Semaphore(POLL_CONCURRENCY)

        async def one(tid: str) -> None:
            async with sem:
                try:
                    task = await self.client.get_task(tid)
                except RpcFailed:
                    return
            self.counters.inc("polls")
            if tid in self.inflight and task.state in TERMINAL:
                self.on_task(
                    task, tpb.TASK_STATE_UNSPECIFIED, self.clock.monotonic(), via_poll=True
                )

        await asyncio.gather(*(one(t) for t in ids))
