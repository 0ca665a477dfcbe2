"""The Consensus service in-process on port 0 against a real etcd: two instances (one
active), and voters written with nothing but the generated stubs, as an agent in
any language would."""

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

from protos.agentmesh.v1 import consensus_pb2 as pb
from protos.agentmesh.v1 import consensus_pb2_grpc as pb_grpc
from registry.errors import StoreUnavailableError
from registry.etcd import Etcd
from registry.etcd_server import EtcdServer
from services._common.errors import LEADER_METADATA_KEY
from services.consensus import signing
from services.consensus.client import ConsensusClient
from services.consensus.config import ConsensusConfig
from services.consensus.server import SERVICE, ConsensusNode
from services.consensus.servicer import ConsensusServicer
from services.consensus.store import ConsensusStore

HANG_S = 10.0


@contextlib.asynccontextmanager
async def instances(endpoint: str, count: int = 2) -> AsyncIterator[list[ConsensusNode]]:
    cluster = f"test-{uuid.uuid4().hex}"
    nodes = [
        ConsensusNode(ConsensusConfig(etcd=endpoint, cluster=cluster, grace_s=0.5, node_id=f"c{i}"))
        for i in range(count)
    ]
    tasks = [asyncio.ensure_future(n.run()) for n in nodes]
    try:
        yield nodes
    finally:
        for n in nodes:
            n.runner.stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)


async def active_of(nodes: list[ConsensusNode]) -> ConsensusNode:
    async with asyncio.timeout(HANG_S):
        while True:
            for n in nodes:
                core = n.servicer.core
                if core is not None and core.loaded.is_set():
                    return n
            await asyncio.sleep(0.02)


class StubVoter:
    """An agent using only the stubs: hello, then answer every request."""

    def __init__(self, endpoint: str, agent_id: str, etcd: Etcd, choice: int) -> None:
        self.channel = grpc.aio.insecure_channel(endpoint)
        self.agent_id = agent_id
        self.etcd = etcd
        self.choice = choice
        self.key = signing.new_key()
        self.welcomed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.etcd.put(self.etcd.key("keys", self.agent_id), signing.public_bytes(self.key))
        self.task = asyncio.ensure_future(self._run())
        await asyncio.wait_for(self.welcomed.wait(), HANG_S)

    async def _run(self) -> None:
        call = pb_grpc.ConsensusStub(self.channel).Participate()
        await call.write(pb.VoterMessage(hello=pb.VoterHello(agent_id=self.agent_id)))
        async for msg in call:
            if msg.HasField("welcome"):
                self.welcomed.set()
            elif msg.HasField("request"):
                req = msg.request
                vote = pb.Vote(
                    proposal_id=req.proposal.proposal_id,
                    agent_id=self.agent_id,
                    round=req.round,
                    choice=self.choice,  # type: ignore[arg-type]
                    reason="stub voter",
                )
                vote.signature = signing.sign(self.key, vote)
                await call.write(pb.VoterMessage(vote=vote))

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        await self.channel.close()


async def health(endpoint: str, service: str) -> int:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return int(resp.status)


async def call(endpoint: str, method: str, request: Any) -> Any:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        return await getattr(pb_grpc.ConsensusStub(channel), method)(request, timeout=HANG_S)


async def decision_of(endpoint: str, proposal_id: str) -> pb.Decision | None:
    """The decision, or None while there is none (NOT_FOUND)."""
    try:
        got: pb.Decision = await call(
            endpoint, "GetDecision", pb.GetDecisionRequest(proposal_id=proposal_id)
        )
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return None
    return got


async def test_active_instance_decides_and_the_standby_points_to_it(
    etcd_server: EtcdServer,
) -> None:
    async with instances(etcd_server.endpoint) as nodes:
        active = await active_of(nodes)
        standby = next(n for n in nodes if n is not active)
        ep, sb = active.runner.endpoint, standby.runner.endpoint
        assert await health(ep, SERVICE) == health_pb2.HealthCheckResponse.SERVING
        assert await health(sb, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        etcd = Etcd(etcd_server.endpoint, prefix=active.runner.etcd.prefix.decode())
        voters = [
            StubVoter(ep, f"v{i}", etcd, pb.CHOICE_APPROVE if i < 3 else pb.CHOICE_REJECT)
            for i in range(4)
        ]
        try:
            for v in voters:
                await v.start()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(sb, "Propose", pb.ProposeRequest(topic="t"))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert (LEADER_METADATA_KEY, ep) in tuple(info.value.trailing_metadata() or ())
            resp = await call(
                ep,
                "Propose",
                pb.ProposeRequest(proposal_id="c1", topic="t", protocol=pb.PROTOCOL_BFT, wait=True),
            )
            assert resp.created
            assert resp.decision.outcome == pb.OUTCOME_APPROVED
            assert (resp.decision.eligible, resp.decision.threshold) == (4, 3)
            # reads are served by the standby too, from etcd
            got = await call(sb, "GetDecision", pb.GetDecisionRequest(proposal_id="c1"))
            assert got.outcome == pb.OUTCOME_APPROVED
            assert got.revision == resp.decision.revision
            await call(ep, "Propose", pb.ProposeRequest(proposal_id="c2", topic="t", wait=True))
            page = await call(sb, "ListDecisions", pb.ListDecisionsRequest(page_size=1))
            assert [d.proposal_id for d in page.decisions] == ["c1"]
            nxt = await call(
                sb, "ListDecisions", pb.ListDecisionsRequest(page_token=page.next_page_token)
            )
            assert [d.proposal_id for d in nxt.decisions] == ["c2"]
            assert not nxt.next_page_token
            status = await call(ep, "GetStatus", pb.GetConsensusStatusRequest())
            assert list(status.voters) == ["v0", "v1", "v2", "v3"]
            assert status.leader_endpoint == ep
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(ep, "GetDecision", pb.GetDecisionRequest(proposal_id="nope"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            for v in voters:
                await v.close()
            await etcd.close()


async def test_watch_decisions_resumes_after_a_revision_without_a_gap(
    etcd_server: EtcdServer,
) -> None:
    async with instances(etcd_server.endpoint, 1) as nodes:
        active = await active_of(nodes)
        ep = active.runner.endpoint
        etcd = Etcd(etcd_server.endpoint, prefix=active.runner.etcd.prefix.decode())
        voter = StubVoter(ep, "w0", etcd, pb.CHOICE_APPROVE)
        try:
            await voter.start()
            first = await call(
                ep, "Propose", pb.ProposeRequest(proposal_id="w1", topic="t", wait=True)
            )
            for pid in ("w2", "w3"):
                await call(ep, "Propose", pb.ProposeRequest(proposal_id=pid, topic="t", wait=True))
            async with grpc.aio.insecure_channel(ep) as channel:
                stream = pb_grpc.ConsensusStub(channel).WatchDecisions(
                    pb.WatchDecisionsRequest(after_revision=first.decision.revision)
                )
                seen = []
                async for d in stream:
                    seen.append(d.proposal_id)
                    if len(seen) == 2:
                        await call(ep, "Propose", pb.ProposeRequest(proposal_id="w4", topic="t"))
                    if len(seen) == 3:
                        break
                stream.cancel()
            assert seen == ["w2", "w3", "w4"]
        finally:
            await voter.close()
            await etcd.close()


@pytest.mark.parametrize(
    ("first", "code"),
    [
        (pb.VoterMessage(vote=pb.Vote(proposal_id="x")), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.VoterMessage(hello=pb.VoterHello(agent_id="bad id")), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_participate_needs_a_valid_hello_first(
    etcd_server: EtcdServer, first: pb.VoterMessage, code: grpc.StatusCode
) -> None:
    async with instances(etcd_server.endpoint, 1) as nodes:
        active = await active_of(nodes)
        async with grpc.aio.insecure_channel(active.runner.endpoint) as channel:
            stream = pb_grpc.ConsensusStub(channel).Participate()
            await stream.write(first)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stream:
                    pass
            assert info.value.code() == code


async def test_a_propose_whose_caller_leaves_during_the_create_is_still_decided(
    etcd_server: EtcdServer,
) -> None:
    """The create reaches etcd, its reply is slow, and the caller's deadline fires
    meanwhile: the proposal it opened must still be asked, decided and closed."""
    async with instances(etcd_server.endpoint, 1) as nodes:
        active = await active_of(nodes)
        core = active.servicer.core
        assert core is not None
        ep = active.runner.endpoint
        etcd = Etcd(etcd_server.endpoint, prefix=active.runner.etcd.prefix.decode())
        voter = StubVoter(ep, "g0", etcd, pb.CHOICE_APPROVE)
        fenced = core.store._fenced  # type: ignore[attr-defined]
        slowed = asyncio.Event()

        async def slow_reply(request: Any) -> Any:
            resp = await fenced(request)  # applied in etcd ...
            if not slowed.is_set():
                slowed.set()
                await asyncio.sleep(1.0)  # ... and the answer comes late
            return resp

        try:
            await voter.start()
            core.store._fenced = slow_reply  # type: ignore[attr-defined]
            async with grpc.aio.insecure_channel(ep) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await pb_grpc.ConsensusStub(channel).Propose(
                        pb.ProposeRequest(proposal_id="gone", topic="t", timeout_s=60),
                        timeout=0.3,
                    )
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert slowed.is_set(), "the create was sent before the caller left"
            async with asyncio.timeout(HANG_S):
                while (got := await decision_of(ep, "gone")) is None:
                    await asyncio.sleep(0.05)
            assert got.outcome == pb.OUTCOME_APPROVED
            assert core.status().open_proposals == 0
        finally:
            await voter.close()
            await etcd.close()


async def end_of(stream: Any) -> grpc.StatusCode:
    """Read a stream to its end; its status."""
    try:
        async for _ in stream:
            pass
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_streams_and_proposals_that_wait_for_a_load_that_fails_are_told_to_retry(
    etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new active instance's load of the open proposals fails (etcd went away
    meanwhile): an agent that said hello and a Propose that came during the load
    are answered UNAVAILABLE, so they retry on the next term, instead of hanging."""
    loading = asyncio.Event()
    fail_now = asyncio.Event()
    load_open = ConsensusStore.load_open
    failed = 0

    async def failing_once(self: ConsensusStore) -> Any:
        nonlocal failed
        if not failed:
            failed += 1
            loading.set()
            await fail_now.wait()
            raise StoreUnavailableError("etcd is unreachable (injected)")
        return await load_open(self)

    monkeypatch.setattr(ConsensusStore, "load_open", failing_once)
    async with instances(etcd_server.endpoint, 1) as nodes:
        await asyncio.wait_for(loading.wait(), HANG_S)
        ep = nodes[0].runner.endpoint
        async with grpc.aio.insecure_channel(ep) as channel:
            stub = pb_grpc.ConsensusStub(channel)
            stream = stub.Participate()
            await stream.write(pb.VoterMessage(hello=pb.VoterHello(agent_id="early")))
            propose = asyncio.ensure_future(
                stub.Propose(pb.ProposeRequest(proposal_id="early", topic="t"), timeout=HANG_S)
            )
            await asyncio.sleep(0.2)  # both are in, waiting for the load
            fail_now.set()
            assert await asyncio.wait_for(end_of(stream), HANG_S) == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await propose
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            stream.cancel()


async def test_an_oversized_vote_naming_another_agent_is_refused_and_the_term_goes_on(
    etcd_server: EtcdServer,
) -> None:
    """A voter sends a vote naming another agent with a 2 MB reason: it is turned
    away, and nothing of it goes to etcd as evidence (a record over etcd's request
    limit would be refused, and a refused vote write ends the term)."""
    async with instances(etcd_server.endpoint, 1) as nodes:
        active = await active_of(nodes)
        core = active.servicer.core
        assert core is not None
        ep = active.runner.endpoint
        etcd = Etcd(etcd_server.endpoint, prefix=active.runner.etcd.prefix.decode())
        honest = [StubVoter(ep, f"h{i}", etcd, pb.CHOICE_APPROVE) for i in range(2)]
        async with grpc.aio.insecure_channel(ep) as channel:
            stub = pb_grpc.ConsensusStub(channel)
            hostile = stub.Participate()
            try:
                await hostile.write(pb.VoterMessage(hello=pb.VoterHello(agent_id="x0")))
                assert (await hostile.read()).HasField("welcome")
                proposal = await stub.Propose(
                    pb.ProposeRequest(
                        proposal_id="big",
                        topic="t",
                        voters=pb.VoterSelector(agents=pb.AgentList(agent_ids=["h0", "h1", "x0"])),
                    ),
                    timeout=HANG_S,
                )
                assert proposal.created
                assert (await hostile.read()).HasField("request")
                vote = pb.Vote(
                    proposal_id="big",
                    agent_id="h0",
                    round=1,
                    choice=pb.CHOICE_APPROVE,
                    reason="x" * 2_000_000,
                )
                await hostile.write(pb.VoterMessage(vote=vote))
                answer = await asyncio.wait_for(hostile.read(), HANG_S)
                assert answer.HasField("rejected")
                assert "reason" in answer.rejected.reason
                for v in honest:
                    await v.start()
                async with asyncio.timeout(HANG_S):
                    while (got := await decision_of(ep, "big")) is None:
                        await asyncio.sleep(0.05)
                assert got.outcome == pb.OUTCOME_APPROVED
                assert core.failed is None
                assert active.servicer.core is core, "the term went on"
            finally:
                hostile.cancel()
                for v in honest:
                    await v.close()
                await etcd.close()


async def test_list_decisions_pages_by_size_under_a_default_clients_receive_limit(
    etcd_server: EtcdServer,
) -> None:
    """300 decisions of about 20 KB (16 winning votes with 1 KiB reasons, as an LLM
    voter writes them): ListDecisions with page_size 1,000 must answer in pages a
    default gRPC client (4 MiB) can receive, and paging must still list them all."""
    async with instances(etcd_server.endpoint, 1) as nodes:
        active = await active_of(nodes)
        ep = active.runner.endpoint
        etcd = Etcd(etcd_server.endpoint, prefix=active.runner.etcd.prefix.decode())
        try:
            vote = pb.Vote(proposal_id="p", agent_id="a" * 128, choice=pb.CHOICE_APPROVE)
            vote.reason = "r" * 1024
            ids = [f"big-{i:03d}" for i in range(300)]
            for pid in ids:
                d = pb.Decision(
                    proposal_id=pid, outcome=pb.OUTCOME_APPROVED, winning_votes=[vote] * 16
                )
                await etcd.put(etcd.key("decisions", pid), d.SerializeToString())
            seen: list[str] = []
            token = ""
            async with grpc.aio.insecure_channel(ep) as channel:  # default 4 MiB receive
                stub = pb_grpc.ConsensusStub(channel)
                for _ in range(len(ids)):
                    page = await stub.ListDecisions(
                        pb.ListDecisionsRequest(page_size=1000, page_token=token), timeout=HANG_S
                    )
                    assert page.decisions
                    seen.extend(d.proposal_id for d in page.decisions)
                    token = page.next_page_token
                    if not token:
                        break
            assert seen == ids
        finally:
            await etcd.close()


async def test_a_watch_resumed_past_compacted_history_waits_quietly_for_the_next_decision(
    fresh_etcd_server: EtcdServer,
) -> None:
    """`agentmesh decisions --watch` on a cluster whose last decision is older than
    etcd's compaction: WatchDecisions(after_revision) must wait for the next decision,
    not re-list in a loop (each turn a watch on a compacted revision and an etcd read)."""
    async with instances(fresh_etcd_server.endpoint, 1) as nodes:
        active = await active_of(nodes)
        ep = active.runner.endpoint
        etcd = Etcd(fresh_etcd_server.endpoint, prefix=active.runner.etcd.prefix.decode())
        voter = StubVoter(ep, "c0", etcd, pb.CHOICE_APPROVE)
        relists = 0
        list_decisions = active.servicer.reader.list_decisions

        async def counted(*args: Any, **kw: Any) -> Any:
            nonlocal relists
            relists += 1
            return await list_decisions(*args, **kw)

        try:
            await voter.start()
            old = await call(
                ep, "Propose", pb.ProposeRequest(proposal_id="old", topic="t", wait=True)
            )
            for i in range(5):  # history moves on; then etcd compacts it
                latest = await etcd.put(etcd.key("elsewhere", str(i)), b"")
            async with grpc.aio.insecure_channel(fresh_etcd_server.endpoint) as channel:
                await rpc.KVStub(channel).Compact(
                    rpc.CompactionRequest(revision=latest, physical=True), timeout=HANG_S
                )
            active.servicer.reader.list_decisions = counted  # type: ignore[method-assign]
            async with grpc.aio.insecure_channel(ep) as channel:
                stream = pb_grpc.ConsensusStub(channel).WatchDecisions(
                    pb.WatchDecisionsRequest(after_revision=old.decision.revision)
                )
                await asyncio.sleep(1.0)
                quiet = relists
                await call(ep, "Propose", pb.ProposeRequest(proposal_id="new", topic="t"))
                got = await asyncio.wait_for(stream.read(), HANG_S)
                stream.cancel()
            assert got.proposal_id == "new"
            assert quiet <= 3, f"{quiet} listings in 1 s while no decision was made"
        finally:
            await voter.close()
            await etcd.close()


@pytest.mark.parametrize("token", ["9" * 30, "-5", "٣"])
async def test_a_page_token_the_service_never_gave_is_invalid_argument(
    etcd_server: EtcdServer, token: str
) -> None:
    async with instances(etcd_server.endpoint, 1) as nodes:
        active = await active_of(nodes)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(
                active.runner.endpoint, "ListDecisions", pb.ListDecisionsRequest(page_token=token)
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in (info.value.details() or "")


async def test_a_client_watching_from_now_misses_no_decision_when_its_stream_breaks(
    etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ConsensusClient.watch_decisions() from now: the stream breaks (the instance goes
    away) before its first decision, a decision is committed meanwhile, and the client
    reconnects: that decision must still come, first."""
    watch_decisions = ConsensusServicer.WatchDecisions
    entered, release = asyncio.Event(), asyncio.Event()
    calls = 0

    async def breaking_once(self: ConsensusServicer, request: Any, context: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            entered.set()
            await release.wait()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the instance went away (injected)")
        async for decision in watch_decisions(self, request, context):
            yield decision

    monkeypatch.setattr(ConsensusServicer, "WatchDecisions", breaking_once)
    async with instances(etcd_server.endpoint, 1) as nodes:
        active = await active_of(nodes)
        ep = active.runner.endpoint
        etcd = Etcd(etcd_server.endpoint, prefix=active.runner.etcd.prefix.decode())
        voter = StubVoter(ep, "w0", etcd, pb.CHOICE_APPROVE)
        client = ConsensusClient(etcd, timeout_s=HANG_S, retry_s=HANG_S)
        watch = client.watch_decisions()
        try:
            await voter.start()
            first = asyncio.ensure_future(anext(watch))
            await asyncio.wait_for(entered.wait(), HANG_S)
            await call(ep, "Propose", pb.ProposeRequest(proposal_id="gap", topic="t", wait=True))
            release.set()
            async with asyncio.timeout(HANG_S):
                while calls < 2:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # the second stream is watching
            await call(ep, "Propose", pb.ProposeRequest(proposal_id="later", topic="t", wait=True))
            assert (await asyncio.wait_for(first, HANG_S)).proposal_id == "gap"
            assert (await asyncio.wait_for(anext(watch), HANG_S)).proposal_id == "later"
        finally:
            await watch.aclose()
            await client.close()
            await voter.close()
            await etcd.close()


async def test_a_watch_after_the_largest_revision_is_invalid_argument(
    etcd_server: EtcdServer,
) -> None:
    async with instances(etcd_server.endpoint, 1) as nodes:
        active = await active_of(nodes)
        async with grpc.aio.insecure_channel(active.runner.endpoint) as channel:
            stream = pb_grpc.ConsensusStub(channel).WatchDecisions(
                pb.WatchDecisionsRequest(after_revision=2**63 - 1)
            )
            code = await asyncio.wait_for(end_of(stream), HANG_S)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
