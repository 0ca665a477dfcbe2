"""etcd dies under a working cluster, and comes back with its data: real processes.

What users rely on (issue 7): every acknowledged task reaches exactly one terminal
state whatever crashes, etcd included, without waiting for a leader change. A write
whose reply etcd's death cut off may have landed; the leader reads it back, and a
reconcile pass repairs anything memory missed. Each test checks the outcome straight
from etcd, and that the leader's term never changed (nothing waited for a failover).

Figures printed with -s (time from etcd's return to the last stranded task finishing)
are observations; the load-test scenario `etcd-kill` measures them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc
from protos.agentmesh.v1 import task_pb2 as tpb
from registry.election import Leader, current_leader
from registry.etcd import Etcd
from services.client import MeshClient
from services.cluster import LocalCluster
from tests.integration.test_failover import (
    HANG_S,
    TERMINAL,
    EventLog,
    Submitter,
    describe,
    live_claims,
    node_of,
    running,
    sleep_specs,
    state_name,
    stored_tasks,
)

pytestmark = pytest.mark.integration

SUCCEEDED = tpb.TaskState.TASK_STATE_SUCCEEDED


async def leader_of(etcd: Etcd) -> Leader:
    deadline = time.monotonic() + HANG_S
    while True:
        with contextlib.suppress(Exception):
            leader = await current_leader(etcd, "coordinator")
            if leader is not None:
                return leader
        if time.monotonic() > deadline:
            raise AssertionError("no coordinator leader")
        await asyncio.sleep(0.1)


async def kill_etcd(c: LocalCluster, down_s: float) -> float:
    """SIGKILL etcd (no goodbye: in-flight requests may or may not be applied), keep it
    down for `down_s`, start it again from the same data dir; returns when it is back."""
    await asyncio.to_thread(c.etcd.kill)
    await asyncio.sleep(down_s)
    await asyncio.to_thread(c.etcd.start)
    return time.monotonic()


async def settled_in_etcd(
    etcd: Etcd, ids: Sequence[str], timeout_s: float, stall_s: float = 15.0
) -> tuple[dict[str, tuple[tpb.Task, int]], dict[str, tpb.Task], float]:
    """Read etcd until every id's record is terminal, nothing moved for `stall_s`, or
    `timeout_s` passed: (records, the ones not terminal, when the last one ended)."""
    deadline = time.monotonic() + timeout_s
    last_change = time.monotonic()
    last: dict[str, tuple[int, int]] = {}
    while True:
        stored = await stored_tasks(etcd)
        pending = {
            i: stored[i][0] for i in ids if i not in stored or stored[i][0].state not in TERMINAL
        }
        now = {i: (t.state, stored[i][1]) for i, t in pending.items() if i in stored}
        if now != last:
            last, last_change = now, time.monotonic()
        if not pending:
            return stored, {}, last_change
        if time.monotonic() - last_change > stall_s or time.monotonic() > deadline:
            return stored, pending, last_change
        await asyncio.sleep(0.25)


async def open_index(etcd: Etcd) -> list[str]:
    prefix = etcd.key("open") + b"/"
    resp = await etcd.range(prefix, keys_only=True)
    return [kv.key[len(prefix) :].decode() for kv in resp.kvs]


def log_levels(path: Path) -> collections.Counter[str]:
    """WARNING and ERROR lines of a service's JSON log, and its outage lines."""
    counts: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            doc = json.loads(line)
            counts[doc.get("level", "")] += 1
            if doc.get("msg", "").startswith("etcd unreachable"):
                counts["outages"] += 1
    return counts


def assert_exactly_once(
    stored: dict[str, tuple[tpb.Task, int]], ids: Sequence[str], events: EventLog
) -> collections.Counter[str]:
    missing = [i for i in ids if i not in stored]
    assert not missing, f"acknowledged tasks with no record in etcd: {missing[:10]}"
    over = {
        i: (stored[i][0].attempts, stored[i][0].spec.max_attempts)
        for i in ids
        if stored[i][0].attempts > stored[i][0].spec.max_attempts
    }
    assert not over, f"attempts past max_attempts: {dict(list(over.items())[:10])}"
    doubled = events.doubled(set(ids))
    assert not doubled, f"tasks completed twice: {dict(list(doubled.items())[:10])}"
    return collections.Counter(state_name(stored[i][0].state) for i in ids)


# ---------------------------------------------------------------- etcd SIGKILLed under load


@pytest.mark.timeout(150)
async def test_etcd_killed_repeatedly_under_load_leaves_no_task_behind(cluster: Any) -> None:
    kills = 6
    c: LocalCluster = await cluster(agents=50, pools=2, coordinators=1, sleep_ms="uniform:5:30")
    etcd = Etcd(c.etcd_endpoint, prefix="/agentmesh/default/")
    clients = [MeshClient(etcd=c.etcd_endpoint, retry_s=60) for _ in range(4)]
    events = EventLog(etcd)
    # four clients, batches of 10 every 20 ms each: several hundred submits a second,
    # and their dispatch, while etcd dies
    submitters = [
        Submitter(client, sleep_specs(f"kill{n}", 5000, random.Random(n), 5, 30), 10, 0.02)
        for n, client in enumerate(clients)
    ]
    for submitter in submitters:
        submitter.allow(len(submitter.specs))
    backs: list[float] = []

    def acked() -> int:
        return sum(len(s.acked) for s in submitters)

    async def until(n: int) -> None:
        deadline = time.monotonic() + HANG_S
        while acked() < n:
            assert time.monotonic() < deadline, f"only {acked()} of {n} acknowledged"
            await asyncio.sleep(0.02)

    try:
        await events.ready(clients[0])
        before = await leader_of(etcd)
        async with contextlib.AsyncExitStack() as stack:
            runs = [await stack.enter_async_context(running(s.run())) for s in submitters]
            await until(400)
            for _ in range(kills):
                t0 = time.monotonic()
                backs.append(await kill_etcd(c, down_s=1.0))
                await until(acked() + 300)  # flowing again
                await asyncio.sleep(max(0.0, 1.5 - (time.monotonic() - t0)))
            for submitter in submitters:
                submitter.stop()
            await asyncio.wait_for(asyncio.gather(*(asyncio.shield(r) for r in runs)), HANG_S)
        ids = [i for s in submitters for i in s.acked]
        stored, stuck, last_done = await settled_in_etcd(etcd, ids, timeout_s=60)
        assert not stuck, f"{len(stuck)} acknowledged tasks not terminal, e.g. {describe(stuck)}"
        after = await leader_of(etcd)
        assert after.term == before.term, f"the leader changed: {before} → {after}"
        states = assert_exactly_once(stored, ids, events)
        assert await live_claims(etcd) == []
        assert [i for i in await open_index(etcd) if not i.startswith("watch-probe-")] == []
        assert not c.dead(), f"processes exited: {c.dead()}"
        # waited out calmly: a line when each outage begins and one when it ends, not a
        # warning per failed write (215,000 in one outage before)
        noisy = log_levels(c.log_dir / "coordinator-1.log")
        assert noisy["ERROR"] == 0, noisy
        assert noisy["outages"] <= 2 * kills, noisy
        assert noisy["WARNING"] <= 6 * kills, noisy
        print(
            f"\n{kills} etcd SIGKILLs under {len(ids)} acknowledged tasks; term {before.term} "
            f"throughout; final states {dict(states)}; last task ended "
            f"{last_done - backs[-1]:.2f} s after etcd's last return"
        )
    finally:
        await events.close()
        for client in clients:
            await client.close()
        await etcd.close()


# ---------------------------------------------------------------- etcd restarted mid-claims


@pytest.mark.timeout(120)
async def test_etcd_restart_while_the_leader_holds_many_claims(cluster: Any) -> None:
    agents = 40
    c: LocalCluster = await cluster(agents=agents, pools=2, coordinators=1)
    etcd = Etcd(c.etcd_endpoint, prefix="/agentmesh/default/")
    client = MeshClient(etcd=c.etcd_endpoint, retry_s=60)
    events = EventLog(etcd)
    # every agent busy with a claim, a backlog waiting, and ~200 claims and reports
    # written a second: each outage cuts through writes in flight
    specs = sleep_specs("held", 1500, random.Random(5), 100, 300)
    try:
        await events.ready(client)
        before = await leader_of(etcd)
        ids = []
        for i in range(0, len(specs), 500):
            resp = await client.submit_batch(specs[i : i + 500])
            ids.extend(r.task.task_id for r in resp.results)

        async def all_busy() -> bool:
            status = await client.status()
            return status.task_counts["ASSIGNED"] + status.task_counts["RUNNING"] >= agents

        deadline = time.monotonic() + HANG_S
        while not await all_busy():
            assert time.monotonic() < deadline, "agents never all busy"
            await asyncio.sleep(0.05)
        await kill_etcd(c, down_s=2.5)
        await asyncio.sleep(1.0)
        while not await all_busy():  # busy again, then once more
            await asyncio.sleep(0.05)
        back = await kill_etcd(c, down_s=2.5)
        stored, stuck, last_done = await settled_in_etcd(etcd, ids, timeout_s=60)
        assert not stuck, f"{len(stuck)} acknowledged tasks not terminal, e.g. {describe(stuck)}"
        after = await leader_of(etcd)
        assert after.term == before.term, f"the leader changed: {before} → {after}"
        states = assert_exactly_once(stored, ids, events)
        assert states == {"SUCCEEDED": len(ids)}, states
        assert await live_claims(etcd) == []
        status = await client.status()  # memory agrees with etcd after the outage
        assert status.task_counts["QUEUED"] == 0
        assert status.task_counts["ASSIGNED"] + status.task_counts["RUNNING"] == 0
        assert status.queue_depth == 0
        attempts = collections.Counter(stored[i][0].attempts for i in ids)
        print(
            f"\netcd SIGKILLed twice for 2.5 s while {agents} agents held claims; term {before.term} "
            f"throughout; all {len(ids)} SUCCEEDED once (attempts {dict(sorted(attempts.items()))}); "
            f"last one ended {last_done - back:.2f} s after etcd came back"
        )
    finally:
        await events.close()
        await client.close()
        await etcd.close()


# ---------------------------------------------------------------- clients with tiny deadlines


async def submit_until_acked(
    stub: cpb_grpc.CoordinatorStub, specs: list[tpb.TaskSpec], deadline_s: float
) -> tuple[int, int]:
    """Submit (one spec: Submit; more: SubmitBatch) with a deadline of a few ms, and retry
    the same ids until one call is answered; returns (calls, deadlines hit)."""
    calls = expired = 0
    while True:
        calls += 1
        try:
            if len(specs) == 1:
                await stub.Submit(cpb.SubmitRequest(spec=specs[0]), timeout=deadline_s)
            else:
                await stub.SubmitBatch(cpb.SubmitBatchRequest(specs=specs), timeout=deadline_s)
            return calls, expired
        except grpc.aio.AioRpcError as err:
            # the deadline shows as DEADLINE_EXCEEDED, or CANCELLED when it passes while
            # the server is cancelling the handler
            if err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                expired += 1
            elif err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        # a replay of a task that landed answers from memory: quick; the deadline grows
        # a little so a loaded machine cannot starve the test
        deadline_s = min(deadline_s * 1.5, 2.0)
        await asyncio.sleep(0.01)


@pytest.mark.timeout(90)
async def test_clients_with_millisecond_deadlines_strand_nothing(cluster: Any) -> None:
    c: LocalCluster = await cluster(agents=20, pools=1, coordinators=1, sleep_ms="fixed:2")
    etcd = Etcd(c.etcd_endpoint, prefix="/agentmesh/default/")
    client = MeshClient(etcd=c.etcd_endpoint, retry_s=60)
    try:
        before = await leader_of(etcd)
        endpoint = node_of(before)[1]
        rng = random.Random(3)
        single = [
            tpb.TaskSpec(
                task_id=f"one-{i:03d}", kind="sleep", payload=json.dumps({"ms": 2}).encode()
            )
            for i in range(200)
        ]
        batches = [
            [
                tpb.TaskSpec(
                    task_id=f"batch{b}-{i:04d}", kind="echo", payload=b"x" * rng.randint(1, 64)
                )
                for i in range(1000)
            ]
            for b in range(3)
        ]
        async with grpc.aio.insecure_channel(endpoint) as channel:
            stub = cpb_grpc.CoordinatorStub(channel)
            results = await asyncio.gather(
                *(submit_until_acked(stub, [s], rng.choice((0.001, 0.002))) for s in single),
                *(submit_until_acked(stub, b, 0.005) for b in batches),
            )
        expired = sum(e for _, e in results)
        ids = [s.task_id for s in single] + [s.task_id for b in batches for s in b]
        stored, stuck, _ = await settled_in_etcd(etcd, ids, timeout_s=60)
        assert not stuck, f"{len(stuck)} acknowledged tasks not terminal, e.g. {describe(stuck)}"
        everything = await stored_tasks(etcd)
        open_records = {
            i: state_name(t.state) for i, (t, _) in everything.items() if t.state not in TERMINAL
        }
        assert not open_records, f"records left open: {dict(list(open_records.items())[:10])}"
        assert all(stored[i][0].state == SUCCEEDED for i in ids)
        assert (await leader_of(etcd)).term == before.term
        status = await client.status()
        assert status.queue_depth == 0
        assert expired > 0, "no call hit its deadline: the test proved nothing"
        print(
            f"\n{len(single)} Submits (1-2 ms deadlines) and {len(batches)} SubmitBatch of 1,000 "
            f"(5 ms): {expired} calls hit their deadline and were retried with the same ids; "
            f"all {len(ids)} tasks SUCCEEDED"
        )
    finally:
        await client.close()
        await etcd.close()
