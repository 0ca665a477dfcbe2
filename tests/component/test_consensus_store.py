"""The consensus store against a real etcd: writes whose reply is lost are sent again
and still take effect once (decisions, ORDERED sequence numbers, proposals)."""

from __future__ import annotations

from typing import Any

from protos.agentmesh.v1 import consensus_pb2 as pb
from registry.errors import StoreUnavailableError
from registry.etcd import Etcd
from services.consensus.store import ConsensusStore


class LosingFence:
    """Applies each transaction, then loses the reply of the first `lose` ones (as when
    etcd commits and the connection drops before the answer arrives)."""

    def __init__(self, etcd: Etcd, lose: int) -> None:
        self.etcd = etcd
        self.lose = lose
        self.sent = 0

    async def __call__(self, request: Any) -> Any:
        self.sent += 1
        resp = await self.etcd.txn_request(request)
        if self.lose:
            self.lose -= 1
            raise StoreUnavailableError("reply lost (injected)")
        return resp


async def no_sleep(_: float) -> None:
    return None


def decision(pid: str, protocol: int = pb.PROTOCOL_QUORUM) -> pb.Decision:
    return pb.Decision(proposal_id=pid, protocol=protocol, outcome=pb.OUTCOME_APPROVED)  # type: ignore[arg-type]


async def test_a_decision_whose_reply_was_lost_is_written_once(etcd: Etcd) -> None:
    fence = LosingFence(etcd, lose=1)
    store = ConsensusStore(etcd, fence, sleep=no_sleep)
    vote = pb.VoteRecord(proposal_id="d1", agent_id="a1", votes=[pb.Vote(reason="r")])
    stored = await store.commit_decision(decision("d1"), [vote])
    assert fence.sent == 2
    assert stored.proposal_id == "d1"
    assert stored.revision > 0
    again = await store.commit_decision(decision("d1"))
    assert again.revision == stored.revision, "create-only: the first decision stands"
    assert [r.agent_id for r in await store.votes_of("d1")] == ["a1"]


async def test_ordered_sequence_numbers_survive_lost_replies_without_gaps(etcd: Etcd) -> None:
    fence = LosingFence(etcd, lose=1)
    store = ConsensusStore(etcd, fence, sleep=no_sleep)
    seqs = []
    for i in range(3):
        fence.lose = 1  # every commit loses its first reply
        seqs.append((await store.commit_decision(decision(f"o{i}", pb.PROTOCOL_ORDERED))).sequence)
    assert seqs == [1, 2, 3]
    # a new active instance (a fresh store) continues the log where it is
    later = ConsensusStore(etcd, LosingFence(etcd, lose=0), sleep=no_sleep)
    assert (await later.commit_decision(decision("o3", pb.PROTOCOL_ORDERED))).sequence == 4
    log = await etcd.range(etcd.key("log") + b"/")
    assert [bytes(kv.value).decode() for kv in log.kvs] == ["o0", "o1", "o2", "o3"]
    listed, cursor = await later.list_decisions(0, 10)
    assert [d.sequence for d in listed] == [1, 2, 3, 4]
    assert cursor == 0


async def test_a_proposal_created_with_a_lost_reply_is_known_as_mine(etcd: Etcd) -> None:
    store = ConsensusStore(etcd, LosingFence(etcd, lose=1), sleep=no_sleep)
    proposal = pb.Proposal(proposal_id="p1", topic="t", created_at_us=123, term=9)
    stored, dec, created = await store.create_proposal(proposal)
    assert created, "the retry found the write it had made itself"
    assert dec is None
    assert stored == proposal
    other = pb.Proposal(proposal_id="p1", topic="t", created_at_us=456, term=9)
    _, _, created = await store.create_proposal(other)
    assert not created
    loaded = await store.load_open()
    assert [p.proposal_id for p, _ in loaded] == ["p1"]


async def test_the_load_finds_each_open_proposal_with_its_votes_and_skips_the_decided(
    etcd: Etcd,
) -> None:
    store = ConsensusStore(etcd, LosingFence(etcd, lose=0), sleep=no_sleep)
    for i in range(40):
        await store.create_proposal(pb.Proposal(proposal_id=f"l{i:02d}", topic="t", term=1))
    for i in range(0, 40, 3):
        await store.put_vote(
            pb.VoteRecord(proposal_id=f"l{i:02d}", agent_id="a1", votes=[pb.Vote(reason="r")])
        )
    for i in range(0, 40, 4):
        await store.commit_decision(decision(f"l{i:02d}"))
    # an open marker whose decision landed without removing it, and one without a proposal
    await etcd.put(etcd.key("decisions", "l01"), decision("l01").SerializeToString())
    await etcd.put(etcd.key("open", "ghost"), b"")
    loaded = {p.proposal_id: [r.agent_id for r in votes] for p, votes in await store.load_open()}
    want = {f"l{i:02d}" for i in range(40) if i % 4 and i != 1}
    assert set(loaded) == want
    assert all(loaded[pid] == (["a1"] if int(pid[1:]) % 3 == 0 else []) for pid in want)
