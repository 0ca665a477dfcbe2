"""The election recipe and fencing, on an in-memory etcd: no sockets, milliseconds each.

`MemoryEtcd` implements only what registry/election.py and the coordinator's task
store call (txn with nested transactions, range by create revision, get, delete,
watch_forever), with etcd's revision rules: one revision per writing transaction,
a key's create revision kept until it is deleted, watches replayed from a start
revision and refused below the compacted one. tests/integration/test_registry.py
runs the same recipe against a real etcd; these tests cover the orderings that
are hard to force there (who watches whom, a lease lost mid-campaign, a key
re-created under the same name, a compacted history).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from typing import Any, TypeVar

import pytest
from aetcd import rpc

from protos.agentmesh.v1 import task_pb2 as tpb
from registry.election import Election, Leader, candidates, current_leader, fenced_op, observe
from registry.etcd import (
    WatchCompactedError,
    WatchEvent,
    cmp_create,
    op_get,
    op_put,
    prefix_end,
)
from registry.leadership import leader_value, parse_leader_value
from registry.lease import KeptLease
from services._common.clock import FakeClock
from services._common.errors import NotLeaderError, StoreUnavailableError
from services.coordinator.port import Write
from services.coordinator.store import EtcdTaskStore

pytestmark = pytest.mark.timeout(10)

T = TypeVar("T")

# A waiter that has not returned within this many loop turns is blocked for good:
# the fake resolves everything without real time passing.
TURNS = 50

_RESULT = {
    rpc.Compare.EQUAL: lambda a, b: a == b,
    rpc.Compare.NOT_EQUAL: lambda a, b: a != b,
    rpc.Compare.LESS: lambda a, b: a < b,
    rpc.Compare.GREATER: lambda a, b: a > b,
}


class MemoryEtcd:
    """The subset of registry.etcd.Etcd that elections and the task store use."""

    # keep in step with registry/etcd.py: a method the code under test starts to use
    # fails these tests with AttributeError rather than passing them silently

    def __init__(self, prefix: bytes = b"/agentmesh/test/") -> None:
        self.prefix = prefix
        self.revision = 1
        self.kvs: dict[bytes, Any] = {}  # key -> rpc.KeyValue
        self.history: list[tuple[int, WatchEvent]] = []
        self.compacted = 0
        self.txns = 0
        self.watched: list[bytes] = []
        self._changed = asyncio.Event()

    def key(self, *parts: str) -> bytes:
        return self.prefix + "/".join(parts).encode()

    # ---- writes (each writing transaction takes one new revision) ----

    def _put(self, rev: int, key: bytes, value: bytes, lease: int) -> None:
        old = self.kvs.get(key)
        kv = rpc.KeyValue(
            key=key,
            value=value,
            lease=lease,
            create_revision=old.create_revision if old else rev,
            mod_revision=rev,
            version=(old.version if old else 0) + 1,
        )
        self.kvs[key] = kv
        self.history.append((rev, WatchEvent("put", kv, old)))

    def _delete(self, rev: int, key: bytes) -> int:
        old = self.kvs.pop(key, None)
        if old is None:
            return 0
        self.history.append(
            (rev, WatchEvent("delete", rpc.KeyValue(key=key, mod_revision=rev), old))
        )
        return 1

    def _holds(self, cmp: Any) -> bool:
        kv = self.kvs.get(cmp.key)
        if cmp.target == rpc.Compare.CREATE:
            have, want = (kv.create_revision if kv else 0), cmp.create_revision
        elif cmp.target == rpc.Compare.MOD:
            have, want = (kv.mod_revision if kv else 0), cmp.mod_revision
        else:
            if kv is None:
                return False
            have, want = kv.value, cmp.value
        return bool(_RESULT[cmp.result](have, want))

    def _apply(self, rev: int, op: Any) -> Any:
        which = op.WhichOneof("request")
        if which == "request_put":
            p = op.request_put
            self._put(rev, p.key, p.value, p.lease)
            return rpc.ResponseOp(response_put=rpc.PutResponse())
        if which == "request_range":
            kv = self.kvs.get(op.request_range.key)
            return rpc.ResponseOp(response_range=rpc.RangeResponse(kvs=[kv] if kv else []))
        if which == "request_delete_range":
            n = self._delete(rev, op.request_delete_range.key)
            return rpc.ResponseOp(response_delete_range=rpc.DeleteRangeResponse(deleted=n))
        t = op.request_txn
        ok, responses = self._txn(rev, t.compare, t.success, t.failure)
        return rpc.ResponseOp(response_txn=rpc.TxnResponse(succeeded=ok, responses=responses))

    def _txn(
        self, rev: int, compare: Iterable[Any], success: Iterable[Any], failure: Iterable[Any]
    ) -> tuple[bool, list[Any]]:
        ok = all(self._holds(c) for c in compare)
        return ok, [self._apply(rev, op) for op in (success if ok else failure)]

    def _commit(self, rev: int) -> None:
        if self.history and self.history[-1][0] == rev:
            self.revision = rev  # a transaction that wrote nothing keeps the revision
            self._changed.set()
            self._changed = asyncio.Event()

    async def txn(
        self,
        compare: Iterable[Any],
        success: Iterable[Any] = (),
        failure: Iterable[Any] = (),
        timeout_s: float | None = None,
    ) -> Any:
        await asyncio.sleep(0)  # a round trip: other coroutines run meanwhile
        self.txns += 1
        rev = self.revision + 1
        ok, responses = self._txn(rev, compare, success, failure)
        self._commit(rev)
        return rpc.TxnResponse(
            header=rpc.ResponseHeader(revision=self.revision), succeeded=ok, responses=responses
        )

    async def txn_request(self, request: Any, timeout_s: float | None = None) -> Any:
        return await self.txn(request.compare, request.success, request.failure)

    async def delete(self, key: bytes) -> int:
        rev = self.revision + 1
        n = self._delete(rev, key)
        self._commit(rev)
        return n

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        self._put(self.revision + 1, key, value, lease)
        self._commit(self.revision + 1)
        return self.revision

    def expire_lease(self, lease: int) -> None:
        """The lease ends: etcd deletes every key on it in one revision."""
        rev = self.revision + 1
        for key in [k for k, kv in self.kvs.items() if kv.lease == lease]:
            self._delete(rev, key)
        self._commit(rev)

    def compact(self) -> None:
        self.compacted = self.revision
        self.history = [(r, ev) for r, ev in self.history if r >= self.compacted]

    # ---- reads ----

    async def get(self, key: bytes) -> Any:
        await asyncio.sleep(0)
        return self.kvs.get(key)

    async def range(
        self,
        prefix: bytes,
        *,
        limit: int = 0,
        max_create_revision: int = 0,
        by_create: str = "",
        **_: Any,
    ) -> Any:
        await asyncio.sleep(0)
        end = prefix_end(prefix)
        kvs = [kv for k, kv in sorted(self.kvs.items()) if prefix <= k < end]
        if max_create_revision:
            kvs = [kv for kv in kvs if kv.create_revision <= max_create_revision]
        if by_create:
            kvs.sort(key=lambda kv: kv.create_revision, reverse=by_create == "desc")
        more = bool(limit) and len(kvs) > limit
        kvs = kvs[:limit] if limit else kvs
        return rpc.RangeResponse(
            header=rpc.ResponseHeader(revision=self.revision), kvs=kvs, more=more, count=len(kvs)
        )

    async def watch_forever(
        self, key: bytes, *, prefix: bool = False, start_revision: int = 0, **_: Any
    ) -> AsyncIterator[tuple[int, list[WatchEvent]]]:
        self.watched.append(key)
        nxt = start_revision or self.revision + 1
        if nxt < self.compacted:
            raise WatchCompactedError(self.compacted)
        end = prefix_end(key) if prefix else None
        while True:
            changed = self._changed
            batch: dict[int, list[WatchEvent]] = {}
            for rev, ev in self.history:
                k = ev.kv.key
                if rev >= nxt and (key <= k < end if end else k == key):
                    batch.setdefault(rev, []).append(ev)
            for rev in sorted(batch):
                nxt = rev + 1
                yield rev, batch[rev]
            if not batch:
                await changed.wait()


async def blocked(aw: Awaitable[T]) -> asyncio.Task[T]:
    """Start `aw` and check that it is still waiting once everything runnable has run."""
    task = asyncio.ensure_future(aw)
    for _ in range(TURNS):
        await asyncio.sleep(0)
    assert not task.done(), f"expected it to wait, but it returned {task.result()!r}"
    return task


async def settle() -> None:
    """Let every waiter run until it blocks again."""
    for _ in range(TURNS):
        await asyncio.sleep(0)


async def done(task: Awaitable[T]) -> T:
    return await asyncio.wait_for(task, 1.0)


async def cancel(*tasks: asyncio.Future[Any]) -> None:
    for t in tasks:
        t.cancel()
        with contextlib.suppress(BaseException):
            await t


def candidate(etcd: MemoryEtcd, lease: int, value: bytes | None = None) -> Election:
    return Election(etcd, "coordinator", lease, value or f"c{lease}".encode())  # type: ignore[arg-type]


# ---------------------------------------------------------------- the campaign recipe


async def test_first_candidate_leads_and_its_term_is_its_keys_create_revision() -> None:
    etcd = MemoryEtcd()
    etcd.revision = 41
    first = candidate(etcd, 0xA, leader_value("coordinator-1", "127.0.0.1:7001"))
    term = await done(first.campaign())

    assert term == first.term == 42 == etcd.kvs[first.key].create_revision
    assert first.key == b"/agentmesh/test/election/coordinator/000000000000000a"
    leader = await current_leader(etcd, "coordinator")  # type: ignore[arg-type]
    assert leader == Leader(b"coordinator-1 127.0.0.1:7001", 42, first.key)
    # the compare every write of this leader carries: its own key, created at its term
    fence = first.fence()
    assert (fence.key, fence.target, fence.result) == (
        first.key,
        rpc.Compare.CREATE,
        rpc.Compare.EQUAL,
    )
    assert fence.create_revision == 42


async def test_each_candidate_watches_only_its_predecessor_and_leads_in_creation_order() -> None:
    etcd = MemoryEtcd()
    a, b, c = candidate(etcd, 1), candidate(etcd, 2), candidate(etcd, 3)
    term_a = await done(a.campaign())
    wait_b = await blocked(b.campaign())
    wait_c = await blocked(c.campaign())
    try:
        # no herd: a leader change wakes one waiter, not all of them
        assert etcd.watched == [a.key, b.key]
        standing = await candidates(etcd, "coordinator")  # type: ignore[arg-type]
        assert [x.value for x in standing] == [b"c1", b"c2", b"c3"]

        # the middle candidate's lease ends: c's predecessor is gone, but a still leads
        etcd.expire_lease(2)
        await settle()  # c looks for its next predecessor; b keeps watching a
        assert not wait_c.done(), "a candidate led while an older candidacy still stood"
        assert etcd.watched == [a.key, b.key, a.key]
        assert not wait_b.done()

        etcd.expire_lease(1)
        term_c = await done(wait_c)
        with pytest.raises(NotLeaderError):  # b's own key went while it waited
            await done(wait_b)
        assert term_c > term_a
        assert await current_leader(etcd, "coordinator") == Leader(b"c3", term_c, c.key)  # type: ignore[arg-type]
    finally:
        await cancel(wait_b, wait_c)


async def test_a_retried_campaign_on_the_same_lease_keeps_its_place() -> None:
    etcd = MemoryEtcd()
    leader = candidate(etcd, 1)
    await done(leader.campaign())
    first_try = candidate(etcd, 2)
    waiting = await blocked(first_try.campaign())
    waiting.cancel()  # the caller gave up (a timeout, say) and campaigns again
    retry = candidate(etcd, 2)
    again = await blocked(retry.campaign())
    try:
        # still second in line, not behind a newer candidate that arrived meanwhile
        newer = candidate(etcd, 3)
        behind = await blocked(newer.campaign())
        etcd.expire_lease(1)
        term = await done(again)
        assert term == etcd.kvs[retry.key].create_revision
        assert [x.value for x in await candidates(etcd, "coordinator")] == [b"c2", b"c3"]  # type: ignore[arg-type]
        assert not behind.done()
    finally:
        await cancel(waiting, again, behind)


async def test_observe_reports_each_leader_in_turn() -> None:
    etcd = MemoryEtcd()
    leaders = observe(etcd, "coordinator")  # type: ignore[arg-type]
    try:
        assert await done(anext(leaders)) is None
        a, b = candidate(etcd, 1), candidate(etcd, 2)
        term_a = await done(a.campaign())
        assert await done(anext(leaders)) == Leader(b"c1", term_a, a.key)
        wait_b = await blocked(b.campaign())
        etcd.expire_lease(1)
        term_b = await done(wait_b)
        assert await done(anext(leaders)) == Leader(b"c2", term_b, b.key)
    finally:
        await leaders.aclose()


# ---------------------------------------------------------------- losing a term


async def test_wait_lost_returns_on_delete_not_on_a_rewrite() -> None:
    etcd = MemoryEtcd()
    leader = candidate(etcd, 1)
    await done(leader.campaign())
    lost = await blocked(leader.wait_lost())
    await etcd.put(leader.key, b"new value", lease=1)  # same key, same create revision
    await settle()
    assert not lost.done()
    etcd.expire_lease(1)
    await done(lost)


@pytest.mark.parametrize("still_mine", [True, False])
async def test_wait_lost_after_compaction_checks_the_key_then_watches_on(still_mine: bool) -> None:
    etcd = MemoryEtcd()
    leader = candidate(etcd, 1)
    await done(leader.campaign())
    for i in range(5):
        await etcd.put(etcd.key("noise"), str(i).encode())
    if not still_mine:
        etcd.expire_lease(1)
    etcd.compact()  # the term's start revision is gone from etcd's history
    if not still_mine:
        await done(leader.wait_lost())
        return
    lost = await blocked(leader.wait_lost())
    etcd.expire_lease(1)
    await done(lost)


# ---------------------------------------------------------------- fencing


async def test_fenced_refuses_without_a_term_and_without_a_round_trip() -> None:
    etcd = MemoryEtcd()
    never = candidate(etcd, 1)
    with pytest.raises(NotLeaderError):
        await never.fenced([op_put(etcd.key("tasks", "t1"), b"x")])
    assert etcd.txns == 0
    assert etcd.key("tasks", "t1") not in etcd.kvs


async def test_fenced_nested_transactions_commit_together_with_their_own_outcomes() -> None:
    etcd = MemoryEtcd()
    leader = candidate(etcd, 1)
    await done(leader.campaign())
    taken = etcd.key("tasks", "taken")
    await etcd.put(taken, b"theirs")
    fresh = etcd.key("tasks", "fresh")
    resp = await leader.fenced_txn(
        [
            fenced_op([cmp_create(fresh, 0)], [op_put(fresh, b"mine")]),
            fenced_op([cmp_create(taken, 0)], [op_put(taken, b"mine")], [op_get(taken)]),
        ]
    )
    assert [r.response_txn.succeeded for r in resp.responses] == [True, False]
    assert etcd.kvs[fresh].mod_revision == resp.header.revision
    assert etcd.kvs[taken].value == b"theirs"


async def test_a_deposed_leader_writes_nothing_and_forgets_its_term() -> None:
    etcd = MemoryEtcd()
    old, new = candidate(etcd, 1), candidate(etcd, 2)
    await done(old.campaign())
    waiting = await blocked(new.campaign())
    # old is paused (SIGSTOP): its lease runs out and new takes over while it sleeps
    etcd.expire_lease(1)
    new_term = await done(waiting)
    before = (etcd.revision, dict(etcd.kvs))

    key = etcd.key("tasks", "t1")
    with pytest.raises(NotLeaderError):
        await old.fenced([op_put(key, b"old"), op_put(etcd.key("tasks", "t2"), b"old")])
    assert (etcd.revision, etcd.kvs) == before, "a refused transaction must change nothing"
    assert old.term == 0
    sent = etcd.txns
    with pytest.raises(NotLeaderError):
        await old.fenced([op_put(key, b"old")])
    assert etcd.txns == sent, "once refused, a deposed leader stops asking etcd"

    await new.fenced([op_put(key, b"new")])
    assert etcd.kvs[key].value == b"new"
    assert new.term == new_term


async def test_a_key_recreated_under_the_same_name_does_not_revive_an_old_term() -> None:
    etcd = MemoryEtcd()
    stale = candidate(etcd, 1)
    old_term = await done(stale.campaign())
    # the same lease campaigns afresh after its key was deleted (a session restarted):
    # same key name, later create revision
    await etcd.delete(stale.key)
    fresh = candidate(etcd, 1)
    new_term = await done(fresh.campaign())
    assert fresh.key == stale.key
    assert new_term > old_term

    with pytest.raises(NotLeaderError):
        await stale.fenced([op_put(etcd.key("tasks", "t1"), b"stale")])
    # and a stale resign must not delete the fresh candidacy
    stale.term = old_term
    await stale.resign()
    assert etcd.kvs[fresh.key].create_revision == new_term
    await fresh.fenced([op_put(etcd.key("tasks", "t1"), b"fresh")])


async def test_task_store_commits_carry_the_fence() -> None:
    """Every write of the coordinator goes through the fence: a deposed one's submit,
    assignment or completion raises NotLeaderError and leaves etcd as it was."""
    etcd = MemoryEtcd()
    old, new = candidate(etcd, 1), candidate(etcd, 2)
    old_term = await done(old.campaign())
    store = EtcdTaskStore(etcd, old, FakeClock(), retention_s=0)  # type: ignore[arg-type]
    task = tpb.Task(task_id="t1", state=tpb.TASK_STATE_QUEUED, term=old_term)
    (ok,) = await store.commit([Write(task, expect_mod=0)])
    assert ok.ok
    found = await store.read("t1")
    assert found is not None
    assert found[0].term == old_term

    waiting = await blocked(new.campaign())
    etcd.expire_lease(1)
    await done(waiting)
    before = dict(etcd.kvs)
    moved = tpb.Task(task_id="t1", state=tpb.TASK_STATE_ASSIGNED, agent_id="a1", term=old_term)
    with pytest.raises(NotLeaderError):
        await store.commit([Write(moved, expect_mod=ok.revision, claim_lease=7)])
    assert etcd.kvs == before


# ---------------------------------------------------------------- lease keep-alive (fake clock)


class FlakyLeases:
    """keepalive_once answers from a script: a TTL, or an exception to raise."""

    def __init__(self, script: Sequence[int | Exception]) -> None:
        self.script = list(script)
        self.calls = 0

    async def grant(self, ttl_s: int) -> int:
        return 99

    async def keepalive_once(self, lease_id: int) -> int:
        self.calls += 1
        step = self.script.pop(0) if self.script else 2
        if isinstance(step, Exception):
            raise step
        return step


def unreachable() -> Exception:
    return StoreUnavailableError("etcd is unreachable (injected)")


async def test_an_unreachable_etcd_does_not_lose_the_lease() -> None:
    # etcd restores every lease with a fresh TTL when it restarts, so an outage longer
    # than the TTL keeps the term; only etcd saying "gone" ends it (fencing covers the rest)
    clock = FakeClock()
    etcd = FlakyLeases([*[unreachable()] * 10, 0])
    lease = KeptLease(etcd, ttl_s=3, clock=clock)  # type: ignore[arg-type]
    await lease.grant()
    keeper = asyncio.ensure_future(lease.keep_alive())
    await settle()  # asleep until its first refresh
    try:
        await clock.advance(10.0)  # ten failed refreshes, over three TTLs
        assert not lease.lost.is_set()
        await clock.advance(1.0)  # etcd is back and says the lease is gone
        assert lease.lost.is_set()
        await done(keeper)
    finally:
        await cancel(keeper)


async def test_lease_survives_refresh_failures_shorter_than_its_ttl() -> None:
    clock = FakeClock()
    etcd = FlakyLeases([unreachable(), unreachable(), 3, unreachable(), unreachable(), 3])
    lease = KeptLease(etcd, ttl_s=3, clock=clock)  # type: ignore[arg-type]
    await lease.grant()
    keeper = asyncio.ensure_future(lease.keep_alive())
    await settle()  # asleep until its first refresh
    try:
        await clock.advance(7.0)
        assert not lease.lost.is_set()
        assert etcd.calls == 7
    finally:
        await cancel(keeper)


async def test_lease_reported_gone_by_etcd_is_lost_at_once() -> None:
    clock = FakeClock()
    etcd = FlakyLeases([0])
    lease = KeptLease(etcd, ttl_s=3, clock=clock)  # type: ignore[arg-type]
    await lease.grant()
    keeper = asyncio.ensure_future(lease.keep_alive())
    await settle()  # asleep until its first refresh
    await clock.advance(1.0)
    assert lease.lost.is_set()
    await done(keeper)


# ---------------------------------------------------------------- the leader's published value


@pytest.mark.parametrize(
    "endpoint", ["127.0.0.1:50051", "[::1]:50051", "coordinator-2.mesh.svc:7000"]
)
def test_leader_value_round_trips(endpoint: str) -> None:
    raw = leader_value("coordinator-2", endpoint)
    assert parse_leader_value(raw) == ("coordinator-2", endpoint)
