"""A follower that a stale redirect pointed at a dead leader comes back to etcd's.

What CI caught once (test_failover's ten kills): the leader was killed; a standby whose
own view still lagged answered an agent's Connect with a redirect to the killed leader;
the pool's follower took it, and its watch never undid it, because etcd's answer had
already changed before the redirect came. Every agent of that pool kept dialling the
dead address. Here with a real etcd and election keys.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from registry.election import Election
from registry.etcd import Etcd
from registry.leadership import leader_value
from services._common.clock import SystemClock
from services._common.follow import Leader

HANG_S = 10.0


async def until(check: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(HANG_S):
        while not check():
            await asyncio.sleep(0.01)


async def following(etcd: Etcd, recheck_s: float | None) -> tuple[Leader, asyncio.Task[None]]:
    leader = Leader(etcd, "coordinator", SystemClock(), recheck_s=recheck_s)
    return leader, asyncio.ensure_future(leader.follow())


async def stop(leader: Leader, task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await leader.close()


async def elected(etcd: Etcd, endpoint: str) -> int:
    lease = await etcd.grant(30)
    await Election(etcd, "coordinator", lease, leader_value("c", endpoint)).campaign()
    return lease


async def test_a_stale_redirect_is_undone_by_etcd_at_once(etcd: Etcd) -> None:
    old = await elected(etcd, "127.0.0.1:1")
    leader, task = await following(etcd, recheck_s=None)  # the watch and the check only
    new = 0
    try:
        await until(lambda: leader.endpoint == "127.0.0.1:1", "the first leader")
        await etcd.revoke(old)  # the leader is gone, and another is elected
        new = await elected(etcd, "127.0.0.1:2")
        await until(lambda: leader.endpoint == "127.0.0.1:2", "the new leader")
        leader.redirected("127.0.0.1:1")  # a standby that still believed in the dead one
        assert leader.endpoint == "127.0.0.1:1"  # taken at once: a redirect may know first
        await until(lambda: leader.endpoint == "127.0.0.1:2", "etcd's leader again")
    finally:
        await stop(leader, task)
        if new:
            await etcd.revoke(new)


async def test_a_redirect_that_knew_first_is_kept(etcd: Etcd) -> None:
    first = await elected(etcd, "127.0.0.1:1")
    leader, task = await following(etcd, recheck_s=None)
    try:
        await until(lambda: leader.endpoint == "127.0.0.1:1", "the first leader")
        await etcd.revoke(first)
        second = await elected(etcd, "127.0.0.1:3")
        leader.redirected("127.0.0.1:3")  # the old leader's last words, as etcd says too
        await asyncio.sleep(0.2)
        assert leader.endpoint == "127.0.0.1:3"
        await etcd.revoke(second)
    finally:
        await stop(leader, task)


async def test_the_recheck_undoes_any_stale_set(etcd: Etcd) -> None:
    lease = await elected(etcd, "127.0.0.1:4")
    leader, task = await following(etcd, recheck_s=0.1)
    try:
        await until(lambda: leader.endpoint == "127.0.0.1:4", "the leader")
        leader.set("127.0.0.1:9")  # wrong, from anywhere; the watch stays silent
        await until(lambda: leader.endpoint == "127.0.0.1:4", "the recheck")
    finally:
        await stop(leader, task)
        await etcd.revoke(lease)
