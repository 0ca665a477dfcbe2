"""The coordinator core's store port: what it asks of durable storage.

`EtcdTaskStore` (store.py) implements it in production and `MemoryStore`
(tests/unit/fakes.py) in unit tests. The core and the servicer read and write
tasks only through this contract, never through etcd directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from protos.agentmesh.v1 import task_pb2 as tpb

# Records read per reconcile round trip: each may be up to etcd's request limit
# (1.5 MiB), and a reply must stay under gRPC's 64 MiB receive limit.
READ_CHUNK = 32


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
    sent: bytes = b""
    """The record bytes the store put on the wire (set by the store): how a read-back
    recognises this write after its reply was lost. The record carries the writer's
    term and timestamps, and one task has one write in flight at a time, so the bytes
    identify the write."""


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
    not_applied: bool = False
    """etcd could not be reached and the write is known not to have landed."""


@dataclass(slots=True)
class OpenTasks:
    """What the open-task index says, read without values (keys and revisions only)."""

    open: dict[str, int]
    """Open (non-terminal) task id → its record's mod revision."""
    claims: dict[str, int]
    """Task id → its live claim's mod revision (the claim token)."""
    revision: int
    """The store revision the reads saw."""
    bytes_read: int = 0


class Store(Protocol):
    async def commit(self, writes: Sequence[Write]) -> list[Committed]:
        """Apply writes under the leader's fence; fills each write's `sent`. Raises
        NotLeaderError when deposed, StoreUnavailableError when the outcome is
        unknown (etcd unreachable, deadline, reset: some writes may have landed)."""
        ...

    async def outcomes(self, writes: Sequence[Write]) -> list[Committed | None]:
        """After an unknown outcome: per write, Committed(True, revision) when the
        record holds what it sent, None when the record is unchanged (it did not
        land), Committed(False, existing) when someone else changed it."""
        ...

    async def read(self, task_id: str) -> tuple[tpb.Task, int] | None:
        """A record and its mod revision."""
        ...

    async def read_many(self, task_ids: Sequence[str]) -> dict[str, tuple[tpb.Task, int]]:
        """Records and their mod revisions (absent ids are left out)."""
        ...

    async def claim_revision(self, task_id: str) -> int:
        """The claim key's mod revision (0 when absent)."""
        ...

    async def open_tasks(self) -> OpenTasks:
        """The open-task index and the live claims, keys and revisions only."""
        ...

    async def revision(self) -> int:
        """etcd's current revision: a cheap call that succeeds only when etcd answers."""
        ...

    async def page(self, start_after: str, limit: int) -> tuple[list[tpb.Task], str]:
        """Up to `limit` records after `start_after` in task id order, and the id to go
        on from ("" when there are no more)."""
        ...
