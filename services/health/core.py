"""The active health monitor's logic: agent states, hung work, breakers, recovery.

Pure: no grpc, no etcd; time comes from the injected `Clock`. One `HealthCore` per
term of the active monitor. What goes in:
- `connect` / `heartbeat` / `disconnect` from each agent's Report stream;
- `tick()` from a timer (every `tick_s`);
- `load()` at takeover (the records in etcd and the agents registered there);
- the outcome of the actions it ordered (`release_done`, `replace_done`, `replace_failed`).
What comes out:
- directives, sent through each stream's `send` callback;
- `actions` (release claims, replace an agent) that the server carries out;
- `dirty`: agents whose `health/<agent>` record must be written (or deleted), fenced;
- events (state changes, alerts, recovery actions) to `subscribers`.

Times: every decision uses the monitor's monotonic clock. A heartbeat's task times are
read against the heartbeat's own `sent_at_us` (both the agent's clock), and anchored at
the moment it arrived, so clock skew between agent and monitor does not matter.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from protos.agentmesh.v1 import health_pb2 as hpb
from services._common.clock import Clock
from services._common.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from services.health.config import HealthConfig

HEALTHY = hpb.HEALTH_STATE_HEALTHY
DEGRADED = hpb.HEALTH_STATE_DEGRADED
CRITICAL = hpb.HEALTH_STATE_CRITICAL
FAILED = hpb.HEALTH_STATE_FAILED
CLOSED = hpb.BREAKER_STATE_CLOSED
OPEN = hpb.BREAKER_STATE_OPEN
HALF_OPEN = hpb.BREAKER_STATE_HALF_OPEN
ALL = hpb.ADMISSION_ALL
ONE = hpb.ADMISSION_ONE
NONE = hpb.ADMISSION_NONE
K = hpb.AlertKind
R = hpb.RecoveryKind

# ---- limits of a heartbeat (every field is bounded; see health.proto) ----
_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_TASKS = 1000
MAX_OUTCOMES = 64
MAX_ERROR_BYTES = 512
MAX_LIST = 32
MAX_NAME = 64
MAX_LABEL_VALUE = 256
MAX_LATENCY_MS = 86_400_000.0
MAX_LAG_MS = 3_600_000.0
MAX_TIMEOUT_S = 1e7
MAX_HEARTBEAT_BYTES = 1 << 20
"""A heartbeat within every field limit is far smaller (about 300 KiB at most)."""
MAX_LISTED_ALERTS = 100
MAX_REGISTERED_UNSEEN = 100_000
"""Registered agents kept while none of them has reported yet (10 pools' worth)."""
WINDOW_CAP = 10_000
"""Outcomes kept per breaker window, whatever its length (bounded memory)."""


def state_name(state: int) -> str:
    return str(hpb.HealthState.Name(state)).removeprefix("HEALTH_STATE_")


def _check_name(value: str, where: str, limit: int = MAX_NAME) -> None:
    if len(value) > limit:
        raise InvalidArgumentError(f"{where} is {len(value)} characters; the limit is {limit}")


def _finite(value: float, where: str, hi: float) -> None:
    if not (math.isfinite(value) and 0 <= value <= hi):
        raise InvalidArgumentError(f"{where} {value!r} is out of range: use 0 to {hi:g}")


def validate_info(info: hpb.AgentInfo) -> None:
    _check_name(info.pool_id, "info.pool_id", 128)
    _check_name(info.incarnation, "info.incarnation", 64)
    for name, values in (("kinds", info.kinds), ("roles", info.roles)):
        if len(values) > MAX_LIST:
            raise InvalidArgumentError(f"info.{name} has {len(values)} entries; the limit is 32")
        for v in values:
            _check_name(v, f"info.{name} entry")
    if len(info.labels) > MAX_LIST:
        raise InvalidArgumentError(f"info.labels has {len(info.labels)} entries; the limit is 32")
    for k, v in info.labels.items():
        _check_name(k, "info.labels key")
        _check_name(v, f"info.labels[{k!r}]", MAX_LABEL_VALUE)
    if not 1 <= info.capacity <= 1000:
        raise InvalidArgumentError(f"info.capacity {info.capacity} is out of range: use 1-1000")
    if info.replaces and not _ID_RE.fullmatch(info.replaces):
        raise InvalidArgumentError("info.replaces must be an agent id (1-128 of A-Z a-z 0-9 . _ -)")


def validate_heartbeat(hb: hpb.Heartbeat, first: bool) -> None:
    """Raise InvalidArgumentError naming the first field over its limit."""
    if hb.ByteSize() > MAX_HEARTBEAT_BYTES:
        raise InvalidArgumentError(
            f"heartbeat is {hb.ByteSize()} bytes; the limit is {MAX_HEARTBEAT_BYTES}"
        )
    if not _ID_RE.fullmatch(hb.agent_id):
        raise InvalidArgumentError("agent_id is required: 1-128 characters of A-Z a-z 0-9 . _ -")
    if first and not hb.HasField("info"):
        raise InvalidArgumentError("the first heartbeat of a stream must carry info")
    if hb.HasField("info"):
        validate_info(hb.info)
    if hb.sent_at_us <= 0:
        raise InvalidArgumentError("sent_at_us is required: the agent's wall clock in µs")
    if len(hb.tasks) > MAX_TASKS:
        raise InvalidArgumentError(f"tasks has {len(hb.tasks)} entries; the limit is {MAX_TASKS}")
    for t in hb.tasks:
        if not 1 <= len(t.task_id) <= 128:
            raise InvalidArgumentError("tasks[].task_id must be 1-128 characters")
        if t.started_at_us < 0 or t.last_progress_at_us < 0:
            raise InvalidArgumentError(f"tasks[{t.task_id!r}] times must not be negative")
        _finite(t.timeout_s, f"tasks[{t.task_id!r}].timeout_s", MAX_TIMEOUT_S)
    if len(hb.outcomes) > MAX_OUTCOMES:
        raise InvalidArgumentError(
            f"outcomes has {len(hb.outcomes)} entries; the limit is {MAX_OUTCOMES} (send the newest)"
        )
    for o in hb.outcomes:
        if len(o.task_id) > 128:
            raise InvalidArgumentError("outcomes[].task_id must be at most 128 characters")
        _finite(o.latency_ms, f"outcomes[{o.task_id!r}].latency_ms", MAX_LATENCY_MS)
        if len(o.error.encode()) > MAX_ERROR_BYTES:
            raise InvalidArgumentError(
                f"outcomes[{o.task_id!r}].error is over {MAX_ERROR_BYTES} bytes: cut it"
            )
    _finite(hb.loop_lag_ms, "loop_lag_ms", MAX_LAG_MS)
    _finite(hb.process.cpu_seconds, "process.cpu_seconds", 1e12)


# ---------------------------------------------------------------- what it orders


@dataclass(slots=True)
class Release:
    """Have the coordinator release claims (requeue the tasks, cancel them on the agent)."""

    agent_id: str
    claims: list[tuple[str, int]]
    """(task id, claim token); empty: every claim the agent holds."""
    reason: str
    hung: bool


@dataclass(slots=True)
class Replace:
    """Have a pool start a replacement (the directive path needs no action: it is sent)."""

    agent_id: str
    pool_id: str
    """The pool to ask."""
    endpoint: str
    """Its AgentPool endpoint."""
    own_pool: bool
    """The agent's own pool: stop the old agent there first."""
    info: hpb.AgentInfo
    reason: str


Action = Release | Replace


@dataclass(frozen=True, slots=True)
class PoolInfo:
    pool_id: str
    endpoint: str
    agents: int = 0


# ---------------------------------------------------------------- per agent


@dataclass(slots=True)
class TaskView:
    task_id: str
    token: int
    started: float
    """When it started, on the monitor's monotonic clock."""
    progress: float
    """Its last progress (or start), on the monitor's monotonic clock."""
    timeout_s: float


@dataclass
class Breaker:
    state: int = CLOSED
    consecutive: int = 0
    window: collections.deque[tuple[float, bool]] = field(
        default_factory=lambda: collections.deque(maxlen=WINDOW_CAP)
    )
    ejections: int = 0
    open_until: float = 0.0
    open_until_us: int = 0
    calm_since: float = 0.0
    """Since when it has been closed without an ejection (for decaying `ejections`)."""
    trial_since: float = 0.0
    """Since when it has been half-open, waiting for its trial task's outcome."""


@dataclass(eq=False)
class AgentView:
    agent_id: str
    info: hpb.AgentInfo
    born: float
    """When this monitor first knew of it (monotonic): the probation clock."""
    state: int = HEALTHY
    since_us: int = 0
    reason: str = ""
    heard: bool = False
    """A heartbeat of this agent reached this monitor (in this term)."""
    last_heartbeat: float = 0.0
    """Its last heartbeat (monotonic); for an agent not heard yet: when it became known."""
    last_heartbeat_us: int = 0
    judge_after: float = 0.0
    """An agent not heard yet is not judged before this (takeover grace)."""
    send: Callable[[hpb.HealthDirective | None], None] | None = None
    stream: int = 0
    closed_at: float | None = None
    lag_s: float = 0.0
    tasks: dict[str, TaskView] = field(default_factory=dict)
    released: dict[tuple[str, int], float] = field(default_factory=dict)
    """Claims released as hung → when; kept while the agent still lists the task."""
    confirmed: set[tuple[str, int]] = field(default_factory=set)
    """Of those, the ones the coordinator released (the agent did hold them)."""
    release_backoff: dict[tuple[str, int], float] = field(default_factory=dict)
    completed: int = 0
    failed: int = 0
    rss_bytes: int = 0
    cpu_seconds: float = 0.0
    paused: bool = False
    draining: bool = False
    baseline_ms: float = 0.0
    recent_ms: float = 0.0
    samples: int = 0
    rise_since: float | None = None
    latency_alert: bool = False
    breaker: Breaker = field(default_factory=Breaker)
    replaces: str = ""
    replaced_by: str = ""
    lineage_failures: int = 0
    """Failed replacements in a row in this agent's line (see `_order_replacement`)."""
    escalated: bool = False
    replace_pending: float | None = None
    retry_replace_at: float | None = None
    drain_sent: bool = False
    hung_tasks: int = 0
    failed_at: float | None = None
    registered: bool = False
    """Registered in etcd (agents/<id>) while a monitor watched: hosted by a pool or an
    agent process, so a failure is worth a replacement through the AgentPool API."""

    @property
    def admission(self) -> int:
        if self.state == FAILED or self.breaker.state == OPEN:
            return NONE
        if self.breaker.state == HALF_OPEN:
            return ONE
        return ALL


# ---------------------------------------------------------------- the core


class HealthCore:
    """The monitor's state for one term. Build one per term."""

    def __init__(
        self,
        cfg: HealthConfig,
        clock: Clock,
        *,
        term: int,
        node_id: str,
        endpoint: str = "",
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.term = term
        self.node_id = node_id
        self.endpoint = endpoint
        self.agents: dict[str, AgentView] = {}
        self.pools: dict[str, PoolInfo] = {}
        self.alerts: dict[str, hpb.Alert] = {}
        """Open alerts by id, oldest first."""
        self.actions: collections.deque[Action] = collections.deque()
        self.dirty: set[str] = set()
        self.changed = asyncio.Event()
        """Set when there are actions to carry out or records to write."""
        self.subscribers: set[Callable[[hpb.HealthEvent], None]] = set()
        self._looked = clock.monotonic()
        """When the monitor last looked at anything (see `_now`)."""
        self.blind_s = 0.0
        """Time the monitor itself did not run this term, left out of every timer."""
        self._blind_after_s = max(cfg.heartbeat_interval_s, 2 * cfg.tick_s)
        self.started = self._looked
        self.started_us = clock.wall_us()
        self.stats: collections.Counter[str] = collections.Counter()
        self._streams = itertools.count(1)
        self._expected: dict[str, str] = {}
        """A replacement's agent id (from a pool's answer) → the agent it replaces."""
        self._placed: collections.Counter[str] = collections.Counter()
        """Replacements sent to each pool this term (its registered count lags)."""
        self._registered: set[str] = set()
        """Agents registered in etcd that this monitor has no view of yet."""
        self._lineage: dict[str, int] = {}
        """An agent that left while its replacement was under way → its line's failures
        (a pool stops the old agent before the new one reports)."""

    # ---- takeover ----

    def load(
        self, records: Iterable[hpb.AgentHealth], registered: Iterable[tuple[str, str]]
    ) -> None:
        """Adopt the records in etcd and the agents registered there (agent id, pool id).

        Every timer starts now: an agent not heard yet is not judged for
        `takeover_grace_s`, and its silence counts from now, so no agent is declared
        FAILED for not having reported to a monitor that did not exist yet."""
        now, wall = self._now(), self.clock.wall_us()
        for rec in records:
            view = self._view(rec.agent_id, rec.info if rec.HasField("info") else None, now)
            if not view.info.pool_id:
                view.info.pool_id = rec.pool_id
            view.state = rec.state or HEALTHY
            view.since_us = rec.state_since_us or wall
            view.reason = rec.reason
            b = view.breaker
            b.state = rec.breaker or CLOSED
            b.ejections = rec.ejections
            b.consecutive = rec.consecutive_failures
            b.calm_since = now
            if b.state == OPEN:
                left_s = max(0.0, (rec.ejected_until_us - wall) / 1e6)
                b.open_until, b.open_until_us = now + left_s, rec.ejected_until_us
            view.replaces, view.replaced_by = rec.replaces, rec.replaced_by
            view.lineage_failures = rec.replacement_failures
            view.escalated = rec.escalated
            view.hung_tasks = rec.hung_tasks
            view.registered = rec.registered
            if view.state != HEALTHY:
                self._open_alert(K.ALERT_KIND_STATE, view, _state_message(view), rec.state_since_us)
            if b.state in (OPEN, HALF_OPEN):
                self._open_alert(K.ALERT_KIND_EJECTED, view, f"ejected: {view.reason}")
            if view.escalated:
                self._open_alert(K.ALERT_KIND_ESCALATION, view, _escalation_message(view))
            if view.state == FAILED:
                view.failed_at = now - max(0.0, (wall - view.since_us) / 1e6)
                if not view.replaced_by and not view.escalated:
                    # the last monitor may have died before ordering it: order it again
                    view.retry_replace_at = now + self.cfg.takeover_grace_s
        for agent_id, pool_id in registered:
            if agent_id not in self.agents and _ID_RE.fullmatch(agent_id):
                self._view(agent_id, hpb.AgentInfo(pool_id=pool_id, capacity=1), now)
            if agent_id in self.agents:
                self.agents[agent_id].registered = True
        for view in self.agents.values():
            view.last_heartbeat = now
            view.judge_after = now + self.cfg.takeover_grace_s

    def registered(self, added: Iterable[str], removed: Iterable[str] = ()) -> None:
        """Agents registered in etcd (agents/<id>) since the last call, and those whose
        registration went. An agent stays `registered` once seen: its registration goes
        with its pool's lease when the pool dies, which is when it needs replacing."""
        for agent_id in added:
            view = self.agents.get(agent_id)
            if view is not None:
                view.registered = True
            elif len(self._registered) < MAX_REGISTERED_UNSEEN:
                self._registered.add(agent_id)
        for agent_id in removed:
            self._registered.discard(agent_id)

    def set_pools(self, pools: Iterable[PoolInfo]) -> None:
        """The agent pools registered now (services/agent-pool/)."""
        self.pools = {p.pool_id: p for p in pools}

    # ---- streams ----

    def connect(
        self, first: hpb.Heartbeat, send: Callable[[hpb.HealthDirective | None], None]
    ) -> int:
        """A Report stream opened with `first`; returns its token (newest stream wins).
        The caller passes `first` to `heartbeat` next."""
        validate_heartbeat(first, first=True)
        now = self._now()
        info = first.info
        view = self.agents.get(first.agent_id)
        if (
            view is not None
            and view.state == FAILED
            and view.info.incarnation
            and info.incarnation
            and view.info.incarnation != info.incarnation
        ):
            # a new agent took a FAILED agent's id (its pool restarted): a fresh start
            self._forget(view, "a new incarnation of the agent took its id")
            if view.registered:
                self._registered.add(view.agent_id)  # its pool registered the id again
            view = None
        if (
            view is not None
            and view.send is not None
            and view.info.incarnation
            and view.info.incarnation != info.incarnation
            and now - view.last_heartbeat < self.cfg.degraded_after_s
        ):
            # Another process says it is this agent, whose stream is open and answering.
            # The newest stream would win: it would close the real agent's, speak for it
            # (a `leaving` deleted its record, an ejection with it) and flap with it. As
            # the coordinator's hello: the newcomer is refused. A restarted pool's agent
            # (the old run silent) still takes its id over.
            raise AlreadyExistsError(
                f"agent id {first.agent_id!r} reports already from pool "
                f"{view.info.pool_id!r} (another incarnation, heard "
                f"{now - view.last_heartbeat:.1f} s ago); every agent id must be unique "
                "(give each agent pool its own --pool-id)"
            )
        if view is None:
            view = self._view(first.agent_id, info, now)
            view.last_heartbeat = now
        else:
            replaces = view.info.replaces
            view.info.CopyFrom(info)
            view.info.replaces = info.replaces or replaces
        predecessor = info.replaces or self._expected.pop(view.agent_id, "")
        if predecessor and not view.replaces:
            self._link(view, predecessor, now)
        if view.send is not None:
            view.send(None)  # the older stream of a reconnect that raced it
        view.stream = next(self._streams)
        view.send = send
        view.closed_at = None
        send(
            hpb.HealthDirective(
                welcome=hpb.HealthWelcome(
                    monitor_id=self.node_id,
                    term=self.term,
                    heartbeat_interval_s=self.cfg.heartbeat_interval_s,
                )
            )
        )
        if view.breaker.state == OPEN and view.state != FAILED:
            send(self._pause(view))
        return view.stream

    def disconnect(self, agent_id: str, stream: int) -> None:
        view = self.agents.get(agent_id)
        if view is None or view.stream != stream:
            return
        view.send = None
        view.closed_at = self._now()

    def heartbeat(self, stream: int, hb: hpb.Heartbeat) -> None:
        validate_heartbeat(hb, first=False)
        view = self.agents.get(hb.agent_id)
        if view is None or view.stream != stream:
            return  # a stream that a newer one replaced
        now = self._now()
        self.stats["heartbeats"] += 1
        if hb.leaving:
            self._forget(view, "the agent left")
            return
        view.heard = True
        view.last_heartbeat = now
        view.last_heartbeat_us = self.clock.wall_us()
        view.lag_s = hb.loop_lag_ms / 1000.0
        view.completed, view.failed = hb.completed, hb.failed
        view.rss_bytes, view.cpu_seconds = hb.process.rss_bytes, hb.process.cpu_seconds
        view.paused, view.draining = hb.paused, hb.draining
        sent = hb.sent_at_us
        tasks: dict[str, TaskView] = {}
        for t in hb.tasks:
            started = now - max(0, sent - t.started_at_us) / 1e6
            progress_us = max(t.started_at_us, t.last_progress_at_us)
            progress = now - max(0, sent - progress_us) / 1e6
            tasks[t.task_id] = TaskView(t.task_id, t.claim_token, started, progress, t.timeout_s)
        view.tasks = tasks
        for key in tuple(view.released):
            listed = tasks.get(key[0])
            if listed is None or listed.token != key[1]:
                del view.released[key]  # the cancel worked: the task left the agent
                view.confirmed.discard(key)
                self._close_alert(_alert_id(K.ALERT_KIND_HUNG_TASK, view.agent_id, key[0]))
        for o in hb.outcomes:
            self._outcome(view, o, now)
        if view.state == FAILED:
            self._came_back(view, now)
            return
        self._judge(view, now)
        self._check_hung(view, now)

    # ---- timers ----

    def tick(self) -> None:
        """Check every timer: silence, hung work, ejections, replacements."""
        now = self._now()
        cfg = self.cfg
        for view in tuple(self.agents.values()):
            if view.state == FAILED:
                if view.retry_replace_at is not None and now >= view.retry_replace_at:
                    view.retry_replace_at = None
                    self._dispatch_replacement(view, now, view.reason)
                if (
                    view.failed_at is not None
                    and now - view.failed_at >= cfg.forget_after_s
                    and view.send is None
                ):
                    self._forget(view, "FAILED long ago")
                    continue
            else:
                self._judge(view, now)
                if view.state != FAILED:
                    self._check_hung(view, now)
                    self._breaker_timers(view, now)
                    if (
                        view.lineage_failures
                        and view.replaces
                        and view.heard
                        and not view.replace_pending
                        and now - view.born >= cfg.replace_probation_s
                    ):
                        view.lineage_failures = 0  # its line is healthy again
                        self._persist(view)
            if (
                view.replace_pending is not None
                and not view.replaced_by
                and now - view.replace_pending >= cfg.replace_timeout_s
            ):
                self.replace_failed(
                    view.agent_id, f"no replacement reported within {cfg.replace_timeout_s:g} s"
                )

    # ---- outcomes of what it ordered ----

    def release_done(
        self, action: Release, released: list[tuple[str, int]], error: str = ""
    ) -> None:
        """The coordinator's answer to a Release (or why it could not be reached)."""
        view = self.agents.get(action.agent_id)
        self._event(
            recovery=hpb.RecoveryAction(
                kind=R.RECOVERY_KIND_RELEASE,
                agent_id=action.agent_id,
                task_ids=[t for t, _ in (released or action.claims)],
                ok=not error,
                detail=error or action.reason,
            )
        )
        if error:
            if view is not None and action.hung:
                now = self._now()
                for key in action.claims:
                    # detect it again (and retry) after a pause, not on every tick
                    view.released.pop(key, None)
                    view.release_backoff[key] = now + 1.0
            return
        self.stats["claims_released"] += len(released)
        if not action.hung or view is None:
            return
        now = self._now()
        done = set(released)
        for key in action.claims:
            if key in done:
                # the agent held it and let it stall: that counts against the agent
                view.confirmed.add(key)
                view.hung_tasks += 1
                self.stats["hung_released"] += 1
                self._breaker_failure(view, now, f"hung task {key[0]}")
            else:
                # the claim had moved on already (a frozen pool's claims died with its
                # lease): the agent lists a task it no longer holds, not a hang
                self._close_alert(_alert_id(K.ALERT_KIND_HUNG_TASK, view.agent_id, key[0]))

    def replace_done(self, agent_id: str, new_agent_id: str) -> None:
        """A pool started `new_agent_id` to replace `agent_id`."""
        view = self.agents.get(agent_id)
        if view is None or view.replaced_by:
            return
        successor = self.agents.get(new_agent_id)
        if successor is not None:
            self._link(successor, agent_id, self._now())
        else:
            self._expected[new_agent_id] = agent_id  # linked on its first heartbeat

    def pool_unreachable(self, agent_id: str, pool_id: str, why: str) -> None:
        """The pool asked to replace `agent_id` did not answer at all (it died and its
        registration has not expired yet): forget that pool and ask another at once,
        without counting it against the agent's line."""
        view = self.agents.get(agent_id)
        self.pools.pop(pool_id, None)
        if view is None or view.replaced_by or view.replace_pending is None:
            return
        if not self.pools:
            self.replace_failed(agent_id, why)
            return
        view.replace_pending = None
        self.stats["replacements"] -= 1  # the same replacement, sent elsewhere
        self._dispatch_replacement(view, self._now(), view.reason)

    def replace_failed(self, agent_id: str, why: str) -> None:
        """A replacement order failed (or none came up in time): count it, retry or escalate."""
        view = self.agents.get(agent_id)
        if view is None or view.replaced_by:
            return
        now = self._now()
        view.replace_pending = None
        view.lineage_failures += 1
        self._event(
            recovery=hpb.RecoveryAction(
                kind=R.RECOVERY_KIND_REPLACE, agent_id=agent_id, ok=False, detail=why
            )
        )
        if view.lineage_failures >= self.cfg.max_replacements:
            self._escalate(view, why)
        else:
            view.retry_replace_at = now + self.cfg.replace_retry_s
        self._persist(view)

    # ---- reading ----

    def record(self, agent_id: str) -> hpb.AgentHealth | None:
        """What `health/<agent>` must hold now (None: no record, i.e. healthy, breaker
        closed, nothing to remember)."""
        view = self.agents.get(agent_id)
        if view is None or not _needs_record(view):
            return None
        rec = self.health(view)
        rec.term = self.term
        rec.response_s = 0.0
        rec.connected = False
        return rec

    def health(self, view: AgentView) -> hpb.AgentHealth:
        b = view.breaker
        return hpb.AgentHealth(
            agent_id=view.agent_id,
            pool_id=view.info.pool_id,
            state=view.state,  # type: ignore[arg-type]
            state_since_us=view.since_us,
            reason=view.reason,
            response_s=self._response(view, self._now()),
            baseline_latency_ms=view.baseline_ms,
            recent_latency_ms=view.recent_ms,
            breaker=b.state,  # type: ignore[arg-type]
            consecutive_failures=b.consecutive,
            ejections=b.ejections,
            ejected_until_us=b.open_until_us if b.state == OPEN else 0,
            admission=view.admission,  # type: ignore[arg-type]
            tasks_in_flight=len(view.tasks),
            completed=view.completed,
            failed=view.failed,
            rss_bytes=view.rss_bytes,
            cpu_seconds=view.cpu_seconds,
            connected=view.send is not None,
            last_heartbeat_us=view.last_heartbeat_us,
            replaces=view.replaces,
            replaced_by=view.replaced_by,
            replacement_failures=view.lineage_failures,
            escalated=view.escalated,
            info=view.info,
            hung_tasks=view.hung_tasks,
            latency_alert=view.latency_alert,
            registered=view.registered,
        )

    def get(self, agent_id: str) -> hpb.AgentHealth:
        view = self.agents.get(agent_id)
        if view is None:
            raise NotFoundError(f"the health monitor knows no agent {agent_id!r}")
        return self.health(view)

    def page(
        self, states: Iterable[int], page_size: int, after: str
    ) -> tuple[list[hpb.AgentHealth], str]:
        if page_size > 1000:
            raise InvalidArgumentError(f"page_size {page_size} is too large: use 1-1000")
        size = page_size or 100
        wanted = set(states)
        ids = sorted(a for a in self.agents if a > after)
        out: list[hpb.AgentHealth] = []
        for i, agent_id in enumerate(ids):
            view = self.agents[agent_id]
            if wanted and view.state not in wanted:
                continue
            out.append(self.health(view))
            if len(out) == size:
                return out, agent_id if i + 1 < len(ids) else ""
        return out, ""

    def counts(self) -> dict[str, int]:
        counts = {state_name(s): 0 for s in (HEALTHY, DEGRADED, CRITICAL, FAILED)}
        for view in self.agents.values():
            counts[state_name(view.state)] += 1
        return counts

    def summary(self) -> hpb.HealthSummary:
        views = self.agents.values()
        s = hpb.HealthSummary(
            monitor_id=self.node_id,
            monitor_endpoint=self.endpoint,
            term=self.term,
            state_counts=self.counts(),
            ejected=sum(v.breaker.state == OPEN for v in views if v.state != FAILED),
            half_open=sum(v.breaker.state == HALF_OPEN for v in views if v.state != FAILED),
            connected=sum(v.send is not None for v in views),
            reporting=sum(v.heard for v in views),
            open_alert_count=len(self.alerts),
            heartbeats=self.stats["heartbeats"],
            hung_released=self.stats["hung_released"],
            replacements=self.stats["replacements"],
            failed_declared=self.stats["failed_declared"],
            term_started_at_us=self.started_us,
        )
        s.open_alerts.extend(itertools.islice(self.alerts.values(), MAX_LISTED_ALERTS))
        return s

    def take_actions(self) -> list[Action]:
        out = list(self.actions)
        self.actions.clear()
        return out

    def take_dirty(self) -> list[str]:
        out = sorted(self.dirty)
        self.dirty.clear()
        return out

    # ---- judging ----

    def _response(self, view: AgentView, now: float) -> float:
        if not view.heard and now < view.judge_after:
            return 0.0
        return max(now - view.last_heartbeat, view.lag_s if view.heard else 0.0)

    def _judge(self, view: AgentView, now: float) -> None:
        cfg = self.cfg
        if view.state == FAILED or (not view.heard and now < view.judge_after):
            return
        if view.send is None and view.closed_at is not None:
            gone = now - view.closed_at
            if gone >= cfg.reconnect_grace_s:
                self._fail(view, f"its Report stream closed {gone:.1f} s ago and did not come back")
                return
        silence = now - view.last_heartbeat
        if silence >= cfg.failed_after_s:
            why = f"no heartbeat for {silence:.1f} s"
            if not view.heard:
                why += " (none since this monitor took over)"
            self._fail(view, why)
            return
        response = self._response(view, now)
        if response < cfg.degraded_after_s:
            state = HEALTHY
        elif response < cfg.critical_after_s:
            state = DEGRADED
        else:
            state = CRITICAL
        if state != view.state:
            self._set_state(view, state, f"response {response:.1f} s")

    def _set_state(self, view: AgentView, state: int, reason: str) -> None:
        previous = view.state
        view.state = state
        view.since_us = self.clock.wall_us()
        view.reason = reason
        alert = _alert_id(K.ALERT_KIND_STATE, view.agent_id)
        if state == HEALTHY:
            self._close_alert(alert)
        else:
            self._open_alert(K.ALERT_KIND_STATE, view, _state_message(view))
        self._changed(view, previous, reason)

    def _fail(self, view: AgentView, why: str) -> None:
        now = self._now()
        self._set_state(view, FAILED, why)
        view.failed_at = now
        self.stats["failed_declared"] += 1
        self._close_alert(_alert_id(K.ALERT_KIND_EJECTION_CAP, view.agent_id))
        # the coordinator requeues a dead agent's claims itself (stream drop, lease
        # expiry); this covers an agent whose process lives on but no longer answers
        self._act(Release(view.agent_id, [], f"agent declared FAILED: {why}", hung=False))
        self._order_replacement(view, now, why)

    def _came_back(self, view: AgentView, now: float) -> None:
        """A FAILED agent heartbeats again (its pool thawed, say)."""
        if view.replaced_by or view.replace_pending is not None:
            if not view.drain_sent and view.send is not None:
                view.drain_sent = True
                successor = view.replaced_by or "a replacement being started"
                view.send(
                    hpb.HealthDirective(
                        drain=hpb.DrainAgent(
                            reason=f"declared FAILED ({view.reason}) and replaced by {successor}"
                        )
                    )
                )
                self._event(
                    recovery=hpb.RecoveryAction(
                        kind=R.RECOVERY_KIND_DRAIN,
                        agent_id=view.agent_id,
                        ok=True,
                        detail=f"replaced by {successor}",
                    )
                )
            return
        # nothing replaced it (recovery escalated, or a retry is due): it recovered
        view.retry_replace_at = None
        view.failed_at = None
        if view.escalated:
            view.escalated = False
            self._close_alert(_alert_id(K.ALERT_KIND_ESCALATION, view.agent_id))
        view.lineage_failures = 0
        self._set_state(view, HEALTHY, "heartbeats resumed after FAILED; nothing replaced it")
        self._judge(view, now)

    def _check_hung(self, view: AgentView, now: float) -> None:
        cfg = self.cfg
        if not view.heard or now - view.last_heartbeat >= cfg.degraded_after_s:
            return  # only an agent that keeps answering can be judged by its tasks
        for t in view.tasks.values():
            key = (t.task_id, t.token)
            released_at = view.released.get(key)
            if released_at is not None:
                if (
                    key in view.confirmed
                    and now - released_at >= cfg.cancel_grace_s
                    and view.replace_pending is None
                    and view.send is not None
                ):
                    self._order_replacement(
                        view,
                        now,
                        f"task {t.task_id} still runs {now - released_at:.1f} s after its claim "
                        "was released: its executor does not stop",
                    )
                continue
            if view.release_backoff.get(key, 0.0) > now:
                continue
            idle, running = now - t.progress, now - t.started
            if idle >= cfg.stall_limit_s:
                why = f"no progress for {idle:.1f} s (stall limit {cfg.stall_limit_s:g} s)"
            elif t.timeout_s > 0 and running >= t.timeout_s + cfg.deadline_grace_s:
                why = f"running {running:.1f} s, past its {t.timeout_s:g} s deadline"
            else:
                continue
            view.released[key] = now
            self._open_alert(
                K.ALERT_KIND_HUNG_TASK, view, f"task {t.task_id} hung: {why}", task_id=t.task_id
            )
            self._act(Release(view.agent_id, [key], f"hung: {why}", hung=True))

    # ---- latency baseline and the predictive alert ----

    def _latency(self, view: AgentView, ms: float, now: float) -> None:
        cfg = self.cfg
        view.samples += 1
        if view.samples == 1:
            view.baseline_ms = view.recent_ms = ms
            return
        view.recent_ms = cfg.recent_alpha * ms + (1 - cfg.recent_alpha) * view.recent_ms
        trusted = view.samples > cfg.baseline_min_samples
        limit = view.baseline_ms * (1 + cfg.predictive_rise)
        # The baseline learns from ordinary samples only, and holds still while a rise
        # is judged: otherwise a rise would feed the baseline as fast as the recent
        # average climbs, and a steady +50 % would never show.
        if not trusted or (ms < limit and view.rise_since is None):
            view.baseline_ms = cfg.baseline_alpha * ms + (1 - cfg.baseline_alpha) * view.baseline_ms
        risen = trusted and view.recent_ms >= limit
        alert = _alert_id(K.ALERT_KIND_PREDICTIVE, view.agent_id)
        if not risen:
            view.rise_since = None
            if view.latency_alert:
                view.latency_alert = False
                self._close_alert(alert)
            return
        if view.rise_since is None:
            view.rise_since = now
        lasted = now - view.rise_since
        if not view.latency_alert and lasted >= cfg.predictive_window_s:
            view.latency_alert = True
            self._open_alert(
                K.ALERT_KIND_PREDICTIVE,
                view,
                f"latency {view.recent_ms:.0f} ms is {view.recent_ms / view.baseline_ms - 1:.0%} "
                f"over its baseline {view.baseline_ms:.0f} ms for {lasted:.0f} s",
            )
        elif view.latency_alert and lasted >= cfg.rebaseline_after_s:
            view.baseline_ms = view.recent_ms  # a lasting level is the new normal
            view.rise_since = None
            view.latency_alert = False
            self._close_alert(alert)

    def _outcome(self, view: AgentView, o: hpb.TaskOutcome, now: float) -> None:
        if o.ok:
            self._latency(view, o.latency_ms, now)
            self._breaker_success(view, now)
        elif o.retryable:
            self._breaker_failure(view, now, f"task {o.task_id} failed: {o.error[:200]}")
        # a non-retryable failure is the task's own fault (bad input): not the agent's

    # ---- the circuit breaker ----

    def _trim(self, b: Breaker, now: float) -> None:
        horizon = now - self.cfg.breaker_window_s
        while b.window and b.window[0][0] < horizon:
            b.window.popleft()

    def _breaker_success(self, view: AgentView, now: float) -> None:
        b = view.breaker
        if b.state == OPEN:
            return  # work it started before the ejection: neither proof nor blame
        b.window.append((now, True))
        self._trim(b, now)
        b.consecutive = 0
        self._close_alert(_alert_id(K.ALERT_KIND_EJECTION_CAP, view.agent_id))
        if b.state == HALF_OPEN:
            b.state = CLOSED
            b.calm_since = now
            b.window.clear()
            view.reason = "succeeded on trial: breaker closed"
            self._close_alert(_alert_id(K.ALERT_KIND_EJECTED, view.agent_id))
            self._send(view, hpb.HealthDirective(resume=hpb.ResumeAgent(reason=view.reason)))
            self._changed(view, view.state, view.reason)

    def _breaker_failure(self, view: AgentView, now: float, why: str) -> None:
        cfg = self.cfg
        b = view.breaker
        if b.state == OPEN or view.state == FAILED:
            return
        b.window.append((now, False))
        self._trim(b, now)
        b.consecutive += 1
        if b.state == HALF_OPEN:
            self._eject(view, now, f"failed on trial ({why})")
            return
        total = len(b.window)
        fails = sum(1 for _, ok in b.window if not ok)
        if b.consecutive >= cfg.breaker_consecutive:
            self._eject(view, now, f"{b.consecutive} failures in a row (last: {why})")
        elif total >= cfg.breaker_min_outcomes and fails / total >= cfg.breaker_error_rate:
            self._eject(view, now, f"{fails} of {total} tasks failed in {cfg.breaker_window_s:g} s")

    def _eject(self, view: AgentView, now: float, why: str) -> None:
        cfg = self.cfg
        b = view.breaker
        live = [v for v in self.agents.values() if v.state != FAILED]
        ejected = sum(1 for v in live if v.breaker.state == OPEN)
        allowed = math.floor(cfg.max_ejected_share * len(live))
        if ejected + 1 > allowed:
            self._open_alert(
                K.ALERT_KIND_EJECTION_CAP,
                view,
                f"not ejected ({why}): {ejected} of {len(live)} agents are ejected already "
                f"(at most {cfg.max_ejected_share:.0%})",
            )
            return
        b.state = OPEN
        b.ejections += 1
        length = min(cfg.ejection_base_s * b.ejections, cfg.ejection_max_s)
        b.open_until = now + length
        b.open_until_us = self.clock.wall_us() + int(length * 1e6)
        b.window.clear()
        b.consecutive = 0
        view.reason = f"ejected for {length:g} s: {why}"
        self.stats["ejections"] += 1
        self._close_alert(_alert_id(K.ALERT_KIND_EJECTION_CAP, view.agent_id))
        self._open_alert(K.ALERT_KIND_EJECTED, view, view.reason)
        self._send(view, self._pause(view))
        self._changed(view, view.state, view.reason)

    def _pause(self, view: AgentView) -> hpb.HealthDirective:
        return hpb.HealthDirective(
            pause=hpb.PauseAgent(reason=view.reason, until_us=view.breaker.open_until_us)
        )

    def _breaker_timers(self, view: AgentView, now: float) -> None:
        cfg = self.cfg
        b = view.breaker
        if b.state == OPEN and now >= b.open_until:
            b.state = HALF_OPEN
            b.open_until_us = 0
            b.trial_since = now
            view.reason = "ejection over: half-open, one task on trial"
            self._open_alert(K.ALERT_KIND_EJECTED, view, view.reason)
            self._send(
                view,
                hpb.HealthDirective(resume=hpb.ResumeAgent(reason=view.reason, half_open=True)),
            )
            self._changed(view, view.state, view.reason)
        elif b.state == HALF_OPEN and now - b.trial_since >= cfg.ejection_base_s:
            # No outcome yet: the coordinator spends the one trial it admits on the first
            # task it assigns; if that assignment never happened (no work, a failed
            # write), writing the record again arms a new trial.
            b.trial_since = now
            self._persist(view)
        elif b.state == CLOSED and b.ejections and now - b.calm_since >= cfg.ejection_max_s:
            b.ejections -= 1  # well behaved for a while: the next ejection is shorter
            b.calm_since = now
            self._persist(view)

    # ---- recovery ----

    def _order_replacement(self, view: AgentView, now: float, why: str) -> None:
        """Replace `view`, unless its line has failed `max_replacements` times in a row.

        A replacement failed when it did not come up, or when it was itself declared
        FAILED (or replaced) within `replace_probation_s`: that is counted here, as
        the line's count plus one when `view` is such a replacement."""
        if view.replace_pending is not None or view.replaced_by or view.escalated:
            return
        failures = view.lineage_failures
        if view.replaces and now - view.born < self.cfg.replace_probation_s:
            failures += 1
        view.lineage_failures = failures
        if failures >= self.cfg.max_replacements:
            self._escalate(view, why)
            self._persist(view)
            return
        self._dispatch_replacement(view, now, why)

    def _dispatch_replacement(self, view: AgentView, now: float, why: str) -> None:
        if (view.state == FAILED or view.send is None) and not view.registered:
            # Anyone can open a Report stream under a made-up id and close it: a pool
            # must not start a real agent for each one. Only an agent a pool (or its own
            # process) registered is replaced through the AgentPool API.
            self._event(
                recovery=hpb.RecoveryAction(
                    kind=R.RECOVERY_KIND_REPLACE,
                    agent_id=view.agent_id,
                    ok=False,
                    detail=(
                        "not replaced: it was never registered in etcd (agents/<id>), "
                        "so no agent pool hosts it"
                    ),
                )
            )
            return
        view.replace_pending = now
        self.stats["replacements"] += 1
        self._persist(view)
        if view.state != FAILED and view.send is not None:
            # alive and listening: its pool replaces it and keeps its size
            view.send(hpb.HealthDirective(replace=hpb.ReplaceAgent(reason=why)))
            self._event(
                recovery=hpb.RecoveryAction(
                    kind=R.RECOVERY_KIND_REPLACE,
                    agent_id=view.agent_id,
                    ok=True,
                    detail=f"replace directive: {why}",
                )
            )
            return
        own = self.pools.get(view.info.pool_id)
        target = own or self._roomiest_pool()
        if target is None:
            self.replace_failed(view.agent_id, "no agent pool is registered to host a replacement")
            return
        self._placed[target.pool_id] += 1
        info = hpb.AgentInfo()
        info.CopyFrom(view.info)
        self._act(
            Replace(
                view.agent_id,
                target.pool_id,
                target.endpoint,
                own_pool=own is not None,
                info=info,
                reason=why,
            )
        )

    def _roomiest_pool(self) -> PoolInfo | None:
        if not self.pools:
            return None
        return min(
            self.pools.values(), key=lambda p: (p.agents + self._placed[p.pool_id], p.pool_id)
        )

    def _link(self, successor: AgentView, predecessor_id: str, now: float) -> None:
        predecessor = self.agents.get(predecessor_id)
        successor.replaces = predecessor_id
        if predecessor is None:
            successor.lineage_failures = self._lineage.pop(predecessor_id, 0)
            if successor.lineage_failures:
                self._persist(successor)
            return
        successor.lineage_failures = predecessor.lineage_failures
        predecessor.replaced_by = successor.agent_id
        predecessor.replace_pending = None
        predecessor.retry_replace_at = None
        self._persist(predecessor)
        self._persist(successor)
        self._event(
            recovery=hpb.RecoveryAction(
                kind=R.RECOVERY_KIND_REPLACE,
                agent_id=predecessor_id,
                new_agent_id=successor.agent_id,
                ok=True,
                detail="replacement reporting",
            )
        )

    def _escalate(self, view: AgentView, why: str) -> None:
        view.escalated = True
        view.retry_replace_at = None
        self._open_alert(K.ALERT_KIND_ESCALATION, view, _escalation_message(view, why))

    def _forget(self, view: AgentView, why: str) -> None:
        self.agents.pop(view.agent_id, None)
        if view.replace_pending is not None and not view.replaced_by:
            self._lineage[view.agent_id] = view.lineage_failures
            while len(self._lineage) > WINDOW_CAP:
                del self._lineage[next(iter(self._lineage))]
        for alert_id in [a for a, al in self.alerts.items() if al.agent_id == view.agent_id]:
            self._close_alert(alert_id)
        self.dirty.add(view.agent_id)  # its record (if any) is deleted
        self.changed.set()
        self._event(
            change=hpb.HealthChange(
                agent_id=view.agent_id,
                previous=view.state,  # type: ignore[arg-type]
                state=view.state,  # type: ignore[arg-type]
                breaker=view.breaker.state,  # type: ignore[arg-type]
                admission=view.admission,  # type: ignore[arg-type]
                reason=why,
                removed=True,
            )
        )

    # ---- plumbing ----

    def _now(self) -> float:
        """The monitor's time: its monotonic clock less the stretches it did not run.

        It looks every `tick_s` and at every heartbeat, so a gap over a heartbeat interval
        between two looks means the monitor itself was stopped (SIGSTOP, a blocked event
        loop, a paused VM): meanwhile the agents' heartbeats waited unread, and their
        silence is the monitor's. Counted, it declared every agent FAILED when it resumed
        (before reading the backlog) and had each one replaced."""
        raw = self.clock.monotonic()
        gap = raw - self._looked
        self._looked = raw
        if gap > self._blind_after_s:
            self.blind_s += gap
        return raw - self.blind_s

    def _view(self, agent_id: str, info: hpb.AgentInfo | None, now: float) -> AgentView:
        view = self.agents.get(agent_id)
        if view is None:
            copy = hpb.AgentInfo()
            if info is not None:
                copy.CopyFrom(info)
            view = AgentView(agent_id, copy, born=now, since_us=self.clock.wall_us())
            view.breaker.calm_since = now
            if agent_id in self._registered:
                self._registered.discard(agent_id)
                view.registered = True
            self.agents[agent_id] = view
        return view

    def _send(self, view: AgentView, directive: hpb.HealthDirective) -> None:
        if view.send is not None:
            view.send(directive)

    def _act(self, action: Action) -> None:
        self.actions.append(action)
        self.changed.set()

    def _persist(self, view: AgentView) -> None:
        self.dirty.add(view.agent_id)
        self.changed.set()

    def _changed(self, view: AgentView, previous: int, reason: str) -> None:
        self._persist(view)
        self._event(
            change=hpb.HealthChange(
                agent_id=view.agent_id,
                previous=previous,  # type: ignore[arg-type]
                state=view.state,  # type: ignore[arg-type]
                breaker=view.breaker.state,  # type: ignore[arg-type]
                admission=view.admission,  # type: ignore[arg-type]
                reason=reason,
            )
        )

    def _open_alert(
        self,
        kind: int,
        view: AgentView,
        message: str,
        opened_at_us: int = 0,
        task_id: str = "",
    ) -> None:
        alert_id = _alert_id(kind, view.agent_id, task_id)
        alert = self.alerts.get(alert_id)
        if alert is not None:
            alert.message = message
            return
        alert = hpb.Alert(
            alert_id=alert_id,
            kind=kind,  # type: ignore[arg-type]
            agent_id=view.agent_id,
            task_id=task_id,
            message=message,
            opened_at_us=opened_at_us or self.clock.wall_us(),
        )
        self.alerts[alert_id] = alert
        self.stats[f"alerts_{hpb.AlertKind.Name(kind)}"] += 1
        self._event(alert=alert)

    def _close_alert(self, alert_id: str) -> None:
        alert = self.alerts.pop(alert_id, None)
        if alert is not None:
            closed = hpb.Alert()
            closed.CopyFrom(alert)
            closed.closed_at_us = self.clock.wall_us()
            self._event(alert=closed)

    def _event(self, **body: object) -> None:
        if not self.subscribers:
            return
        event = hpb.HealthEvent(at_us=self.clock.wall_us(), term=self.term, **body)  # type: ignore[arg-type]
        for callback in tuple(self.subscribers):
            callback(event)


def _alert_id(kind: int, agent_id: str, task_id: str = "") -> str:
    name = str(hpb.AlertKind.Name(kind)).removeprefix("ALERT_KIND_").lower()
    return f"{name}/{agent_id}/{task_id}" if task_id else f"{name}/{agent_id}"


def _state_message(view: AgentView) -> str:
    return f"{state_name(view.state)}: {view.reason}"


def _escalation_message(view: AgentView, why: str = "") -> str:
    text = (
        f"{view.lineage_failures} replacements in a row failed; recovery stopped for "
        f"{view.agent_id}: look at pool {view.info.pool_id or '?'}"
    )
    return f"{text} (last: {why})" if why else text


def _needs_record(view: AgentView) -> bool:
    return bool(
        view.state != HEALTHY
        or view.breaker.state != CLOSED
        or view.breaker.ejections
        or view.lineage_failures
        or view.escalated
        or view.replaced_by
        or view.replace_pending is not None
    )
