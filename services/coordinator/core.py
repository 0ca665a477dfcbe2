"""The root coordinator's logic: durable queue, state machine, claims, dispatch.

Pure: no grpc, no etcd. Durable writes go through a `Store` (etcd in
production, an in-memory fake in unit tests) and time through a `Clock`.

Invariants:
- Every task change is one `Write` the store commits atomically, comparing the
  record's mod revision; the in-memory view changes only after the commit, so
  memory never runs ahead of etcd.
- An ASSIGNED record's mod revision is its claim token: the claim key
  (claims/<id>, on the agent's lease) is written in the same commit. A result
  is accepted only while both the record and the claim still carry that
  revision, so a stale, forged or late report cannot complete a task, and a
  task is completed at most once.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import random
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tenacity import AsyncRetrying, retry_if_exception_type, retry_never, wait_random_exponential

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.clock import Clock
from services._common.errors import (
    InvalidArgumentError,
    NotFoundError,
    NotLeaderError,
    StoreUnavailableError,
)
from services.coordinator import limits
from services.coordinator.config import CoordinatorConfig
from services.coordinator.limits import validate_hello, validate_spec

log = logging.getLogger(__name__)

S = tpb.TaskState
QUEUED, ASSIGNED, RUNNING = S.TASK_STATE_QUEUED, S.TASK_STATE_ASSIGNED, S.TASK_STATE_RUNNING
SUCCEEDED, FAILED, CANCELLED, DEAD_LETTER = (
    S.TASK_STATE_SUCCEEDED,
    S.TASK_STATE_FAILED,
    S.TASK_STATE_CANCELLED,
    S.TASK_STATE_DEAD_LETTER,
)
TERMINAL = frozenset({SUCCEEDED, CANCELLED, DEAD_LETTER})
HELD = frozenset({ASSIGNED, RUNNING})

MAX_BATCH = limits.BATCH_ITEMS
HAND_BACK_S = 1.0
"""A task released as hung waits this long at most for an agent other than its own."""
STRATEGIES = ("least-loaded", "round-robin", "weighted", "random")


def state_name(state: int) -> str:
    return S.Name(state).removeprefix("TASK_STATE_")


# ---------------------------------------------------------------- store contract


@dataclass(slots=True)
class Write:
    """One atomic task change. The store compares, then applies all of it or nothing."""

    task: tpb.Task
    expect_mod: int
    """The record's current mod revision; 0 means "create, only if absent"."""
    claim_lease: int = 0
    """Put claims/<id> (value: the agent id) on this lease; the commit revision is the token."""
    expect_claim: int = 0
    """The claim key's mod revision must equal this (the token being reported)."""
    delete_claim: bool = False


@dataclass(slots=True)
class Committed:
    ok: bool
    revision: int = 0
    """The commit's revision: the record's new mod revision (and claim token)."""
    existing: tpb.Task | None = None
    """When a create was refused: the record that exists (idempotent submit)."""
    existing_mod: int = 0
    lease_missing: bool = False
    """The claim's lease no longer exists (the agent's process died)."""


class Store(Protocol):
    async def commit(self, writes: Sequence[Write]) -> list[Committed]:
        """Apply writes under the leader's fence. Raises NotLeaderError when deposed,
        StoreUnavailableError when etcd cannot be reached."""
        ...

    async def read(self, task_id: str) -> tuple[tpb.Task, int] | None:
        """A record and its mod revision."""
        ...

    async def claim_revision(self, task_id: str) -> int:
        """The claim key's mod revision (0 when absent)."""
        ...


# ---------------------------------------------------------------- ids and backoff
# (validation, with every limit, lives in limits.py)


def task_id_for(spec: tpb.TaskSpec, wall_us: int, rng: random.Random) -> str:
    """The id a new task gets: the client's, one derived from its idempotency key,
    or a fresh time-ordered one (so listing by key lists by submit time)."""
    if spec.task_id:
        return spec.task_id
    if spec.idempotency_key:
        return "k-" + hashlib.sha256(spec.idempotency_key.encode()).hexdigest()[:32]
    return f"t-{wall_us:014x}-{rng.getrandbits(40):010x}"


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, so retries
    of a burst of failures spread out without ever retrying at once."""
    ceiling = min(cap_s, base_s * 2.0 ** max(0, attempt - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


# ---------------------------------------------------------------- agents


@dataclass(eq=False)
class Agent:
    agent_id: str
    pool_id: str
    lease_id: int
    roles: frozenset[str]
    labels: dict[str, str]
    kinds: frozenset[str]
    capacity: int
    send: Callable[[cpb.CoordinatorMessage | None], None]
    """Queues a message to the agent; None closes the stream."""
    connected_at_us: int = 0
    inflight: set[str] = field(default_factory=set)
    completed: int = 0
    failed: int = 0
    latency_ema_ms: float = 0.0
    draining: bool = False
    order: int = 0
    admit: int = -1
    """Tasks the health monitor lets it hold at once: -1 no limit, 1 (half-open
    breaker), 0 (ejected or FAILED). From its `health/<agent>` record."""

    def free(self) -> int:
        if self.draining:
            return 0
        limit = self.capacity if self.admit < 0 else min(self.capacity, self.admit)
        return limit - len(self.inflight)

    def can_run(self, spec: tpb.TaskSpec) -> bool:
        if spec.kind not in self.kinds:
            return False
        if spec.role and spec.role not in self.roles:
            return False
        labels = self.labels
        return all(labels.get(k) == v for k, v in spec.required_labels.items())

    def status(self) -> cpb.AgentStatus:
        return cpb.AgentStatus(
            agent_id=self.agent_id,
            pool_id=self.pool_id,
            roles=sorted(self.roles),
            labels=self.labels,
            kinds=sorted(self.kinds),
            capacity=self.capacity,
            inflight=len(self.inflight),
            completed=self.completed,
            failed=self.failed,
            latency_ema_ms=self.latency_ema_ms,
            draining=self.draining,
            connected_at_us=self.connected_at_us,
            health_admission={-1: "", 0: "none"}.get(self.admit, "one"),
        )


class Strategy:
    """Picks an agent for a task among those with free capacity that can run it."""

    def __init__(self, name: str, rng: random.Random) -> None:
        if name not in STRATEGIES:
            raise ValueError(
                f"unknown assignment strategy {name!r}; use one of {', '.join(STRATEGIES)}"
            )
        self.name = name
        self.rng = rng
        self._rr = 0

    def pick(self, spec: tpb.TaskSpec, free: dict[str, Agent]) -> Agent | None:
        name = self.name
        if name == "least-loaded":
            best: Agent | None = None
            best_load = 2.0
            for agent in free.values():
                load = len(agent.inflight) / agent.capacity
                if load < best_load and agent.can_run(spec):
                    best, best_load = agent, load
                    if load == 0.0:
                        break
            return best
        candidates = [a for a in free.values() if a.can_run(spec)]
        if not candidates:
            return None
        if name == "round-robin":
            # the lowest connection order after the last pick, wrapping around
            after = [a for a in candidates if a.order > self._rr]
            chosen = min(after or candidates, key=lambda a: a.order)
            self._rr = chosen.order
            return chosen
        if name == "random":
            return self.rng.choice(candidates)
        return min(candidates, key=lambda a: weighted_score(a, spec))


def weighted_score(agent: Agent, spec: tpb.TaskSpec) -> float:
    """Lower is better: load dominates, then latency, minus label affinity.

    Affinity counts the agent's labels that the task's metadata mentions
    (e.g. metadata project=x prefers agents labelled project=x), so related
    work sticks to agents that have its context warm.
    """
    load = len(agent.inflight) / agent.capacity
    latency = agent.latency_ema_ms / (agent.latency_ema_ms + 100.0)
    affinity = sum(1 for k, v in spec.metadata.items() if agent.labels.get(k) == v)
    return load + 0.5 * latency - 0.25 * min(affinity, 4)


# ---------------------------------------------------------------- the core


@dataclass(slots=True)
class Entry:
    """A non-terminal task as the leader holds it."""

    task: tpb.Task
    mod: int
    busy: bool = False
    """A write for this task is in flight; others wait for it."""


class CoordinatorCore:
    """The leader's state for one term. Build one per term; never reuse after `NotLeaderError`."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        cfg: CoordinatorConfig,
        *,
        term: int,
        node_id: str,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.cfg = cfg
        self.term = term
        self.node_id = node_id
        self.rng = rng or random.Random()
        self.strategy = Strategy(cfg.strategy, self.rng)
        self.active: dict[str, Entry] = {}
        self.ready: list[collections.deque[str]] = [collections.deque() for _ in range(10)]
        self.delayed: list[tuple[int, str]] = []  # (not_before_us, task_id), a heap
        self.agents: dict[str, Agent] = {}
        self.awaiting: dict[str, set[str]] = {}
        """agent id → claims loaded at takeover that the agent has not confirmed yet."""
        self.free: dict[str, Agent] = {}
        self.admission: dict[str, int] = {}
        """agent id → the health monitor's limit (see `Agent.admit`), kept across reconnects."""
        self.finished: collections.Counter[str] = collections.Counter()
        self.subscribers: set[Callable[[tpb.Task, int], None]] = set()
        self.on_progress: Callable[[tpb.Task, float, str], None] | None = None
        """Receives progress from the agent holding a task (fraction, message); not stored."""
        self.wake = asyncio.Event()
        self.deposed: NotLeaderError | None = None
        self._order = 0
        self._background: set[asyncio.Task[None]] = set()

    # ---- loading a term ----

    def load(
        self, records: Iterable[tuple[tpb.Task, int]], live_claims: dict[str, int]
    ) -> list[str]:
        """Adopt the non-terminal records found in etcd at the start of a term.

        Returns the ids of ASSIGNED tasks whose claim is gone: the caller requeues them.
        """
        orphans = []
        for task, mod in records:
            if task.state in TERMINAL:
                continue
            entry = Entry(task, mod)
            self.active[task.task_id] = entry
            if task.state == QUEUED:
                self._enqueue(task)
            else:
                task.state = ASSIGNED  # RUNNING is never persisted; be explicit
                task.claim_token = mod
                if live_claims.get(task.task_id) != mod:
                    orphans.append(task.task_id)
                else:
                    # the previous leader may have committed this claim and died before
                    # sending it: the agent's hello says whether it has it
                    self.awaiting.setdefault(task.agent_id, set()).add(task.task_id)
        return orphans

    def expire_awaiting(self) -> None:
        """Requeue loaded claims that no agent has reclaimed by now (called once, after a
        grace period that covers the agents' reconnects)."""
        for agent_id, task_ids in self.awaiting.items():
            for task_id in task_ids:
                self.spawn(
                    self._requeue(
                        task_id,
                        agent_id,
                        "agent did not reconnect after failover",
                        count_attempt=False,
                    )
                )
        self.awaiting.clear()

    # ---- events to subscribers ----

    def _publish(self, task: tpb.Task, previous: int) -> None:
        for callback in tuple(self.subscribers):
            callback(task, previous)

    # ---- commits ----

    async def _commit(self, writes: Sequence[Write], *, persist: bool = False) -> list[Committed]:
        """Commit under the fence. With `persist`, an unreachable etcd is waited out
        (jittered backoff, until the term ends): for writes nobody else would redo,
        such as an agent's report or a requeue, which must land once etcd is back."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(StoreUnavailableError) if persist else retry_never,
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            sleep=self.clock.sleep,
            reraise=True,
        ):
            with attempt:
                if self.deposed:
                    raise self.deposed
                try:
                    return await self.store.commit(writes)
                except NotLeaderError as err:
                    self.deposed = err
                    self.wake.set()
                    raise
        raise AssertionError("unreachable")

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a write without blocking the caller (the dispatcher, a stream); the core
        holds it until done and cancels it at the end of the term."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (err := task.exception()) is not None:
            if isinstance(err, NotLeaderError | StoreUnavailableError):
                log.warning("background write failed", extra={"error": str(err)})
            else:
                log.error("background write crashed", exc_info=err)

    async def close(self) -> None:
        for task in tuple(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    # ---- client API ----

    async def submit(self, specs: Sequence[tpb.TaskSpec]) -> list[tuple[tpb.Task, bool]]:
        if not specs:
            raise InvalidArgumentError("specs is empty: submit at least one task")
        if len(specs) > MAX_BATCH:
            raise InvalidArgumentError(
                f"a batch holds at most {MAX_BATCH} tasks; split it ({len(specs)} given)"
            )
        for i, spec in enumerate(specs):
            validate_spec(spec, self.cfg, f"specs[{i}]" if len(specs) > 1 else "spec")
        now = self.clock.wall_us()
        writes: list[Write] = []
        picks: list[Agent | None] = []
        seen: set[str] = set()
        # Fast path: while nothing waits, a task that a free agent can run is created
        # already ASSIGNED, its claim in the same transaction: one etcd write fewer, and
        # the assignment leaves with the acknowledgement. Never while tasks wait, so
        # priority and FIFO order hold.
        fast = not any(self.ready)
        for spec in specs:
            task_id = task_id_for(spec, now, self.rng)
            if task_id in seen:
                raise InvalidArgumentError(f"task id {task_id!r} appears twice in one batch")
            seen.add(task_id)
            if task_id in self.active:  # an idempotent replay of a live task: no write needed
                writes.append(Write(self.active[task_id].task, expect_mod=-1))
                picks.append(None)
                continue
            stored = tpb.TaskSpec()
            stored.CopyFrom(spec)
            stored.task_id = task_id
            if not stored.max_attempts:
                stored.max_attempts = self.cfg.default_max_attempts
            task = tpb.Task(
                task_id=task_id, spec=stored, state=QUEUED, created_at_us=now, term=self.term
            )
            agent = self.strategy.pick(stored, self.free) if fast and self.free else None
            if agent is None:
                writes.append(Write(task, expect_mod=0))
            else:
                self._reserve(agent, task_id)
                task.state, task.agent_id, task.attempts, task.assigned_at_us = (
                    ASSIGNED,
                    agent.agent_id,
                    1,
                    now,
                )
                writes.append(Write(task, expect_mod=0, claim_lease=agent.lease_id))
            picks.append(agent)
        todo = [w for w in writes if w.expect_mod == 0]
        try:
            results = iter(await self._commit(todo))
        except BaseException:
            for agent, w in zip(picks, writes, strict=True):
                if agent is not None:
                    self._release(agent, w.task.task_id)
            raise
        out: list[tuple[tpb.Task, bool]] = []
        retry: dict[int, tpb.TaskSpec] = {}  # position → spec, for claims on a dead lease
        for write, agent in zip(writes, picks, strict=True):
            task = write.task
            if write.expect_mod == -1:
                out.append((task, False))
                continue
            res = next(results)
            if res.ok:
                self.active[task.task_id] = Entry(task, res.revision)
                if agent is None:
                    self._enqueue(task)
                else:
                    task.claim_token = res.revision
                    self._deliver(agent, task)
                self._publish(task, S.TASK_STATE_UNSPECIFIED)
                out.append((task, True))
                continue
            if agent is not None:
                self._release(agent, task.task_id)
            if res.lease_missing:  # the agent's process died: the task was not created
                assert agent is not None
                self._drop_dead_agent(agent)
                retry[len(out)] = task.spec
                out.append((task, True))  # replaced below
                continue
            existing = res.existing
            if existing is None:
                raise StoreUnavailableError("submit was refused by etcd without a record; retry")
            entry = self.active.get(existing.task_id)
            out.append((entry.task if entry else existing, False))
        if retry:  # the agent is dropped now, so these go through the queue
            for pos, result in zip(retry, await self.submit(list(retry.values())), strict=True):
                out[pos] = result
        self.wake.set()
        return out

    async def get(self, task_id: str) -> tpb.Task:
        entry = self.active.get(task_id)
        if entry is not None:
            return entry.task
        found = await self.store.read(task_id)
        if found is None:
            raise NotFoundError(
                f"task {task_id!r} does not exist (or expired after the retention period)"
            )
        return found[0]

    async def cancel(self, task_id: str, reason: str) -> tpb.Task:
        entry = self.active.get(task_id)
        if entry is None:
            return await self.get(task_id)  # terminal already (or NOT_FOUND)
        while entry.busy:
            await asyncio.sleep(0.001)
            if self.active.get(task_id) is not entry:
                return await self.get(task_id)
        task = entry.task
        prev_state = task.state
        new = _copy(task)
        new.state = CANCELLED
        new.last_error = reason or "cancelled by a client"
        new.finished_at_us = self.clock.wall_us()
        new.term = self.term
        entry.busy = True
        try:
            (res,) = await self._commit([Write(new, entry.mod, delete_claim=prev_state in HELD)])
        finally:
            entry.busy = False
        if not res.ok:
            await self._resync(task_id)
            return await self.get(task_id)
        self._finish(entry, new, prev_state)
        if prev_state in HELD and (agent := self.agents.get(task.agent_id)):
            agent.send(
                cpb.CoordinatorMessage(
                    cancel=cpb.CancelAssignment(task_id=task_id, reason=new.last_error)
                )
            )
            self._release(agent, task_id)
        return new

    # ---- agents ----

    def connect(
        self, hello: cpb.AgentHello, send: Callable[[cpb.CoordinatorMessage | None], None]
    ) -> Agent:
        validate_hello(hello)
        if hello.agent_id in self.agents:
            # a reconnect racing its own old stream: the newest stream wins
            self.disconnect(hello.agent_id)
        self._order += 1
        agent = Agent(
            agent_id=hello.agent_id,
            pool_id=hello.pool_id,
            lease_id=hello.lease_id,
            roles=frozenset(hello.roles),
            labels=dict(hello.labels),
            kinds=frozenset(hello.kinds),
            capacity=hello.capacity,
            send=send,
            connected_at_us=self.clock.wall_us(),
            order=self._order,
            admit=self.admission.get(hello.agent_id, -1),
        )
        self.agents[agent.agent_id] = agent
        send(
            cpb.CoordinatorMessage(welcome=cpb.Welcome(coordinator_id=self.node_id, term=self.term))
        )
        for ref in hello.held_claims:
            entry = self.active.get(ref.task_id)
            if (
                entry
                and entry.task.state in HELD
                and entry.task.claim_token == ref.claim_token
                and entry.task.agent_id == agent.agent_id
            ):
                agent.inflight.add(ref.task_id)
            else:
                send(
                    cpb.CoordinatorMessage(
                        cancel=cpb.CancelAssignment(
                            task_id=ref.task_id, reason="claim is no longer valid"
                        )
                    )
                )
        for task_id in self.awaiting.pop(agent.agent_id, ()):
            if task_id not in agent.inflight:  # committed by the last leader, never received
                self.spawn(
                    self._requeue(
                        task_id, agent.agent_id, "assignment lost in failover", count_attempt=False
                    )
                )
        if agent.free() > 0:
            self.free[agent.agent_id] = agent
        self.wake.set()
        return agent

    def disconnect(self, agent_id: str) -> None:
        """The agent's stream ended: requeue what it held at once."""
        agent = self.agents.pop(agent_id, None)
        if agent is None:
            return
        self.free.pop(agent_id, None)
        for task_id in tuple(agent.inflight):
            self.spawn(
                self._requeue(task_id, agent.agent_id, "agent disconnected", count_attempt=True)
            )
        agent.inflight.clear()

    def drain(self, agent_id: str) -> None:
        agent = self.agents.get(agent_id)
        if agent:
            agent.draining = True
            self.free.pop(agent_id, None)

    def _reserve(self, agent: Agent, task_id: str) -> None:
        agent.inflight.add(task_id)
        if agent.admit == 1:
            agent.admit = 0  # half-open: its one trial task; the health monitor says what next
        if agent.free() <= 0:
            self.free.pop(agent.agent_id, None)

    def _deliver(self, agent: Agent, task: tpb.Task) -> bool:
        """Send a committed assignment, or requeue it if the agent left meanwhile."""
        if agent.agent_id not in self.agents:
            agent.inflight.discard(task.task_id)
            self.spawn(
                self._requeue(
                    task.task_id, agent.agent_id, "agent disconnected", count_attempt=False
                )
            )
            return False
        agent.send(cpb.CoordinatorMessage(assign=cpb.Assign(task=task)))
        return True

    def _drop_dead_agent(self, agent: Agent) -> None:
        log.warning("agent lease is gone; dropping the agent", extra={"agent": agent.agent_id})
        self.disconnect(agent.agent_id)
        agent.send(
            cpb.CoordinatorMessage(drain=cpb.Drain(reason="your etcd lease expired; reconnect"))
        )

    def _release(self, agent: Agent, task_id: str) -> None:
        agent.inflight.discard(task_id)
        if agent.free() > 0 and agent.agent_id in self.agents:
            self.free[agent.agent_id] = agent
            self.wake.set()

    def accepted(self, agent_id: str, msg: cpb.TaskAccepted) -> None:
        entry = self.active.get(msg.task_id)
        if (
            entry
            and entry.task.state in HELD
            and entry.task.claim_token == msg.claim_token
            and entry.task.agent_id == agent_id
        ):
            prev = entry.task.state
            new = _copy(entry.task)  # published events are never changed afterwards
            new.state = RUNNING
            new.received_at_us = msg.received_at_us
            entry.task = new
            self._publish(new, prev)

    def progress(self, agent_id: str, msg: cpb.TaskProgress) -> None:
        """Relay progress to watchers; only from the agent holding the task's current claim."""
        entry = self.active.get(msg.task_id)
        if (
            entry
            and entry.task.state in HELD
            and entry.task.claim_token == msg.claim_token
            and entry.task.agent_id == agent_id
            and self.on_progress is not None
        ):
            self.on_progress(entry.task, msg.fraction, msg.message)

    async def report(self, agent_id: str, msg: cpb.TaskResult | cpb.TaskFailure) -> cpb.ReportAck:
        """A result or failure from an agent; the ack says whether it counted."""
        ok = isinstance(msg, cpb.TaskResult)
        ack = cpb.ReportAck(task_id=msg.task_id, claim_token=msg.claim_token)
        agent = self.agents.get(agent_id)
        entry = self.active.get(msg.task_id)
        held = entry is not None and entry.task.state in HELD and entry.task.agent_id == agent_id
        if agent is not None and not (held and entry and entry.task.claim_token != msg.claim_token):
            # the slot frees with the report of the claim it holds; a wrong token for a task
            # the agent still holds under another claim frees nothing
            self._release(agent, msg.task_id)
        if entry is None:
            ack.reason = f"task {msg.task_id!r} is not in flight (finished, cancelled or unknown)"
            return ack
        task = entry.task
        if not held or task.claim_token != msg.claim_token:
            ack.reason = f"stale or foreign claim token {msg.claim_token} for task {msg.task_id!r}"
            return ack
        while entry.busy:  # a cancel is being written; then the claim is gone anyway
            await asyncio.sleep(0.001)
        if self.active.get(msg.task_id) is not entry or entry.task is not task:
            ack.reason = "the task changed while the report was in flight"
            return ack
        now = self.clock.wall_us()
        new = _copy(task)
        new.usage.input_tokens += msg.usage.input_tokens
        new.usage.output_tokens += msg.usage.output_tokens
        new.usage.cost_usd += msg.usage.cost_usd
        new.finished_at_us = now
        new.term = self.term
        if ok:
            assert isinstance(msg, cpb.TaskResult)
            new.state = SUCCEEDED
            new.result = msg.output
            if msg.received_at_us and not new.received_at_us:
                new.received_at_us = msg.received_at_us
        else:
            assert isinstance(msg, cpb.TaskFailure)
            new.last_error = msg.error or "the agent reported a failure without a message"
            if msg.retryable and task.attempts < task.spec.max_attempts:
                new.state = QUEUED
                new.finished_at_us = 0
                new.not_before_us = now + int(
                    backoff_s(task.attempts, self.cfg.retry_base_s, self.cfg.retry_cap_s, self.rng)
                    * 1e6
                )
            else:
                new.state = DEAD_LETTER
        entry.busy = True
        try:
            (res,) = await self._commit(
                [Write(new, entry.mod, expect_claim=msg.claim_token, delete_claim=True)],
                persist=True,
            )
        finally:
            entry.busy = False
        if not res.ok:
            await self._resync(msg.task_id)
            ack.reason = "the claim was lost before the report arrived (agent lease expired or task reassigned)"
            return ack
        ack.accepted = True
        if agent is not None:
            if ok:
                agent.completed += 1
            else:
                agent.failed += 1
            took_ms = max(0.0, (now - task.assigned_at_us) / 1000.0)
            agent.latency_ema_ms = (
                took_ms if not agent.latency_ema_ms else 0.8 * agent.latency_ema_ms + 0.2 * took_ms
            )
        if new.state == QUEUED:
            entry.task, entry.mod = new, res.revision
            self._delay(new)
            self._publish(new, FAILED)
        else:
            self._finish(entry, new, task.state)
        return ack

    def _finish(self, entry: Entry, new: tpb.Task, previous: int) -> None:
        self.active.pop(new.task_id, None)
        self.finished[state_name(new.state)] += 1
        self._publish(new, previous)

    # ---- the health monitor's orders ----

    def admit(self, agent_id: str, limit: int) -> None:
        """Apply the health monitor's admission for an agent (see `Agent.admit`)."""
        if limit < 0:
            self.admission.pop(agent_id, None)
        else:
            self.admission[agent_id] = limit
        agent = self.agents.get(agent_id)
        if agent is None or agent.admit == limit:
            return
        agent.admit = limit
        if agent.free() > 0:
            self.free[agent_id] = agent
            self.wake.set()
        else:
            self.free.pop(agent_id, None)

    async def release_claims(
        self, agent_id: str, claims: Sequence[tuple[str, int]], reason: str
    ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """Requeue the tasks `agent_id` holds under these claims (all when empty), for the
        health monitor. Returns (released, skipped). The work is owned by the core, so it
        finishes even if the caller goes away; a late result is refused by the token."""
        limits.check_id("agent_id", agent_id)
        if len(claims) > limits.BATCH_ITEMS:
            raise InvalidArgumentError(
                f"claims has {len(claims)} entries; the limit is {limits.BATCH_ITEMS}"
            )
        limits.check_bytes("reason", reason, limits.REASON_BYTES)
        wanted = list(claims) or [
            (task_id, entry.task.claim_token)
            for task_id, entry in self.active.items()
            if entry.task.state in HELD and entry.task.agent_id == agent_id
        ]
        job = asyncio.ensure_future(
            asyncio.gather(*(self._release_claim(agent_id, t, c, reason) for t, c in wanted))
        )
        self._background.add(job)  # type: ignore[arg-type]
        job.add_done_callback(self._owned_done)
        done = await asyncio.shield(job)
        released = [claim for claim, ok in zip(wanted, done, strict=True) if ok]
        skipped = [claim for claim, ok in zip(wanted, done, strict=True) if not ok]
        return released, skipped

    def _owned_done(self, job: asyncio.Future[Any]) -> None:
        self._background.discard(job)  # type: ignore[arg-type]
        if not job.cancelled():
            # its caller may be gone; a write that failed (deposed, etcd down) is repaired
            # by the next load of the claims, like any requeue's
            job.exception()

    async def _release_claim(self, agent_id: str, task_id: str, token: int, reason: str) -> bool:
        entry = self.active.get(task_id)
        while entry is not None and entry.busy:
            await asyncio.sleep(0.001)
            entry = self.active.get(task_id)
        if (
            entry is None
            or entry.task.state not in HELD
            or entry.task.agent_id != agent_id
            or entry.task.claim_token != token
        ):
            return False
        # No await between the check above and `_requeue`'s own: it requeues this claim.
        await self._requeue(
            task_id, agent_id, f"released by the health monitor: {reason}", count_attempt=True
        )
        now = self.active.get(task_id)
        if now is not None and now.task.state in HELD and now.task.claim_token == token:
            return False  # the write did not land (resynced from etcd instead)
        agent = self.agents.get(agent_id)
        if agent is not None:
            agent.send(
                cpb.CoordinatorMessage(
                    cancel=cpb.CancelAssignment(task_id=task_id, reason=f"released: {reason}")
                )
            )
            self.spawn(self._hand_back(agent, task_id))
        return True

    async def _hand_back(self, agent: Agent, task_id: str) -> None:
        """Give the agent a released task hung on its slot back once the task runs
        elsewhere, or after HAND_BACK_S if nobody else was free: it is not handed the
        task it just hung on while another agent could take it."""
        waited = 0.0
        while waited < HAND_BACK_S:
            entry = self.active.get(task_id)
            if entry is None or entry.task.state != QUEUED:
                break
            await self.clock.sleep(0.01)
            waited += 0.01
        self._release(agent, task_id)

    # ---- requeue / claims lost ----

    async def _requeue(self, task_id: str, agent_id: str, why: str, *, count_attempt: bool) -> None:
        entry = self.active.get(task_id)
        if entry is None or entry.task.state not in HELD or entry.task.agent_id != agent_id:
            return
        while entry.busy:
            await asyncio.sleep(0.001)
        task = entry.task
        if (
            self.active.get(task_id) is not entry
            or task.state not in HELD
            or task.agent_id != agent_id
        ):
            return
        new = _copy(task)
        new.last_error = why
        new.term = self.term
        exhausted = count_attempt and task.attempts >= task.spec.max_attempts
        new.state = DEAD_LETTER if exhausted else QUEUED
        if exhausted:
            new.finished_at_us = self.clock.wall_us()
        entry.busy = True
        try:
            (res,) = await self._commit([Write(new, entry.mod, delete_claim=True)], persist=True)
        finally:
            entry.busy = False
        if not res.ok:
            await self._resync(task_id)
            return
        if exhausted:
            self._finish(entry, new, task.state)
            return
        entry.task, entry.mod = new, res.revision
        # at the front: a requeued task was waiting longest, and its agent's death is
        # not its fault (it is re-dispatched within one dispatch pass)
        self.ready[new.spec.priority].appendleft(new.task_id)
        self._publish(new, task.state)
        self.wake.set()

    def claim_lost(self, task_id: str, token: int) -> None:
        """etcd deleted a claim (its agent's lease expired)."""
        entry = self.active.get(task_id)
        if (
            entry
            and entry.task.state in HELD
            and entry.task.claim_token == token
            and not entry.busy
        ):
            agent = self.agents.get(entry.task.agent_id)
            if agent:
                agent.inflight.discard(task_id)
                agent.send(
                    cpb.CoordinatorMessage(
                        cancel=cpb.CancelAssignment(task_id=task_id, reason="claim expired")
                    )
                )
            self.spawn(
                self._requeue(
                    task_id,
                    entry.task.agent_id,
                    "claim expired (agent lease lost)",
                    count_attempt=True,
                )
            )

    def requeue_orphans(self, task_ids: Iterable[str]) -> None:
        for task_id in task_ids:
            entry = self.active.get(task_id)
            if entry:
                self.spawn(
                    self._requeue(
                        task_id,
                        entry.task.agent_id,
                        "claim lost during failover",
                        count_attempt=True,
                    )
                )

    async def _resync(self, task_id: str) -> None:
        """A compare failed: memory and etcd disagree. Adopt etcd's record."""
        found = await self.store.read(task_id)
        entry = self.active.get(task_id)
        if entry is None:
            return
        if found is None:
            self.active.pop(task_id, None)
            return
        task, mod = found
        if task.state in TERMINAL:
            self._finish(entry, task, entry.task.state)
            return
        if task.state == ASSIGNED:
            task.claim_token = mod
        entry.task, entry.mod = task, mod
        if task.state == QUEUED:
            self._enqueue(task)
            self.wake.set()
        elif await self.store.claim_revision(task_id) != mod:
            self.spawn(self._requeue(task_id, task.agent_id, "claim lost", count_attempt=True))

    # ---- the queue ----

    def _enqueue(self, task: tpb.Task) -> None:
        if task.not_before_us > self.clock.wall_us():
            self._delay(task)
        else:
            self.ready[task.spec.priority].append(task.task_id)

    def _delay(self, task: tpb.Task) -> None:
        import heapq

        heapq.heappush(self.delayed, (task.not_before_us, task.task_id))
        self.wake.set()

    def queue_depth(self) -> int:
        return sum(len(q) for q in self.ready) + len(self.delayed)

    def _promote_due(self) -> float | None:
        """Move due retries to the ready queues; seconds until the next one is due."""
        import heapq

        now = self.clock.wall_us()
        while self.delayed and self.delayed[0][0] <= now:
            _, task_id = heapq.heappop(self.delayed)
            entry = self.active.get(task_id)
            if entry and entry.task.state == QUEUED:
                self.ready[entry.task.spec.priority].append(task_id)
        return (self.delayed[0][0] - now) / 1e6 if self.delayed else None

    def plan(self) -> list[tuple[Entry, Agent]]:
        """Match ready tasks to agents: highest priority first, FIFO within one."""
        if not self.free:
            return []
        picks: list[tuple[Entry, Agent]] = []
        free = self.free
        for priority in range(9, -1, -1):
            queue = self.ready[priority]
            skipped: list[str] = []
            scanned = 0
            while queue and free and scanned < 10_000:
                task_id = queue.popleft()
                entry = self.active.get(task_id)
                if entry is None or entry.task.state != QUEUED or entry.busy:
                    continue
                scanned += 1
                agent = self.strategy.pick(entry.task.spec, free)
                if agent is None:
                    skipped.append(task_id)  # nobody free can run it now; keep its place
                    continue
                self._reserve(agent, task_id)
                entry.busy = True
                picks.append((entry, agent))
            queue.extendleft(reversed(skipped))
            if not free:
                break
        return picks

    async def _assign(self, entry: Entry, agent: Agent) -> None:
        task = entry.task
        new = _copy(task)
        new.state = ASSIGNED
        new.agent_id = agent.agent_id
        new.attempts = task.attempts + 1
        new.assigned_at_us = self.clock.wall_us()
        new.received_at_us = 0
        new.not_before_us = 0
        new.term = self.term
        try:
            (res,) = await self._commit([Write(new, entry.mod, claim_lease=agent.lease_id)])
        except BaseException as err:
            entry.busy = False
            self._release(agent, task.task_id)
            if self.active.get(task.task_id) is entry:
                self.ready[task.spec.priority].appendleft(task.task_id)
            if isinstance(err, StoreUnavailableError):
                self.spawn(self._wake_after(0.5))  # try again once etcd may be back
            raise
        entry.busy = False
        if not res.ok:
            self._release(agent, task.task_id)
            if res.lease_missing:
                self.ready[task.spec.priority].appendleft(task.task_id)
                self._drop_dead_agent(agent)
            else:
                await self._resync(task.task_id)
            return
        new.claim_token = res.revision
        entry.task, entry.mod = new, res.revision
        if self._deliver(agent, new):
            self._publish(new, QUEUED)

    async def _wake_after(self, seconds: float) -> None:
        await self.clock.sleep(seconds)
        self.wake.set()

    async def run(self) -> None:
        """Dispatch until deposed (raises NotLeaderError) or cancelled."""
        while True:
            self.wake.clear()
            if self.deposed:
                raise self.deposed
            next_due = self._promote_due()
            for entry, agent in self.plan():
                self.spawn(self._assign(entry, agent))
            if next_due is None:
                await self.wake.wait()
            else:
                sleeper = asyncio.ensure_future(self.clock.sleep(next_due))
                waiter = asyncio.ensure_future(self.wake.wait())
                try:
                    await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    sleeper.cancel()
                    waiter.cancel()

    # ---- status ----

    def counts(self) -> dict[str, int]:
        counts: collections.Counter[str] = collections.Counter()
        for entry in self.active.values():
            counts[state_name(entry.task.state)] += 1
        counts.update(self.finished)
        return dict(counts)


def _copy(task: tpb.Task) -> tpb.Task:
    new = tpb.Task()
    new.CopyFrom(task)
    return new
