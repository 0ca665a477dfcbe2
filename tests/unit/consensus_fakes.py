"""An in-memory consensus store with etcd's semantics, for unit tests of the core."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from protos.agentmesh.v1 import consensus_pb2 as pb
from services._common.errors import NotLeaderError


@dataclass
class MemoryConsensusStore:
    proposals: dict[str, bytes] = field(default_factory=dict)
    open_ids: set[str] = field(default_factory=set)
    votes: dict[tuple[str, str], bytes] = field(default_factory=dict)
    decisions: dict[str, bytes] = field(default_factory=dict)
    keys: dict[str, bytes] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    revision: int = 1
    deposed: bool = False
    decision_writes: int = 0
    vote_writes: int = 0
    carried: int = 0
    """Vote records written in a decision's own transaction."""
    hold_votes: bool = False
    """Votes stay uncommitted until `release()` (a slow etcd)."""
    _held: list[tuple[pb.VoteRecord, asyncio.Future[None]]] = field(default_factory=list)

    def _check(self) -> None:
        if self.deposed:
            raise NotLeaderError("term over (injected)")

    def put_vote(self, record: pb.VoteRecord) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        copy = pb.VoteRecord()
        copy.CopyFrom(record)
        if self.hold_votes:
            self._held.append((copy, fut))
        else:
            asyncio.get_running_loop().call_soon(self._apply, copy, fut)
        return fut

    def release(self) -> None:
        held, self._held = self._held, []
        for record, fut in held:
            self._apply(record, fut)

    def _apply(self, record: pb.VoteRecord, fut: asyncio.Future[None]) -> None:
        if fut.done():
            return
        if self.deposed:
            fut.set_exception(NotLeaderError("term over (injected)"))
            return
        self.vote_writes += 1
        self.revision += 1
        self.votes[(record.proposal_id, record.agent_id)] = record.SerializeToString()
        fut.set_result(None)

    async def create_proposal(
        self, proposal: pb.Proposal
    ) -> tuple[pb.Proposal, pb.Decision | None, bool]:
        await asyncio.sleep(0)
        self._check()
        pid = proposal.proposal_id
        if pid in self.proposals:
            stored = pb.Proposal.FromString(self.proposals[pid])
            decision = self.decisions.get(pid)
            return stored, pb.Decision.FromString(decision) if decision else None, False
        self.revision += 1
        self.proposals[pid] = proposal.SerializeToString()
        self.open_ids.add(pid)
        return proposal, None, True

    async def update_proposal(self, proposal: pb.Proposal) -> None:
        await asyncio.sleep(0)
        self._check()
        self.proposals[proposal.proposal_id] = proposal.SerializeToString()

    async def commit_decision(
        self,
        decision: pb.Decision,
        records: list[pb.VoteRecord] = (),  # type: ignore[assignment]
    ) -> pb.Decision:
        await asyncio.sleep(0)
        self._check()
        pid = decision.proposal_id
        if pid in self.decisions:
            return pb.Decision.FromString(self.decisions[pid])
        self.decision_writes += 1
        for record in records:
            self.votes[(record.proposal_id, record.agent_id)] = record.SerializeToString()
        self.carried += len(records)
        self.revision += 1
        out = pb.Decision()
        out.CopyFrom(decision)
        if out.protocol == pb.PROTOCOL_ORDERED:
            self.log.append(pid)
            out.sequence = len(self.log)
        self.decisions[pid] = out.SerializeToString()
        self.open_ids.discard(pid)
        out.revision = self.revision
        return out

    async def load_open(self) -> list[tuple[pb.Proposal, list[pb.VoteRecord]]]:
        out = []
        for pid in sorted(self.open_ids):
            out.append((pb.Proposal.FromString(self.proposals[pid]), await self.votes_of(pid)))
        return out

    async def public_key(self, agent_id: str) -> bytes | None:
        return self.keys.get(agent_id)

    async def get_proposal(self, proposal_id: str) -> pb.Proposal | None:
        raw = self.proposals.get(proposal_id)
        return pb.Proposal.FromString(raw) if raw else None

    async def get_decision(self, proposal_id: str) -> pb.Decision | None:
        raw = self.decisions.get(proposal_id)
        return pb.Decision.FromString(raw) if raw else None

    async def votes_of(self, proposal_id: str) -> list[pb.VoteRecord]:
        return [
            pb.VoteRecord.FromString(raw)
            for (pid, _), raw in sorted(self.votes.items())
            if pid == proposal_id
        ]
