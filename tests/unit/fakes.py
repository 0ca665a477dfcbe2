"""An in-memory `Store` with etcd's semantics, for unit tests of the coordinator core.

It mirrors `EtcdTaskStore.commit`: each `Write` compares the record's mod revision
(0: absent) and, when asked, the claim's; one `commit()` call is one etcd
transaction, so every write that succeeds in it shares one new revision.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.errors import NotLeaderError, StoreUnavailableError
from services.coordinator.core import Committed, Write

HELD = (tpb.TASK_STATE_ASSIGNED, tpb.TASK_STATE_RUNNING)


@dataclass
class MemoryStore:
    revision: int = 1
    records: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    """task id → (serialized Task, mod revision)."""
    claims: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    """task id → (agent id, mod revision, lease)."""
    dead_leases: set[int] = field(default_factory=set)
    deposed: bool = False
    """The leader's fence fails: every commit raises NotLeaderError."""
    fail_next: int = 0
    """The next N commits raise StoreUnavailableError (etcd unreachable)."""
    commits: int = 0
    """Commit calls that reached the store (etcd round trips)."""

    async def commit(self, writes: Sequence[Write]) -> list[Committed]:
        await asyncio.sleep(0)  # a round trip: other coroutines run meanwhile
        if self.fail_next:
            self.fail_next -= 1
            raise StoreUnavailableError("etcd is unreachable (injected)")
        if self.deposed:
            raise NotLeaderError("this coordinator's term is over (injected)")
        self.commits += 1
        rev = self.revision + 1
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
            record = tpb.Task()
            record.CopyFrom(w.task)
            if record.state in HELD:
                # the token is the commit's revision: stored as 0, read back from the mod
                record.claim_token = 0
                record.state = tpb.TASK_STATE_ASSIGNED
            self.records[tid] = (record.SerializeToString(), rev)
            if w.claim_lease:
                self.claims[tid] = (w.task.agent_id, rev, w.claim_lease)
            elif w.delete_claim:
                self.claims.pop(tid, None)
            out.append(Committed(True, revision=rev))
        if any(c.ok for c in out):
            self.revision = rev  # etcd: a transaction that changes nothing keeps the revision
        return out

    async def read(self, task_id: str) -> tuple[tpb.Task, int] | None:
        current = self.records.get(task_id)
        return None if current is None else (_decode(*current), current[1])

    async def claim_revision(self, task_id: str) -> int:
        claim = self.claims.get(task_id)
        return claim[1] if claim else 0

    # ---- test helpers ----

    def task(self, task_id: str) -> tpb.Task:
        """The stored record, decoded as a reader would see it."""
        return _decode(*self.records[task_id])

    def snapshot(self) -> tuple[list[tuple[tpb.Task, int]], dict[str, int]]:
        """What a new leader loads: every record, and the live claims' revisions."""
        records = [(_decode(raw, mod), mod) for raw, mod in self.records.values()]
        return records, {tid: mod for tid, (_, mod, _) in self.claims.items()}

    def expire_lease(self, lease: int) -> list[tuple[str, int]]:
        """The lease dies: its claims go. Returns (task id, token) per deleted claim,
        what the coordinator's claims watch reports."""
        self.dead_leases.add(lease)
        lost = [(tid, mod) for tid, (_, mod, held_on) in self.claims.items() if held_on == lease]
        for tid, _ in lost:
            del self.claims[tid]
        if lost:
            self.revision += 1
        return lost


def _decode(raw: bytes, mod: int) -> tpb.Task:
    task = tpb.Task.FromString(raw)
    if task.state == tpb.TASK_STATE_ASSIGNED:
        task.claim_token = mod
    return task
