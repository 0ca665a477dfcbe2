"""The consensus core with a fake clock and an in-memory store: counting only committed
votes, thresholds, rounds, timeouts, byzantine voters, failover and idempotency."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protos.agentmesh.v1 import consensus_pb2 as pb
from services._common.clock import FakeClock
from services._common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotLeaderError,
    StoreUnavailableError,
)
from services.consensus import signing
from services.consensus.config import ConsensusConfig
from services.consensus.core import MAX_PROBES, ConsensusCore, Voter
from tests.unit.consensus_fakes import MemoryConsensusStore

CFG = ConsensusConfig(default_timeout_s=10.0)


class Agent:
    """A voter's stream, seen from the test: what the core sent it."""

    def __init__(self, core: ConsensusCore, agent_id: str) -> None:
        self.core = core
        self.agent_id = agent_id
        self.inbox: list[pb.ConsensusMessage] = []
        self.closed = False
        self.key = signing.new_key()
        self.voter: Voter | None = None

    def send(self, msg: pb.ConsensusMessage | None) -> None:
        if msg is None:
            self.closed = True
        else:
            self.inbox.append(msg)

    def requests(self, pid: str = "", round_: int = 0) -> list[pb.VoteRequest]:
        return [
            m.request
            for m in self.inbox
            if m.HasField("request")
            and (not pid or m.request.proposal.proposal_id == pid)
            and (not round_ or m.request.round == round_)
        ]

    def rejections(self) -> list[pb.VoteRejected]:
        return [m.rejected for m in self.inbox if m.HasField("rejected")]

    def vote(
        self,
        pid: str,
        choice: int = pb.CHOICE_APPROVE,
        *,
        round_: int = 1,
        option: str = "",
        reason: str = "because",
        sign_with: Ed25519PrivateKey | None = None,
        agent_id: str = "",
        signature: bytes | None = None,
    ) -> None:
        vote = pb.Vote(
            proposal_id=pid,
            agent_id=agent_id or self.agent_id,
            round=round_,
            choice=choice,  # type: ignore[arg-type]
            option=option,
            reason=reason,
        )
        vote.signature = (
            signature if signature is not None else signing.sign(sign_with or self.key, vote)
        )
        assert self.voter is not None
        self.core.on_vote(self.voter, vote)


class World:
    def __init__(self, store: MemoryConsensusStore | None = None, term: int = 7) -> None:
        self.clock = FakeClock()
        self.store = store or MemoryConsensusStore()
        self.core = ConsensusCore(self.store, self.clock, CFG, term=term, node_id="c1")
        self.agents: dict[str, Agent] = {}
        self.runner: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.runner = asyncio.ensure_future(self.core.run())
        await self.core.loaded.wait()

    async def connect(self, count: int, prefix: str = "a", **hello: Any) -> list[Agent]:
        made = []
        for i in range(count):
            agent_id = f"{prefix}{i:03d}"
            agent = Agent(self.core, agent_id)
            self.store.keys[agent_id] = signing.public_bytes(agent.key)
            agent.voter = await self.core.connect(
                pb.VoterHello(agent_id=agent_id, **hello), agent.send
            )
            self.agents[agent_id] = agent
            made.append(agent)
        return made

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def stop(self) -> None:
        if self.runner is not None:
            self.runner.cancel()
            with contextlib.suppress(BaseException):
                await self.runner
        await self.core.close()


@pytest.fixture
async def world() -> AsyncIterator[World]:
    w = World()
    await w.start()
    try:
        yield w
    finally:
        await w.stop()


async def propose(w: World, pid: str = "p1", **kw: Any) -> asyncio.Future[pb.Decision]:
    _, decision, created, fut = await w.core.propose(
        pb.ProposeRequest(proposal_id=pid, topic="t", **kw)
    )
    assert created
    assert decision is None
    assert fut is not None
    return fut


def all_vote(agents: list[Agent], pid: str, choice: int = pb.CHOICE_APPROVE, **kw: Any) -> None:
    for a in agents:
        a.vote(pid, choice, **kw)


# ---- QUORUM ----


async def test_quorum_decides_at_a_majority_and_its_votes_are_in_etcd_with_it(
    world: World,
) -> None:
    agents = await world.connect(10)
    done = await propose(world)
    assert all(len(a.requests("p1")) == 1 for a in agents)
    world.store.hold_votes = True  # etcd slow: the grouped vote writes have not landed
    all_vote(agents[:5], "p1")
    await world.settle()
    assert not done.done(), "5 of 10 is not a majority"
    agents[5].vote("p1")
    await world.settle()
    decision = done.result()
    # the decision did not wait for the vote writes: it carried the six records in
    # its own transaction, so etcd never holds a decision without its votes
    assert world.store.carried == 6
    assert {a for (pid, a) in world.store.votes if pid == "p1"} == {a.agent_id for a in agents[:6]}
    world.store.hold_votes = False
    world.store.release()
    assert decision.outcome == pb.OUTCOME_APPROVED
    assert (decision.eligible, decision.threshold, decision.votes_counted) == (10, 6, 6)
    assert decision.participation == pytest.approx(0.6)
    assert decision.tally["APPROVE"] == 6
    assert world.store.decision_writes == 1
    assert decision.winning_votes[0].reason == "because"


async def test_a_vote_already_in_etcd_is_not_carried_again(world: World) -> None:
    agents = await world.connect(4)
    done = await propose(world)
    all_vote(agents[:2], "p1")
    await world.settle()  # these two are committed by the grouped writes
    agents[2].vote("p1")
    await world.settle()
    assert done.result().votes_counted == 3
    assert world.store.carried <= 1


async def test_quorum_one_vote_short_stays_open_until_it_times_out(world: World) -> None:
    agents = await world.connect(10)
    done = await propose(world, timeout_s=5)
    all_vote(agents[:5], "p1")
    all_vote(agents[5:7], "p1", pb.CHOICE_REJECT)
    await world.settle()
    assert not done.done()
    await world.clock.advance(4.9)
    await world.settle()
    assert not done.done()
    await world.clock.advance(0.2)
    await world.settle()
    decision = done.result()
    assert decision.outcome == pb.OUTCOME_TIMED_OUT
    assert decision.votes_counted == 7
    assert decision.participation == pytest.approx(0.7)
    assert decision.latency_ms == pytest.approx(5000, abs=200)


async def test_no_quorum_is_decided_as_soon_as_no_choice_can_win(world: World) -> None:
    agents = await world.connect(4)
    done = await propose(world)
    all_vote(agents[:2], "p1")
    all_vote(agents[2:3], "p1", pb.CHOICE_REJECT)
    await world.settle()
    assert not done.done()  # approve can still reach 3
    agents[3].vote("p1", pb.CHOICE_ABSTAIN)
    await world.settle()
    assert done.result().outcome == pb.OUTCOME_NO_QUORUM


async def test_options_pick_the_winner_and_bad_votes_are_rejected_not_counted(world: World) -> None:
    agents = await world.connect(3)
    done = await propose(world, options=["red", "blue"])
    agents[0].vote("p1", pb.CHOICE_APPROVE)  # approve is not an answer to a choice
    agents[0].vote("p1", pb.CHOICE_OPTION, option="green")
    agents[0].vote("p1", pb.CHOICE_OPTION, option="blue", reason="")
    await world.settle()
    assert len(agents[0].rejections()) == 3
    for a in agents[:2]:
        a.vote("p1", pb.CHOICE_OPTION, option="blue")
    await world.settle()
    decision = done.result()
    assert (decision.outcome, decision.option) == (pb.OUTCOME_CHOSEN, "blue")
    assert not decision.excluded


async def test_voters_by_role_label_and_list_are_fixed_when_the_proposal_opens(
    world: World,
) -> None:
    reviewers = await world.connect(3, "r", roles=["reviewer"], labels={"team": "x"})
    await world.connect(3, "o", roles=["other"])
    _, _, _, _ = await world.core.propose(
        pb.ProposeRequest(proposal_id="byrole", topic="t", voters=pb.VoterSelector(role="reviewer"))
    )
    req = (await world.core.propose(pb.ProposeRequest(proposal_id="byrole", topic="t")))[0]
    assert list(req.voters) == [a.agent_id for a in reviewers]
    labels = pb.VoterSelector(labels=pb.LabelSelector(labels={"team": "x"}))
    p2, *_ = await world.core.propose(
        pb.ProposeRequest(proposal_id="bylabel", topic="t", voters=labels)
    )
    assert list(p2.voters) == [a.agent_id for a in reviewers]
    listed = pb.VoterSelector(agents=pb.AgentList(agent_ids=["o000", "ghost"]))
    p3, *_ = await world.core.propose(
        pb.ProposeRequest(proposal_id="bylist", topic="t", voters=listed)
    )
    assert list(p3.voters) == ["ghost", "o000"]
    assert p3.threshold == 2
    late = await world.connect(1, "late", roles=["reviewer"])
    assert not late[0].requests("byrole"), "an agent that connects later is not a voter"
    with pytest.raises(FailedPreconditionError, match="no eligible"):
        await world.core.propose(
            pb.ProposeRequest(topic="t", voters=pb.VoterSelector(role="nobody"))
        )


async def test_propose_is_idempotent_on_its_id(world: World) -> None:
    agents = await world.connect(3)
    await propose(world)
    again = await world.core.propose(pb.ProposeRequest(proposal_id="p1", topic="t"))
    assert again[2] is False
    assert again[3] is not None
    with pytest.raises(AlreadyExistsError):
        await world.core.propose(pb.ProposeRequest(proposal_id="p1", topic="other"))
    all_vote(agents, "p1")
    await world.settle()
    replay = await world.core.propose(pb.ProposeRequest(proposal_id="p1", topic="t"))
    assert replay[1] is not None
    assert replay[1].outcome == pb.OUTCOME_APPROVED
    assert len(world.store.proposals) == 1


@pytest.mark.parametrize(
    "selector",
    [
        {"voters": pb.VoterSelector(role="reviewer")},
        {"quorum": 3},
        {"protocol": pb.PROTOCOL_BFT, "max_faulty": 1},
    ],
)
async def test_a_replay_after_a_failover_gets_the_decision_whoever_is_connected(
    selector: dict[str, Any],
) -> None:
    """The decision's reply was lost with the instance that committed it; the client
    retries (same id) on the next one before any agent is back: it gets the decision,
    not FAILED_PRECONDITION for the voters connected now."""
    first = World()
    await first.start()
    try:
        agents = await first.connect(4, roles=["reviewer"])
        await propose(first, "r1", **selector)
        all_vote(agents, "r1")
        await first.settle()
        assert "r1" in first.store.decisions
    finally:
        await first.stop()
    second = World(first.store, term=9)
    await second.start()
    try:
        await second.connect(1, "late")  # no reviewer, and fewer than the quorum or BFT needs
        proposal, decision, created, pending = await second.core.propose(
            pb.ProposeRequest(proposal_id="r1", topic="t", **selector)
        )
        assert decision is not None
        assert decision.outcome == pb.OUTCOME_APPROVED
        assert (created, pending, proposal.proposal_id) == (False, None, "r1")
        assert len(proposal.voters) == 4
        with pytest.raises(AlreadyExistsError):
            await second.core.propose(pb.ProposeRequest(proposal_id="r1", topic="other"))
    finally:
        await second.stop()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("topic", "", "topic is required"),
        ("topic", "x" * 257, "topic is 257 bytes; the limit is 256"),
        ("payload", b"x" * (64 * 1024 + 1), "payload is 65537 bytes"),
        ("options", ["only"], "options needs 0 or at least 2"),
        ("options", [str(i) for i in range(33)], "options has 33 entries; the limit is 32"),
        ("options", ["a", "a"], "distinct"),
        ("timeout_s", 3601.0, "timeout_s"),
        ("proposal_id", "bad id!", "proposal_id"),
    ],
)
async def test_propose_validates_every_field_and_names_it(
    world: World, field: str, value: Any, message: str
) -> None:
    await world.connect(1)
    req = pb.ProposeRequest(topic="t")
    if isinstance(value, list):
        getattr(req, field).extend(value)
    else:
        setattr(req, field, value)
    with pytest.raises(InvalidArgumentError, match=message):
        await world.core.propose(req)


async def test_quorum_above_the_voters_is_refused(world: World) -> None:
    await world.connect(3)
    with pytest.raises(InvalidArgumentError, match="quorum 4"):
        await world.core.propose(pb.ProposeRequest(topic="t", quorum=4))


# ---- FAST ----


async def test_fast_decides_in_one_round_at_three_quarters(world: World) -> None:
    agents = await world.connect(8)
    done = await propose(world, protocol=pb.PROTOCOL_FAST)
    all_vote(agents[:5], "p1")
    await world.settle()
    assert not done.done()
    agents[5].vote("p1")
    await world.settle()
    assert (done.result().outcome, done.result().round) == (pb.OUTCOME_APPROVED, 1)


async def test_fast_split_goes_to_a_second_round_decided_by_majority(world: World) -> None:
    agents = await world.connect(8)
    done = await propose(world, protocol=pb.PROTOCOL_FAST)
    all_vote(agents[:5], "p1")
    all_vote(agents[5:8], "p1", pb.CHOICE_REJECT)  # 5 < 6 and nobody left: round 2
    await world.settle()
    assert not done.done()
    second = [a.requests("p1", 2) for a in agents]
    assert all(len(r) == 1 for r in second)
    assert dict(second[0][0].previous_tally) == {"APPROVE": 5, "REJECT": 3}
    assert world.store.proposals
    assert pb.Proposal.FromString(world.store.proposals["p1"]).round == 2
    agents[0].vote("p1", round_=1)  # a round-1 vote now is stale, not counted
    all_vote(agents[:5], "p1", round_=2)
    await world.settle()
    decision = done.result()
    assert (decision.outcome, decision.round, decision.threshold) == (pb.OUTCOME_APPROVED, 2, 5)


async def test_fast_round_one_ends_at_half_the_timeout(world: World) -> None:
    agents = await world.connect(4)
    done = await propose(world, protocol=pb.PROTOCOL_FAST, timeout_s=10)
    all_vote(agents[:2], "p1")  # 2 of 4, two silent: round 1 could still reach 3
    await world.settle()
    await world.clock.advance(5.1)
    await world.settle()
    assert agents[0].requests("p1", 2), "round 2 after half the timeout"
    all_vote(agents[:3], "p1", round_=2)
    await world.settle()
    assert done.result().round == 2


# ---- BFT ----


async def test_bft_excludes_forgers_equivocators_and_impersonators_and_reports_them(
    world: World,
) -> None:
    agents = await world.connect(10)  # f = 3, threshold 7
    done = await propose(world, protocol=pb.PROTOCOL_BFT)
    forger, equivocator, impostor = agents[0], agents[1], agents[2]
    forger.vote("p1", sign_with=signing.new_key())
    forger.vote("p1", signature=b"\x01" * 64)
    equivocator.vote("p1")
    equivocator.vote("p1", pb.CHOICE_REJECT)
    impostor.vote("p1", agent_id=agents[9].agent_id)
    agents[3].vote("p1")
    agents[3].vote("p1")  # the same vote again: a resend, not equivocation
    await world.settle()
    assert not done.done()
    all_vote(agents[3:9], "p1")
    await world.settle()
    assert not done.done(), "6 honest approvals are one short of 2f + 1 = 7"
    agents[9].vote("p1")
    await world.settle()
    decision = done.result()
    assert decision.outcome == pb.OUTCOME_APPROVED
    assert (decision.threshold, decision.votes_counted) == (7, 7)
    faults = {e.agent_id: e.fault for e in decision.excluded}
    assert faults == {
        forger.agent_id: pb.FAULT_FORGED_SIGNATURE,
        equivocator.agent_id: pb.FAULT_EQUIVOCATION,
        impostor.agent_id: pb.FAULT_UNKNOWN_AGENT,
    }
    stored = pb.VoteRecord.FromString(world.store.votes[("p1", equivocator.agent_id)])
    assert stored.excluded.fault == pb.FAULT_EQUIVOCATION
    assert stored.conflicting.choice == pb.CHOICE_REJECT
    assert len(stored.votes) == 1
    assert forger.rejections()[0].fault == pb.FAULT_FORGED_SIGNATURE
    reported = {(f.agent_id, f.fault) for f in world.core.faults}
    assert (impostor.agent_id, pb.FAULT_UNKNOWN_AGENT) in reported


async def test_bft_with_f_byzantine_cannot_decide_without_2f_plus_1_honest_matching(
    world: World,
) -> None:
    agents = await world.connect(4)  # f = 1, threshold 3
    done = await propose(world, protocol=pb.PROTOCOL_BFT, timeout_s=2)
    agents[0].vote("p1")
    agents[1].vote("p1")
    agents[2].vote("p1", sign_with=signing.new_key())  # forged: excluded
    await world.settle()
    assert not done.done()  # 2 valid + 1 pending (agents[3]) can still make 3
    agents[3].vote("p1", pb.CHOICE_REJECT)
    await world.settle()
    assert done.result().outcome == pb.OUTCOME_NO_QUORUM


async def test_bft_agent_without_a_registered_key_is_unknown(world: World) -> None:
    agents = await world.connect(4)
    del world.store.keys[agents[0].agent_id]
    ghost = Agent(world.core, agents[0].agent_id)
    ghost.voter = await world.core.connect(pb.VoterHello(agent_id=ghost.agent_id), ghost.send)
    assert agents[0].closed, "the reconnect replaced the older stream"
    done = await propose(world, protocol=pb.PROTOCOL_BFT)
    ghost.vote("p1")
    await world.settle()  # its key is looked up once more before it is excluded
    all_vote(agents[1:], "p1")
    await world.settle()
    decision = done.result()
    assert [(e.agent_id, e.fault) for e in decision.excluded] == [
        (ghost.agent_id, pb.FAULT_UNKNOWN_AGENT)
    ]


async def test_bft_key_registered_after_the_hello_is_found_when_the_agent_votes(
    world: World,
) -> None:
    """A pool whose lease was lost (etcd paused longer than its TTL) puts its agents'
    keys back only after they may have reconnected: an agent whose hello found no key
    but whose key is there by the time it votes is an honest voter, not UNKNOWN_AGENT."""
    agents = await world.connect(4)
    late = agents[0]
    key = world.store.keys.pop(late.agent_id)
    late.voter = await world.core.connect(pb.VoterHello(agent_id=late.agent_id), late.send)
    world.store.keys[late.agent_id] = key  # the pool registered it again
    done = await propose(world, protocol=pb.PROTOCOL_BFT, quorum=4)
    all_vote(agents, "p1")
    await world.settle()
    decision = done.result()
    assert decision.outcome == pb.OUTCOME_APPROVED
    assert (decision.votes_counted, list(decision.excluded)) == (4, [])
    assert not late.rejections()


async def test_bft_refuses_too_few_voters(world: World) -> None:
    await world.connect(3)
    with pytest.raises(FailedPreconditionError, match="n >= 3f"):
        await world.core.propose(
            pb.ProposeRequest(topic="t", protocol=pb.PROTOCOL_BFT, max_faulty=1)
        )


async def test_votes_on_unknown_proposals_are_reported(world: World) -> None:
    (agent,) = await world.connect(1)
    agent.vote("nope")
    await world.settle()
    assert [(f.agent_id, f.fault) for f in world.core.faults] == [
        (agent.agent_id, pb.FAULT_UNKNOWN_PROPOSAL)
    ]
    assert agent.rejections()[0].fault == pb.FAULT_UNKNOWN_PROPOSAL


async def test_a_vote_on_an_unknown_proposal_during_an_etcd_outage_keeps_the_term(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether the proposal is known cannot be read while etcd is away: that is no
    reason to end the term (every open proposal's waiter would get UNAVAILABLE)."""
    (agent,) = await world.connect(1)
    done = await propose(world, "p1")

    async def unreachable(_: str) -> pb.Proposal | None:
        raise StoreUnavailableError("etcd is unreachable (injected)")

    monkeypatch.setattr(world.store, "get_proposal", unreachable)
    agent.vote("late")
    await world.settle()
    assert world.core.failed is None
    agent.vote("p1")
    await world.settle()
    assert done.result().outcome == pb.OUTCOME_APPROVED


async def test_outsiders_are_reported_in_the_decision(world: World) -> None:
    insiders = await world.connect(2, "in")
    (outsider,) = await world.connect(1, "out")
    listed = pb.VoterSelector(agents=pb.AgentList(agent_ids=[a.agent_id for a in insiders]))
    _, _, _, done = await world.core.propose(
        pb.ProposeRequest(proposal_id="p1", topic="t", voters=listed)
    )
    assert done is not None
    outsider.vote("p1")
    all_vote(insiders, "p1")
    await world.settle()
    assert [e.agent_id for e in done.result().excluded] == [outsider.agent_id]


# ---- ORDERED, durability ----


async def test_ordered_decisions_get_consecutive_sequence_numbers(world: World) -> None:
    agents = await world.connect(3)
    futures = [await propose(world, f"o{i}", protocol=pb.PROTOCOL_ORDERED) for i in range(3)]
    for i in (2, 0, 1):
        all_vote(agents, f"o{i}")
        await world.settle()
    seqs = {f.result().proposal_id: f.result().sequence for f in futures}
    assert seqs == {"o2": 1, "o0": 2, "o1": 3}


async def test_a_new_term_finishes_an_open_proposal_from_its_committed_votes() -> None:
    first = World()
    await first.start()
    agents = await first.connect(10)
    await propose(first, timeout_s=10)
    all_vote(agents[:4], "p1")
    await first.settle()
    first.store.deposed = True  # the term ends (fence refused) before a decision
    await first.stop()
    first.store.deposed = False
    second = World(first.store, term=9)
    second.clock = first.clock
    second.core.clock = first.clock
    await second.start()
    try:
        newcomers = await second.connect(10)
        owed = [a for a in newcomers if a.requests("p1")]
        assert len(owed) == 6, "only the voters without a committed vote are asked again"
        owed[0].vote("p1")
        owed[1].vote("p1")
        await second.settle()
        decision = pb.Decision.FromString(first.store.decisions["p1"])
        assert decision.outcome == pb.OUTCOME_APPROVED
        assert decision.votes_counted == 6
        assert decision.term == 9
    finally:
        await second.stop()


async def test_a_new_term_times_out_a_proposal_whose_deadline_passed_meanwhile() -> None:
    first = World()
    await first.start()
    await first.connect(3)
    await propose(first, timeout_s=1)
    await first.stop()
    await first.clock.advance(5)
    second = World(first.store)
    second.core.clock = first.clock
    await second.start()
    try:
        await second.settle()
        decision = pb.Decision.FromString(first.store.decisions["p1"])
        assert decision.outcome == pb.OUTCOME_TIMED_OUT
        assert not first.store.open_ids
    finally:
        await second.stop()


async def test_agents_reconnecting_to_open_proposals_share_one_request_each(
    world: World,
) -> None:
    """After a failover every agent reconnects and is sent every open proposal it owes:
    one message per proposal and round, not a copy per agent (100 agents and 2,000
    open proposals of 1 KiB payloads took 1.3 GB)."""
    await world.connect(3)
    for i in range(5):
        await propose(world, f"m{i}", payload=b"x" * 1024)
    again = await world.connect(3)  # the same agents, on new streams
    for i in range(5):
        sent = [a.inbox[1 + i] for a in again]  # after the welcome
        assert all(m.request.proposal.proposal_id == f"m{i}" for m in sent)
        assert all(m is sent[0] for m in sent)


async def test_a_deposed_core_stops_and_fails_its_waiters(world: World) -> None:
    agents = await world.connect(3)
    done = await propose(world)
    world.store.deposed = True
    all_vote(agents, "p1")
    await world.settle()
    assert world.runner is not None
    with pytest.raises(NotLeaderError):
        await asyncio.wait_for(world.runner, 1)
    await world.core.close()
    with pytest.raises(NotLeaderError):
        done.result()
    assert all(a.closed for a in agents)


class SlowCreateStore(MemoryConsensusStore):
    """Applies a create at once and answers it only when `answer` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = asyncio.Event()
        self.applied = asyncio.Event()

    async def create_proposal(
        self, proposal: pb.Proposal
    ) -> tuple[pb.Proposal, pb.Decision | None, bool]:
        got = await super().create_proposal(proposal)
        self.applied.set()
        await self.answer.wait()
        return got


async def test_a_create_still_being_answered_when_the_term_ends_fails_its_caller() -> None:
    w = World(SlowCreateStore())
    await w.start()
    try:
        await w.connect(1)
        caller = asyncio.ensure_future(
            w.core.propose(pb.ProposeRequest(proposal_id="p1", topic="t"))
        )
        await asyncio.wait_for(w.store.applied.wait(), 1)  # type: ignore[attr-defined]
        await w.core.close()
        with pytest.raises(NotLeaderError, match="term ended"):
            await asyncio.wait_for(caller, 1)
    finally:
        await w.stop()


# ---- group commit of votes ----


async def test_votes_leave_in_few_transactions_packed_by_count_and_bytes() -> None:
    from services.consensus.store import VoteBatcher

    sent: list[list[tuple[bytes, bytes]]] = []
    gate = asyncio.Event()

    async def send(items: list[tuple[bytes, bytes]]) -> None:
        sent.append(items)
        await gate.wait()

    batcher = VoteBatcher(send, max_ops=120, max_bytes=10_000, max_inflight=1, sleep=asyncio.sleep)
    first = batcher.put(b"k0", b"v")
    await asyncio.sleep(0)
    futures = [batcher.put(f"k{i}".encode(), b"x" * 50) for i in range(1, 300)]
    gate.set()
    await asyncio.gather(first, *futures)
    # the first goes alone at once; the next 299 queue behind it and leave packed:
    # 10,000 bytes hold about 117 records of ~85 bytes, so 3 more transactions, not 299
    assert len(sent[0]) == 1
    assert len(sent) == 4
    assert sum(len(b) for b in sent) == 300
    assert all(sum(len(k) + len(v) + 32 for k, v in b) <= 10_000 for b in sent)
    assert batcher.transactions == 4


async def test_a_lost_vote_commit_is_sent_again_and_a_refused_fence_fails_the_waiters() -> None:
    from services._common.errors import StoreUnavailableError
    from services.consensus.store import VoteBatcher

    calls = 0

    async def flaky(items: list[tuple[bytes, bytes]]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreUnavailableError("reply lost (injected)")

    async def no_sleep(_: float) -> None:
        return None

    batcher = VoteBatcher(flaky, max_ops=120, max_bytes=10_000, max_inflight=4, sleep=no_sleep)
    await batcher.put(b"k", b"v")
    assert calls == 2

    async def refused(items: list[tuple[bytes, bytes]]) -> None:
        raise NotLeaderError("fence refused (injected)")

    batcher = VoteBatcher(refused, max_ops=120, max_bytes=10_000, max_inflight=4, sleep=no_sleep)
    with pytest.raises(NotLeaderError):
        await batcher.put(b"k", b"v")


async def test_an_equivocation_after_the_decision_is_still_recorded_and_reported(
    world: World,
) -> None:
    agents = await world.connect(4)
    done = await propose(world, protocol=pb.PROTOCOL_BFT)
    all_vote(agents[:3], "p1")
    await world.settle()
    assert done.result().outcome == pb.OUTCOME_APPROVED
    late = agents[3]
    late.vote("p1")
    late.vote("p1", pb.CHOICE_REJECT)
    await world.settle()
    stored = pb.VoteRecord.FromString(world.store.votes[("p1", late.agent_id)])
    assert stored.excluded.fault == pb.FAULT_EQUIVOCATION
    assert (late.agent_id, pb.FAULT_EQUIVOCATION) in {
        (f.agent_id, f.fault) for f in world.core.faults
    }


async def test_a_flood_of_votes_on_unknown_proposals_reads_etcd_a_few_at_a_time(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each vote on a proposal nobody made costs an etcd read: one stream's flood must
    not become as many reads at once. The rest are turned away unread, not as faults,
    and the stream may vote again once its reads are answered."""
    (agent,) = await world.connect(1)
    gate = asyncio.Event()
    reads: list[str] = []
    real = world.store.get_proposal

    async def slow(pid: str) -> pb.Proposal | None:
        reads.append(pid)
        await gate.wait()
        return await real(pid)

    monkeypatch.setattr(world.store, "get_proposal", slow)
    for i in range(50):
        agent.vote(f"nobody-{i}")
    await world.settle()
    assert len(reads) == MAX_PROBES
    turned_away = [r for r in agent.rejections() if "vote again" in r.reason]
    assert len(turned_away) == 50 - MAX_PROBES
    assert all(r.fault == pb.FAULT_UNSPECIFIED for r in turned_away)
    gate.set()
    await world.settle()
    assert len(world.core.faults) == MAX_PROBES  # the ones read: no such proposal
    agent.vote("nobody-again")  # the stream's reads are answered: it is read again
    await world.settle()
    assert reads[-1] == "nobody-again"


async def test_a_keyless_stream_flooding_bft_votes_reads_its_key_a_few_at_a_time(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A BFT vote from a stream whose hello found no key reads the key again: a flood
    of them is read MAX_PROBES at a time, the rest turned away unread."""
    agents = await world.connect(4)
    keyless = agents[0]
    world.store.keys.pop(keyless.agent_id)
    keyless.voter = await world.core.connect(pb.VoterHello(agent_id=keyless.agent_id), keyless.send)
    await propose(world, protocol=pb.PROTOCOL_BFT, quorum=4)
    gate = asyncio.Event()
    reads: list[str] = []
    real = world.store.public_key

    async def slow(agent_id: str) -> bytes:
        reads.append(agent_id)
        await gate.wait()
        return await real(agent_id)

    monkeypatch.setattr(world.store, "public_key", slow)
    for _ in range(30):
        keyless.vote("p1")
    await world.settle()
    assert len(reads) == MAX_PROBES
    assert len([r for r in keyless.rejections() if "vote again" in r.reason]) == 30 - MAX_PROBES
    gate.set()
    await world.settle()
    assert [f.fault for f in world.core.faults] == [pb.FAULT_UNKNOWN_AGENT]
