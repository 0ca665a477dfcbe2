"""The root coordinator's logic: durable queue, state machine, claims, dispatch.

Pure: no grpc, no etcd. Durable writes go through a `Store` (port.py: etcd in
production, an in-memory fake in unit tests) and time through a `Clock`. The task
rules are in tasks.py, the agents' sessions and the strategies in sessions.py, the
ready queue in queue.py.

Invariants:
- Every task change is one `Write` the store commits atomically, comparing the
  record's mod revision; the in-memory view changes only after the commit, so
  memory never runs ahead of etcd.
- Every write's outcome is known before anyone acts on it. A commit that raises
  after it may have been sent (a deadline, a reset, etcd killed after applying)
  is resolved by reading the record back (`_write`): our bytes there mean it
  landed, an unchanged mod revision means it did not, anything else is someone
  else's change and memory adopts it. One path for every write.
- Once a write has gone out, the core finishes its bookkeeping in a task it owns,
  whatever happens to the RPC that asked for it.
- Memory is a cache of etcd: `reconcile()` compares the open tasks in etcd (an
  index key per open task) with memory, on a timer and after every outage, and
  repairs any difference.
- One write per task at a time: an `Entry` is taken (`take`/`try_take`) for the
  whole of a write and its bookkeeping; the ready queue keeps a taken entry's
  place.
- An ASSIGNED record's mod revision is its claim token: the claim key
  (claims/<id>, on the agent's lease) is written in the same commit. A result
  is accepted only while both the record and the claim still carry that
  revision, so a stale, forged or late report cannot complete a task, and a
  task is completed at most once.
- `attempts` counts attempts that may have started: an assignment the agent
  never received is handed back without counting, so attempts ≤ max_attempts.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.clock import Clock
from services._common.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    NotLeaderError,
    StoreUnavailableError,
)
from services.coordinator import limits
from services.coordinator.config import CoordinatorConfig
from services.coordinator.limits import DEFAULT_LLM, validate_hello, validate_spec
from services.coordinator.llm_admission import LlmGate
from services.coordinator.port import READ_CHUNK, Committed, Store, Write
from services.coordinator.queue import ReadyQueue
from services.coordinator.sessions import AgentSession, Strategy
from services.coordinator.tasks import (
    ASSIGNED,
    CANCELLED,
    DEAD_LETTER,
    FAILED,
    HELD,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    S,
    backoff_s,
    state_name,
    task_id_for,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BATCH = limits.BATCH_ITEMS
HAND_BACK_S = 1.0
"""A task released as hung waits this long at most for an agent other than its own."""

# While etcd is unreachable, one probe at a time asks whether it is back, with
# equal-jitter backoff from 50 ms to 1 s: a restarted etcd is noticed within about
# a second, and an outage costs the leader a call a second, not a call per waiter.
PROBE_BASE_S = 0.05
PROBE_CAP_S = 1.0


_CALLER_WAITS: contextvars.ContextVar[asyncio.Future[None] | None] = contextvars.ContextVar(
    "agentmesh_caller_waits", default=None
)
"""Set in the core's task for an RPC's work: resolved when that work starts to wait
for etcd to come back, so the RPC can answer UNAVAILABLE instead of hanging."""


@dataclass(slots=True, eq=False)
class Entry:
    """A non-terminal task as the leader holds it."""

    task: tpb.Task
    mod: int
    queued: bool = False
    """Its id sits in a ready queue or the retry heap (in one of them, once)."""
    claim_gone: int = 0
    """etcd deleted this claim token while a write was under way (ours, most likely)."""
    _busy: asyncio.Future[None] | None = None
    """Set while a write for this task and its bookkeeping are under way."""

    @property
    def busy(self) -> bool:
        return self._busy is not None

    def try_take(self) -> bool:
        """Take the entry if nobody holds it (no await: the dispatcher plans in one go)."""
        if self._busy is not None:
            return False
        self._busy = asyncio.get_running_loop().create_future()
        return True

    async def take(self) -> None:
        """Wait until the entry is free, then take it. A waiter that is cancelled leaves
        the holder's future alone (asyncio.wait does not cancel what it waits for)."""
        while self._busy is not None:
            await asyncio.wait({self._busy})
        self._busy = asyncio.get_running_loop().create_future()

    def release(self) -> None:
        busy, self._busy = self._busy, None
        if busy is not None and not busy.done():
            busy.set_result(None)


@dataclass
class ReconcileStats:
    """One reconcile pass: what it read and what it repaired."""

    open_tasks: int = 0
    claims: int = 0
    bytes_read: int = 0
    records_read: int = 0
    seconds: float = 0.0
    adopted: int = 0
    """Open records memory did not hold."""
    finished: int = 0
    """Entries etcd says are terminal (or gone)."""
    resynced: int = 0
    """Entries whose record changed behind memory's back."""
    enqueued: int = 0
    """QUEUED entries that were in no queue."""
    redelivered: int = 0
    """ASSIGNED entries no connected agent held, sent to their agent again."""
    requeued: int = 0
    """ASSIGNED entries no connected agent held, put back in the queue."""

    def repairs(self) -> int:
        return (
            self.adopted
            + self.finished
            + self.resynced
            + self.enqueued
            + self.redelivered
            + self.requeued
        )


@dataclass
class _Outage:
    since: float = 0.0
    """Monotonic time the outage began; 0 while etcd answers."""
    back: asyncio.Event = field(default_factory=asyncio.Event)
    failed_calls: int = 0
    waits: int = 0
    """Writes and reads that waited for etcd during this outage."""
    outages: int = 0


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
        self.agents: dict[str, AgentSession] = {}
        self.awaiting: dict[str, set[str]] = {}
        """agent id → claims loaded at takeover that the agent has not confirmed yet."""
        self.free: dict[str, AgentSession] = {}
        self.admission: dict[str, int] = {}
        """agent id → the health monitor's limit (see `AgentSession.admit`), kept across reconnects."""
        self.finished: collections.Counter[str] = collections.Counter()
        self.subscribers: set[Callable[[tpb.Task, int], None]] = set()
        self.on_progress: Callable[[tpb.Task, float, str], None] | None = None
        """Receives progress from the agent holding a task (fraction, message); not stored."""
        self.wake = asyncio.Event()
        self.queue = ReadyQueue(clock, self.wake)
        self.deposed: NotLeaderError | None = None
        self.last_reconcile: ReconcileStats | None = None
        self._order = 0
        self._background: set[asyncio.Task[Any]] = set()
        self._creating: dict[str, asyncio.Future[None]] = {}
        """Task ids whose create is in flight: a replay of one waits for its outcome."""
        self.llm = LlmGate(DEFAULT_LLM, clock)
        """Admission, budgets and costs of `llm` tasks (the server sets the configured one)."""
        self._outage = _Outage()
        self._outage.back.set()
        self._reconcile_now = asyncio.Event()

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
                self._enqueue(entry)
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
                self.run_in_background(
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

    # ---- the one write path ----

    def _check_term(self) -> None:
        if self.deposed:
            raise self.deposed

    def step_down(self, why: str) -> None:
        """End this core's term: nothing more is written, and waiters and the
        dispatcher stop with NotLeaderError."""
        self._depose(NotLeaderError(why))

    def _depose(self, err: NotLeaderError) -> NotLeaderError:
        self.deposed = self.deposed or err
        self.wake.set()
        return self.deposed

    async def _write(self, writes: Sequence[Write], *, persist: bool = False) -> list[Committed]:
        """Commit under the fence and return each write's known outcome.

        An unknown outcome is resolved by reading back before anything acts on it.
        Without `persist`, a write that did not land comes back `not_applied` (and
        nothing is sent while etcd is known to be down: the caller answers UNAVAILABLE
        at once). With `persist`, for writes nobody else would redo (an agent's
        report, a requeue), an outage is waited out and the write sent again until
        it lands or someone else's change makes it moot.
        """
        results: list[Committed | None] = [None] * len(writes)
        pending = list(range(len(writes)))
        uncertain: set[int] = set()  # sent at least once with an unknown outcome
        while pending:
            self._check_term()
            if persist:
                await self._store_ready()
            elif self._outage.since:
                for i in pending:
                    results[i] = Committed(False, not_applied=True)
                break
            batch = [writes[i] for i in pending]
            try:
                got: list[Committed | None] = list(await self.store.commit(batch))
            except NotLeaderError as err:
                raise self._depose(err) from None
            except StoreUnavailableError as err:
                self._store_failed(err)
                uncertain.update(pending)
                # at once: often only this reply was lost (a deadline, a reset)
                got = await self._from_store(partial(self.store.outcomes, batch), eager=True)
            else:
                self._store_ok()
                # a compare that fails after an earlier attempt whose outcome was unknown
                # may be that attempt landing late: our own bytes say so
                late = [
                    k
                    for k, (i, res) in enumerate(zip(pending, got, strict=True))
                    if i in uncertain and res is not None and not res.ok
                ]
                if late:
                    again = await self._from_store(
                        partial(self.store.outcomes, [batch[k] for k in late])
                    )
                    for k, res in zip(late, again, strict=True):
                        if res is not None and res.ok:
                            got[k] = res
            retry = []
            for i, res in zip(pending, got, strict=True):
                if res is not None:
                    results[i] = res
                elif persist:
                    retry.append(i)
                else:
                    results[i] = Committed(False, not_applied=True)
            pending = retry
        return [r if r is not None else Committed(False, not_applied=True) for r in results]

    # ---- etcd outages ----

    def _store_failed(self, err: BaseException) -> None:
        outage = self._outage
        outage.failed_calls += 1
        if outage.since:
            return
        outage.since = self.clock.monotonic()
        outage.back = asyncio.Event()
        outage.failed_calls = 1
        outage.waits = 0
        outage.outages += 1
        # one line when an outage begins and one when it ends, whatever happens between
        log.warning(
            "etcd unreachable: writes wait for it, new submits and cancels get UNAVAILABLE",
            extra={"term": self.term, "error": str(err)},
        )
        self.wake.set()
        self.run_in_background(self._probe(outage.outages))

    def _store_ok(self, probes: int = 0) -> None:
        """A call to etcd succeeded: an outage, if one was on, is over."""
        outage = self._outage
        if not outage.since:
            return
        log.info(
            "etcd reachable again",
            extra={
                "term": self.term,
                "down_s": round(self.clock.monotonic() - outage.since, 3),
                "failed_calls": outage.failed_calls,
                "waiting_writes": outage.waits,
                "probes": probes,
            },
        )
        outage.since = 0.0
        outage.back.set()
        self.wake.set()
        self.reconcile_soon()

    async def _probe(self, outage_number: int) -> None:
        """The one caller that asks etcd, with jittered backoff, whether it is back."""
        outage = self._outage
        attempt = 0
        while outage.since and outage.outages == outage_number:
            attempt += 1
            await self.clock.sleep(backoff_s(attempt, PROBE_BASE_S, PROBE_CAP_S, self.rng))
            if not outage.since or outage.outages != outage_number:
                return  # another call found etcd back first
            try:
                await self.store.revision()
            except StoreUnavailableError:
                outage.failed_calls += 1
                continue
            self._store_ok(attempt)

    def store_down(self) -> bool:
        return bool(self._outage.since)

    async def _store_ready(self) -> None:
        """Return at once while etcd answers; during an outage, when it is over."""
        if self._outage.since:
            waits = _CALLER_WAITS.get()
            if waits is not None and not waits.done():
                waits.set_result(None)  # the RPC that asked answers now; the work goes on
            self._outage.waits += 1
            while self._outage.since:
                self._check_term()
                await self._outage.back.wait()
        self._check_term()

    async def _from_store(self, call: Callable[[], Awaitable[T]], *, eager: bool = False) -> T:
        """A read the core cannot go on without: retried across an outage (one prober
        decides when to try again), until it answers or the term ends. `eager`: try once
        before waiting for an outage to end."""
        while True:
            if not eager:
                await self._store_ready()
            eager = False
            try:
                got = await call()
            except StoreUnavailableError as err:
                self._store_failed(err)
                continue
            self._store_ok()
            return got

    # ---- work the core owns ----

    def run_in_background(
        self, coro: Coroutine[Any, Any, T], *, caller: asyncio.Future[None] | None = None
    ) -> asyncio.Task[T]:
        """Run work without blocking the caller (the dispatcher, a stream); the core
        holds it until done and cancels it at the end of the term. `caller`: resolved
        if the work starts waiting for etcd (see `_owned`)."""
        context = contextvars.copy_context()
        context.run(_CALLER_WAITS.set, caller)
        task = asyncio.get_running_loop().create_task(coro, context=context)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    async def _owned(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` as the core's own task and wait for it. If the caller goes away
        (a client's deadline cancels its handler), the write it started still finishes
        and its bookkeeping is done. If the work has to wait for etcd to come back (the
        outcome of its write is unknown until then), the caller gets UNAVAILABLE at once
        and the work goes on: a retry with the same ids finds the outcome."""
        waits: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = self.run_in_background(coro, caller=waits)
        try:
            either: set[asyncio.Future[Any]] = {task, waits}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current is not None and current.cancelling()):
                # the term ended under us, not the caller
                raise self.deposed or NotLeaderError("the leader's term ended") from None
            raise
        if task.done():
            if task.cancelled():
                raise self.deposed or NotLeaderError("the leader's term ended")
            return task.result()
        raise StoreUnavailableError(
            "etcd is unreachable; whether this call's write landed is not known yet (the "
            "leader settles it when etcd is back): retry with the same task ids"
        )

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if task.cancelled():
            return
        err = task.exception()  # retrieved here, so asyncio never logs it as lost
        if err is None or isinstance(err, NotLeaderError | StoreUnavailableError):
            return  # a deposed term ends by itself; outages have their own two lines
        if isinstance(err, InvalidArgumentError | NotFoundError | AlreadyExistsError):
            return  # answered to the caller, if it is still there
        log.error("background work crashed", exc_info=err)

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
            validate_spec(spec, self.cfg, f"specs[{i}]" if len(specs) > 1 else "spec", self.llm.cfg)
        self.llm.check_budgets(specs)  # FAILED_PRECONDITION for the whole batch
        self._check_term()
        return await self._owned(self._submit(list(specs)))

    async def _submit(self, specs: list[tpb.TaskSpec]) -> list[tuple[tpb.Task, bool]]:
        if self._outage.since:
            raise StoreUnavailableError("etcd is unreachable; nothing was written; retry shortly")
        now = self.clock.wall_us()
        ids: list[str] = []
        for spec in specs:
            task_id = task_id_for(spec, now, self.rng)
            if task_id in ids:
                raise InvalidArgumentError(f"task id {task_id!r} appears twice in one batch")
            ids.append(task_id)
        # a replay (a client retrying after its deadline) waits for the outcome of the
        # create still in flight for the same id, then answers from what it found
        while waiting := {self._creating[i] for i in ids if i in self._creating}:
            await asyncio.wait(waiting)
        writes: list[Write] = []
        picks: list[AgentSession | None] = []
        # Fast path: while nothing waits, a task that a free agent can run is created
        # already ASSIGNED, its claim in the same transaction: one etcd write fewer, and
        # the assignment leaves with the acknowledgement. Never while tasks wait, so
        # priority and FIFO order hold.
        fast = not self.queue.has_ready()
        for spec, task_id in zip(specs, ids, strict=True):
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
            if agent is not None and not self.llm.admit(task):
                agent = None  # over its model's rate limits: it waits in the queue
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
        loop = asyncio.get_running_loop()
        creating = {w.task.task_id: loop.create_future() for w in todo}
        self._creating.update(creating)
        try:
            try:
                results = iter(await self._write(todo))
            except BaseException:
                for agent, w in zip(picks, writes, strict=True):
                    if agent is not None:
                        self._release(agent, w.task.task_id)
                raise
            out: list[tuple[tpb.Task, bool]] = []
            retry: dict[int, tpb.TaskSpec] = {}  # position → spec, for claims on a dead lease
            missed = 0
            for write, agent in zip(writes, picks, strict=True):
                task = write.task
                if write.expect_mod == -1:
                    out.append((task, False))
                    continue
                res = next(results)
                if res.ok:
                    entry = Entry(task, res.revision)
                    self.active[task.task_id] = entry
                    if agent is None:
                        self._enqueue(entry)
                    else:
                        task.claim_token = res.revision
                        self._deliver(agent, task)
                    self._publish(task, S.TASK_STATE_UNSPECIFIED)
                    out.append((task, True))
                    continue
                if agent is not None:
                    self._release(agent, task.task_id)
                if res.not_applied:
                    missed += 1
                    out.append((task, False))
                    continue
                if res.lease_missing:  # the agent's process died: the task was not created
                    assert agent is not None
                    self._drop_dead_agent(agent)
                    retry[len(out)] = task.spec
                    out.append((task, True))  # replaced below
                    continue
                existing = res.existing
                if existing is None:
                    raise StoreUnavailableError(
                        "submit was refused by etcd without a record; retry"
                    )
                live = self.active.get(existing.task_id)
                if live is None and existing.state not in TERMINAL:
                    # the record exists but this leader does not hold it (a create whose
                    # outcome nobody resolved): take it in, so the replay repairs memory
                    live = self._adopt(existing, res.existing_mod)
                out.append((live.task if live else existing, False))
        finally:
            for task_id, fut in creating.items():
                if self._creating.get(task_id) is fut:
                    del self._creating[task_id]
                fut.set_result(None)
        if missed:
            raise StoreUnavailableError(
                f"etcd is unreachable; {missed} of {len(specs)} tasks were not written "
                "(the others were); retry with the same ids"
            )
        if retry:  # the agent is dropped now, so these go through the queue
            again = await self._submit(list(retry.values()))
            for pos, result in zip(retry, again, strict=True):
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
        """Cancel and return the state the cancel produced: CANCELLED, or the terminal
        record when the task had finished already. UNAVAILABLE when it cannot be
        committed (never an OK that leaves the task running)."""
        self._check_term()
        return await self._owned(self._cancel(task_id, reason))

    async def _cancel(self, task_id: str, reason: str) -> tpb.Task:
        for _ in range(10):  # each round ends, or learns of a change made meanwhile
            if self._outage.since:
                raise StoreUnavailableError(
                    f"etcd is unreachable; task {task_id!r} was not cancelled; retry shortly"
                )
            entry = self.active.get(task_id)
            if entry is None:
                if task_id in self._creating:
                    await asyncio.wait({self._creating[task_id]})
                    continue
                found = await self.store.read(task_id)
                if found is None:
                    raise NotFoundError(
                        f"task {task_id!r} does not exist (or expired after the retention period)"
                    )
                if found[0].state in TERMINAL:
                    return found[0]  # finished already: say how
                if task_id in self.active:
                    continue
                entry = self._adopt(*found)  # open in etcd, unknown here: take it in first
            await entry.take()
            try:
                if self.active.get(task_id) is not entry:
                    continue  # finished (or replaced) while we waited
                task = entry.task
                prev_state = task.state
                new = _copy(task)
                new.state = CANCELLED
                new.last_error = reason or "cancelled by a client"
                new.finished_at_us = self.clock.wall_us()
                new.term = self.term
                (res,) = await self._write([Write(new, entry.mod, delete_claim=prev_state in HELD)])
                if res.not_applied:
                    raise StoreUnavailableError(
                        f"etcd is unreachable; task {task_id!r} was not cancelled; retry"
                    )
                if not res.ok:
                    await self._resync(entry)  # someone else's change: look again
                    continue
                self._finish(entry, new, prev_state)
                if prev_state in HELD and (agent := self.agents.get(task.agent_id)):
                    if task_id in agent.inflight:
                        agent.send(
                            cpb.CoordinatorMessage(
                                cancel=cpb.CancelAssignment(task_id=task_id, reason=new.last_error)
                            )
                        )
                    self._release(agent, task_id)
                return new
            finally:
                self._done_with(entry)
        raise StoreUnavailableError(f"task {task_id!r} kept changing; retry the cancel")

    # ---- agents ----

    def connect(
        self, hello: cpb.AgentHello, send: Callable[[cpb.CoordinatorMessage | None], None]
    ) -> AgentSession:
        validate_hello(hello)
        old = self.agents.get(hello.agent_id)
        if old is not None:
            if old.lease_id != hello.lease_id:
                # Another process says it is this agent. Replacing the live one would
                # orphan it (connected, never given work); the newcomer is refused.
                raise AlreadyExistsError(
                    f"agent id {hello.agent_id!r} is connected already from pool "
                    f"{old.pool_id!r} on another etcd lease; every agent id must be unique "
                    "(give each agent pool its own --pool-id)"
                )
            # The same process reconnecting while its old stream is still open (it saw
            # the break first): the new stream wins and the old one is closed. The claims
            # the hello lists are re-adopted below; the requeue that disconnect schedules
            # checks, before it writes, that no session holds the claim again.
            self.disconnect(hello.agent_id)
            old.send(None)
        self._order += 1
        agent = AgentSession(
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
                if entry.busy:
                    # a write for it is on its way (a requeue after the old stream ended):
                    # the claim stays only if it still holds once that write is resolved
                    self.run_in_background(self._confirm_claim(agent, entry, ref.claim_token))
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
                self.run_in_background(
                    self._requeue(
                        task_id, agent.agent_id, "assignment lost in failover", count_attempt=False
                    )
                )
        if agent.free() > 0:
            self.free[agent.agent_id] = agent
        self.wake.set()
        return agent

    async def _confirm_claim(self, agent: AgentSession, entry: Entry, token: int) -> None:
        await entry.take()
        try:
            task = entry.task
            if (
                self.active.get(task.task_id) is entry
                and task.state in HELD
                and task.claim_token == token
                and task.agent_id == agent.agent_id
            ):
                return
            if task.task_id in agent.inflight and not (
                task.state in HELD and task.agent_id == agent.agent_id
            ):
                agent.send(
                    cpb.CoordinatorMessage(
                        cancel=cpb.CancelAssignment(
                            task_id=task.task_id, reason="claim is no longer valid"
                        )
                    )
                )
                self._release(agent, task.task_id)
        finally:
            self._done_with(entry)

    def disconnect(self, agent_id: str) -> None:
        """The agent's stream ended: requeue what it held at once."""
        agent = self.agents.pop(agent_id, None)
        if agent is None:
            return
        self.free.pop(agent_id, None)
        for task_id in tuple(agent.inflight):
            self.run_in_background(
                self._requeue(task_id, agent.agent_id, "agent disconnected", count_attempt=True)
            )
        agent.inflight.clear()

    def drain(self, agent_id: str) -> None:
        agent = self.agents.get(agent_id)
        if agent:
            agent.draining = True
            self.free.pop(agent_id, None)

    def _reserve(self, agent: AgentSession, task_id: str) -> None:
        agent.inflight.add(task_id)
        if agent.admit == 1:
            agent.admit = 0  # half-open: its one trial task; the health monitor says what next
        if agent.free() <= 0:
            self.free.pop(agent.agent_id, None)

    def _deliver(self, agent: AgentSession, task: tpb.Task) -> bool:
        """Send a committed assignment, or requeue it if the agent left meanwhile."""
        if self.agents.get(agent.agent_id) is not agent:
            agent.inflight.discard(task.task_id)
            self.run_in_background(
                self._requeue(
                    task.task_id, agent.agent_id, "agent disconnected", count_attempt=False
                )
            )
            return False
        agent.send(cpb.CoordinatorMessage(assign=cpb.Assign(task=task)))
        return True

    def _drop_dead_agent(self, agent: AgentSession) -> None:
        log.warning("agent lease is gone; dropping the agent", extra={"agent": agent.agent_id})
        if self.agents.get(agent.agent_id) is agent:
            self.disconnect(agent.agent_id)
        agent.send(
            cpb.CoordinatorMessage(drain=cpb.Drain(reason="your etcd lease expired; reconnect"))
        )

    def _release(self, agent: AgentSession, task_id: str) -> None:
        agent.inflight.discard(task_id)
        if agent.free() > 0 and self.agents.get(agent.agent_id) is agent:
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
        if not held or entry.task.claim_token != msg.claim_token:
            ack.reason = f"stale or foreign claim token {msg.claim_token} for task {msg.task_id!r}"
            return ack
        await entry.take()  # a cancel may be being written: then the claim is gone anyway
        try:
            task = entry.task
            if (
                self.active.get(msg.task_id) is not entry
                or task.state not in HELD
                or task.claim_token != msg.claim_token
                or task.agent_id != agent_id
            ):
                ack.reason = "the task changed while the report was in flight"
                return ack
            now = self.clock.wall_us()
            new = _copy(task)
            new.usage.input_tokens += msg.usage.input_tokens
            new.usage.output_tokens += msg.usage.output_tokens
            new.usage.cost_usd += msg.usage.cost_usd
            new.finished_at_us = now
            new.term = self.term
            handed_back = False
            if ok:
                assert isinstance(msg, cpb.TaskResult)
                new.state = SUCCEEDED
                new.result = msg.output
                if msg.received_at_us and not new.received_at_us:
                    new.received_at_us = msg.received_at_us
            else:
                assert isinstance(msg, cpb.TaskFailure)
                new.last_error = msg.error or "the agent reported a failure without a message"
                current = self.agents.get(agent_id)
                if msg.not_started and current is not None and current.draining:
                    # an assign that crossed the agent's "draining": it never started, so
                    # it goes back first in line without using up an attempt (only from a
                    # draining agent, which gets nothing new: no task can loop this way)
                    handed_back = True
                    new.state = QUEUED
                    new.finished_at_us = 0
                    new.not_before_us = 0
                    new.attempts = max(0, task.attempts - 1)
                elif msg.retryable and task.attempts < task.spec.max_attempts:
                    new.state = QUEUED
                    new.finished_at_us = 0
                    new.not_before_us = now + int(
                        backoff_s(
                            task.attempts, self.cfg.retry_base_s, self.cfg.retry_cap_s, self.rng
                        )
                        * 1e6
                    )
                else:
                    new.state = DEAD_LETTER
            (res,) = await self._write(
                [Write(new, entry.mod, expect_claim=msg.claim_token, delete_claim=True)],
                persist=True,
            )
            if not res.ok:
                await self._resync(entry)
                ack.reason = "the claim was lost before the report arrived (agent lease expired or task reassigned)"
                return ack
            ack.accepted = True
            self.llm.reported(new, agent_id, msg)  # settle its admission, follow, charge
            if agent is not None and not handed_back:
                if ok:
                    agent.completed += 1
                else:
                    agent.failed += 1
                took_ms = max(0.0, (now - task.assigned_at_us) / 1000.0)
                agent.latency_ema_ms = (
                    took_ms
                    if not agent.latency_ema_ms
                    else 0.8 * agent.latency_ema_ms + 0.2 * took_ms
                )
            if new.state == QUEUED:
                entry.task, entry.mod = new, res.revision
                self._enqueue(entry, front=handed_back)
                self._publish(new, FAILED if not handed_back else task.state)
            else:
                self._finish(entry, new, task.state)
            return ack
        finally:
            self._done_with(entry)

    def _done_with(self, entry: Entry) -> None:
        """Release a taken entry; a QUEUED one that plan() skipped while it was busy
        gets its turn now, and a claim etcd deleted meanwhile is dealt with now."""
        entry.release()
        gone, entry.claim_gone = entry.claim_gone, 0
        task = entry.task
        if gone and task.state in HELD and task.claim_token == gone:
            self.claim_lost(task.task_id, gone)
        if entry.queued and task.state == QUEUED and self.free:
            self.wake.set()

    def _finish(self, entry: Entry, new: tpb.Task, previous: int) -> None:
        if self.active.get(new.task_id) is entry:
            del self.active[new.task_id]
        self.llm.forget(new.task_id)
        self.finished[state_name(new.state)] += 1
        self._publish(new, previous)

    # ---- the health monitor's orders ----

    def admit(self, agent_id: str, limit: int) -> None:
        """Apply the health monitor's admission for an agent (see `AgentSession.admit`)."""
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
        done = await self._owned(self._release_all(agent_id, wanted, reason))
        released = [claim for claim, ok in zip(wanted, done, strict=True) if ok]
        skipped = [claim for claim, ok in zip(wanted, done, strict=True) if not ok]
        return released, skipped

    async def _release_all(
        self, agent_id: str, wanted: list[tuple[str, int]], reason: str
    ) -> list[bool]:
        return list(
            await asyncio.gather(*(self._release_claim(agent_id, t, c, reason) for t, c in wanted))
        )

    async def _release_claim(self, agent_id: str, task_id: str, token: int, reason: str) -> bool:
        entry = self.active.get(task_id)
        if entry is None:
            return False
        await entry.take()
        try:
            task = entry.task
            if (
                self.active.get(task_id) is not entry
                or task.state not in HELD
                or task.agent_id != agent_id
                or task.claim_token != token
            ):
                return False
            why = f"released by the health monitor: {reason}"
            if not await self._requeue_entry(entry, why, count_attempt=True):
                return False  # someone else's change came first (a report, a cancel)
        finally:
            self._done_with(entry)
        agent = self.agents.get(agent_id)
        if agent is not None and task_id in agent.inflight:
            agent.send(
                cpb.CoordinatorMessage(
                    cancel=cpb.CancelAssignment(task_id=task_id, reason=f"released: {reason}")
                )
            )
            # its slot stays taken until the task runs elsewhere (plan() never hands a
            # task to an agent that still lists it)
            self.run_in_background(self._hand_back(agent, task_id))
        return True

    async def _hand_back(self, agent: AgentSession, task_id: str) -> None:
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

    async def _requeue(
        self,
        task_id: str,
        agent_id: str,
        why: str,
        *,
        count_attempt: bool,
        token: int = 0,
    ) -> None:
        """Put a held task back in the queue (DEAD_LETTER when a counted attempt was its
        last). `token`: the claim is known to be gone (its lease expired), so a session
        that still lists it is told to stop; without it, a session that holds the claim
        again (a reconnect's hello) keeps it and nothing is written."""
        entry = self.active.get(task_id)
        if entry is None:
            return
        await entry.take()
        try:
            task = entry.task
            if (
                self.active.get(task_id) is not entry
                or task.state not in HELD
                or task.agent_id != agent_id
                or (token and task.claim_token != token)
            ):
                return
            holder = self.agents.get(agent_id)
            if holder is not None and task_id in holder.inflight:
                if not token:
                    return  # re-adopted by a newer session of the agent: its claim stands
                holder.send(
                    cpb.CoordinatorMessage(
                        cancel=cpb.CancelAssignment(task_id=task_id, reason="claim expired")
                    )
                )
                # not offered new work for it: its lease is most likely dead, and a claim
                # on a dead lease only fails (its next report frees the slot)
                holder.inflight.discard(task_id)
            await self._requeue_entry(entry, why, count_attempt=count_attempt)
        finally:
            self._done_with(entry)

    async def _requeue_entry(self, entry: Entry, why: str, *, count_attempt: bool) -> bool:
        """The write of a requeue; the caller has taken the entry. False when someone
        else's change came first (memory then follows etcd)."""
        task = entry.task
        new = _copy(task)
        new.last_error = why
        new.term = self.term
        new.not_before_us = 0
        exhausted = count_attempt and task.attempts >= task.spec.max_attempts
        if not count_attempt:
            new.attempts = max(0, task.attempts - 1)  # it never started: give it back
        new.state = DEAD_LETTER if exhausted else QUEUED
        if exhausted:
            new.finished_at_us = self.clock.wall_us()
        (res,) = await self._write([Write(new, entry.mod, delete_claim=True)], persist=True)
        if not res.ok:
            await self._resync(entry)
            return False
        if exhausted:
            self._finish(entry, new, task.state)
            return True
        entry.task, entry.mod = new, res.revision
        # at the front: a requeued task was waiting longest, and its agent's death is
        # not its fault (it is re-dispatched within one dispatch pass)
        self._enqueue(entry, front=True)
        self._publish(new, task.state)
        return True

    def claim_lost(self, task_id: str, token: int) -> None:
        """etcd deleted a claim. Our own writes delete claims too (a report, a cancel, a
        requeue), and the watch may tell us before the write's reply does: the requeue
        decides once it has the entry, when the write under way is resolved."""
        entry = self.active.get(task_id)
        if entry and entry.task.state in HELD and entry.task.claim_token == token:
            if entry.busy:
                # Most likely our own write (a report, a cancel) deleted it and its reply
                # is on its way: decided when that write is done, without a task per
                # completion meanwhile.
                entry.claim_gone = token
                return
            self.run_in_background(
                self._requeue(
                    task_id,
                    entry.task.agent_id,
                    "claim expired (agent lease lost)",
                    count_attempt=True,
                    token=token,
                )
            )

    def requeue_orphans(self, task_ids: Iterable[str]) -> None:
        for task_id in task_ids:
            entry = self.active.get(task_id)
            if entry:
                self.run_in_background(
                    self._requeue(
                        task_id,
                        entry.task.agent_id,
                        "claim lost during failover",
                        count_attempt=True,
                    )
                )

    # ---- memory follows etcd ----

    async def _resync(self, entry: Entry) -> None:
        """A compare failed: memory and etcd disagree. Adopt etcd's record (the caller
        has taken the entry)."""
        task_id = entry.task.task_id
        found = await self._from_store(partial(self.store.read, task_id))
        self._absorb(entry, found)

    def _absorb(self, entry: Entry, found: tuple[tpb.Task, int] | None) -> str:
        """Make a taken entry match etcd's record; returns what changed."""
        old = entry.task
        task_id = old.task_id
        if self.active.get(task_id) is not entry:
            return ""
        holder = self.agents.get(old.agent_id) if old.state in HELD else None
        if found is None:  # gone (expired): nothing is left to finish
            del self.active[task_id]
            self._let_go(holder, task_id)
            return "finished"
        task, mod = found
        if task.state in TERMINAL:
            self._let_go(holder, task_id)
            self._finish(entry, task, old.state)
            return "finished"
        if task.state == ASSIGNED:
            task.claim_token = mod
        changed = mod != entry.mod
        if changed:
            if holder is not None and (
                task.state not in HELD or task.claim_token != old.claim_token
            ):
                self._let_go(holder, task_id)  # the claim it was sent is gone
            entry.task, entry.mod = task, mod
            self._publish(task, old.state)
        if task.state == QUEUED:
            self._enqueue(entry)
        else:
            # a claim memory did not make, or one whose report failed its compare: it
            # stays only if its agent holds it and the claim is live
            self.run_in_background(self._settle_claim(entry))
        return "resynced" if changed else ""

    def _let_go(self, holder: AgentSession | None, task_id: str) -> None:
        """A session holds a claim that is gone: tell it to stop and free its slot."""
        if holder is not None and task_id in holder.inflight:
            holder.send(
                cpb.CoordinatorMessage(
                    cancel=cpb.CancelAssignment(task_id=task_id, reason="claim is no longer valid")
                )
            )
            self._release(holder, task_id)

    def _adopt(self, task: tpb.Task, mod: int) -> Entry:
        """Take in an open record memory did not hold (an idempotent replay found it, or
        reconcile did). An ASSIGNED one is delivered again or requeued."""
        entry = Entry(task, mod)
        self.active[task.task_id] = entry
        if task.state == QUEUED:
            self._enqueue(entry)
        else:
            task.state = ASSIGNED
            task.claim_token = mod
            self.run_in_background(self._settle_claim(entry))
        self._publish(task, S.TASK_STATE_UNSPECIFIED)
        return entry

    async def _settle_claim(self, entry: Entry, claim_mod: int | None = None) -> str:
        """An ASSIGNED entry that no connected session may hold: keep it if one does (or
        its agent may still return after a takeover), send it again if its agent is here
        with room and the claim is live (it never received it), else requeue."""
        await entry.take()
        try:
            task = entry.task
            task_id = task.task_id
            if self.active.get(task_id) is not entry or task.state not in HELD:
                return ""
            holder = self.agents.get(task.agent_id)
            if holder is not None and task_id in holder.inflight:
                return ""
            if task_id in self.awaiting.get(task.agent_id, ()):
                return ""
            if claim_mod is None or claim_mod != task.claim_token:
                claim_mod = await self._from_store(partial(self.store.claim_revision, task_id))
            if claim_mod != task.claim_token:
                # the lease died with its agent, which may have run it: that counts
                await self._requeue_entry(entry, "claim lost", count_attempt=True)
                return "requeued"
            if holder is not None and holder.free() > 0:
                self._reserve(holder, task_id)
                holder.send(cpb.CoordinatorMessage(assign=cpb.Assign(task=task)))
                return "redelivered"
            await self._requeue_entry(entry, "assignment never delivered", count_attempt=False)
            return "requeued"
        finally:
            self._done_with(entry)

    def reconcile_soon(self) -> None:
        self._reconcile_now.set()

    async def reconcile(self) -> ReconcileStats:
        """Compare the open tasks in etcd with memory and repair every difference.

        Reads keys and revisions only (the open-task index and the claims), then the
        records of the few tasks that differ. Entries busy with a write, and changes
        newer than the snapshot, are left to the write under way.
        """
        started = self.clock.monotonic()
        snap = await self._from_store(self.store.open_tasks)
        stats = ReconcileStats(
            open_tasks=len(snap.open), claims=len(snap.claims), bytes_read=snap.bytes_read
        )
        suspects: list[str] = []
        unheld: list[Entry] = []
        # what is really in line, not what the entries' flags say: a check of the check
        in_line = self.queue.in_line()
        for task_id, mod in snap.open.items():
            entry = self.active.get(task_id)
            if entry is None:
                if task_id not in self._creating:
                    suspects.append(task_id)
            elif entry.mod < mod:
                suspects.append(task_id)
            elif entry.mod == mod and not entry.busy:
                task = entry.task
                if task.state == QUEUED:
                    if task_id not in in_line:
                        entry.queued = False
                        self._enqueue(entry)
                        stats.enqueued += 1
                elif task.state in HELD:
                    holder = self.agents.get(task.agent_id)
                    if not (holder is not None and task_id in holder.inflight) and (
                        task_id not in self.awaiting.get(task.agent_id, ())
                    ):
                        unheld.append(entry)
        for task_id, entry in self.active.items():
            if task_id not in snap.open and entry.mod <= snap.revision and not entry.busy:
                suspects.append(task_id)
        for i in range(0, len(suspects), READ_CHUNK):
            chunk = suspects[i : i + READ_CHUNK]
            found = await self._from_store(partial(self.store.read_many, chunk))
            stats.records_read += len(found)
            for task_id in chunk:
                record = found.get(task_id)
                entry = self.active.get(task_id)
                if entry is None:
                    if (
                        record is not None
                        and record[0].state not in TERMINAL
                        and task_id not in self._creating
                    ):
                        self._adopt(*record)
                        stats.adopted += 1
                    continue
                if record is not None and record[1] <= entry.mod:
                    continue  # memory is as new (a write landed meanwhile)
                if not entry.try_take():
                    continue
                try:
                    what = self._absorb(entry, record)
                finally:
                    self._done_with(entry)
                if what == "finished":
                    stats.finished += 1
                elif what == "resynced":
                    stats.resynced += 1
        for entry in unheld:
            what = await self._settle_claim(entry, snap.claims.get(entry.task.task_id))
            if what == "redelivered":
                stats.redelivered += 1
            elif what == "requeued":
                stats.requeued += 1
        stats.seconds = self.clock.monotonic() - started
        self.last_reconcile = stats
        if stats.repairs():
            log.warning(
                "reconcile repaired memory",
                extra={"term": self.term, **_stats_extra(stats)},
            )
        return stats

    async def reconcile_loop(self) -> None:
        """Reconcile every `reconcile_interval_s`, and at once after an outage ends."""
        while True:
            await self._sleep_or(self._reconcile_now, self.cfg.reconcile_interval_s)
            self._reconcile_now.clear()
            self._check_term()
            if self._outage.since:
                continue  # the outage's end wakes us
            log.debug("reconcile", extra={"term": self.term})
            try:
                stats = await self.reconcile()
            except StoreUnavailableError:
                continue
            log.debug("reconciled", extra={"term": self.term, **_stats_extra(stats)})

    async def _sleep_or(self, event: asyncio.Event, seconds: float) -> None:
        if event.is_set():
            return
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waiter.cancel()

    # ---- the queue ----

    def _enqueue(self, entry: Entry, *, front: bool = False) -> None:
        self.queue.push(entry, front=front)

    def queue_depth(self) -> int:
        """Tasks waiting for an agent (ready, backing off, or being assigned)."""
        return sum(1 for e in self.active.values() if e.task.state == QUEUED)

    def plan(self) -> list[tuple[Entry, AgentSession]]:
        """Match ready tasks to free agents (see `ReadyQueue.plan`)."""
        return self.queue.plan(self.active, self.free, self.strategy.pick, self._reserve, self.llm)

    async def _assign(self, entry: Entry, agent: AgentSession) -> None:
        """Write the claim of a planned assignment (plan() took the entry and the slot)."""
        task = entry.task
        slot_settled = False
        try:
            if task.attempts >= task.spec.max_attempts:
                # only a record written before attempts were counted right gets here
                self._release(agent, task.task_id)
                slot_settled = True
                await self._dead_letter_exhausted(entry)
                return
            new = _copy(task)
            new.state = ASSIGNED
            new.agent_id = agent.agent_id
            new.attempts = task.attempts + 1
            new.assigned_at_us = self.clock.wall_us()
            new.received_at_us = 0
            new.not_before_us = 0
            new.term = self.term
            (res,) = await self._write([Write(new, entry.mod, claim_lease=agent.lease_id)])
            slot_settled = True
            if res.ok:
                new.claim_token = res.revision
                entry.task, entry.mod = new, res.revision
                if self._deliver(agent, new):
                    self._publish(new, QUEUED)
                return
            self._release(agent, task.task_id)
            if res.not_applied or res.lease_missing:
                self._enqueue(entry, front=True)  # first in line again
                if res.lease_missing:
                    self._drop_dead_agent(agent)
            else:
                await self._resync(entry)
        finally:
            if not slot_settled:  # the term ended mid-write
                self._release(agent, task.task_id)
            self._done_with(entry)

    async def _dead_letter_exhausted(self, entry: Entry) -> None:
        new = _copy(entry.task)
        new.state = DEAD_LETTER
        new.finished_at_us = self.clock.wall_us()
        new.term = self.term
        new.last_error = new.last_error or "attempts exhausted"
        (res,) = await self._write([Write(new, entry.mod)], persist=True)
        if res.ok:
            self._finish(entry, new, QUEUED)
        else:
            await self._resync(entry)

    async def run(self) -> None:
        """Dispatch until deposed (raises NotLeaderError) or cancelled."""
        while True:
            self.wake.clear()
            self._check_term()
            if self._outage.since:
                # nothing can be written: wait the outage out instead of failing claims
                await self._outage.back.wait()
                continue
            next_due = self.queue.promote_due(self.active)
            for entry, agent in self.plan():
                self.run_in_background(self._assign(entry, agent))
            llm_due = self.llm.next_try_s()  # a model held back by its rate limits
            if llm_due is not None:
                next_due = llm_due if next_due is None else min(next_due, llm_due)
            if next_due is None:
                await self.wake.wait()
            else:
                await self._sleep_or(self.wake, next_due)

    # ---- status ----

    def counts(self) -> dict[str, int]:
        counts: collections.Counter[str] = collections.Counter()
        for entry in self.active.values():
            counts[state_name(entry.task.state)] += 1
        counts.update(self.finished)
        return dict(counts)


def _stats_extra(stats: ReconcileStats) -> dict[str, Any]:
    return {
        "open_tasks": stats.open_tasks,
        "claims": stats.claims,
        "bytes_read": stats.bytes_read,
        "records_read": stats.records_read,
        "ms": round(stats.seconds * 1000, 2),
        "adopted": stats.adopted,
        "finished": stats.finished,
        "resynced": stats.resynced,
        "enqueued": stats.enqueued,
        "redelivered": stats.redelivered,
        "requeued": stats.requeued,
    }


def _copy(task: tpb.Task) -> tpb.Task:
    new = tpb.Task()
    new.CopyFrom(task)
    return new
