"""Consensus: `propose` a question to the agents, and read the `decisions`."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import typer
from rich.table import Table

from services.cli.common import (
    CLIENT_RETRY_S,
    Cluster,
    Etcd,
    call,
    console,
    fail,
    id_column,
    parse_labels,
    telling_retries,
    where,
)
from services.consensus import limits

PROTOCOL_NAMES = ("quorum", "fast", "bft", "ordered")


def _protocol(name: str) -> int:
    from protos.agentmesh.v1 import consensus_pb2 as pb

    if name.lower() not in PROTOCOL_NAMES:
        fail(f"--protocol {name!r} is unknown; use {', '.join(PROTOCOL_NAMES)}", 2)
    return int(pb.Protocol.Value("PROTOCOL_" + name.upper()))


def _decision_row(d: Any) -> list[str]:
    from protos.agentmesh.v1 import consensus_pb2 as pb

    outcome = pb.Outcome.Name(d.outcome).removeprefix("OUTCOME_")
    if d.option:
        outcome += f" {d.option}"
    return [
        d.proposal_id,
        pb.Protocol.Name(d.protocol).removeprefix("PROTOCOL_"),
        outcome,
        str(d.round),
        f"{d.votes_counted}/{d.eligible} (need {d.threshold})",
        f"{d.participation:.0%}",
        f"{d.latency_ms:.1f}",
        ",".join(
            f"{e.agent_id}:{pb.Fault.Name(e.fault).removeprefix('FAULT_')}" for e in d.excluded
        )[:60]
        or "-",
        str(d.sequence or "-"),
        d.topic[:40],
    ]


def _decision_table(decisions: list[Any], title: str = "") -> Table:
    table = Table(title=title or None)
    id_column(table, "proposal", (d.proposal_id for d in decisions))
    for col in (
        "protocol",
        "outcome",
        "round",
        "votes",
        "participation",
        "latency ms",
        "excluded",
        "seq",
        "topic",
    ):
        table.add_column(col)
    for d in decisions:
        table.add_row(*_decision_row(d))
    return table


def propose(
    topic: str = typer.Argument(..., help="what is being decided (1-256 bytes)"),
    payload: str = typer.Option("", help="context for the voters (at most 64 KiB)"),
    option: list[str] = typer.Option([], help="a choice (repeat; none: approve or reject)"),
    protocol: str = typer.Option("quorum", help="quorum | fast | bft | ordered"),
    role: str = typer.Option("", help="only agents with this role vote"),
    label: list[str] = typer.Option([], help="only agents with this label key=value (repeatable)"),
    agent: list[str] = typer.Option([], help="exactly these agents vote (repeatable)"),
    quorum: int = typer.Option(0, help="votes a choice needs (raises the protocol's threshold)"),
    timeout_s: float = typer.Option(30.0, help="seconds until TIMED_OUT"),
    max_faulty: int = typer.Option(0, help="BFT: faulty voters tolerated (0: the most n allows)"),
    proposal_id: str | None = typer.Option(
        None, "--id", help="client-chosen id (makes retries safe)"
    ),
    wait: bool = typer.Option(True, help="wait for the decision (--no-wait returns at once)"),
    as_json: bool = typer.Option(False, "--json", help="print the response as proto JSON"),
    etcd: Etcd = None,
    cluster: Cluster = None,
) -> None:
    """Open a proposal for the agents to vote on, and (by default) wait for its decision."""
    from google.protobuf import json_format

    from protos.agentmesh.v1 import consensus_pb2 as pb
    from services.consensus.client import ConsensusClient

    if sum(bool(x) for x in (role, label, agent)) > 1:
        fail("give at most one of --role, --label, --agent", 2)
    if not 0 <= timeout_s <= limits.MAX_TIMEOUT_S:  # also refuses nan
        fail(
            f"--timeout-s {timeout_s:g} is out of range: use 0 to {limits.MAX_TIMEOUT_S:g} (0: 30)",
            2,
        )
    for flag, value in (("--quorum", quorum), ("--max-faulty", max_faulty)):
        if not 0 <= value <= limits.MAX_VOTERS:
            fail(f"{flag} {value} is out of range: use 0 to {limits.MAX_VOTERS:,}", 2)
    req = pb.ProposeRequest(
        proposal_id=proposal_id or "",
        topic=topic,
        payload=payload.encode(),
        options=option,
        protocol=_protocol(protocol),  # type: ignore[arg-type]
        quorum=quorum,
        timeout_s=timeout_s,
        max_faulty=max_faulty,
        wait=wait,
        proposer=f"cli:{os.environ.get('USER', '')}",
    )
    if role:
        req.voters.role = role
    elif label:
        req.voters.labels.labels.update(parse_labels(label))
    elif agent:
        req.voters.agents.agent_ids.extend(agent)
    else:
        req.voters.all = True
    at = where(etcd, cluster)

    async def go() -> Any:
        async with telling_retries(
            ConsensusClient(at.etcd, at.cluster, retry_s=CLIENT_RETRY_S)
        ) as client:
            return await client.propose(req)

    resp = call(go())
    if as_json:
        print(json_format.MessageToJson(resp))
        return
    p = resp.proposal
    console.print(
        f"proposal {p.proposal_id} ({'created' if resp.created else 'exists'}): "
        f"{len(p.voters)} voters, threshold {p.threshold}"
    )
    if resp.HasField("decision"):
        console.print(_decision_table([resp.decision]))
        for v in resp.decision.winning_votes[:5]:
            console.print(f"  {v.agent_id}: {v.reason}", markup=False)


def decisions(
    proposal_id: str | None = typer.Argument(None, help="show this one decision"),
    protocol: str = typer.Option("", help="only this protocol"),
    limit: int = typer.Option(50, help="rows to show (1-1000)"),
    watch: bool = typer.Option(False, help="then follow new decisions as they are committed"),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table"),
    etcd: Etcd = None,
    cluster: Cluster = None,
) -> None:
    """Decisions in commit order (the order every observer sees), or one by id."""
    from google.protobuf import json_format

    from services.consensus.client import ConsensusClient
    from services.consensus.servicer import MAX_PAGE

    if not 1 <= limit <= MAX_PAGE:
        fail(f"--limit {limit} is out of range: use 1 to {MAX_PAGE}", 2)
    proto = _protocol(protocol) if protocol else 0
    at = where(etcd, cluster)

    def show(items: list[Any]) -> None:
        if as_json:
            for d in items:
                print(json_format.MessageToJson(d, indent=None))
        else:
            console.print(_decision_table(items))

    async def go() -> None:
        async with telling_retries(
            ConsensusClient(at.etcd, at.cluster, retry_s=CLIENT_RETRY_S)
        ) as client:
            if proposal_id:
                d = await client.decision(proposal_id)
                show([d])
                for v in d.winning_votes:
                    console.print(f"  {v.agent_id}: {v.reason}", markup=False)
                return
            resp = await client.list_decisions(protocol=proto, page_size=limit)
            show(list(resp.decisions))
            if not watch:
                return
            after = resp.decisions[-1].revision if resp.decisions else 0
            async for d in client.watch_decisions(proto, after):
                show([d])

    with contextlib.suppress(KeyboardInterrupt):
        call(go())
