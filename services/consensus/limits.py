"""Every field a caller or an agent sends has a limit; INVALID_ARGUMENT names the field.

The limits keep the largest proposal, its vote records and the decision each one
etcd write well under etcd's 1.5 MiB request limit: a proposal of 64 KiB payload
and 1,000 named voters is about 200 KiB.
"""

from __future__ import annotations

import re

from protos.agentmesh.v1 import consensus_pb2 as pb
from services._common.errors import InvalidArgumentError
from services.consensus.rules import PROTOCOLS

MAX_ID = 128
MAX_TOPIC_BYTES = 256
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_OPTIONS = 32
MAX_OPTION_BYTES = 128
MAX_VOTERS = 1000
MAX_LABELS = 16
MAX_LABEL_BYTES = 128
MAX_REASON_BYTES = 1024
MAX_TIMEOUT_S = 3600.0
MAX_PROPOSER_BYTES = 256
LIST_PAGE_BYTES = 3 * 1024 * 1024
"""ListDecisions stops a page at this size, under a default gRPC client's 4 MiB receive
limit (a decision with 16 winning votes of 1 KiB reasons is about 20 KB)."""
LIST_READ_RECORDS = 100
"""Decisions read from etcd per range while listing (each well under 640 KiB, so a
read stays under the etcd client's 64 MiB receive limit)."""

_ID = re.compile(r"^[A-Za-z0-9._-]+$")


def check_id(value: str, field: str, required: bool = True) -> None:
    if not value:
        if required:
            raise InvalidArgumentError(f"{field} is required")
        return
    if len(value) > MAX_ID or not _ID.fullmatch(value):
        raise InvalidArgumentError(
            f"{field} {value[:40]!r} must be 1-{MAX_ID} characters of [A-Za-z0-9._-]"
        )


def _bytes(value: str | bytes, field: str, limit: int, required: bool = False) -> None:
    size = len(value.encode() if isinstance(value, str) else value)
    if required and not size:
        raise InvalidArgumentError(f"{field} is required")
    if size > limit:
        raise InvalidArgumentError(f"{field} is {size} bytes; the limit is {limit}")


def check_propose(req: pb.ProposeRequest) -> None:
    """Validate a ProposeRequest field by field (the first bad one is named)."""
    check_id(req.proposal_id, "proposal_id", required=False)
    _bytes(req.topic, "topic", MAX_TOPIC_BYTES, required=True)
    _bytes(req.payload, "payload", MAX_PAYLOAD_BYTES)
    _bytes(req.proposer, "proposer", MAX_PROPOSER_BYTES)
    options = list(req.options)
    if len(options) > MAX_OPTIONS:
        raise InvalidArgumentError(
            f"options has {len(options)} entries; the limit is {MAX_OPTIONS}"
        )
    if len(options) == 1:
        raise InvalidArgumentError(
            "options needs 0 or at least 2 entries (one option is no choice)"
        )
    for i, option in enumerate(options):
        _bytes(option, f"options[{i}]", MAX_OPTION_BYTES, required=True)
    if len(set(options)) != len(options):
        raise InvalidArgumentError("options must be distinct")
    if req.protocol and req.protocol not in PROTOCOLS:
        raise InvalidArgumentError(
            f"protocol {req.protocol} is unknown; use QUORUM, FAST, BFT or ORDERED"
        )
    if not 0 <= req.timeout_s <= MAX_TIMEOUT_S or req.timeout_s != req.timeout_s:
        raise InvalidArgumentError(f"timeout_s must be 0 (default) to {MAX_TIMEOUT_S:g} seconds")
    if req.max_faulty and req.protocol != pb.PROTOCOL_BFT:
        raise InvalidArgumentError("max_faulty applies to BFT proposals only")
    if req.quorum > MAX_VOTERS:
        raise InvalidArgumentError(f"quorum {req.quorum} is over the {MAX_VOTERS} voters limit")
    which = req.voters.WhichOneof("selector")
    if which == "role":
        check_id(req.voters.role, "voters.role")
    elif which == "labels":
        labels = req.voters.labels.labels
        if not labels:
            raise InvalidArgumentError("voters.labels needs at least one key=value")
        if len(labels) > MAX_LABELS:
            raise InvalidArgumentError(
                f"voters.labels has {len(labels)} entries; the limit is {MAX_LABELS}"
            )
        for key, value in labels.items():
            _bytes(key, "voters.labels key", MAX_LABEL_BYTES, required=True)
            _bytes(value, f"voters.labels[{key[:20]}]", MAX_LABEL_BYTES)
    elif which == "agents":
        ids = list(req.voters.agents.agent_ids)
        if not ids:
            raise InvalidArgumentError("voters.agents needs at least one agent id")
        if len(ids) > MAX_VOTERS:
            raise InvalidArgumentError(
                f"voters.agents has {len(ids)} ids; the limit is {MAX_VOTERS}"
            )
        for i, agent_id in enumerate(ids):
            check_id(agent_id, f"voters.agents[{i}]")
        if len(set(ids)) != len(ids):
            raise InvalidArgumentError("voters.agents must be distinct")


def check_hello(hello: pb.VoterHello) -> None:
    check_id(hello.agent_id, "hello.agent_id")
    _bytes(hello.pool_id, "hello.pool_id", MAX_ID)
    if len(hello.roles) > MAX_LABELS or len(hello.labels) > MAX_LABELS:
        raise InvalidArgumentError(f"hello has more than {MAX_LABELS} roles or labels")
    for role in hello.roles:
        _bytes(role, "hello.roles", MAX_LABEL_BYTES)
    for key, value in hello.labels.items():
        _bytes(key, "hello.labels key", MAX_LABEL_BYTES)
        _bytes(value, "hello.labels value", MAX_LABEL_BYTES)


def vote_size_problem(vote: pb.Vote) -> str:
    """Which field of a vote is over its limit ('' when none). Checked before anything
    else, so no vote record (nor the evidence of a fault) outgrows an etcd request."""
    if len(vote.reason.encode()) > MAX_REASON_BYTES:
        return f"reason is over {MAX_REASON_BYTES} bytes"
    if len(vote.agent_id.encode()) > MAX_ID:
        return f"agent_id is over {MAX_ID} characters"
    if len(vote.option.encode()) > MAX_OPTION_BYTES or len(vote.signature) > 128:
        return "option or signature is too long"
    return ""


def vote_problem(vote: pb.Vote, options: tuple[str, ...]) -> str:
    """What is malformed about a vote ('' when nothing): it is rejected, not recorded."""
    if not vote.reason:
        return "reason is required: every vote says why"
    problem = vote_size_problem(vote)
    if problem:
        return problem
    if vote.choice == pb.CHOICE_OPTION:
        if vote.option not in options:
            return f"option {vote.option[:40]!r} is not one of the proposal's options"
    elif vote.choice in (pb.CHOICE_APPROVE, pb.CHOICE_REJECT):
        if options:
            return "this proposal has options: choose one (CHOICE_OPTION) or abstain"
    elif vote.choice != pb.CHOICE_ABSTAIN:
        return "choice is required (APPROVE, REJECT, ABSTAIN or OPTION)"
    return ""
