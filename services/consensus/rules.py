"""The decision rule of each protocol: pure functions of counts, no I/O, no clock.

Every threshold here is the number of matching votes one choice needs, out of `n`
eligible voters fixed when the proposal opened. A `quorum` from the proposer may
raise a threshold, never lower it below the protocol's guarantee.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from protos.agentmesh.v1 import consensus_pb2 as pb

QUORUM = pb.PROTOCOL_QUORUM
FAST = pb.PROTOCOL_FAST
BFT = pb.PROTOCOL_BFT
ORDERED = pb.PROTOCOL_ORDERED
PROTOCOLS: dict[int, str] = {QUORUM: "QUORUM", FAST: "FAST", BFT: "BFT", ORDERED: "ORDERED"}

ABSTAIN = "ABSTAIN"
APPROVE = "APPROVE"
REJECT = "REJECT"


class RuleError(ValueError):
    """The proposal cannot be decided under its protocol (too few voters, a bad quorum)."""


def majority(n: int) -> int:
    return n // 2 + 1


def fast_threshold(n: int) -> int:
    """At least three quarters: ceil(3n / 4)."""
    return (3 * n + 3) // 4


def bft_faulty(n: int, requested: int = 0) -> int:
    """f, the byzantine voters tolerated: `requested`, or the most n allows.

    Raises RuleError when n < 3f + 1 (too few voters to tolerate f)."""
    if n < 1:
        raise RuleError("BFT needs at least one eligible voter")
    f = requested or (n - 1) // 3
    if n < 3 * f + 1:
        raise RuleError(f"BFT with f={f} needs n >= 3f + 1 = {3 * f + 1} voters; {n} are eligible")
    return f


def bft_threshold(n: int, f: int) -> int:
    """2f + 1 when n = 3f + 1; in general the least q with q - f > (n - f) / 2.

    So whatever f voters do, the votes for the decided choice include a strict
    majority of the honest voters. With n = 3f + 1 that is exactly 2f + 1; with
    more voters than 3f + 1, 2f + 1 alone would let f byzantine votes tip a split
    honest vote (n = 3f + 2: 2f + 1 includes only f + 1 of 2f + 2 honest voters).
    """
    return max(2 * f + 1, (n + f) // 2 + 1)


def threshold(protocol: int, n: int, round_: int = 1, quorum: int = 0, f: int = 0) -> int:
    """Votes one choice needs in `round_` among `n` eligible voters."""
    if n < 1:
        raise RuleError("no eligible voters")
    if quorum > n:
        raise RuleError(f"quorum {quorum} is more than the {n} eligible voters")
    if protocol == FAST and round_ == 1:
        base = fast_threshold(n)
    elif protocol == BFT:
        base = bft_threshold(n, f)
    elif protocol in (QUORUM, ORDERED, FAST):
        base = majority(n)
    else:
        raise RuleError(f"unknown protocol {protocol}")
    return max(base, quorum)


class Kind(Enum):
    OPEN = "open"
    DECIDED = "decided"
    NEXT_ROUND = "next_round"
    NO_QUORUM = "no_quorum"


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    choice: str = ""
    """The winning choice name (APPROVE, REJECT or option:<name>) when DECIDED."""


def evaluate(
    *,
    protocol: int,
    round_: int,
    threshold_: int,
    choices: tuple[str, ...],
    counts: Mapping[str, int],
    pending: int,
) -> Verdict:
    """The verdict on one round.

    Args:
        choices: the winnable choice names (APPROVE and REJECT, or the options).
        counts: counted votes per choice name (ABSTAIN may appear; it never wins).
        pending: eligible voters who may still cast a counting vote this round (not
            yet voted, not excluded).

    A choice at the threshold decides. When no choice can reach it even if every
    pending voter joined it, FAST's first round moves on to round 2 and every
    other round ends in NO_QUORUM. Otherwise the round stays open.
    """
    best = ""
    best_count = -1
    for choice in choices:
        c = counts.get(choice, 0)
        if c > best_count:
            best, best_count = choice, c
    if best_count >= threshold_:
        return Verdict(Kind.DECIDED, best)
    if best_count + pending < threshold_:
        if protocol == FAST and round_ == 1:
            return Verdict(Kind.NEXT_ROUND)
        return Verdict(Kind.NO_QUORUM)
    return Verdict(Kind.OPEN)


def choice_name(choice: int, option: str = "") -> str:
    """The tally key of a vote: APPROVE, REJECT, ABSTAIN or option:<name>."""
    if choice == pb.CHOICE_OPTION:
        return "option:" + option
    return _NAMES.get(choice, "")


_NAMES: dict[int, str] = {
    pb.CHOICE_APPROVE: APPROVE,
    pb.CHOICE_REJECT: REJECT,
    pb.CHOICE_ABSTAIN: ABSTAIN,
}


def choices_of(options: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The winnable choices of a proposal."""
    if options:
        return tuple("option:" + o for o in options)
    return (APPROVE, REJECT)


def outcome_of(choice: str) -> tuple[int, str]:
    """(Outcome, option) for a winning choice name."""
    if choice == APPROVE:
        return pb.OUTCOME_APPROVED, ""
    if choice == REJECT:
        return pb.OUTCOME_REJECTED, ""
    return pb.OUTCOME_CHOSEN, choice.removeprefix("option:")
