"""The swarm as one JSON-able snapshot: a pure fold of what the cluster says.

Inputs are the public protos (ClusterStatus, AgentStatus, Task, TaskEvent) and plain
values; time comes from an injected Clock; nothing here does I/O or imports grpc. The
collector feeds it; the live view, `status --json` and the dashboard read `snapshot()`.

Memory stays bounded whatever the cluster does: a ring of time buckets (latency
HdrHistograms for the last `rate_window_s` only, figures for the older ones), and
capped maps for held tasks and task histories.

Every count says what it covers (`covers`), because the sources differ: GetStatus
gives what the leader holds now plus what it finished in its current term; the events
stream gives what this viewer saw since it started, minus what it missed while the
stream was down (`gaps` counts those outages).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.clock import Clock
from services._common.latency import LatencyRecorder

S = tpb.TaskState
QUEUED = S.TASK_STATE_QUEUED
ASSIGNED = S.TASK_STATE_ASSIGNED
RUNNING = S.TASK_STATE_RUNNING
SUCCEEDED = S.TASK_STATE_SUCCEEDED
FAILED = S.TASK_STATE_FAILED
CANCELLED = S.TASK_STATE_CANCELLED
DEAD_LETTER = S.TASK_STATE_DEAD_LETTER
UNSPECIFIED = S.TASK_STATE_UNSPECIFIED
TERMINAL = frozenset({SUCCEEDED, CANCELLED, DEAD_LETTER})
HELD = frozenset({ASSIGNED, RUNNING})

SCHEMA_VERSION = 1

OPTIONAL_SERVICES: dict[str, str] = {"health": "health monitor", "consensus": "consensus"}
"""Service kinds that get a section of their own once they run (registered under
services/<kind>/ in etcd). Until a feed for one fills its data, the section says
whether any instance is registered."""

STATE_NAMES = tuple(n.removeprefix("TASK_STATE_") for n in tpb.TaskState.keys()[1:])


def state_name(state: int) -> str:
    """'SUCCEEDED' for TASK_STATE_SUCCEEDED; the number for a state this build does not know."""
    try:
        return str(tpb.TaskState.Name(state)).removeprefix("TASK_STATE_")
    except ValueError:
        return str(state)


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Bounds of what the model keeps."""

    bucket_s: float = 1.0
    """Width of one throughput/latency bucket in seconds."""
    history: int = 600
    """Buckets kept (10 minutes at 1 s)."""
    rate_window_s: float = 30.0
    """`throughput.now_per_s` is the finished tasks per second over this window."""
    held_tasks: int = 100_000
    """Tasks held by agents that are tracked (capacity × agents is the real bound)."""
    task_histories: int = 5_000
    """Tasks whose events are kept for the dashboard's task page (least recent dropped)."""
    events_per_task: int = 32
    recent_failures: int = 20
    tasks_per_agent: int = 8
    """Running tasks listed per agent (the rest are counted)."""
    leader_changes: int = 20
    held_grace_s: float = 5.0
    """A held task whose agent reports nothing in flight is dropped after this long
    (its end event was missed); younger ones may just have raced ListAgents."""


class BucketLatency:
    """One latency (milliseconds) of one time bucket, or merged over several: an
    HdrHistogram (services/_common/latency.py, 1 % precision up to a day) made on the
    first sample, plus the exact largest sample, which caps the percentiles."""

    HIGHEST_US = 86_400_000_000
    """A day: queue waits and retries can take minutes; longer samples are clamped."""
    DIGITS = 2
    """1 %: about 30 kB a histogram, so a ring of them stays small (3 digits: 140 kB)."""

    __slots__ = ("max_ms", "rec")

    def __init__(self) -> None:
        self.rec: LatencyRecorder | None = None
        self.max_ms = 0.0

    @property
    def count(self) -> int:
        return self.rec.count if self.rec is not None else 0

    def _recorder(self) -> LatencyRecorder:
        if self.rec is None:
            self.rec = LatencyRecorder(
                "", highest_us=self.HIGHEST_US, significant_digits=self.DIGITS
            )
        return self.rec

    def add(self, ms: float) -> None:
        self._recorder().record_ms(ms)
        self.max_ms = max(self.max_ms, ms)

    def merge(self, other: BucketLatency) -> None:
        if other.rec is not None:
            self._recorder().merge(other.rec)
            self.max_ms = max(self.max_ms, other.max_ms)

    def percentiles(self, *qs: float) -> list[float | None]:
        """The q-th percentiles (None when empty), never above the largest sample."""
        if self.rec is None or not self.rec.count:
            return [None] * len(qs)
        found = self.rec.percentiles_ms(qs)
        return [min(found[q], self.max_ms) for q in qs]

    def percentile(self, q: float) -> float | None:
        return self.percentiles(q)[0]

    def summary(self) -> dict[str, float | int | None]:
        p50, p95, p99 = self.percentiles(50, 95, 99)
        return {
            "n": self.count,
            "p50_ms": _round(p50),
            "p95_ms": _round(p95),
            "p99_ms": _round(p99),
            "max_ms": _round(self.max_ms) if self.count else None,
        }


class _Bucket:
    __slots__ = (
        "cancelled",
        "dead_letter",
        "dispatch",
        "e2e",
        "failed_attempts",
        "index",
        "point",
        "run",
        "submitted",
        "succeeded",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.submitted = 0
        self.succeeded = 0
        self.dead_letter = 0
        self.cancelled = 0
        self.failed_attempts = 0
        self.e2e = BucketLatency()
        self.dispatch = BucketLatency()
        self.run = BucketLatency()
        self.point: dict[str, Any] | None = None
        """The latency figures, fixed once the bucket is complete (samples only go to the
        newest bucket)."""

    @property
    def finished(self) -> int:
        return self.succeeded + self.dead_letter + self.cancelled

    def latency_point(self, t_us: int) -> dict[str, Any]:
        if self.point is not None:
            return self.point
        e2e = self.e2e.percentiles(50, 95, 99)
        dispatch = self.dispatch.percentiles(50, 95)
        run = self.run.percentiles(50, 95)
        return {
            "t_us": t_us,
            "n": self.e2e.count,
            "e2e_p50_ms": _round(e2e[0]),
            "e2e_p95_ms": _round(e2e[1]),
            "e2e_p99_ms": _round(e2e[2]),
            "dispatch_p50_ms": _round(dispatch[0]),
            "dispatch_p95_ms": _round(dispatch[1]),
            "run_p50_ms": _round(run[0]),
            "run_p95_ms": _round(run[1]),
        }

    def close(self, t_us: int) -> None:
        """Fix the figures of a complete bucket, and free its histograms."""
        if self.point is None:
            self.point = self.latency_point(t_us)
            self.e2e, self.dispatch, self.run = BucketLatency(), BucketLatency(), BucketLatency()


@dataclass
class _Held:
    """A task an agent holds (ASSIGNED or RUNNING), as the events told it."""

    task_id: str
    agent_id: str
    kind: str
    state: int
    attempts: int
    assigned_at_us: int
    seen_at: float
    """Monotonic time this model learnt of it."""
    progress_updates: int = 0
    last_progress_us: int = 0


@dataclass
class _Usage:
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    tasks: int = 0


class SwarmModel:
    """Folds cluster readings into a snapshot.

    Args:
        clock: time for buckets, rates and ages.
        limits: what it keeps.
        cluster: the cluster name, shown in the snapshot.
        group_by: "pool" or "role": how agents are grouped.
    """

    def __init__(
        self,
        clock: Clock,
        limits: Limits | None = None,
        *,
        cluster: str = "default",
        group_by: str = "pool",
    ) -> None:
        if group_by not in ("pool", "role"):
            raise ValueError(f"group_by {group_by!r} must be 'pool' or 'role'")
        self.clock = clock
        self.limits = limits or Limits()
        self.cluster = cluster
        self.group_by = group_by
        self.started_us = clock.wall_us()
        # leader and services (GetStatus, or etcd when no coordinator answers)
        self.status: cpb.ClusterStatus | None = None
        self.term = 0
        self.leader_changes: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=self.limits.leader_changes
        )
        self.services: list[dict[str, Any]] = []
        self.service_health: dict[str, tuple[str, int]] = {}
        self.services_from = ""
        # agents (ListAgents) and what they hold (events)
        self.agents: dict[str, cpb.AgentStatus] = {}
        self.agents_at_us = 0
        self.held: dict[str, _Held] = {}
        self.let_go: collections.OrderedDict[str, int] = collections.OrderedDict()
        """task id → the attempt the events saw end (finished or requeued), so a listing
        older than that event cannot show the task held again (bounded like `held`)."""
        self.usage: dict[str, _Usage] = collections.defaultdict(_Usage)
        self.total_usage = _Usage()
        # queue sample (ListTasks QUEUED)
        self.queue_by_priority: dict[int, int] = {}
        self.queue_sampled = 0
        self.queue_sample_complete = False
        self.queue_sampled_at_us = 0
        # events
        self.buckets: collections.deque[_Bucket] = collections.deque(maxlen=self.limits.history)
        self.seen: collections.Counter[str] = collections.Counter()
        self.events = 0
        self.last_event_us = 0
        self.stream = "connecting"
        self.stream_was_up = False
        self.seen_since_us = 0
        self.gaps = 0
        self.histories: collections.OrderedDict[str, collections.deque[dict[str, Any]]] = (
            collections.OrderedDict()
        )
        self.recent_failures: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=self.limits.recent_failures
        )
        # health of the readings themselves, and optional sections
        self.errors: dict[str, tuple[str, int]] = {}
        self.last_ok_us: dict[str, int] = {}
        self.sections: dict[str, dict[str, Any]] = {}
        self.agent_health: dict[str, dict[str, Any]] = {}
        self.alerts: list[dict[str, Any]] = []

    # ------------------------------------------------------------ readings

    def ok(self, source: str) -> None:
        """A reading from `source` succeeded (clears its error)."""
        self.errors.pop(source, None)
        self.last_ok_us[source] = self.clock.wall_us()

    def error(self, source: str, message: str) -> None:
        """A reading from `source` failed; the earliest time of a run of failures is kept."""
        since = self.errors.get(source, (message, self.clock.wall_us()))[1]
        self.errors[source] = (message, since)

    def apply_status(self, status: cpb.ClusterStatus) -> None:
        """GetStatus: leader, term, standbys, services, queue depth, the leader's counts."""
        if status.term and status.term != self.term:
            if self.term:
                self.leader_changes.append(
                    {
                        "at_us": self.clock.wall_us(),
                        "term": status.term,
                        "leader_id": status.leader_id,
                        "leader_endpoint": status.leader_endpoint,
                        "previous_term": self.term,
                    }
                )
                # the stream moves to the new leader; what happened in between is not seen
                self.gaps += 1
            self.term = status.term
        self.status = status
        self.apply_services(
            [
                {
                    "kind": s.kind,
                    "id": s.instance_id,
                    "endpoint": s.endpoint,
                    "metadata": dict(s.metadata),
                }
                for s in status.services
            ],
            source="GetStatus",
        )
        self.ok("status")

    def apply_services(self, services: Iterable[Mapping[str, Any]], source: str) -> None:
        """Registered service instances (from GetStatus, or etcd's services/ when no
        coordinator answers)."""
        self.services = [
            {
                "kind": str(s["kind"]),
                "id": str(s["id"]),
                "endpoint": str(s["endpoint"]),
                "metadata": dict(s.get("metadata") or {}),
            }
            for s in services
        ]
        self.services_from = source
        live = {s["endpoint"] for s in self.services}
        for endpoint in list(self.service_health):
            if endpoint not in live:
                del self.service_health[endpoint]

    def apply_leader(self, leader_id: str, endpoint: str, term: int) -> None:
        """The leader as etcd's election names it (used when GetStatus fails)."""
        status = cpb.ClusterStatus()
        if self.status is not None:
            status.CopyFrom(self.status)
        status.leader_id, status.leader_endpoint, status.term = leader_id, endpoint, term
        # the live figures are the leader's; from etcd alone they are unknown
        status.from_leader = False
        status.agents_connected = 0
        status.queue_depth = 0
        status.ClearField("task_counts")
        if term and term != self.term:
            if self.term:
                self.leader_changes.append(
                    {
                        "at_us": self.clock.wall_us(),
                        "term": term,
                        "leader_id": leader_id,
                        "leader_endpoint": endpoint,
                        "previous_term": self.term,
                    }
                )
                self.gaps += 1
            self.term = term
        self.status = status

    def apply_service_health(self, results: Mapping[str, str]) -> None:
        """grpc.health.v1 Check results by endpoint: SERVING, NOT_SERVING, or why it failed."""
        now = self.clock.wall_us()
        for endpoint, result in results.items():
            self.service_health[endpoint] = (result, now)

    def apply_agents(self, agents: Sequence[cpb.AgentStatus]) -> None:
        """ListAgents: the agents connected to the leader, with their counters."""
        self.agents = {a.agent_id: a for a in agents}
        self.agents_at_us = self.clock.wall_us()
        self.ok("agents")
        # drop held tasks whose end we missed: the agent is gone or holds nothing, and
        # the task is older than ListAgents can have raced
        now = self.clock.monotonic()
        grace = self.limits.held_grace_s
        by_agent: dict[str, list[_Held]] = collections.defaultdict(list)
        for held in self.held.values():
            by_agent[held.agent_id].append(held)
        for agent_id, holding in by_agent.items():
            agent = self.agents.get(agent_id)
            inflight = agent.inflight if agent is not None else 0
            if len(holding) <= inflight:
                continue
            # more held than the leader says the agent runs: the oldest are the ones whose
            # end was missed (a busy agent is never idle, so waiting for inflight == 0 would
            # keep them forever under a backlog)
            holding.sort(key=lambda h: (h.assigned_at_us, h.seen_at))
            for held in holding[: len(holding) - inflight]:
                if now - held.seen_at > grace:
                    del self.held[held.task_id]

    def apply_queue_sample(self, tasks: Sequence[tpb.Task], complete: bool) -> None:
        """ListTasks(QUEUED), one bounded page: the queue by priority. `complete` is False
        when the page did not hold every queued task (then it is a sample in key order)."""
        counts: collections.Counter[int] = collections.Counter(
            t.spec.priority for t in tasks if t.state == QUEUED
        )
        self.queue_by_priority = dict(counts)
        self.queue_sampled = sum(counts.values())
        self.queue_sample_complete = complete
        self.queue_sampled_at_us = self.clock.wall_us()
        self.ok("queue")

    def seed_held(self, tasks: Sequence[tpb.Task]) -> None:
        """ListTasks(ASSIGNED, RUNNING) after (re)connecting: tasks held before the stream
        started, so agents show what they run without waiting for new events."""
        now = self.clock.monotonic()
        for t in tasks:
            if t.state in HELD and t.task_id not in self.held:
                if t.attempts <= self.let_go.get(t.task_id, 0):
                    continue  # listed before the event that ended this attempt
                self._hold(t, now)

    def stream_opened(self) -> None:
        """A WatchEvents call is being opened: what is seen from here on counts."""
        if not self.seen_since_us:
            self.seen_since_us = self.clock.wall_us()

    def stream_up(self) -> None:
        self.stream = "connected"
        self.stream_was_up = True
        self.ok("events")

    def stream_down(self, message: str) -> None:
        """The events stream broke; what happens until it is back is not seen."""
        if self.stream == "connected":
            self.gaps += 1
        self.stream = "reconnecting"
        self.error("events", message)

    def apply_event(self, event: tpb.TaskEvent) -> None:
        """One WatchEvents event."""
        task = event.task
        prev, state = event.previous_state, task.state
        now_us = self.clock.wall_us()
        self.events += 1
        self.last_event_us = now_us
        if prev == state:
            # the coordinator relays an agent's progress as an event without a change
            held = self.held.get(task.task_id)
            if held is not None:
                held.progress_updates += 1
                held.last_progress_us = now_us
            self._remember(task, prev, now_us, progress=True)
            return
        self._remember(task, prev, now_us)
        bucket = self._bucket(now_us)
        if prev == UNSPECIFIED:
            # a new task: queued, or claimed at once when an agent was free
            bucket.submitted += 1
            self.seen["SUBMITTED"] += 1
        if state in HELD:
            self._hold(task, self.clock.monotonic())
        else:
            self.held.pop(task.task_id, None)
            if prev in HELD:
                self.let_go[task.task_id] = task.attempts
                self.let_go.move_to_end(task.task_id)
                if len(self.let_go) > self.limits.held_tasks:
                    self.let_go.popitem(last=False)
        if state == FAILED or prev == FAILED:
            # the coordinator publishes a retried failure as FAILED → QUEUED
            bucket.failed_attempts += 1
            self.seen["FAILED"] += 1
            self._failure(task, now_us)
        elif prev in HELD and state == QUEUED:
            # taken back without a failure report: the agent was lost or released it
            self.seen["REQUEUED"] += 1
        if state in TERMINAL and prev not in TERMINAL:
            self.seen[state_name(state)] += 1
            if state == SUCCEEDED:
                bucket.succeeded += 1
                self._latencies(bucket, task)
            elif state == DEAD_LETTER:
                bucket.dead_letter += 1
                self._failure(task, now_us)
            else:
                bucket.cancelled += 1
            self._usage(task)

    def apply_section(
        self,
        kind: str,
        *,
        status: str,
        message: str = "",
        data: Mapping[str, Any] | None = None,
        alerts: Sequence[Mapping[str, Any]] | None = None,
        agent_health: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """What a feed for an optional service read (the health monitor's agent states
        and alerts, say). `status` is a word for people: "ok", "unavailable", ..."""
        self.sections[kind] = {
            "status": status,
            "message": message,
            "data": dict(data or {}),
            "at_us": self.clock.wall_us(),
        }
        if alerts is not None:
            self.alerts = [dict(a) for a in alerts]
        if agent_health is not None:
            self.agent_health = {k: dict(v) for k, v in agent_health.items()}

    # ------------------------------------------------------------ internals

    def _bucket(self, now_us: int) -> _Bucket:
        """The bucket for `now_us`, adding empty ones for the quiet time before it."""
        index = int(now_us / 1e6 // self.limits.bucket_s)
        buckets = self.buckets
        if buckets and buckets[-1].index >= index:
            # the clock never goes back; a bucket in the past is the current one's
            return buckets[-1]
        first = buckets[-1].index + 1 if buckets else index
        first = max(first, index - self.limits.history + 1)
        for i in range(first, index + 1):
            buckets.append(_Bucket(i))
        # histograms are kept for the recent-latency window only: the older buckets keep
        # their figures, so memory stays a few MB at most whatever the history
        keep = self._latency_window()
        for i in range(len(buckets) - keep - 1, -1, -1):
            old = buckets[i]
            if old.point is not None:
                break
            old.close(int(old.index * self.limits.bucket_s * 1e6))
        return buckets[-1]

    def _latency_window(self) -> int:
        """Buckets the recent latency figures cover (the newest included)."""
        return max(1, round(self.limits.rate_window_s / self.limits.bucket_s))

    def _hold(self, task: tpb.Task, now: float) -> None:
        held = self.held.get(task.task_id)
        if held is not None and held.agent_id == task.agent_id and held.attempts == task.attempts:
            held.state = task.state  # ASSIGNED → RUNNING: same claim, keep its progress
            return
        if task.task_id not in self.held and len(self.held) >= self.limits.held_tasks:
            self.held.pop(next(iter(self.held)))  # the oldest: its end was probably missed
        self.held[task.task_id] = _Held(
            task_id=task.task_id,
            agent_id=task.agent_id,
            kind=task.spec.kind,
            state=task.state,
            attempts=task.attempts,
            assigned_at_us=task.assigned_at_us,
            seen_at=now,
        )

    def _latencies(self, bucket: _Bucket, task: tpb.Task) -> None:
        created, assigned, finished = task.created_at_us, task.assigned_at_us, task.finished_at_us
        if created and finished >= created:
            bucket.e2e.add((finished - created) / 1000)
        if created and assigned >= created:
            bucket.dispatch.add((assigned - created) / 1000)
        if assigned and finished >= assigned:
            bucket.run.add((finished - assigned) / 1000)

    def _usage(self, task: tpb.Task) -> None:
        u = task.usage
        if not (u.cost_usd or u.input_tokens or u.output_tokens):
            return
        for acc in (self.usage[task.agent_id], self.total_usage):
            acc.cost_usd += u.cost_usd
            acc.input_tokens += u.input_tokens
            acc.output_tokens += u.output_tokens
            acc.tasks += 1

    def _failure(self, task: tpb.Task, now_us: int) -> None:
        self.recent_failures.append(
            {
                "at_us": now_us,
                "task_id": task.task_id,
                "state": state_name(task.state),
                "kind": task.spec.kind,
                "agent_id": task.agent_id,
                "attempts": task.attempts,
                "error": task.last_error[:300],
            }
        )

    def _remember(self, task: tpb.Task, prev: int, now_us: int, progress: bool = False) -> None:
        histories = self.histories
        history = histories.get(task.task_id)
        if history is None:
            if len(histories) >= self.limits.task_histories:
                histories.popitem(last=False)
            history = histories[task.task_id] = collections.deque(
                maxlen=self.limits.events_per_task
            )
        else:
            histories.move_to_end(task.task_id)
        history.append(
            {
                "seen_at_us": now_us,
                "from": state_name(prev) if prev else "",
                "to": state_name(task.state),
                "progress": progress,
                "agent_id": task.agent_id,
                "attempts": task.attempts,
                "error": task.last_error[:300] if task.state in (FAILED, DEAD_LETTER) else "",
            }
        )

    # ------------------------------------------------------------ reading it out

    def history(self, task_id: str) -> list[dict[str, Any]]:
        """The events this model saw for one task, oldest first (empty if none)."""
        return list(self.histories.get(task_id, ()))

    def rate_per_s(self, window_s: float | None = None) -> float:
        """Finished tasks per second over the last `window_s` of complete buckets."""
        window_s = self.limits.rate_window_s if window_s is None else window_s
        now_index = int(self.clock.wall_us() / 1e6 // self.limits.bucket_s)
        self._bucket(self.clock.wall_us())
        oldest = now_index - max(1, round(window_s / self.limits.bucket_s))
        # never count time before this viewer started: a young viewer averages what it saw
        start_index = int((self.seen_since_us or self.started_us) / 1e6 // self.limits.bucket_s)
        oldest = max(oldest, start_index)
        done = [b for b in self.buckets if oldest <= b.index < now_index]
        span = now_index - oldest
        if span <= 0:
            return 0.0
        return sum(b.finished for b in done) / (span * self.limits.bucket_s)

    def snapshot(self, points: int | None = None) -> dict[str, Any]:
        """Everything, as plain JSON-able values. `points` caps the series' length."""
        now_us = self.clock.wall_us()
        self._bucket(now_us)  # quiet time shows as empty buckets, up to now
        series = list(self.buckets)
        if points is not None:
            series = series[-points:] if points > 0 else []
        status = self.status
        rate = self.rate_per_s()
        agents = self._agents_view()
        inflight = sum(a.inflight for a in self.agents.values())
        queued = status.queue_depth if status is not None else 0
        backlog = queued + inflight
        recent = self._recent_latency()
        return {
            "schema": SCHEMA_VERSION,
            "cluster": self.cluster,
            "generated_at_us": now_us,
            "source": {
                "started_us": self.started_us,
                "event_stream": self.stream,
                "events": self.events,
                "last_event_us": self.last_event_us,
                "gaps": self.gaps,
                "errors": {
                    k: {"message": m, "since_us": since}
                    for k, (m, since) in sorted(self.errors.items())
                },
                "last_ok_us": dict(sorted(self.last_ok_us.items())),
                "services_from": self.services_from,
            },
            "leader": self._leader_view(),
            "services": self._services_view(),
            "agents": agents,
            "queue": {
                "depth": queued if status is not None else None,
                "by_priority": {
                    str(p): n for p, n in sorted(self.queue_by_priority.items(), reverse=True)
                },
                "sampled": self.queue_sampled,
                "complete": self.queue_sample_complete,
                "sampled_at_us": self.queue_sampled_at_us,
                "covers": (
                    "every queued task"
                    if self.queue_sample_complete
                    else f"the first {self.queue_sampled} queued tasks in key order (a sample)"
                )
                if self.queue_sampled_at_us
                else "not read yet",
            },
            "throughput": {
                "bucket_s": self.limits.bucket_s,
                "window_s": self.limits.rate_window_s,
                "now_per_s": round(rate, 2),
                "peak_per_s": round(
                    max((b.finished for b in self.buckets), default=0) / self.limits.bucket_s, 2
                ),
                "series": [
                    {
                        "t_us": int(b.index * self.limits.bucket_s * 1e6),
                        "submitted": b.submitted,
                        "finished": b.finished,
                        "succeeded": b.succeeded,
                        "dead_letter": b.dead_letter,
                        "cancelled": b.cancelled,
                        "failed_attempts": b.failed_attempts,
                    }
                    for b in series
                ],
                "covers": "tasks this viewer saw finish, per bucket of its own clock",
            },
            "latency": {
                "series": [
                    b.latency_point(int(b.index * self.limits.bucket_s * 1e6)) for b in series
                ],
                "recent": recent,
                "covers": (
                    "SUCCEEDED tasks seen, from their records: end to end = created → finished, "
                    "dispatch = created → assigned (queue wait included), run = assigned → "
                    "finished (the last attempt); percentiles within 1 %"
                ),
            },
            "eta": {
                "queued": queued,
                "inflight": inflight,
                "backlog": backlog,
                "rate_per_s": round(rate, 2),
                "eta_s": (0.0 if backlog == 0 else round(backlog / rate, 1) if rate > 0 else None),
                "covers": (
                    f"queued + in flight at the finish rate of the last {self.limits.rate_window_s:g} s"
                ),
            },
            "counts": {
                "leader": {
                    "by_state": dict(sorted(status.task_counts.items()))
                    if status is not None
                    else {},
                    "term": self.term,
                    "covers": (
                        "what the leader holds now (tasks not finished), plus every task "
                        "finished since the cluster's etcd was new: the leaders keep the "
                        "totals in etcd, written each second (a killed leader's last second "
                        "may be missing)"
                    ),
                },
                "seen": {
                    "by_state": {k: self.seen[k] for k in sorted(self.seen) if k != "SUBMITTED"},
                    "submitted": self.seen["SUBMITTED"],
                    "since_us": self.seen_since_us,
                    "gaps": self.gaps,
                    "covers": (
                        "task changes this viewer saw on the events stream since it started: "
                        "FAILED counts failed attempts that were retried (a last failed "
                        "attempt is DEAD_LETTER), REQUEUED tasks taken back from a lost "
                        "agent; a stream outage or leader change loses what happened "
                        "meanwhile (see gaps)"
                    ),
                },
            },
            "costs": {
                "total_usd": round(self.total_usage.cost_usd, 6)
                if self.total_usage.tasks
                else None,
                "input_tokens": self.total_usage.input_tokens,
                "output_tokens": self.total_usage.output_tokens,
                "tasks_with_usage": self.total_usage.tasks,
                "covers": "usage recorded on the finished tasks this viewer saw (all attempts)",
            },
            "sections": self._sections_view(),
            "alerts": list(self.alerts),
            "recent_failures": list(reversed(self.recent_failures)),
        }

    def _leader_view(self) -> dict[str, Any]:
        s = self.status
        return {
            "id": s.leader_id if s else "",
            "endpoint": s.leader_endpoint if s else "",
            "term": s.term if s else 0,
            "strategy": s.assignment_strategy if s else "",
            "agents_connected": s.agents_connected if s else 0,
            "standbys": [
                {"id": sb.instance_id, "endpoint": sb.endpoint} for sb in (s.standbys if s else ())
            ],
            "changes": list(self.leader_changes),
        }

    def _services_view(self) -> list[dict[str, Any]]:
        s = self.status
        leader_id = s.leader_id if s else ""
        standby_ids = {sb.instance_id for sb in s.standbys} if s else set()
        out = []
        for svc in sorted(self.services, key=lambda x: (x["kind"], x["id"])):
            role = ""
            if svc["kind"] == "coordinator":
                role = (
                    "leader"
                    if svc["id"] == leader_id
                    else "standby"
                    if svc["id"] in standby_ids
                    else ""
                )
            health, checked = self.service_health.get(svc["endpoint"], ("UNKNOWN", 0))
            out.append({**svc, "role": role, "health": health, "checked_us": checked})
        return out

    def _agents_view(self) -> dict[str, Any]:
        by_agent: dict[str, list[_Held]] = collections.defaultdict(list)
        for held in self.held.values():
            by_agent[held.agent_id].append(held)
        now_us = self.clock.wall_us()
        limit = self.limits.tasks_per_agent
        groups: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for agent in sorted(self.agents.values(), key=lambda a: a.agent_id):
            tasks = sorted(by_agent.get(agent.agent_id, ()), key=lambda h: h.assigned_at_us)
            usage = self.usage.get(agent.agent_id)
            view = {
                "id": agent.agent_id,
                "pool": agent.pool_id,
                "roles": list(agent.roles),
                "kinds": list(agent.kinds),
                "capacity": agent.capacity,
                "inflight": agent.inflight,
                "load": round(agent.inflight / agent.capacity, 3) if agent.capacity else 0.0,
                "completed": agent.completed,
                "failed": agent.failed,
                "latency_ema_ms": round(agent.latency_ema_ms, 2),
                "draining": agent.draining,
                "connected_at_us": agent.connected_at_us,
                "tasks": [
                    {
                        "task_id": h.task_id,
                        "kind": h.kind,
                        "state": state_name(h.state),
                        "attempts": h.attempts,
                        "assigned_at_us": h.assigned_at_us,
                        "for_ms": round((now_us - h.assigned_at_us) / 1000, 1)
                        if h.assigned_at_us
                        else None,
                        "progress_updates": h.progress_updates,
                        "last_progress_us": h.last_progress_us,
                    }
                    for h in tasks[:limit]
                ],
                "tasks_more": max(0, len(tasks) - limit),
                "health": self.agent_health.get(agent.agent_id),
                "cost_usd": round(usage.cost_usd, 6) if usage else None,
                "tokens": {"input": usage.input_tokens, "output": usage.output_tokens}
                if usage
                else None,
            }
            if self.group_by == "pool":
                key = agent.pool_id or "(no pool)"
            else:
                key = ",".join(sorted(agent.roles)) or "(no role)"
            groups[key].append(view)
        return {
            "group_by": self.group_by,
            "total": len(self.agents),
            "read_at_us": self.agents_at_us,
            "groups": [
                {
                    "key": key,
                    "agents": members,
                    "count": len(members),
                    "inflight": sum(m["inflight"] for m in members),
                    "capacity": sum(m["capacity"] for m in members),
                    "completed": sum(m["completed"] for m in members),
                    "failed": sum(m["failed"] for m in members),
                }
                for key, members in sorted(groups.items())
            ],
        }

    def _sections_view(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        kinds = collections.Counter(s["kind"] for s in self.services)
        for kind in sorted(set(OPTIONAL_SERVICES) | set(self.sections)):
            read = self.sections.get(kind)
            running = kinds.get(kind, 0)
            if read is not None:
                status, message = read["status"], read["message"]
            elif running:
                status = "running"
                message = (
                    f"{running} instance(s) registered; this viewer does not read its data yet"
                )
            else:
                status = "not running"
                message = f"no {OPTIONAL_SERVICES.get(kind, kind)} is registered"
            out[kind] = {
                "label": OPTIONAL_SERVICES.get(kind, kind),
                "instances": running,
                "status": status,
                "message": message,
                "data": read["data"] if read else {},
            }
        return out

    def _recent_latency(self) -> dict[str, Any]:
        """Latency percentiles over the rate window."""
        window = self._latency_window()
        e2e, dispatch, run = BucketLatency(), BucketLatency(), BucketLatency()
        for b in list(self.buckets)[-window:]:
            e2e.merge(b.e2e)
            dispatch.merge(b.dispatch)
            run.merge(b.run)
        return {
            "window_s": self.limits.rate_window_s,
            "e2e": e2e.summary(),
            "dispatch": dispatch.summary(),
            "run": run.summary(),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
