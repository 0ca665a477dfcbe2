"""An in-memory `Store` with etcd's semantics, for unit tests of the coordinator core.

It mirrors `EtcdTaskStore`: each `Write` compares the record's mod revision
(0: absent) and, when asked, the claim's; one `commit()` call is one etcd
transaction, so every write that succeeds in it shares one new revision. The
open-task index (`open/<id>`, written in the same transaction as the record)
is derived from the records: every non-terminal record is in it, with the
record's mod revision.

Failure modes, as etcd shows them to a client:
- `fail_next`: the next N commits are sent and NOT applied, then raise
  StoreUnavailableError (etcd down before it applied them);
- `lose_next`: the next N commits are APPLIED, then raise StoreUnavailableError
  (etcd applied them and died, or the deadline passed, before the reply came);
- `down`: every call raises StoreUnavailableError until it is cleared (an outage);
- `hold()`: commits that were sent wait for the returned event before applying,
  whatever happens to the caller meanwhile (a request on the wire is not recalled
  by cancelling the coroutine that sent it);
- `chaos`: a seeded random mix of the first two, `lose_p` and `fail_p` per commit.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.errors import NotLeaderError, StoreUnavailableError
from services.coordinator.port import Committed, OpenTasks, Write

HELD = (tpb.TASK_STATE_ASSIGNED, tpb.TASK_STATE_RUNNING)
TERMINAL = (tpb.TASK_STATE_SUCCEEDED, tpb.TASK_STATE_CANCELLED, tpb.TASK_STATE_DEAD_LETTER)


@dataclass
class MemoryStore:
    revision_now: int = 1
    records: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    """task id → (serialized Task, mod revision)."""
    claims: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    """task id → (agent id, mod revision, lease)."""
    dead_leases: set[int] = field(default_factory=set)
    deposed: bool = False
    """The leader's fence fails: every commit raises NotLeaderError."""
    fail_next: int = 0
    """The next N commits are not applied and raise StoreUnavailableError."""
    lose_next: int = 0
    """The next N commits are applied, then raise StoreUnavailableError (reply lost)."""
    down: bool = False
    """etcd is unreachable: every call raises StoreUnavailableError."""
    die_with_lost_reply: bool = False
    """With `lose_next`: etcd dies right after applying (sets `down`), as a SIGKILL would."""
    chaos: random.Random | None = None
    lose_p: float = 0.0
    fail_p: float = 0.0
    commits: int = 0
    """Commit calls that etcd applied (round trips that changed something or compared)."""
    calls: int = 0
    """Every call that tried to reach etcd, failed ones included."""
    _gate: asyncio.Event | None = None

    # ---- the Store protocol ----

    async def commit(self, writes: Sequence[Write]) -> list[Committed]:
        self.calls += 1
        await asyncio.sleep(0)  # a round trip: other coroutines run meanwhile
        if self.down:
            raise StoreUnavailableError("etcd is unreachable (injected outage)")
        for w in writes:  # on the wire now: what etcd would store, as the real store keeps it
            w.sent = _stored(w.task).SerializeToString()
        fail = lose = False
        if self.fail_next:
            self.fail_next -= 1
            fail = True
        elif self.lose_next:
            self.lose_next -= 1
            lose = True
        elif self.chaos is not None:
            roll = self.chaos.random()
            fail = roll < self.fail_p
            lose = not fail and roll < self.fail_p + self.lose_p
        gate = self._gate
        if gate is not None:
            # the request is sent: it applies when etcd gets to it, even if our caller
            # is cancelled meanwhile (shielded, like the real group commit's own task)
            await asyncio.shield(self._apply_when(gate, writes, fail))
            out = None
        if fail:
            raise StoreUnavailableError("etcd is unreachable (injected: not applied)")
        out = self._apply(writes) if gate is None else self._applied
        if lose:
            if self.die_with_lost_reply:
                self.down = True
            raise StoreUnavailableError("etcd did not answer (injected: applied, reply lost)")
        assert out is not None
        return out

    async def outcomes(self, writes: Sequence[Write]) -> list[Committed | None]:
        self.calls += 1
        await asyncio.sleep(0)
        if self.down:
            raise StoreUnavailableError("etcd is unreachable (injected outage)")
        out: list[Committed | None] = []
        for w in writes:
            current = self.records.get(w.task.task_id)
            if current is not None and w.sent and current[0] == w.sent:
                out.append(Committed(True, revision=current[1]))
            elif (current[1] if current else 0) == w.expect_mod:
                out.append(None)
            elif current is None:
                out.append(Committed(False))
            else:
                out.append(Committed(False, existing=_decode(*current), existing_mod=current[1]))
        return out

    async def read(self, task_id: str) -> tuple[tpb.Task, int] | None:
        self.calls += 1
        await asyncio.sleep(0)
        if self.down:
            raise StoreUnavailableError("etcd is unreachable (injected outage)")
        current = self.records.get(task_id)
        return None if current is None else (_decode(*current), current[1])

    async def read_many(self, task_ids: Iterable[str]) -> dict[str, tuple[tpb.Task, int]]:
        self.calls += 1
        await asyncio.sleep(0)
        if self.down:
            raise StoreUnavailableError("etcd is unreachable (injected outage)")
        return {
            tid: (_decode(*self.records[tid]), self.records[tid][1])
            for tid in task_ids
            if tid in self.records
        }

    async def claim_revision(self, task_id: str) -> int:
        self.calls += 1
        await asyncio.sleep(0)
        if self.down:
            raise StoreUnavailableError("etcd is unreachable (injected outage)")
        claim = self.claims.get(task_id)
        return claim[1] if claim else 0

    async def open_tasks(self) -> OpenTasks:
        """The open-task index and the claims, as etcd's keys-only ranges give them."""
        self.calls += 1
        await asyncio.sleep(0)
        if self.down:
            raise StoreUnavailableError("etcd is unreachable (injected outage)")
        index = {
            tid: mod
            for tid, (raw, mod) in self.records.items()
            if tpb.Task.FromString(raw).state not in TERMINAL
        }
        claims = {tid: mod for tid, (_, mod, _) in self.claims.items()}
        size = sum(len(t) + 24 for t in index) + sum(len(t) + 24 for t in claims)
        return OpenTasks(index, claims, self.revision_now, size)

    async def revision(self) -> int:
        self.calls += 1
        await asyncio.sleep(0)
        if self.down:
            raise StoreUnavailableError("etcd is unreachable (injected outage)")
        return self.revision_now

    async def page(self, start_after: str, limit: int) -> tuple[list[tpb.Task], str]:
        self.calls += 1
        await asyncio.sleep(0)
        if self.down:
            raise StoreUnavailableError("etcd is unreachable (injected outage)")
        ids = sorted(t for t in self.records if t > start_after)
        tasks = [_decode(*self.records[t]) for t in ids[:limit]]
        return tasks, ids[limit - 1] if len(ids) > limit else ""

    # ---- applying ----

    _applied: list[Committed] | None = None

    async def _apply_when(self, gate: asyncio.Event, writes: Sequence[Write], fail: bool) -> None:
        await gate.wait()
        self._applied = None if fail else self._apply(writes)

    def _apply(self, writes: Sequence[Write]) -> list[Committed]:
        if self.deposed:
            raise NotLeaderError("this coordinator's term is over (injected)")
        self.commits += 1
        rev = self.revision_now + 1
        out: list[Committed] = []
        for w in writes:
            tid = w.task.task_id
            current = self.records.get(tid)
            mod = current[1] if current else 0
            claim_mod = self.claims[tid][1] if tid in self.claims else 0
            if mod != w.expect_mod or (w.expect_claim and claim_mod != w.expect_claim):
                if w.expect_mod == 0 and current is not None:
                    out.append(Committed(False, existing=_decode(*current), existing_mod=mod))
                else:
                    out.append(Committed(False))
                continue
            if w.claim_lease and w.claim_lease in self.dead_leases:
                out.append(Committed(False, lease_missing=True))
                continue
            self.records[tid] = (_stored(w.task).SerializeToString(), rev)
            if w.claim_lease:
                self.claims[tid] = (w.task.agent_id, rev, w.claim_lease)
            elif w.delete_claim:
                self.claims.pop(tid, None)
            out.append(Committed(True, revision=rev))
        if any(c.ok for c in out):
            self.revision_now = rev  # etcd: a transaction that changes nothing keeps the revision
        return out

    # ---- test helpers ----

    def hold(self) -> asyncio.Event:
        """From now on, sent commits wait for the returned event before applying."""
        self._gate = asyncio.Event()
        return self._gate

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    def task(self, task_id: str) -> tpb.Task:
        """The stored record, decoded as a reader would see it."""
        return _decode(*self.records[task_id])

    def put(self, task: tpb.Task, claim_lease: int = 0) -> int:
        """Write a record behind the leader's back (what a write whose reply was lost
        leaves, or another term); with `claim_lease`, its claim too. Returns its revision."""
        self.revision_now += 1
        self.records[task.task_id] = (_stored(task).SerializeToString(), self.revision_now)
        if claim_lease:
            self.claims[task.task_id] = (task.agent_id, self.revision_now, claim_lease)
        else:
            self.claims.pop(task.task_id, None)
        return self.revision_now

    def states(self) -> dict[str, int]:
        """How many records are in each state (what a scan of etcd counts)."""
        out: dict[str, int] = {}
        for raw, _ in self.records.values():
            name = tpb.TaskState.Name(tpb.Task.FromString(raw).state).removeprefix("TASK_STATE_")
            out[name] = out.get(name, 0) + 1
        return out

    def snapshot(self) -> tuple[list[tuple[tpb.Task, int]], dict[str, int]]:
        """What a new leader loads: every open record, and the live claims' revisions."""
        records = [
            (_decode(raw, mod), mod)
            for raw, mod in self.records.values()
            if tpb.Task.FromString(raw).state not in TERMINAL
        ]
        return records, {tid: mod for tid, (_, mod, _) in self.claims.items()}

    def expire_lease(self, lease: int) -> list[tuple[str, int]]:
        """The lease dies: its claims go. Returns (task id, token) per deleted claim,
        what the coordinator's claims watch reports."""
        self.dead_leases.add(lease)
        lost = [(tid, mod) for tid, (_, mod, held_on) in self.claims.items() if held_on == lease]
        for tid, _ in lost:
            del self.claims[tid]
        if lost:
            self.revision_now += 1
        return lost


def _stored(task: tpb.Task) -> tpb.Task:
    record = tpb.Task()
    record.CopyFrom(task)
    if record.state in HELD:
        # the token is the commit's revision: stored as 0, read back from the mod
        record.claim_token = 0
        record.state = tpb.TASK_STATE_ASSIGNED
    return record


def _decode(raw: bytes, mod: int) -> tpb.Task:
    task = tpb.Task.FromString(raw)
    if task.state == tpb.TASK_STATE_ASSIGNED:
        task.claim_token = mod
    return task
