"""The etcd layer (registry/) against a real etcd: the guarantees services build on."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import pytest
from aetcd import rpc

from registry import discovery
from registry.election import Election, Leader, Lock, candidates, current_leader, fenced_op, observe
from registry.etcd import (
    Etcd,
    LeaseNotFoundError,
    WatchEvent,
    cmp_create,
    cmp_mod,
    cmp_value,
    op_get,
    op_put,
)
from registry.etcd_server import EtcdServer
from registry.lease import KeptLease
from services._common.errors import NotLeaderError, StoreUnavailableError

pytestmark = pytest.mark.integration

T = TypeVar("T")

# Bounds that only catch a hang: every awaited event here normally takes milliseconds.
HANG_S = 10.0
# How long a waiter is given to (wrongly) get ahead before we check it has not.
SETTLE_S = 0.3


async def within(awaitable: Awaitable[T], timeout_s: float = HANG_S) -> T:
    return await asyncio.wait_for(awaitable, timeout_s)


async def next_of(gen: AsyncIterator[T]) -> T:
    return await within(anext(gen))


async def cancel(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def value(etcd: Etcd, key: bytes) -> bytes | None:
    kv = await etcd.get(key)
    return None if kv is None else bytes(kv.value)


async def retry_until_up(call: Callable[[], Awaitable[T]]) -> T:
    """Repeat `call` while etcd is still coming back (the channel reconnects with backoff)."""
    deadline = time.monotonic() + HANG_S
    while True:
        try:
            return await call()
        except StoreUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


Grant = Callable[[], Awaitable[KeptLease]]


@contextlib.asynccontextmanager
async def kept_leases(etcd: Etcd, ttl_s: int = 2) -> AsyncIterator[Grant]:
    """Grant leases kept alive in the background, as a service's session lease is."""
    granted: list[KeptLease] = []
    keepers: list[asyncio.Task[None]] = []

    async def grant() -> KeptLease:
        lease = KeptLease(etcd, ttl_s=ttl_s)
        await lease.grant()
        granted.append(lease)
        keepers.append(asyncio.create_task(lease.keep_alive()))
        return lease

    try:
        yield grant
    finally:
        await cancel(*keepers)
        for lease in granted:
            await lease.revoke()


@pytest.fixture
async def leases(etcd: Etcd) -> AsyncIterator[Grant]:
    async with kept_leases(etcd) as grant:
        yield grant


# ---- key-value and transactions ----


async def test_put_get_range_delete(etcd: Etcd) -> None:
    a, b, c = etcd.key("kv", "a"), etcd.key("kv", "b"), etcd.key("kv", "c")
    rev_a = await etcd.put(a, b"1")
    await etcd.put(c, b"3")
    rev_b = await etcd.put(b, b"2")
    await etcd.put(etcd.key("kvx", "d"), b"sibling prefix, not under kv/")
    assert rev_b > rev_a

    got = await etcd.get(a)
    assert got is not None
    assert (got.value, got.create_revision, got.mod_revision, got.version) == (
        b"1",
        rev_a,
        rev_a,
        1,
    )
    assert await etcd.get(etcd.key("kv", "missing")) is None

    prefix = etcd.key("kv") + b"/"
    listed = await etcd.range(prefix)
    assert [(kv.key, kv.value) for kv in listed.kvs] == [(a, b"1"), (b, b"2"), (c, b"3")]
    assert listed.count == 3
    assert listed.header.revision >= rev_b

    page = await etcd.range(prefix, start=b, limit=1)
    assert [kv.key for kv in page.kvs] == [b]
    assert page.more
    assert (await etcd.range(prefix, count_only=True)).count == 3
    assert [kv.value for kv in (await etcd.range(prefix, keys_only=True)).kvs] == [b"", b"", b""]
    by_age = await etcd.range(prefix, by_create="asc")
    assert [kv.key for kv in by_age.kvs] == [a, c, b]
    newest = await etcd.range(prefix, by_create="desc", limit=1)
    assert [kv.key for kv in newest.kvs] == [b]
    older_than_b = await etcd.range(prefix, max_create_revision=rev_b - 1, by_create="desc")
    assert [kv.key for kv in older_than_b.kvs] == [c, a]

    assert await etcd.delete(a) == 1
    assert await etcd.delete(a) == 0
    assert await etcd.get(a) is None
    assert [kv.key for kv in (await etcd.range(prefix)).kvs] == [b, c]


async def test_put_overwrites_and_bumps_mod_revision(etcd: Etcd) -> None:
    key = etcd.key("kv", "k")
    first = await etcd.put(key, b"v1")
    second = await etcd.put(key, b"v2")
    kv = await etcd.get(key)
    assert kv is not None
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (b"v2", first, second, 2)


async def test_txn_cmp_create_zero_creates_only_once(etcd: Etcd) -> None:
    key = etcd.key("tasks", "t1")
    first = await etcd.txn([cmp_create(key, 0)], [op_put(key, b"first")], [op_get(key)])
    assert first.succeeded
    second = await etcd.txn([cmp_create(key, 0)], [op_put(key, b"second")], [op_get(key)])
    assert not second.succeeded
    # the failure branch tells the loser what won
    (existing,) = second.responses[0].response_range.kvs
    assert existing.value == b"first"
    assert existing.create_revision == first.header.revision
    assert await value(etcd, key) == b"first"


async def test_txn_cmp_mod_rejects_a_stale_revision(etcd: Etcd) -> None:
    key = etcd.key("tasks", "t1")
    seen = await etcd.put(key, b"QUEUED")
    assert (await etcd.txn([cmp_mod(key, seen)], [op_put(key, b"ASSIGNED")])).succeeded
    # a second writer still holding the old revision loses and changes nothing
    stale = await etcd.txn([cmp_mod(key, seen)], [op_put(key, b"CANCELLED")])
    assert not stale.succeeded
    kv = await etcd.get(key)
    assert kv.value == b"ASSIGNED"
    assert (await etcd.txn([cmp_mod(key, kv.mod_revision)], [op_put(key, b"RUNNING")])).succeeded
    assert (await etcd.txn([cmp_mod(key, seen, ">")], [])).succeeded
    assert (await etcd.txn([cmp_value(key, b"RUNNING")], [])).succeeded
    assert not (await etcd.txn([cmp_value(key, b"QUEUED")], [])).succeeded


# ---- leases ----


async def test_keys_on_a_lease_disappear_when_it_is_revoked(etcd: Etcd) -> None:
    lease = KeptLease(etcd, ttl_s=2)
    lease_id = await lease.grant()
    key, other = etcd.key("claims", "t1"), etcd.key("claims", "t2")
    await etcd.put(key, b"agent-1", lease=lease_id)
    await etcd.put(other, b"no lease")
    assert 0 < await etcd.ttl(lease_id) <= 2

    await lease.revoke()
    assert await etcd.get(key) is None
    assert await value(etcd, other) == b"no lease"
    assert await etcd.ttl(lease_id) == -1
    await lease.revoke()  # revoking twice is harmless
    with pytest.raises(LeaseNotFoundError):
        await etcd.put(key, b"agent-1", lease=lease_id)


async def test_lease_ttl_below_etcd_minimum_is_refused(etcd: Etcd) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        KeptLease(etcd, ttl_s=1)


async def test_keep_alive_keeps_a_short_lease_alive(etcd: Etcd) -> None:
    lease = KeptLease(etcd, ttl_s=2)
    lease_id = await lease.grant()
    key = etcd.key("services", "agent-pool", "p1")
    await etcd.put(key, b"endpoint", lease=lease_id)
    task = asyncio.create_task(lease.keep_alive())
    try:
        await asyncio.sleep(3.5)  # well past the 2 s TTL
        assert not task.done()
        assert not lease.lost.is_set()
        assert await etcd.ttl(lease_id) > 0
        assert await etcd.get(key) is not None
    finally:
        await cancel(task)
        await lease.revoke()


async def test_lease_lost_is_set_when_revoked_behind_its_back(
    etcd: Etcd, etcd_server: EtcdServer
) -> None:
    lease = KeptLease(etcd, ttl_s=2)
    lease_id = await lease.grant()
    task = asyncio.create_task(lease.keep_alive())
    other = Etcd(etcd_server.endpoint, prefix="/agentmesh/admin/")
    try:
        await other.revoke(lease_id)  # an operator, or etcd expiring it during a pause
        await within(lease.lost.wait())
        await within(task)  # keep_alive returns once the lease is gone
    finally:
        await cancel(task)
        await other.close()


# ---- discovery ----


async def test_register_resolve_deregister(etcd: Etcd, leases: Grant) -> None:
    lease = await leases()
    c1 = discovery.Instance("coordinator", "c1", "127.0.0.1:7001", {"zone": "a"})
    c2 = discovery.Instance("coordinator", "c2", "127.0.0.1:7002")
    h1 = discovery.Instance("health", "h1", "127.0.0.1:7101")
    for inst in (c1, c2, h1):
        await discovery.register(etcd, lease.id, inst)

    assert await discovery.resolve(etcd, "coordinator") == [c1, c2]
    assert await discovery.resolve(etcd, "health") == [h1]
    assert sorted(await discovery.resolve(etcd), key=lambda i: i.instance_id) == [c1, c2, h1]
    assert await discovery.resolve(etcd, "consensus") == []

    await discovery.deregister(etcd, c1)
    assert await discovery.resolve(etcd, "coordinator") == [c2]
    await lease.revoke()
    assert await discovery.resolve(etcd) == []


async def test_resolve_does_not_mix_kinds_sharing_a_name_prefix(etcd: Etcd, leases: Grant) -> None:
    lease = await leases()
    agent = discovery.Instance("agent", "a1", "127.0.0.1:7201")
    pool = discovery.Instance("agent-pool", "p1", "127.0.0.1:7301")
    await discovery.register(etcd, lease.id, agent)
    await discovery.register(etcd, lease.id, pool)
    assert await discovery.resolve(etcd, "agent") == [agent]


async def test_discovery_watch_follows_registrations_and_lease_loss(
    etcd: Etcd, leases: Grant
) -> None:
    already = discovery.Instance("agent-pool", "p0", "127.0.0.1:7300")
    old_lease = await leases()
    await discovery.register(etcd, old_lease.id, already)

    snapshots = discovery.watch(etcd, "agent-pool")
    try:
        assert await next_of(snapshots) == [already]

        lease = await leases()
        p1 = discovery.Instance("agent-pool", "p1", "127.0.0.1:7301")
        await discovery.register(etcd, lease.id, p1)
        assert sorted(await next_of(snapshots), key=lambda i: i.instance_id) == [already, p1]

        await discovery.register(etcd, lease.id, discovery.Instance("health", "h1", "127.0.0.1:1"))
        await old_lease.revoke()  # the pool process died: its lease goes, so does its entry
        assert await next_of(snapshots) == [p1]  # the health instance caused no snapshot

        await lease.revoke()
        assert await next_of(snapshots) == []
    finally:
        await snapshots.aclose()


# ---- locks ----


async def test_lock_is_mutually_exclusive(etcd: Etcd, leases: Grant) -> None:
    first_lease, second_lease = await leases(), await leases()
    log: list[str] = []
    first_entered, second_entered = asyncio.Event(), asyncio.Event()
    release_first = asyncio.Event()

    async def first() -> int:
        async with Lock(etcd, "migrate", first_lease.id) as lock:
            log.append("first in")
            first_entered.set()
            await release_first.wait()
            log.append("first out")
            return lock.token

    async def second() -> int:
        async with Lock(etcd, "migrate", second_lease.id) as lock:
            log.append("second in")
            second_entered.set()
            return lock.token

    first_task = asyncio.create_task(first())
    try:
        await within(first_entered.wait())
        second_task = asyncio.create_task(second())
        try:
            await asyncio.sleep(SETTLE_S)
            assert not second_entered.is_set()
            release_first.set()
            first_token, second_token = await within(asyncio.gather(first_task, second_task))
        finally:
            await cancel(second_task)
    finally:
        await cancel(first_task)
    assert log == ["first in", "first out", "second in"]
    assert second_token > first_token
    # both released: nothing left under locks/
    assert (await etcd.range(etcd.key("locks") + b"/", count_only=True)).count == 0


async def test_lock_holder_losing_its_lease_releases_the_lock(etcd: Etcd, leases: Grant) -> None:
    dead_lease, live_lease = await leases(), await leases()
    holder = Lock(etcd, "migrate", dead_lease.id)
    await within(holder.__aenter__())  # and then its process hangs, never leaving the block

    async def waiter() -> int:
        async with Lock(etcd, "migrate", live_lease.id) as lock:
            return lock.token

    task = asyncio.create_task(waiter())
    try:
        await asyncio.sleep(SETTLE_S)
        assert not task.done()
        await dead_lease.revoke()
        assert await within(task) > holder.token
    finally:
        await cancel(task)


# ---- elections ----


async def _depose_by_resign(leader: Election, lease: KeptLease) -> None:
    await leader.resign()


async def _depose_by_lease_loss(leader: Election, lease: KeptLease) -> None:
    await lease.revoke()


DEPOSE = pytest.mark.parametrize(
    "depose", [_depose_by_resign, _depose_by_lease_loss], ids=["resign", "lease-revoked"]
)


async def test_first_candidate_leads_with_its_create_revision_as_term(
    etcd: Etcd, leases: Grant
) -> None:
    assert await current_leader(etcd, "coordinator") is None
    lease = await leases()
    election = Election(etcd, "coordinator", lease.id, b"127.0.0.1:7001")
    term = await within(election.campaign())

    kv = await etcd.get(election.key)
    assert kv is not None
    assert term == election.term == kv.create_revision
    assert kv.lease == lease.id
    assert await current_leader(etcd, "coordinator") == Leader(
        b"127.0.0.1:7001", term, election.key
    )
    assert await candidates(etcd, "coordinator") == [Leader(b"127.0.0.1:7001", term, election.key)]
    # campaigning again on the same lease keeps the same place and term
    assert await within(election.campaign()) == term
    # other roles are separate elections
    assert await current_leader(etcd, "health") is None


@DEPOSE
async def test_second_candidate_leads_after_the_first_goes(
    etcd: Etcd,
    leases: Grant,
    depose: Callable[[Election, KeptLease], Awaitable[None]],
) -> None:
    lease1, lease2 = await leases(), await leases()
    first = Election(etcd, "coordinator", lease1.id, b"c1")
    second = Election(etcd, "coordinator", lease2.id, b"c2")
    term1 = await within(first.campaign())

    leaders = observe(etcd, "coordinator")
    campaign = asyncio.create_task(second.campaign())
    try:
        assert await next_of(leaders) == Leader(b"c1", term1, first.key)
        await asyncio.sleep(SETTLE_S)
        assert not campaign.done()
        standing = await candidates(etcd, "coordinator")
        assert [(c.value, c.key) for c in standing] == [(b"c1", first.key), (b"c2", second.key)]
        assert await current_leader(etcd, "coordinator") == standing[0]

        lost = asyncio.create_task(first.wait_lost())
        await depose(first, lease1)
        term2 = await within(campaign)
        await within(lost)  # the old leader learns it is out

        assert term2 > term1
        assert term2 == (await etcd.get(second.key)).create_revision
        new_leader = Leader(b"c2", term2, second.key)
        assert await current_leader(etcd, "coordinator") == new_leader
        assert await candidates(etcd, "coordinator") == [new_leader]
        assert await next_of(leaders) == new_leader
    finally:
        await cancel(campaign)
        await leaders.aclose()


@DEPOSE
async def test_deposed_leader_cannot_write(
    etcd: Etcd,
    leases: Grant,
    depose: Callable[[Election, KeptLease], Awaitable[None]],
) -> None:
    lease1, lease2 = await leases(), await leases()
    old = Election(etcd, "coordinator", lease1.id, b"c1")
    new = Election(etcd, "coordinator", lease2.id, b"c2")
    await within(old.campaign())
    old_term = old.term
    assert await old.fenced([op_put(etcd.key("tasks", "t0"), b"by c1")])

    campaign = asyncio.create_task(new.campaign())
    try:
        await asyncio.sleep(SETTLE_S)  # let `new` join the queue behind `old`
        await depose(old, lease1)
        await within(campaign)
    finally:
        await cancel(campaign)

    key = etcd.key("tasks", "t1")
    # `old` still believes it leads (resign clears its term; put it back as a stale replica would)
    old.term = old_term
    with pytest.raises(NotLeaderError):
        await old.fenced([op_put(key, b"by c1"), op_put(etcd.key("tasks", "t2"), b"by c1")])
    assert await etcd.get(key) is None
    assert await etcd.get(etcd.key("tasks", "t2")) is None
    assert old.term == 0
    with pytest.raises(NotLeaderError):
        await old.fenced([op_put(key, b"by c1")])  # and it keeps refusing

    (put,) = await new.fenced([op_put(key, b"by c2")])
    assert put.HasField("response_put")
    assert await value(etcd, key) == b"by c2"


async def test_fenced_without_a_term_is_refused(etcd: Etcd, leases: Grant) -> None:
    lease = await leases()
    never_campaigned = Election(etcd, "coordinator", lease.id, b"c1")
    with pytest.raises(NotLeaderError):
        await never_campaigned.fenced([op_put(etcd.key("tasks", "t1"), b"x")])
    assert await etcd.get(etcd.key("tasks", "t1")) is None


async def test_fenced_nested_transactions_report_each_outcome(etcd: Etcd, leases: Grant) -> None:
    lease = await leases()
    leader = Election(etcd, "coordinator", lease.id, b"c1")
    await within(leader.campaign())
    fresh, taken, stale = (
        etcd.key("tasks", "fresh"),
        etcd.key("tasks", "taken"),
        etcd.key("tasks", "stale"),
    )
    await etcd.put(taken, b"someone else's")
    stale_rev = await etcd.put(stale, b"v1")
    await etcd.put(stale, b"v2")

    # one round trip carrying three independent task transitions (group commit)
    responses = await leader.fenced(
        [
            fenced_op([cmp_create(fresh, 0)], [op_put(fresh, b"mine")]),
            fenced_op([cmp_create(taken, 0)], [op_put(taken, b"mine")], [op_get(taken)]),
            fenced_op([cmp_mod(stale, stale_rev)], [op_put(stale, b"mine")]),
        ]
    )
    outcomes = [r.response_txn.succeeded for r in responses]
    assert outcomes == [True, False, False]
    assert responses[1].response_txn.responses[0].response_range.kvs[0].value == b"someone else's"
    assert await value(etcd, fresh) == b"mine"
    assert await value(etcd, taken) == b"someone else's"
    assert await value(etcd, stale) == b"v2"


async def test_observe_reports_no_leader_then_each_leader(etcd: Etcd, leases: Grant) -> None:
    leaders = observe(etcd, "consensus")
    try:
        assert await next_of(leaders) is None
        lease = await leases()
        election = Election(etcd, "consensus", lease.id, b"k1")
        term = await within(election.campaign())
        assert await next_of(leaders) == Leader(b"k1", term, election.key)
        await election.resign()
        assert await next_of(leaders) is None
    finally:
        await leaders.aclose()


# ---- etcd restarts and outages ----


async def _collect(
    gen: AsyncIterator[tuple[int, list[WatchEvent]]], into: asyncio.Queue[WatchEvent]
) -> None:
    async for _, events in gen:
        for ev in events:
            into.put_nowait(ev)


async def _no_tasks_beyond(tasks: set[asyncio.Task[Any]]) -> None:
    # grpc finishes a call's own bookkeeping tasks a moment after the call ends
    while asyncio.all_tasks() - tasks - {asyncio.current_task()}:
        await asyncio.sleep(0.05)


async def test_watch_forever_survives_an_etcd_restart(fresh_etcd_server: EtcdServer) -> None:
    etcd = Etcd(fresh_etcd_server.endpoint, prefix="/agentmesh/restart/", timeout_s=1.0)
    writer = Etcd(fresh_etcd_server.endpoint, prefix="/agentmesh/restart/", timeout_s=1.0)
    prefix = etcd.key("tasks") + b"/"
    received: asyncio.Queue[WatchEvent] = asyncio.Queue()
    start = await etcd.put(etcd.key("before-watch"), b"")
    tasks_before = asyncio.all_tasks()
    watcher = asyncio.create_task(
        _collect(etcd.watch_forever(prefix, prefix=True, start_revision=start + 1), received)
    )
    try:
        await writer.put(etcd.key("tasks", "1"), b"delivered before the stop")
        first = await within(received.get())
        await writer.put(etcd.key("tasks", "2"), b"written just before the stop")
        # stop() blocks the loop: the watcher gets no chance to read "2" before etcd goes
        fresh_etcd_server.stop()
        fresh_etcd_server.start()
        await retry_until_up(
            lambda: writer.put(etcd.key("tasks", "3"), b"written after the restart")
        )
        later = [await within(received.get()), await within(received.get())]
    finally:
        await cancel(watcher)
        await etcd.close()
        await writer.close()
    assert [ev.kind for ev in [first, *later]] == ["put"] * 3
    assert [ev.kv.key for ev in [first, *later]] == [etcd.key("tasks", n) for n in "123"]
    await asyncio.sleep(0)
    assert received.empty()  # and nothing twice
    # a long-lived service sees many etcd restarts: no task may be left behind by the broken stream
    await within(_no_tasks_beyond(tasks_before))


async def test_a_deletions_only_watch_gets_no_puts_and_resumes_after_a_restart(
    fresh_etcd_server: EtcdServer,
) -> None:
    etcd = Etcd(fresh_etcd_server.endpoint, prefix="/agentmesh/noput/", timeout_s=1.0)
    writer = Etcd(fresh_etcd_server.endpoint, prefix="/agentmesh/noput/", timeout_s=1.0)
    prefix = etcd.key("claims") + b"/"
    received: asyncio.Queue[WatchEvent] = asyncio.Queue()
    start = await etcd.put(etcd.key("before-watch"), b"")
    watcher = asyncio.create_task(
        _collect(
            etcd.watch_forever(
                prefix, prefix=True, start_revision=start + 1, prev_kv=True, no_put=True
            ),
            received,
        )
    )
    try:
        await writer.put(etcd.key("claims", "1"), b"one")
        await writer.put(etcd.key("claims", "2"), b"two")
        await writer.delete(etcd.key("claims", "1"))
        first = await within(received.get())
        fresh_etcd_server.stop()
        fresh_etcd_server.start()
        await retry_until_up(lambda: writer.delete(etcd.key("claims", "2")))
        second = await within(received.get())
    finally:
        await cancel(watcher)
        await etcd.close()
        await writer.close()
    assert [(ev.kind, ev.kv.key) for ev in (first, second)] == [
        ("delete", etcd.key("claims", "1")),
        ("delete", etcd.key("claims", "2")),
    ]
    assert first.prev_kv is not None
    assert first.prev_kv.value == b"one"
    await asyncio.sleep(0)
    assert received.empty()  # no puts, and nothing twice


async def test_watch_forever_from_now_keeps_its_place_across_a_restart(
    fresh_etcd_server: EtcdServer,
) -> None:
    # A watcher that has seen no event yet must still resume where it started, or a put
    # landing between etcd's return and the watcher's reconnect is lost.
    etcd = Etcd(fresh_etcd_server.endpoint, prefix="/agentmesh/restart/", timeout_s=1.0)
    writer = Etcd(fresh_etcd_server.endpoint, prefix="/agentmesh/restart/", timeout_s=1.0)
    received: asyncio.Queue[WatchEvent] = asyncio.Queue()
    watcher = asyncio.create_task(
        _collect(etcd.watch_forever(etcd.key("leader"), start_revision=0), received)
    )
    try:
        await asyncio.sleep(SETTLE_S)  # the watch is up
        fresh_etcd_server.stop()
        await asyncio.sleep(SETTLE_S)  # the watcher sees the break and backs off
        fresh_etcd_server.start()
        await retry_until_up(lambda: writer.put(etcd.key("leader"), b"after the restart"))
        ev = await within(received.get())
    finally:
        await cancel(watcher)
        await etcd.close()
        await writer.close()
    assert ev.kv.value == b"after the restart"


async def test_watch_forever_catching_up_on_a_backlog_loses_nothing_across_a_restart(
    fresh_etcd_server: EtcdServer,
) -> None:
    # etcd sends a backlog in batches of 1000 revisions, each under a header carrying the
    # store's current revision; a watcher that resumed after that header would skip the rest.
    etcd = Etcd(fresh_etcd_server.endpoint, prefix="/agentmesh/backlog/", timeout_s=HANG_S)
    keys = {etcd.key("tasks", f"{i:05d}") for i in range(2500)}
    try:
        first = await etcd.put(etcd.key("tasks", "start"), b"")
        for batch in range(0, 2500, 250):
            await asyncio.gather(*(etcd.put(k, b"") for k in sorted(keys)[batch : batch + 250]))
        stream = etcd.watch_forever(etcd.key("tasks") + b"/", prefix=True, start_revision=first + 1)
        seen: list[bytes] = []
        try:
            _, events = await next_of(stream)
            seen += [ev.kv.key for ev in events]
            assert len(seen) < len(keys)  # the rest is still on its way when etcd goes
            fresh_etcd_server.stop()
            fresh_etcd_server.start()
            while len(seen) < len(keys):
                _, events = await next_of(stream)
                seen += [ev.kv.key for ev in events]
        finally:
            await stream.aclose()
    finally:
        await etcd.close()
    assert sorted(seen) == sorted(keys)


async def _compact(endpoint: str, revision: int) -> None:
    # what etcd's auto-compaction does every few minutes in production
    async with grpc.aio.insecure_channel(endpoint) as channel:
        await rpc.KVStub(channel).Compact(
            rpc.CompactionRequest(revision=revision, physical=True), timeout=HANG_S
        )


async def test_long_waiters_survive_a_restart_after_compaction(
    fresh_etcd_server: EtcdServer,
) -> None:
    # A standby, a leader waiting to be deposed, and discovery/leader watchers that saw no
    # change for longer than etcd keeps history: after a break their watches would resume
    # from a compacted revision. They must carry on, not fail.
    etcd = Etcd(fresh_etcd_server.endpoint, prefix="/agentmesh/compact/", timeout_s=1.0)
    tasks: list[asyncio.Task[Any]] = []
    try:
        async with kept_leases(etcd, ttl_s=10) as grant:
            lease1, lease2, pool_lease = await grant(), await grant(), await grant()
            leader = Election(etcd, "coordinator", lease1.id, b"c1")
            standby = Election(etcd, "coordinator", lease2.id, b"c2")
            await within(leader.campaign())

            pools: asyncio.Queue[list[discovery.Instance]] = asyncio.Queue()
            leaders: asyncio.Queue[Leader | None] = asyncio.Queue()

            async def pump(gen: AsyncIterator[Any], into: asyncio.Queue[Any]) -> None:
                async for item in gen:
                    into.put_nowait(item)

            campaign = asyncio.create_task(standby.campaign())
            lost = asyncio.create_task(leader.wait_lost())
            tasks += [
                campaign,
                lost,
                asyncio.create_task(pump(discovery.watch(etcd, "agent-pool"), pools)),
                asyncio.create_task(pump(observe(etcd, "coordinator"), leaders)),
            ]
            assert await within(pools.get()) == []
            assert (await within(leaders.get())).value == b"c1"
            await asyncio.sleep(SETTLE_S)  # every watch is established

            for i in range(5):  # unrelated traffic moves the revision on
                now = await etcd.put(etcd.key("tasks", str(i)), b"")
            await _compact(fresh_etcd_server.endpoint, now)
            fresh_etcd_server.stop()
            fresh_etcd_server.start()

            pool = discovery.Instance("agent-pool", "p1", "127.0.0.1:7301")
            await retry_until_up(lambda: discovery.register(etcd, pool_lease.id, pool))
            while (snapshot := await within(pools.get())) != [pool]:
                assert snapshot == []  # at most a fresh listing from before the register

            assert not campaign.done()
            assert not lost.done()
            await lease1.revoke()
            await within(lost)
            assert await within(campaign) > leader.term
            while (seen := await within(leaders.get())) != Leader(b"c2", standby.term, standby.key):
                assert seen in (None, Leader(b"c1", leader.term, leader.key))
    finally:
        await cancel(*tasks)
        await etcd.close()


async def test_calls_fail_fast_while_etcd_is_down(fresh_etcd_server: EtcdServer) -> None:
    timeout_s = 1.0
    etcd = Etcd(fresh_etcd_server.endpoint, prefix="/agentmesh/down/", timeout_s=timeout_s)
    try:
        key = etcd.key("k")
        await etcd.put(key, b"v")
        lease_id = await etcd.grant(2)
        fresh_etcd_server.stop()
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: etcd.get(key),
            lambda: etcd.put(key, b"v2"),
            lambda: etcd.delete(key),
            lambda: etcd.range(etcd.key("") + b"/"),
            lambda: etcd.txn([cmp_create(key, 0)], [op_put(key, b"v3")]),
            lambda: etcd.grant(2),
            lambda: etcd.keepalive_once(lease_id),
            lambda: etcd.status(),
        ]
        for call in calls:
            began = time.monotonic()
            with pytest.raises(StoreUnavailableError):
                # wait_for only turns a hang into a clear failure; the client's own deadline should fire first
                await asyncio.wait_for(call(), timeout_s + 2.0)
            assert time.monotonic() - began < timeout_s + 1.0

        fresh_etcd_server.start()
        kv = await retry_until_up(lambda: etcd.get(key))
        assert kv is not None
        assert kv.value == b"v"  # nothing half-applied while etcd was away
    finally:
        await etcd.close()
