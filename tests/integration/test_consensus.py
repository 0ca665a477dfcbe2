"""The consensus service as real processes: etcd, a coordinator, consensus instances and
two agent pools with 100 voters in all, whose agents each hold a Participate stream.

Each test starts its own cluster and stops it (the `cluster` fixture), whatever happens.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from typing import Any

import pytest

from protos.agentmesh.v1 import consensus_pb2 as pb
from registry.etcd import Etcd
from services.cluster import LocalCluster
from services.consensus import rules
from services.consensus.client import ConsensusClient
from services.consensus.store import ConsensusStore
from tests.integration.conftest import ClusterFactory

pytestmark = pytest.mark.integration

VOTERS = 100
PROTOCOLS = (pb.PROTOCOL_QUORUM, pb.PROTOCOL_FAST, pb.PROTOCOL_BFT, pb.PROTOCOL_ORDERED)


async def start(cluster: ClusterFactory, **fields: Any) -> LocalCluster:
    fields.setdefault("agents", VOTERS)
    fields.setdefault("pools", 2)
    local = await cluster(**fields)
    await local.wait_voters(fields["agents"], timeout_s=30)
    return local


def client_of(local: LocalCluster) -> ConsensusClient:
    return ConsensusClient(local.etcd_endpoint, local.spec.cluster, timeout_s=5.0, retry_s=20.0)


def store_of(local: LocalCluster) -> ConsensusStore:
    return ConsensusStore(Etcd(local.etcd_endpoint, prefix=f"/agentmesh/{local.spec.cluster}/"))


async def recount(store: ConsensusStore, decision: pb.Decision) -> Counter[str]:
    """The tally of the deciding round, recomputed from the vote records in etcd."""
    tally: Counter[str] = Counter()
    for record in await store.votes_of(decision.proposal_id):
        if record.HasField("excluded"):
            continue
        for vote in record.votes:
            if vote.round == decision.round:
                tally[rules.choice_name(vote.choice, vote.option)] += 1
    return tally


def assert_correct(decision: pb.Decision, etcd_tally: Counter[str]) -> None:
    """A decision is TIMED_OUT/NO_QUORUM, or its winner has the threshold in etcd."""
    if decision.outcome in (pb.OUTCOME_TIMED_OUT, pb.OUTCOME_NO_QUORUM):
        assert all(
            n < decision.threshold for name, n in decision.tally.items() if name != "ABSTAIN"
        )
        return
    winner = "APPROVE" if decision.outcome == pb.OUTCOME_APPROVED else "REJECT"
    if decision.outcome == pb.OUTCOME_CHOSEN:
        winner = "option:" + decision.option
    assert decision.tally[winner] >= decision.threshold
    # every vote the decision counted is committed in etcd (votes may have come after)
    assert etcd_tally[winner] >= decision.tally[winner]


@pytest.mark.timeout(90)
async def test_concurrent_proposals_under_every_protocol(cluster: ClusterFactory) -> None:
    local = await start(cluster)
    async with client_of(local) as client:
        watched: list[pb.Decision] = []

        async def watch() -> None:
            async for d in client.watch_decisions():
                watched.append(d)

        watcher = asyncio.ensure_future(watch())
        await asyncio.sleep(0.3)  # the watch is open before the first decision
        requests = [
            pb.ProposeRequest(
                proposal_id=f"{rules.PROTOCOLS[proto].lower()}-{i}",
                topic=f"{rules.PROTOCOLS[proto]} #{i}",
                protocol=proto,  # type: ignore[arg-type]
                options=["red", "blue"] if i % 2 else [],
                timeout_s=20,
                wait=True,
            )
            for proto in PROTOCOLS
            for i in range(6)
        ]
        responses = await asyncio.wait_for(
            asyncio.gather(*(client.propose(r) for r in requests)), 60
        )
        for req, resp in zip(requests, responses, strict=True):
            d = resp.decision
            assert d.eligible == VOTERS
            assert d.outcome == (pb.OUTCOME_CHOSEN if req.options else pb.OUTCOME_APPROVED)
            if req.options:
                assert d.option == "red"  # policy "always" picks the first option
            assert d.votes_counted >= d.threshold
            assert d.threshold == rules.threshold(
                req.protocol, VOTERS, d.round, 0, resp.proposal.max_faulty
            )
            assert d.latency_ms > 0
        ordered = sorted(
            (r.decision for r in responses if r.decision.protocol == pb.PROTOCOL_ORDERED),
            key=lambda d: d.revision,
        )
        assert [d.sequence for d in ordered] == list(range(1, 7)), "gap-free, in revision order"
        listed = (await client.list_decisions(page_size=100)).decisions
        assert [d.proposal_id for d in listed] == [
            r.decision.proposal_id for r in sorted(responses, key=lambda r: r.decision.revision)
        ]
        async with asyncio.timeout(10):
            while len(watched) < len(requests):
                await asyncio.sleep(0.05)
        watcher.cancel()
        assert [d.proposal_id for d in watched] == [d.proposal_id for d in listed]


@pytest.mark.timeout(90)
async def test_byzantine_voters_are_excluded_under_bft(cluster: ClusterFactory) -> None:
    # in each pool of 50: 3 forge signatures, 3 equivocate, 2 vote as someone else,
    # 2 also vote on proposals that do not exist (their real vote is honest)
    byzantine = "forge:3,equivocate:3,impersonate:2,unknown-proposal:2"
    local = await start(cluster, env={"AGENTMESH_BYZANTINE": byzantine})
    expected = {}
    for pool in ("pool-1", "pool-2"):
        for n in range(1, 4):
            expected[f"{pool}-a{n:04d}"] = pb.FAULT_FORGED_SIGNATURE
        for n in range(4, 7):
            expected[f"{pool}-a{n:04d}"] = pb.FAULT_EQUIVOCATION
        for n in range(7, 9):
            expected[f"{pool}-a{n:04d}"] = pb.FAULT_UNKNOWN_AGENT
    honest = VOTERS - len(expected)  # 84; f = 33, threshold 67
    store = store_of(local)
    try:
        async with client_of(local) as client:
            responses = await asyncio.gather(
                *(
                    client.propose(
                        pb.ProposeRequest(
                            proposal_id=f"bft-{i}",
                            topic="deploy?",
                            protocol=pb.PROTOCOL_BFT,
                            quorum=honest,  # wait for every honest vote
                            timeout_s=20,
                            wait=True,
                        )
                    )
                    for i in range(4)
                )
            )
            await asyncio.sleep(0.5)  # late byzantine votes are still detected and recorded
            for resp in responses:
                d = resp.decision
                assert d.outcome == pb.OUTCOME_APPROVED
                assert resp.proposal.max_faulty == 33
                assert d.votes_counted >= honest
                # a forged or impersonated vote never counts; an equivocator's first vote
                # counts until its second arrives (within the f the threshold tolerates)
                never = {a for a, f in expected.items() if f != pb.FAULT_EQUIVOCATION}
                assert not {v.agent_id for v in d.winning_votes} & never
                assert {e.agent_id for e in d.excluded} <= set(expected), "no honest exclusion"
                records = {r.agent_id: r for r in await store.votes_of(d.proposal_id)}
                found = {a: r.excluded.fault for a, r in records.items() if r.HasField("excluded")}
                assert found == expected
                for agent in (a for a, f in expected.items() if f == pb.FAULT_EQUIVOCATION):
                    assert records[agent].conflicting.choice != records[agent].votes[0].choice
            status = await client.status()
            unknown = {
                f.agent_id for f in status.recent_faults if f.fault == pb.FAULT_UNKNOWN_PROPOSAL
            }
            assert unknown <= {f"pool-{p}-a{n:04d}" for p in (1, 2) for n in (9, 10)}
            assert unknown, "votes on unknown proposals are reported with the agent id"
    finally:
        await store.etcd.close()


@pytest.mark.timeout(90)
async def test_a_voter_pool_killed_mid_vote_gives_timed_out_or_a_correct_decision(
    cluster: ClusterFactory,
) -> None:
    # agents think 1-1.5 s before voting, so the kill lands mid-vote
    local = await start(cluster, env={"AGENTMESH_VOTE_DELAY_MS": "uniform:1000:1500"})
    store = store_of(local)
    try:
        async with client_of(local) as client:
            requests = [
                pb.ProposeRequest(
                    proposal_id=f"kill-{rules.PROTOCOLS[proto].lower()}-{i}",
                    topic="t",
                    protocol=proto,  # type: ignore[arg-type]
                    timeout_s=4,
                    wait=True,
                )
                for proto in PROTOCOLS
                for i in range(3)
            ]
            pending = asyncio.gather(*(client.propose(r) for r in requests))
            # every proposal open (its electorate of 100 taken) before the kill: a proposal
            # opened after it has 50 voters, who can decide it
            async with asyncio.timeout(10):
                for r in requests:
                    while (opened := await store.get_proposal(r.proposal_id)) is None:
                        await asyncio.sleep(0.01)
                    assert len(opened.voters) == VOTERS
            local.kill("pool-2")  # 50 of 100 voters gone before answering
            responses = await asyncio.wait_for(pending, 30)
            outcomes = Counter()
            for resp in responses:
                d = resp.decision
                outcomes[d.outcome] += 1
                assert_correct(d, await recount(store, d))
                assert d.participation <= 0.5 + 1e-9
            # 50 live voters cannot reach 51 (QUORUM, ORDERED, FAST round 2) or 67 (BFT)
            assert outcomes == {pb.OUTCOME_TIMED_OUT: len(requests)}
    finally:
        await store.etcd.close()


@pytest.mark.timeout(120)
async def test_the_active_instance_killed_mid_vote_the_standby_finishes(
    cluster: ClusterFactory,
) -> None:
    local = await start(cluster, consensus=2, env={"AGENTMESH_VOTE_DELAY_MS": "uniform:300:500"})
    store = store_of(local)
    try:
        async with client_of(local) as client:
            first = await client.status()
            active = "consensus-1" if first.leader_id == "consensus-1" else "consensus-2"
            requests = [
                pb.ProposeRequest(
                    proposal_id=f"failover-{rules.PROTOCOLS[proto].lower()}-{i}",
                    topic="t",
                    protocol=proto,  # type: ignore[arg-type]
                    timeout_s=20,
                    wait=True,
                )
                for proto in PROTOCOLS
                for i in range(2)
            ]
            pending = asyncio.gather(*(client.propose(r) for r in requests))
            await asyncio.sleep(0.15)  # proposals are open, no vote is in yet
            t0 = time.monotonic()
            local.kill(active, signal.SIGKILL)
            responses = await asyncio.wait_for(pending, 60)
            took = time.monotonic() - t0
            after = await client.status()
            assert after.term > first.term
            assert after.leader_id != first.leader_id
            for resp in responses:
                d = resp.decision
                assert d.outcome == pb.OUTCOME_APPROVED, pb.Outcome.Name(d.outcome)
                assert d.term == after.term, "decided by the standby that took over"
                assert_correct(d, await recount(store, d))
            assert took < 15
            open_left = await store.etcd.range(store.prefix("open"), keys_only=True)
            assert not open_left.kvs
    finally:
        await store.etcd.close()


@pytest.mark.timeout(120)
async def test_decisions_survive_a_restart_of_everything(cluster: ClusterFactory) -> None:
    local = await start(cluster, agents=100)
    async with client_of(local) as client:
        for proto in PROTOCOLS:
            for i in range(2):
                await client.propose(
                    pb.ProposeRequest(
                        proposal_id=f"keep-{proto}-{i}", topic="t", protocol=proto, wait=True
                    )  # type: ignore[arg-type]
                )
        before = list((await client.list_decisions(page_size=100)).decisions)
    assert len(before) == 8
    await asyncio.to_thread(local.stop)
    await asyncio.to_thread(local.start)
    await local.wait_ready(timeout_s=60, agents=100)
    await local.wait_voters(100, timeout_s=30)
    async with client_of(local) as client:
        after = list((await client.list_decisions(page_size=100)).decisions)
        assert after == before
        one = await client.decision("keep-4-1")
        assert one.sequence == 2
        resp = await client.propose(
            pb.ProposeRequest(
                proposal_id="keep-next", topic="t", protocol=pb.PROTOCOL_ORDERED, wait=True
            )
        )
        assert resp.decision.sequence == 3, "the log goes on without a gap"
        replay = await client.propose(
            pb.ProposeRequest(proposal_id="keep-1-0", topic="t", protocol=pb.PROTOCOL_QUORUM)
        )
        assert replay.created is False
        assert replay.decision == before[0]
