"""The monitor's record writer (health/store.py) with a fake core and fence: batches
under etcd's limits, a lost reply written again, a delete only for what may exist."""

from __future__ import annotations

import asyncio
from typing import Any

from protos.agentmesh.v1 import health_pb2 as hpb
from registry.errors import StoreUnavailableError
from services.health import store


class FakeCore:
    def __init__(self, records: dict[str, hpb.AgentHealth | None]) -> None:
        self.records = records
        self.dirty: set[str] = set(records)

    def take_dirty(self) -> list[str]:
        out = sorted(self.dirty)
        self.dirty.clear()
        return out

    def record(self, agent_id: str) -> hpb.AgentHealth | None:
        return self.records[agent_id]


class FakeEtcd:
    def key(self, *parts: str) -> bytes:
        return "/".join(parts).encode()


class Fence:
    """Applies nothing; records each transaction's ops, and loses the first `lose` replies."""

    def __init__(self, lose: int = 0) -> None:
        self.lose = lose
        self.txns: list[list[Any]] = []

    async def __call__(self, request: Any) -> None:
        self.txns.append(list(request.success))
        if self.lose:
            self.lose -= 1
            raise StoreUnavailableError("reply lost (injected)")


class NoWait:
    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)


async def written(core: FakeCore, fence: Fence, stored: set[str], txns: int) -> None:
    wanted = asyncio.Event()
    wanted.set()
    task = asyncio.ensure_future(
        store.write_records(FakeEtcd(), NoWait(), core, fence, wanted, stored)  # type: ignore[arg-type]
    )
    try:
        async with asyncio.timeout(2):
            while len(fence.txns) < txns or core.dirty or wanted.is_set():
                await asyncio.sleep(0)
    finally:
        task.cancel()


def kinds(txn: list[Any]) -> list[str]:
    return [op.WhichOneof("request") for op in txn]


async def test_records_leave_in_batches_under_etcd_s_op_limit() -> None:
    n = store.MAX_TXN_OPS * 2 + 5
    core = FakeCore({f"a{i:04}": hpb.AgentHealth(agent_id=f"a{i:04}") for i in range(n)})
    fence, stored = Fence(), set[str]()
    await written(core, fence, stored, txns=3)
    assert [len(t) for t in fence.txns] == [store.MAX_TXN_OPS, store.MAX_TXN_OPS, 5]
    assert len(stored) == n


async def test_a_forgotten_agent_is_deleted_only_when_it_may_have_a_record() -> None:
    core = FakeCore({"gone": None, "never": None, "kept": hpb.AgentHealth(agent_id="kept")})
    fence, stored = Fence(), {"gone"}
    await written(core, fence, stored, txns=1)
    assert kinds(fence.txns[0]) == ["request_delete_range", "request_put"]  # gone, kept
    assert stored == {"kept"}


async def test_a_batch_whose_reply_was_lost_is_written_again() -> None:
    core = FakeCore({"a1": hpb.AgentHealth(agent_id="a1")})
    fence, stored = Fence(lose=1), set[str]()
    await written(core, fence, stored, txns=2)
    assert fence.txns[0] == fence.txns[1]
    assert stored == {"a1"}
