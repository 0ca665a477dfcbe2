"""Local agents' voting policies and byzantine behaviours (no sockets)."""

from __future__ import annotations

import json

import pytest

from protos.agentmesh.v1 import consensus_pb2 as pb
from services._common.clock import FakeClock
from services.agent_pool.voter import Policy, VoterPool, parse_byzantine
from services.consensus import signing


def request(
    pid: str = "p1", options: tuple[str, ...] = (), payload: object = None, **kw: object
) -> pb.VoteRequest:
    proposal = pb.Proposal(proposal_id=pid, topic="t", options=options, **kw)  # type: ignore[arg-type]
    if payload is not None:
        proposal.payload = json.dumps(payload).encode()
    return pb.VoteRequest(proposal=proposal, round=1)


@pytest.mark.parametrize(
    "spec",
    [
        "always",
        "never",
        "abstain",
        "silent",
        "random:7",
        "random:7:0.9",
        "field:ok",
        "field:env=prod",
    ],
)
def test_policies_parse(spec: str) -> None:
    assert Policy.parse(spec).kind == spec.split(":")[0]


@pytest.mark.parametrize("spec", ["sometimes", "random:x", "random:1:2", "field:", "always:1"])
def test_bad_policies_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="vote policy"):
        Policy.parse(spec)


def test_simple_policies_always_give_a_reason() -> None:
    assert Policy.parse("always").decide(request(), "a") == (
        pb.CHOICE_APPROVE,
        "",
        "policy: always approve",
    )
    assert Policy.parse("always").decide(request(options=("x", "y")), "a")[:2] == (
        pb.CHOICE_OPTION,
        "x",
    )
    assert Policy.parse("never").decide(request(), "a")[0] == pb.CHOICE_REJECT  # type: ignore[index]
    assert Policy.parse("abstain").decide(request(), "a")[0] == pb.CHOICE_ABSTAIN  # type: ignore[index]
    assert Policy.parse("silent").decide(request(), "a") is None
    for spec in ("always", "never", "abstain", "random:1", "field:x"):
        decided = Policy.parse(spec).decide(request(), "a")
        assert decided is not None
        assert decided[2]


def test_seeded_random_is_reproducible_and_depends_on_seed_and_agent() -> None:
    policy = Policy.parse("random:42")
    votes = [policy.decide(request(f"p{i}"), "a")[0] for i in range(200)]  # type: ignore[index]
    assert votes == [Policy.parse("random:42").decide(request(f"p{i}"), "a")[0] for i in range(200)]  # type: ignore[index]
    assert 60 < votes.count(pb.CHOICE_APPROVE) < 140
    other = [Policy.parse("random:43").decide(request(f"p{i}"), "a")[0] for i in range(200)]  # type: ignore[index]
    assert other != votes
    mostly = [Policy.parse("random:1:0.9").decide(request(f"p{i}"), "b")[0] for i in range(200)]  # type: ignore[index]
    assert mostly.count(pb.CHOICE_APPROVE) > 160


def test_field_policy_reads_the_payload() -> None:
    truthy = Policy.parse("field:tests_pass")
    assert truthy.decide(request(payload={"tests_pass": True}), "a")[0] == pb.CHOICE_APPROVE  # type: ignore[index]
    assert truthy.decide(request(payload={"tests_pass": False}), "a")[0] == pb.CHOICE_REJECT  # type: ignore[index]
    assert truthy.decide(request(payload={}), "a")[0] == pb.CHOICE_ABSTAIN  # type: ignore[index]
    equals = Policy.parse("field:env=prod")
    assert equals.decide(request(payload={"env": "prod"}), "a")[0] == pb.CHOICE_APPROVE  # type: ignore[index]
    assert equals.decide(request(payload={"env": "dev"}), "a")[0] == pb.CHOICE_REJECT  # type: ignore[index]
    pick = Policy.parse("field:plan")
    assert pick.decide(request(options=("A", "B"), payload={"plan": "B"}), "a")[:2] == (
        pb.CHOICE_OPTION,
        "B",
    )
    assert (
        pick.decide(request(options=("A", "B"), payload={"plan": "C"}), "a")[0] == pb.CHOICE_ABSTAIN
    )  # type: ignore[index]


def test_byzantine_specs() -> None:
    assert parse_byzantine(("forge:2", "silent:1")) == ["forge", "forge", "silent"]
    with pytest.raises(ValueError, match="MODE:COUNT"):
        parse_byzantine(("lie:1",))


async def test_honest_agents_repeat_their_vote_and_byzantine_ones_misbehave() -> None:
    pool = VoterPool(
        None,  # type: ignore[arg-type]  # _answer needs no etcd
        "pool",
        lambda: 0,
        Policy.parse("random:3"),
        FakeClock(),
        ["forge", "equivocate", "impersonate", "unknown-proposal", "silent"],
    )
    # register() makes keys and hands out modes (and writes etcd): done by hand here
    agents = ["b-forge", "b-equiv", "b-imp", "b-unknown", "b-silent", "honest"]
    for agent_id, mode in zip(agents, [*pool._modes, ""], strict=True):
        pool.keys[agent_id] = signing.new_key()
        if mode:
            pool.mode[agent_id] = mode
    req = request(protocol=pb.PROTOCOL_BFT)
    public = {a: signing.load_public(signing.public_bytes(k)) for a, k in pool.keys.items()}

    honest = pool._answer("honest", req)
    assert len(honest) == 1
    assert signing.verify(public["honest"], honest[0])  # type: ignore[arg-type]
    assert pool._answer("honest", req) == honest, "a re-request gets the same vote"

    (forged,) = pool._answer("b-forge", req)
    assert not signing.verify(public["b-forge"], forged)  # type: ignore[arg-type]
    first, second = pool._answer("b-equiv", req)
    assert first.choice != second.choice
    assert signing.verify(public["b-equiv"], first)
    assert signing.verify(public["b-equiv"], second)
    (imp,) = pool._answer("b-imp", req)
    assert imp.agent_id != "b-imp"
    real, ghost = pool._answer("b-unknown", req)
    assert real.proposal_id == "p1"
    assert ghost.proposal_id != "p1"
    assert pool._answer("b-silent", req) == []
