"""The group commit: packs by count and by bytes, never one key twice, and a refused
transaction fails only the writes that caused it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import REGISTRY

from registry.errors import LeaseNotFoundError, StoreRefusedError, StoreUnavailableError
from services.coordinator.store import GroupCommitter


@dataclass(frozen=True)
class Op:
    name: str
    size: int = 100
    poison: type[Exception] | None = None

    @property
    def key(self) -> bytes:
        return self.name.encode()


class FakeEtcd:
    """Applies a transaction unless it holds a poisoned write (then refuses it whole)."""

    def __init__(self, max_bytes: int = 1000) -> None:
        self.max_bytes = max_bytes
        self.txns: list[list[Op]] = []
        self.applied: list[str] = []

    async def flush(self, ops: list[Any]) -> list[Any]:
        await asyncio.sleep(0)
        self.txns.append(list(ops))
        assert len({op.key for op in ops}) == len(ops), "etcd: duplicate key given in txn"
        if sum(op.size for op in ops) > self.max_bytes and len(ops) > 1:
            raise AssertionError("packed over the byte budget")
        for op in ops:
            if op.poison is not None:
                raise op.poison(f"etcd refused the request because of {op.name}")
        self.applied.extend(op.name for op in ops)
        return [f"ok:{op.name}" for op in ops]


async def submit_each(committer: GroupCommitter, ops: list[Op]) -> list[Any]:
    """Each op from its own caller, all at once (as concurrent RPCs would)."""
    return [r for rs in await asyncio.gather(*(committer.submit([op]) for op in ops)) for r in rs]


async def test_packs_by_bytes_and_by_count() -> None:
    etcd = FakeEtcd(max_bytes=1000)
    committer = GroupCommitter(etcd.flush, max_ops=5, max_inflight=1, max_bytes=1000)
    ops = [Op(f"w{i}", size=300 if i % 2 else 100) for i in range(40)] + [Op("big", size=5000)]
    results = await submit_each(committer, ops)
    assert results == [f"ok:{op.name}" for op in ops]
    assert sorted(etcd.applied) == sorted(op.name for op in ops)
    for txn in etcd.txns:
        assert len(txn) <= 5
        assert sum(op.size for op in txn) <= 1000 or len(txn) == 1
    assert ["big"] in [[op.name for op in txn] for txn in etcd.txns]  # a large one goes alone


async def test_two_writes_of_one_key_never_share_a_transaction() -> None:
    etcd = FakeEtcd()
    committer = GroupCommitter(etcd.flush, max_inflight=1)
    ops = [Op("same"), Op("other"), Op("same"), Op("same")]
    results = await submit_each(committer, ops)
    assert results == ["ok:same", "ok:other", "ok:same", "ok:same"]
    assert len(etcd.txns) >= 3


@pytest.mark.parametrize("refusal", [StoreRefusedError, LeaseNotFoundError])
async def test_a_refused_write_fails_alone_and_every_other_caller_gets_its_answer(
    refusal: type[Exception],
) -> None:
    etcd = FakeEtcd(max_bytes=10**9)
    committer = GroupCommitter(etcd.flush, max_inflight=1, max_bytes=10**9)
    # a first write holds the committer so the rest queue up and leave together
    ops = [Op(f"w{i}") for i in range(100)]
    ops[37] = Op("bad-1", poison=refusal)
    ops[80] = Op("bad-2", poison=refusal)
    results = await submit_each(committer, ops)
    for op, result in zip(ops, results, strict=True):
        if op.poison:
            assert isinstance(result, refusal)
            assert op.name in str(result)
        else:
            assert result == f"ok:{op.name}"
    assert sorted(etcd.applied) == sorted(op.name for op in ops if not op.poison)
    # halving, not one round trip per write
    assert len(etcd.txns) < 40


async def test_an_unreachable_etcd_is_every_callers_answer() -> None:
    async def flush(ops: list[Any]) -> list[Any]:
        raise StoreUnavailableError("etcd is unreachable")

    committer = GroupCommitter(flush, max_inflight=1)
    outcomes = await asyncio.gather(
        *(committer.submit([Op(f"w{i}")]) for i in range(10)), return_exceptions=True
    )
    assert all(isinstance(o, StoreUnavailableError) for o in outcomes)


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_prometheus_sees_each_writes_wait_each_transactions_size_and_the_busy_time() -> None:
    """Two writes queue behind a transaction held for 50 ms: three writes, two
    transactions (one of two writes), two waits of about 50 ms, and about 100 ms busy
    (the two transactions back to back; wall-clock bounds only from below)."""
    release = asyncio.Event()
    etcd = FakeEtcd()

    async def slow_flush(ops: list[Any]) -> list[Any]:
        if ops[0].name == "first":
            await release.wait()
        else:
            await asyncio.sleep(0.05)
        return await etcd.flush(ops)

    before = {
        name: _sample(name)
        for name in (
            "agentmesh_etcd_commit_writes_count",
            "agentmesh_etcd_commit_writes_sum",
            "agentmesh_etcd_commit_wait_seconds_count",
            "agentmesh_etcd_commit_wait_seconds_sum",
            "agentmesh_etcd_commit_busy_seconds_total",
        )
    }
    committer = GroupCommitter(slow_flush, max_inflight=1)
    first = asyncio.ensure_future(committer.submit([Op("first")]))
    await asyncio.sleep(0)
    rest = asyncio.ensure_future(submit_each(committer, [Op("a"), Op("b")]))
    await asyncio.sleep(0.05)
    release.set()
    assert await first == ["ok:first"]
    assert await rest == ["ok:a", "ok:b"]

    def added(name: str) -> float:
        return _sample(name) - before[name]

    assert etcd.txns == [[Op("first")], [Op("a"), Op("b")]]
    assert added("agentmesh_etcd_commit_writes_count") == 2
    assert added("agentmesh_etcd_commit_writes_sum") == 3
    assert added("agentmesh_etcd_commit_wait_seconds_count") == 3
    # "a" and "b" waited for "first" (50 ms); "first" went out at once
    assert added("agentmesh_etcd_commit_wait_seconds_sum") >= 2 * 0.045
    # busy from "first" going out to the second transaction's return: ≥ 50 + 50 ms
    assert added("agentmesh_etcd_commit_busy_seconds_total") >= 0.095
