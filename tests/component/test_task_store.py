"""The coordinator's etcd task store against a real etcd: read-back of writes whose
reply was lost, the open-task index, and a takeover load that pages by size."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from protos.agentmesh.v1 import task_pb2 as tpb
from registry.election import Election
from registry.etcd import Etcd
from registry.etcd_server import EtcdServer
from services._common.clock import SystemClock
from services.coordinator.port import Committed, Write
from services.coordinator.store import EtcdTaskStore

S = tpb.TaskState


@pytest.fixture
async def store(etcd_server: EtcdServer) -> AsyncIterator[EtcdTaskStore]:
    """A store on a cluster prefix of its own, fenced by a term it holds."""
    etcd = Etcd(etcd_server.endpoint, prefix=f"/agentmesh/test-{uuid.uuid4().hex}/")
    lease = await etcd.grant(30)
    election = Election(etcd, "coordinator", lease, b"test 127.0.0.1:1")
    await election.campaign()
    try:
        yield EtcdTaskStore(etcd, election, SystemClock(), retention_s=3600)
    finally:
        await etcd.revoke(lease)
        await etcd.close()


def task(task_id: str, state: int = S.TASK_STATE_QUEUED, payload: bytes = b"") -> tpb.Task:
    return tpb.Task(
        task_id=task_id,
        spec=tpb.TaskSpec(task_id=task_id, kind="echo", payload=payload, max_attempts=3),
        state=state,  # type: ignore[arg-type]
        term=7,
    )


async def test_every_write_keeps_the_open_index(store: EtcdTaskStore) -> None:
    (created,) = await store.commit([Write(task("a"), 0)])
    (other,) = await store.commit([Write(task("b"), 0)])
    snap = await store.open_tasks()
    assert snap.open == {"a": created.revision, "b": other.revision}
    done = task("a", S.TASK_STATE_SUCCEEDED)
    (finished,) = await store.commit([Write(done, created.revision)])
    assert finished.ok
    snap = await store.open_tasks()
    assert snap.open == {"b": other.revision}  # the index key went with the terminal record
    assert snap.bytes_read > 0
    assert snap.revision >= finished.revision


async def test_read_back_tells_landed_from_not_landed_from_changed(store: EtcdTaskStore) -> None:
    landed = Write(task("landed"), 0)
    (res,) = await store.commit([landed])  # as if its reply had been lost: read it back
    never = Write(task("never"), 0)
    never.sent = b"bytes that were never applied"
    (first,) = await store.commit([Write(task("changed"), 0)])
    mine = Write(task("changed", S.TASK_STATE_CANCELLED), first.revision)
    mine.sent = b"what we would have written"
    await store.commit([Write(task("changed", S.TASK_STATE_SUCCEEDED), first.revision)])
    got = await store.outcomes([landed, never, mine])
    assert got[0] == Committed(True, revision=res.revision)
    assert got[1] is None  # unchanged: it did not land
    assert got[2] is not None
    assert not got[2].ok
    assert got[2].existing is not None
    assert got[2].existing.state == S.TASK_STATE_SUCCEEDED


async def test_an_assigned_write_reads_back_with_its_claim_token(store: EtcdTaskStore) -> None:
    lease = await store.etcd.grant(30)
    claimed = task("c", S.TASK_STATE_ASSIGNED)
    claimed.agent_id = "a1"
    w = Write(claimed, 0, claim_lease=lease)
    (res,) = await store.commit([w])
    (back,) = await store.outcomes([w])
    assert back == Committed(True, revision=res.revision)
    assert await store.claim_revision("c") == res.revision
    await store.etcd.revoke(lease)


@pytest.mark.timeout(120)
async def test_takeover_loads_past_large_retained_records(store: EtcdTaskStore) -> None:
    # issue 8, item 2: 46 retained records near etcd's 1.5 MiB request limit are 66 MiB,
    # over gRPC's 64 MiB receive limit in one page of 1,000 keys: every campaign failed.
    # Here they were written before the open-task index existed (no marker), so the
    # first load scans them all, by size, and indexes the open ones.
    etcd = store.etcd
    big = b"x" * (1480 * 1024)
    for i in range(46):
        record = task(f"old-{i:02d}", S.TASK_STATE_SUCCEEDED, payload=big)
        await etcd.put(store.task_key(record.task_id), record.SerializeToString())
    for i in range(3):
        record = task(f"open-{i}", payload=b"small")
        await etcd.put(store.task_key(record.task_id), record.SerializeToString())
    records, claims, revision = await store.load()
    assert sorted(t.task_id for t, _ in records) == ["open-0", "open-1", "open-2"]
    assert claims == {}
    assert revision > 0
    # from now on a load reads the index only: the retained records are never read
    snap = await store.open_tasks()
    assert set(snap.open) == {"open-0", "open-1", "open-2"}
    again, _, _ = await store.load()
    assert sorted(t.task_id for t, _ in again) == ["open-0", "open-1", "open-2"]
    pages = [len(page) async for page in store.scan()]
    assert sum(pages) == 49
    assert max(pages) < 46  # paged by bytes, not by a count of keys
