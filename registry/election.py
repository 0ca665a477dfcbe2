"""Leader election and locks with etcd's campaign recipe, and fenced transactions.

The recipe (as in etcd's own concurrency package): each candidate creates a key
under the election prefix with its session lease; the key with the lowest create
revision leads; every other candidate watches only its immediate predecessor, so
a leader change wakes one waiter, not all of them. The leader's create revision
is its term: a fencing token that grows with every new leader.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from aetcd import rpc

from registry.errors import NotLeaderError
from registry.etcd import (
    Compare,
    Etcd,
    RequestOp,
    TxnResponse,
    WatchCompactedError,
    cmp_create,
    op_delete,
    op_get,
    op_put,
    op_txn,
)


@dataclass(frozen=True)
class Leader:
    value: bytes
    term: int
    key: bytes


class Election:
    """One candidacy in the election `role`, on `lease_id`.

    Args:
        etcd: the store.
        role: e.g. "coordinator"; keys live under election/<role>/.
        lease_id: the candidate's session lease (its death ends the candidacy).
        value: what the leader publishes (its endpoint, say).
    """

    def __init__(
        self, etcd: Etcd, role: str, lease_id: int, value: bytes, namespace: str = "election"
    ) -> None:
        self.etcd = etcd
        self.prefix = etcd.key(namespace, role) + b"/"
        self.key = self.prefix + f"{lease_id:016x}".encode()
        self.lease_id = lease_id
        self.value = value
        self.term = 0

    async def campaign(self) -> int:
        """Block until this candidate leads; return its term."""
        etcd = self.etcd
        resp = await etcd.txn(
            [cmp_create(self.key, 0)],
            [op_put(self.key, self.value, self.lease_id)],
            [op_get(self.key)],
        )
        if resp.succeeded:
            rev = int(resp.header.revision)
        else:  # a candidacy on this lease already exists (a retried campaign): keep its place
            rev = int(resp.responses[0].response_range.kvs[0].create_revision)
        while True:
            pred = await etcd.range(
                self.prefix, max_create_revision=rev - 1, by_create="desc", limit=1
            )
            if not pred.kvs:
                break
            try:
                async for _, events in etcd.watch_forever(
                    pred.kvs[0].key, start_revision=pred.header.revision + 1
                ):
                    if any(ev.kind == "delete" for ev in events):
                        break
            except WatchCompactedError:
                # a standby waits for hours; after a break its watch may resume from a
                # compacted revision: look up the predecessor again
                continue
        mine = await etcd.get(self.key)
        if mine is None or mine.create_revision != rev:
            raise NotLeaderError("the candidacy's lease expired while campaigning; campaign again")
        self.term = rev
        return rev

    async def wait_lost(self) -> None:
        """Return when this leader's key is gone (lease expired, resigned, deleted)."""
        start = self.term
        while True:
            try:
                async for _, events in self.etcd.watch_forever(self.key, start_revision=start):
                    if any(ev.kind == "delete" for ev in events):
                        return
            except WatchCompactedError as err:
                # A term outlives etcd's history (auto-compaction), so a watch resumed
                # after a break can start too early: check the key now, then watch from
                # the oldest revision etcd still has (any later delete is after it).
                mine = await self.etcd.get(self.key)
                if mine is None or mine.create_revision != self.term:
                    return
                start = err.compact_revision

    async def resign(self) -> None:
        if self.term:
            await self.etcd.txn([cmp_create(self.key, self.term)], [op_delete(self.key)])
        else:
            await self.etcd.delete(self.key)
        self.term = 0

    def fence(self) -> Compare:
        """The compare every write of this leader carries."""
        return cmp_create(self.key, self.term)

    async def fenced(
        self, ops: Sequence[RequestOp], timeout_s: float | None = None
    ) -> list[object]:
        """Apply `ops` (typically nested transactions) only while this leader's term holds.

        Returns one response per op. Raises NotLeaderError when the term is over:
        a deposed leader cannot write anything.
        """
        return list((await self.fenced_txn(ops, timeout_s)).responses)

    async def fenced_txn(
        self, ops: Sequence[RequestOp], timeout_s: float | None = None
    ) -> TxnResponse:
        """`fenced`, returning the whole response (its header holds the commit revision)."""
        request = rpc.TxnRequest(success=ops)
        return await self.fenced_request(request, timeout_s)

    async def fenced_request(self, request: Any, timeout_s: float | None = None) -> TxnResponse:
        """Send a TxnRequest built by the caller (success ops filled in place, which
        saves copying them) with this leader's fence as its only compare."""
        if not self.term:
            raise NotLeaderError("not the leader")
        del request.compare[:]
        request.compare.append(self.fence())
        resp = await self.etcd.txn_request(request, timeout_s)
        if not resp.succeeded:
            self.term = 0
            raise NotLeaderError("this coordinator's term is over (a newer leader was elected)")
        return resp


def fenced_op(
    compare: Sequence[Compare], success: Sequence[RequestOp], failure: Sequence[RequestOp] = ()
) -> RequestOp:
    """A nested transaction for `Election.fenced` (its own compares, its own outcome)."""
    return op_txn(compare, success, failure)


async def current_leader(etcd: Etcd, role: str) -> Leader | None:
    """The leader of `role` now, or None."""
    prefix = etcd.key("election", role) + b"/"
    resp = await etcd.range(prefix, by_create="asc", limit=1)
    if not resp.kvs:
        return None
    kv = resp.kvs[0]
    return Leader(kv.value, int(kv.create_revision), kv.key)


async def candidates(etcd: Etcd, role: str) -> list[Leader]:
    """Every candidacy of `role`, leader first."""
    prefix = etcd.key("election", role) + b"/"
    resp = await etcd.range(prefix, by_create="asc")
    return [Leader(kv.value, int(kv.create_revision), kv.key) for kv in resp.kvs]


async def observe(etcd: Etcd, role: str) -> AsyncIterator[Leader | None]:
    """The leader now, then each time it changes."""
    prefix = etcd.key("election", role) + b"/"
    first = True
    last: Leader | None = None
    while True:
        resp = await etcd.range(prefix, by_create="asc", limit=1)
        now = (
            Leader(resp.kvs[0].value, int(resp.kvs[0].create_revision), resp.kvs[0].key)
            if resp.kvs
            else None
        )
        if first or now != last:
            first, last = False, now
            yield now
        try:
            async for _, _events in etcd.watch_forever(
                prefix, prefix=True, start_revision=resp.header.revision + 1
            ):
                now = await current_leader(etcd, role)
                if now != last:
                    last = now
                    yield now
        except WatchCompactedError:
            continue  # history compacted during a long break: read the leader afresh


class Lock:
    """A distributed mutex: the same recipe under locks/<name>/.

    `async with Lock(etcd, "name", lease_id): ...` holds it for the block; a
    holder that dies releases it when its lease expires.
    """

    def __init__(self, etcd: Etcd, name: str, lease_id: int) -> None:
        self._election = Election(etcd, name, lease_id, b"", namespace="locks")

    @property
    def token(self) -> int:
        return self._election.term

    async def __aenter__(self) -> Lock:
        await self._election.campaign()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._election.resign()
