"""Each protocol's decision rule at and around its thresholds, and vote signatures."""

from __future__ import annotations

import pytest

from protos.agentmesh.v1 import consensus_pb2 as pb
from services.consensus import rules, signing
from services.consensus.rules import APPROVE, BFT, FAST, ORDERED, QUORUM, REJECT, Kind, RuleError

AR = (APPROVE, REJECT)


def verdict(protocol: int, thr: int, counts: dict[str, int], pending: int, round_: int = 1) -> Kind:
    return rules.evaluate(
        protocol=protocol,
        round_=round_,
        threshold_=thr,
        choices=AR,
        counts=counts,
        pending=pending,
    ).kind


@pytest.mark.parametrize(("n", "want"), [(1, 1), (2, 2), (3, 2), (4, 3), (99, 50), (100, 51)])
def test_quorum_and_ordered_need_a_strict_majority(n: int, want: int) -> None:
    assert rules.threshold(QUORUM, n) == want
    assert rules.threshold(ORDERED, n) == want


def test_quorum_decides_at_the_threshold_and_not_one_vote_before() -> None:
    thr = rules.threshold(QUORUM, 100)
    assert verdict(QUORUM, thr, {APPROVE: 50}, pending=50) is Kind.OPEN
    assert verdict(QUORUM, thr, {APPROVE: 51}, pending=49) is Kind.DECIDED
    # 50/50 with nobody left: nobody can reach 51
    assert verdict(QUORUM, thr, {APPROVE: 50, REJECT: 50}, pending=0) is Kind.NO_QUORUM
    # 50 approve, 49 reject, one voter left: approve can still win
    assert verdict(QUORUM, thr, {APPROVE: 50, REJECT: 49}, pending=1) is Kind.OPEN


def test_abstentions_never_win_and_can_make_a_quorum_impossible() -> None:
    thr = rules.threshold(QUORUM, 10)  # 6
    assert verdict(QUORUM, thr, {rules.ABSTAIN: 6}, pending=4) is Kind.NO_QUORUM
    assert verdict(QUORUM, thr, {rules.ABSTAIN: 4, APPROVE: 5}, pending=1) is Kind.OPEN
    assert verdict(QUORUM, thr, {rules.ABSTAIN: 4, APPROVE: 6}, pending=0) is Kind.DECIDED


@pytest.mark.parametrize(("n", "want"), [(1, 1), (3, 3), (4, 3), (5, 4), (8, 6), (100, 75)])
def test_fast_round_one_needs_three_quarters(n: int, want: int) -> None:
    assert rules.threshold(FAST, n, 1) == want
    assert rules.threshold(FAST, n, 2) == n // 2 + 1


def test_fast_goes_to_round_two_exactly_when_three_quarters_is_out_of_reach() -> None:
    thr = rules.threshold(FAST, 100)  # 75
    assert verdict(FAST, thr, {APPROVE: 74}, pending=1) is Kind.OPEN
    assert verdict(FAST, thr, {APPROVE: 75}, pending=0) is Kind.DECIDED
    assert verdict(FAST, thr, {APPROVE: 74, REJECT: 26}, pending=0) is Kind.NEXT_ROUND
    assert verdict(FAST, thr, {APPROVE: 60, REJECT: 26}, pending=14) is Kind.NEXT_ROUND
    assert verdict(FAST, thr, {APPROVE: 60, REJECT: 25}, pending=15) is Kind.OPEN
    # round 2 is decided by majority, and a hopeless round 2 has no third round
    thr2 = rules.threshold(FAST, 100, 2)
    assert verdict(FAST, thr2, {APPROVE: 51}, pending=49, round_=2) is Kind.DECIDED
    assert verdict(FAST, thr2, {APPROVE: 50, REJECT: 50}, pending=0, round_=2) is Kind.NO_QUORUM


@pytest.mark.parametrize(
    ("n", "f", "want"),
    [(1, 0, 1), (4, 1, 3), (7, 2, 5), (10, 3, 7), (100, 33, 67), (5, 1, 4), (6, 1, 4)],
)
def test_bft_threshold_is_2f_plus_1_at_n_3f_plus_1_and_an_honest_majority_beyond(
    n: int, f: int, want: int
) -> None:
    assert rules.bft_faulty(n) == f
    thr = rules.threshold(BFT, n, f=f)
    assert thr == want
    # whatever f byzantine voters do, the honest votes inside a quorum are a strict
    # majority of all honest voters
    assert thr - f > (n - f) / 2
    if n == 3 * f + 1:
        assert thr == 2 * f + 1


def test_bft_refuses_too_few_voters_for_the_faults_asked() -> None:
    assert rules.bft_faulty(4, 1) == 1
    with pytest.raises(RuleError, match="n >= 3f"):
        rules.bft_faulty(3, 1)
    with pytest.raises(RuleError, match="7 voters"):
        rules.bft_faulty(6, 2)


def test_bft_decides_with_2f_plus_1_matching_votes_not_2f() -> None:
    thr = rules.threshold(BFT, 4, f=1)
    assert verdict(BFT, thr, {APPROVE: 2}, pending=1) is Kind.OPEN
    assert verdict(BFT, thr, {APPROVE: 3}, pending=0) is Kind.DECIDED
    assert verdict(BFT, thr, {APPROVE: 2, REJECT: 1}, pending=0) is Kind.NO_QUORUM


def test_quorum_raises_a_threshold_and_never_lowers_it() -> None:
    assert rules.threshold(QUORUM, 10, quorum=8) == 8
    assert rules.threshold(QUORUM, 10, quorum=2) == 6
    assert rules.threshold(BFT, 4, quorum=4, f=1) == 4
    with pytest.raises(RuleError, match="more than"):
        rules.threshold(QUORUM, 10, quorum=11)
    with pytest.raises(RuleError, match="no eligible"):
        rules.threshold(QUORUM, 0)


def test_options_are_choices_and_the_winner_names_one() -> None:
    choices = rules.choices_of(["red", "blue"])
    result = rules.evaluate(
        protocol=QUORUM,
        round_=1,
        threshold_=2,
        choices=choices,
        counts={"option:blue": 2},
        pending=1,
    )
    assert result.kind is Kind.DECIDED
    assert rules.outcome_of(result.choice) == (pb.OUTCOME_CHOSEN, "blue")
    assert rules.outcome_of(APPROVE) == (pb.OUTCOME_APPROVED, "")
    assert rules.choice_name(pb.CHOICE_OPTION, "blue") == "option:blue"


# ---- signatures ----


def _vote(**kw: object) -> pb.Vote:
    base: dict[str, object] = dict(
        proposal_id="p1", agent_id="a1", round=1, choice=pb.CHOICE_APPROVE, reason="looks right"
    )
    base.update(kw)
    return pb.Vote(**base)  # type: ignore[arg-type]


def test_a_signed_vote_verifies_and_cannot_be_moved_to_another_proposal_round_or_agent() -> None:
    key = signing.new_key()
    public = signing.load_public(signing.public_bytes(key))
    assert public is not None
    vote = _vote()
    vote.signature = signing.sign(key, vote)
    assert signing.verify(public, vote)
    for change in (
        {"proposal_id": "p2"},
        {"round": 2},
        {"agent_id": "a2"},
        {"choice": pb.CHOICE_REJECT},
        {"reason": "looks wrong"},
    ):
        moved = _vote(**change)
        moved.signature = vote.signature
        assert not signing.verify(public, moved), change
    other = signing.load_public(signing.public_bytes(signing.new_key()))
    assert other is not None
    assert not signing.verify(other, vote)
    garbage = _vote(signature=b"\x00" * 64)
    assert not signing.verify(public, garbage)
    assert not signing.verify(public, _vote(signature=b"short"))
    assert signing.load_public(b"not a key") is None


def test_the_canonical_encoding_is_unambiguous() -> None:
    # moving bytes between adjacent fields changes the signed bytes
    a = _vote(proposal_id="ab", agent_id="c")
    b = _vote(proposal_id="a", agent_id="bc")
    assert signing.canonical(a) != signing.canonical(b)
