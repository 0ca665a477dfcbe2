"""The shape every service shares: the Runner's lifecycle and the leadership loop,
with in-process runners on port 0 against a real etcd."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from aetcd import rpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from registry import discovery
from registry.election import current_leader
from registry.errors import NotLeaderError
from registry.etcd import Etcd, op_put
from registry.etcd_server import EtcdServer
from registry.leadership import Leadership, Term, parse_leader_value
from services._common.config import ServiceConfig
from services._common.runner import Runner

SERVICE = "agentmesh.v1.Example"
HANG_S = 10.0


async def within(awaitable: Any, timeout_s: float = HANG_S) -> Any:
    return await asyncio.wait_for(awaitable, timeout_s)


async def health_of(endpoint: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return int(resp.status)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Replica:
    """A minimal elected service: leads by recording its terms until the term ends."""

    def __init__(self, etcd_endpoint: str, cluster: str, name: str, **cfg: Any) -> None:
        self.runner = Runner(
            "example",
            ServiceConfig(etcd=etcd_endpoint, cluster=cluster, grace_s=1.0, **cfg),
            [SERVICE],
            node_id=name,
        )
        self.terms: list[int] = []
        self.leading = asyncio.Event()
        self.events: list[str] = []
        self.fail_lead = False

    async def lead(self, term: Term) -> None:
        if self.fail_lead:
            raise RuntimeError("load failed (injected)")
        self.terms.append(term.number)
        await self.runner.serving(True)
        self.leading.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.leading.clear()
            await self.runner.serving(False)

    async def drain(self) -> None:
        self.events.append("drain")


@contextlib.asynccontextmanager
async def replicas(endpoint: str, count: int, **cfg: Any) -> AsyncIterator[list[Replica]]:
    cluster = f"test-{uuid.uuid4().hex}"
    made = [Replica(endpoint, cluster, f"r{i}", **cfg) for i in range(count)]
    tasks = []
    for r in made:
        leadership = r.runner.leadership()
        tasks.append(
            asyncio.ensure_future(
                r.runner.run(lambda lp=leadership, r=r: lp.serve(r.lead), drain=r.drain)
            )
        )
    try:
        yield made
    finally:
        for r in made:
            r.runner.stop()
        await within(asyncio.gather(*tasks, return_exceptions=True), 30)


async def leader_of(replicas_: list[Replica]) -> Replica:
    async with asyncio.timeout(HANG_S):
        while True:
            leading = [r for r in replicas_ if r.leading.is_set()]
            if len(leading) == 1:
                return leading[0]
            assert len(leading) <= 1, "two replicas lead at once"
            await asyncio.sleep(0.01)


async def test_one_leads_registers_and_reports_health(etcd_server: EtcdServer) -> None:
    async with replicas(etcd_server.endpoint, 2) as (a, b):
        leader = await leader_of([a, b])
        standby = b if leader is a else a
        assert await health_of(leader.runner.endpoint, SERVICE) == SERVING
        assert await health_of(standby.runner.endpoint, SERVICE) == NOT_SERVING
        assert await health_of(standby.runner.endpoint) == SERVING  # up, just not leading
        etcd = leader.runner.etcd
        found = await current_leader(etcd, "example")
        assert found is not None
        assert parse_leader_value(found.value) == (
            "r0" if leader is a else "r1",
            leader.runner.endpoint,
        )
        async with asyncio.timeout(HANG_S):
            while len(await discovery.resolve(etcd, "example")) < 2:
                await asyncio.sleep(0.02)
        await leader.runner.publish(agents="7")
        mine = [
            i
            for i in await discovery.resolve(etcd, "example")
            if i.instance_id == leader.runner.node_id
        ]
        assert mine[0].metadata == {"agents": "7"}


async def test_metadata_published_while_registering_is_not_lost(
    etcd_server: EtcdServer,
) -> None:
    runner = Runner(
        "example",
        ServiceConfig(etcd=etcd_server.endpoint, cluster=f"test-{uuid.uuid4().hex}", grace_s=1.0),
        [SERVICE],
        node_id="r0",
    )
    attach = runner.session.attach
    published = False

    async def slow_attach(key: bytes, value: bytes) -> None:
        nonlocal published
        await attach(key, value)
        if not published:  # the pool's count changes while the first put is in flight
            published = True
            await runner.publish(agents="7")

    runner.session.attach = slow_attach  # type: ignore[method-assign]
    task = asyncio.ensure_future(runner.run())
    try:
        async with asyncio.timeout(HANG_S):
            while True:
                found = await discovery.resolve(runner.etcd, "example")
                if found and found[0].metadata == {"agents": "7"}:
                    break
                await asyncio.sleep(0.02)
    finally:
        runner.stop()
        await within(task, 30)


async def test_stopping_the_leader_hands_over_at_once_and_fences_it(
    etcd_server: EtcdServer,
) -> None:
    async with replicas(etcd_server.endpoint, 2) as (a, b):
        first = await leader_of([a, b])
        other = b if first is a else a
        old_term = first.terms[-1]
        leadership_term = first.runner.session  # keep its etcd for the fence check below
        etcd = Etcd(etcd_server.endpoint, prefix=first.runner.etcd.prefix.decode())
        try:
            t0 = asyncio.get_running_loop().time()
            first.runner.stop()
            await within(other.leading.wait())
            took = asyncio.get_running_loop().time() - t0
            # the lease is revoked on shutdown, so the standby need not wait out the TTL
            assert took < first.runner.cfg.lease_ttl_s
            assert other.terms[-1] > old_term
            assert first.events == ["drain"]
            # the old term's fence refuses writes
            key = first.runner.etcd.key("election", "example") + b"/"
            stale = rpc.TxnRequest()
            stale.compare.append(
                rpc.Compare(
                    key=key + f"{leadership_term.id:016x}".encode(),
                    target=rpc.Compare.CREATE,
                    result=rpc.Compare.EQUAL,
                    create_revision=old_term,
                )
            )
            stale.success.append(op_put(etcd.key("fenced"), b"x"))
            resp = await etcd.txn_request(stale)
            assert not resp.succeeded
            assert await health_of(other.runner.endpoint, SERVICE) == SERVING
        finally:
            await etcd.close()


async def test_lost_lease_ends_the_term_and_the_session_comes_back(
    etcd_server: EtcdServer,
) -> None:
    async with replicas(etcd_server.endpoint, 1) as (only,):
        await within(only.leading.wait())
        first_term = only.terms[-1]
        old_lease = only.runner.session.id
        await only.runner.etcd.revoke(old_lease)  # etcd forgets us (as after a long partition)
        async with asyncio.timeout(HANG_S):
            while not (only.leading.is_set() and only.terms[-1] > first_term):
                await asyncio.sleep(0.02)
        assert only.runner.session.id != old_lease
        # the registration came back on the new lease
        async with asyncio.timeout(HANG_S):
            while not await discovery.resolve(only.runner.etcd, "example"):
                await asyncio.sleep(0.02)


async def test_a_lead_that_keeps_failing_backs_off_and_says_not_serving(
    etcd_server: EtcdServer,
) -> None:
    async with replicas(etcd_server.endpoint, 1) as (only,):
        only.fail_lead = True
        async with asyncio.timeout(HANG_S):
            while await health_of(only.runner.endpoint) != NOT_SERVING:
                await asyncio.sleep(0.05)
        etcd = only.runner.etcd
        before = await current_leader(etcd, "example")
        await asyncio.sleep(1.5)
        after = await current_leader(etcd, "example")
        # backoff: at most a handful of terms in 1.5 s, not hundreds
        churn = (after.term if after else 0) - (before.term if before else 0)
        assert churn < 40, f"terms churned by {churn} revisions in 1.5 s"
        only.fail_lead = False
        async with asyncio.timeout(15):
            await only.leading.wait()
        # once a term has held a few seconds, the process says it serves again
        async with asyncio.timeout(15):
            while await health_of(only.runner.endpoint) != SERVING:
                await asyncio.sleep(0.1)


async def test_hold_raises_when_the_term_ends(etcd: Etcd) -> None:
    from registry.lease import Session

    session = Session(etcd, 2)
    keeper = asyncio.ensure_future(session.run())
    try:
        leadership = Leadership(session, "hold", b"x")
        terms = leadership.terms()
        term = await within(anext(terms))
        work = asyncio.ensure_future(term.hold(asyncio.Event().wait()))
        await asyncio.sleep(0.05)
        await etcd.delete(term.election.key)  # someone deleted our key: the term is over
        with pytest.raises(NotLeaderError):
            await within(work)
        await terms.aclose()
    finally:
        keeper.cancel()
        with contextlib.suppress(BaseException):
            await keeper
        await session.close()
