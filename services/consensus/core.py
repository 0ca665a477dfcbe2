"""The consensus core: proposals, vote intake, decisions and timeouts. No gRPC here.

One core per term of the active instance. It counts a vote only once the vote is
committed to etcd, and commits a decision only from counted votes, so a new
active instance that loads the same records reaches the same verdict: an open
proposal is finished by whoever holds the term, or times out, never left open.
Time comes from the injected Clock (deadlines are wall-clock microseconds, stored
with the proposal, so they hold across failover).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import secrets
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protos.agentmesh.v1 import consensus_pb2 as pb
from services._common.clock import Clock
from services._common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotLeaderError,
    ResourceExhaustedError,
    StoreUnavailableError,
)
from services.consensus import limits, rules, signing
from services.consensus.config import ConsensusConfig

log = logging.getLogger(__name__)

RECENT_DECISIONS = 10_000
"""Decided ids remembered, so a late vote is ignored rather than reported as a fault."""
RECENT_FAULTS = 100
FINISHED_KEPT = 1000
"""Decided proposals whose votes stay in memory, for faults that show after a decision."""
OUTSIDERS_PER_PROPOSAL = 100
WINNING_VOTES_SHOWN = 16
CARRIED_RECORDS = 100
"""Vote records a decision's transaction carries at most (etcd: 128 ops a transaction)."""
CARRIED_BYTES = 768 * 1024
"""... and their bytes at most (etcd refuses requests over 1.5 MiB)."""
TIMER_IDLE_S = 3600.0
MAX_PROBES = 8
"""Votes a stream may have waiting on an etcd read (on an unknown proposal, or a BFT
vote whose key was missing at hello)."""

Send = Callable[[pb.ConsensusMessage | None], None]


class Store(Protocol):
    def put_vote(self, record: pb.VoteRecord) -> asyncio.Future[None]:
        """Queue the record's current state (serialized at once) for a grouped write."""
        ...

    async def create_proposal(
        self, proposal: pb.Proposal
    ) -> tuple[pb.Proposal, pb.Decision | None, bool]: ...

    async def update_proposal(self, proposal: pb.Proposal) -> None: ...

    async def commit_decision(
        self, decision: pb.Decision, records: list[pb.VoteRecord] = ...
    ) -> pb.Decision: ...

    async def load_open(self) -> list[tuple[pb.Proposal, list[pb.VoteRecord]]]: ...

    async def public_key(self, agent_id: str) -> bytes | None: ...

    async def get_proposal(self, proposal_id: str) -> pb.Proposal | None: ...

    async def get_decision(self, proposal_id: str) -> pb.Decision | None: ...

    async def votes_of(self, proposal_id: str) -> list[pb.VoteRecord]: ...


@dataclass(eq=False)
class Voter:
    """An agent with an open Participate stream."""

    agent_id: str
    pool_id: str
    roles: frozenset[str]
    labels: dict[str, str]
    send: Send
    key: Ed25519PublicKey | None = None
    probes: int = 0
    """Its votes on unknown proposals whose etcd read is in flight (`MAX_PROBES`)."""


@dataclass(eq=False)
class Open:
    """An undecided proposal and what is known of its votes."""

    proposal: pb.Proposal
    voters: frozenset[str]
    choices: tuple[str, ...]
    done: asyncio.Future[pb.Decision]
    records: dict[str, pb.VoteRecord] = field(default_factory=dict)
    """Each agent's record as this instance wants it in etcd (may be ahead of etcd)."""
    counted: dict[str, str] = field(default_factory=dict)
    """Agents with a valid vote in the current round → its choice name. A vote counts
    from the moment it is validated; the decision that rests on it is committed in
    one transaction with every record not yet in etcd, so a decision never rests on
    a vote etcd does not have."""
    counts: Counter[str] = field(default_factory=Counter)
    excluded: set[str] = field(default_factory=set)
    outsiders: list[pb.Exclusion] = field(default_factory=list)
    writing: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    again: set[str] = field(default_factory=set)
    """Agents whose record changed while a write of it was in flight."""
    version: Counter[str] = field(default_factory=Counter)
    dirty: set[str] = field(default_factory=set)
    """Agents whose latest record is not known to be in etcd."""
    cleaned: asyncio.Event = field(default_factory=asyncio.Event)
    previous_tally: dict[str, int] = field(default_factory=dict)
    request: pb.ConsensusMessage | None = None
    """The vote request of the current round, built once and shared by every stream."""
    state: str = "open"
    """open → (advancing → open) → deciding → decided."""

    @property
    def n(self) -> int:
        return len(self.voters)

    def vote_in_round(self, agent_id: str, round_: int) -> pb.Vote | None:
        record = self.records.get(agent_id)
        if record is None:
            return None
        for vote in record.votes:
            if vote.round == round_:
                return vote
        return None


def same_content(stored: pb.Proposal, req: pb.ProposeRequest) -> bool:
    """A replayed Propose (same id) must ask the same question."""
    return (
        stored.topic == req.topic
        and stored.payload == req.payload
        and list(stored.options) == list(req.options)
        and stored.protocol == (req.protocol or pb.PROTOCOL_QUORUM)
    )


def _same_vote(a: pb.Vote, b: pb.Vote) -> bool:
    return (
        a.choice == b.choice
        and a.option == b.option
        and a.reason == b.reason
        and a.signature == b.signature
    )


class ConsensusCore:
    """The active instance's state for one term.

    Args:
        store: fenced etcd writes (ConsensusStore) or a fake.
        clock: injected time.
        cfg: limits and defaults.
        term: this instance's fencing token (recorded in proposals and decisions).
        node_id: this instance's id (in welcomes).
    """

    def __init__(
        self, store: Store, clock: Clock, cfg: ConsensusConfig, *, term: int, node_id: str = ""
    ) -> None:
        self.store = store
        self.clock = clock
        self.cfg = cfg
        self.term = term
        self.node_id = node_id
        self.voters: dict[str, Voter] = {}
        self.open: dict[str, Open] = {}
        self.recent: OrderedDict[str, pb.Decision] = OrderedDict()
        self.finished: OrderedDict[str, Open] = OrderedDict()
        self.faults: deque[pb.Exclusion] = deque(maxlen=RECENT_FAULTS)
        self.loaded = asyncio.Event()
        self.failed: BaseException | None = None
        self._timers: list[tuple[int, int, str, str]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._creating: dict[str, asyncio.Future[Any]] = {}
        self.closed = False

    # ---- lifecycle ----

    async def run(self) -> None:
        """Load the open proposals, then fire deadlines until the term ends; raises
        the error that ended it (NotLeaderError when a fenced write was refused)."""
        for proposal, records in await self.store.load_open():
            self._adopt(proposal, records)
        self.loaded.set()
        log.info("consensus core ready", extra={"term": self.term, "open": len(self.open)})
        while True:
            if self.failed is not None:
                raise self.failed
            now = self.clock.wall_us()
            while self._timers and self._timers[0][0] <= now:
                _, _, pid, kind = heapq.heappop(self._timers)
                self._fire(pid, kind)
            delay = (self._timers[0][0] - now) / 1e6 if self._timers else TIMER_IDLE_S
            self._wake.clear()
            sleeper = asyncio.ensure_future(self.clock.sleep(max(0.0, delay)))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waker.cancel()

    async def close(self) -> None:
        """End the term: close every stream, fail every waiter (its client retries on
        the next active instance, which finishes the proposal)."""
        self.closed = True
        self.loaded.set()  # wakes the calls waiting for a load that will not finish
        for voter in tuple(self.voters.values()):
            voter.send(None)
        self.voters.clear()
        for task in tuple(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for p in self.open.values():
            if not p.done.done():
                p.done.set_exception(
                    NotLeaderError("the consensus term ended; the next active instance decides")
                )
                p.done.exception()  # retrieved: a waiter may be gone

    async def _ready(self) -> None:
        """Wait for the open proposals to be loaded; NotLeaderError if the term ended
        first (a load that failed never finishes: the caller retries on the next term)."""
        await self.loaded.wait()
        if self.closed:
            raise self._ended()

    def _ended(self) -> NotLeaderError:
        return NotLeaderError("the consensus term ended; retry on the active instance")

    def _fail(self, err: BaseException) -> None:
        if self.failed is None:
            self.failed = err if isinstance(err, NotLeaderError) else NotLeaderError(str(err))
            log.warning("consensus term failing", extra={"error": repr(err)})
        self._wake.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        err = task.exception()
        if err is not None:
            if not isinstance(err, NotLeaderError):
                log.error("consensus background write failed", exc_info=err)
            self._fail(err)

    def _timer(self, at_us: int, pid: str, kind: str) -> None:
        heapq.heappush(self._timers, (at_us, next(self._seq), pid, kind))
        if self._timers[0][2] == pid:
            self._wake.set()

    # ---- voters ----

    async def connect(self, hello: pb.VoterHello, send: Send) -> Voter:
        """An agent's Participate stream said hello; it gets the open requests it owes."""
        limits.check_hello(hello)
        await self._ready()
        raw = await self.store.public_key(hello.agent_id)
        if self.closed:  # ended during the read: close() no longer ends this stream
            raise self._ended()
        voter = Voter(
            hello.agent_id,
            hello.pool_id,
            frozenset(hello.roles),
            dict(hello.labels),
            send,
            signing.load_public(raw) if raw else None,
        )
        old = self.voters.get(voter.agent_id)
        if old is not None:
            old.send(None)  # a reconnect replaces the older stream
        self.voters[voter.agent_id] = voter
        send(pb.ConsensusMessage(welcome=pb.VoterWelcome(instance_id=self.node_id, term=self.term)))
        for p in self.open.values():
            if p.state == "open" and self._owes(p, voter.agent_id):
                send(self._request(p))
        return voter

    def disconnect(self, voter: Voter) -> None:
        if self.voters.get(voter.agent_id) is voter:
            del self.voters[voter.agent_id]

    def _owes(self, p: Open, agent_id: str) -> bool:
        return (
            agent_id in p.voters
            and agent_id not in p.excluded
            and p.vote_in_round(agent_id, p.proposal.round) is None
        )

    def _request(self, p: Open) -> pb.ConsensusMessage:
        # One message a round, shared by every stream's queue (never changed once
        # built): a copy per stream cost 1.3 GB when 100 agents reconnected after a
        # failover to 2,000 open proposals of 1 KiB payloads.
        if p.request is not None and p.request.request.round == p.proposal.round:
            return p.request
        msg = pb.ConsensusMessage()
        req = msg.request
        req.proposal.CopyFrom(p.proposal)
        # the eligible list is for the service: sent to every voter it would cost
        # each proposal n × n ids (100 voters: 130 KB serialized and parsed)
        del req.proposal.voters[:]
        req.round = p.proposal.round
        req.previous_tally.update(p.previous_tally)
        p.request = msg
        return msg

    def _ask(self, p: Open) -> None:
        msg = self._request(p)
        by_pool: dict[str, list[Voter]] = {}
        for agent_id in p.voters:
            voter = self.voters.get(agent_id)
            if voter is not None and self._owes(p, agent_id):
                by_pool.setdefault(voter.pool_id, []).append(voter)
        # Round-robin over the pools: every pool process starts answering at once,
        # instead of the second idling until all of the first pool's agents were asked.
        for group in itertools.zip_longest(*by_pool.values()):
            for voter in group:
                if voter is not None:
                    voter.send(msg)

    # ---- proposals ----

    def resolve(self, selector: pb.VoterSelector) -> list[str]:
        which = selector.WhichOneof("selector")
        if which == "agents":
            return sorted(set(selector.agents.agent_ids))
        voters = self.voters.values()
        if which == "role":
            return sorted(v.agent_id for v in voters if selector.role in v.roles)
        if which == "labels":
            want = dict(selector.labels.labels)
            return sorted(
                v.agent_id for v in voters if all(v.labels.get(k) == x for k, x in want.items())
            )
        return sorted(v.agent_id for v in voters)

    async def propose(
        self, req: pb.ProposeRequest
    ) -> tuple[pb.Proposal, pb.Decision | None, bool, asyncio.Future[pb.Decision] | None]:
        """Open a proposal (or find the one with this id).

        Returns (proposal, decision if already decided, created, a future of the
        decision while it is open)."""
        limits.check_propose(req)
        await self._ready()
        pid = req.proposal_id or f"p-{self.clock.wall_us():x}-{secrets.token_hex(4)}"
        while pid in self._creating:  # the same id being created by a concurrent call
            await asyncio.wait({self._creating[pid]})
        existing = self.open.get(pid)
        if existing is not None:
            if not same_content(existing.proposal, req):
                raise AlreadyExistsError(f"proposal {pid} exists with other content")
            return existing.proposal, None, False, existing.done
        if pid in self.recent and req.proposal_id:
            stored = await self.store.get_proposal(pid)
            if stored is not None and not same_content(stored, req):
                raise AlreadyExistsError(f"proposal {pid} exists with other content")
            return stored or pb.Proposal(proposal_id=pid), self.recent[pid], False, None
        try:
            if len(self.open) >= self.cfg.max_open_proposals:
                raise ResourceExhaustedError(
                    f"{len(self.open)} proposals are open (the limit); retry when some are decided"
                )
            proposal = self._new_proposal(pid, req)
        except (ResourceExhaustedError, FailedPreconditionError, InvalidArgumentError):
            # Perhaps a replay of a proposal decided before (by an earlier term, whose
            # reply was lost with it, or long ago): its voters were fixed when it
            # opened, so the agents connected now must not turn it away.
            replay = await self._decided(pid, req) if req.proposal_id else None
            if replay is None:
                raise
            return replay
        if self.closed:  # ended during a read above: close() has cancelled its tasks
            raise self._ended()
        # The core's own task, not the caller's: a create that has gone out is
        # settled and its proposal adopted even if the caller goes away meanwhile (a
        # client's deadline cancels the handler); otherwise the proposal would sit
        # open in etcd with no timer and no vote request until the next failover.
        task = asyncio.ensure_future(self._create(proposal, req))
        self._creating[pid] = task
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._created, pid))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current is not None and current.cancelling()):
                # the term ended under the create, not the caller
                raise self._ended() from None
            raise

    async def _decided(
        self, pid: str, req: pb.ProposeRequest
    ) -> tuple[pb.Proposal, pb.Decision, bool, None] | None:
        """The stored proposal and its decision, if `pid` was decided (None if not)."""
        stored = await self.store.get_proposal(pid)
        if stored is None:
            return None
        if not same_content(stored, req):
            raise AlreadyExistsError(f"proposal {pid} exists with other content")
        decision = await self.store.get_decision(pid)
        return (stored, decision, False, None) if decision is not None else None

    async def _create(
        self, proposal: pb.Proposal, req: pb.ProposeRequest
    ) -> tuple[pb.Proposal, pb.Decision | None, bool, asyncio.Future[pb.Decision] | None]:
        pid = proposal.proposal_id
        stored, decision, created = await self.store.create_proposal(proposal)
        if not created and not same_content(stored, req):
            raise AlreadyExistsError(f"proposal {pid} exists with other content")
        if decision is not None:
            return stored, decision, False, None
        p = self.open.get(pid)
        if p is None:
            # created now, or open in etcd from before and not yet here
            records = [] if created else await self.store.votes_of(pid)
            p = self._adopt(stored, records)
        return stored, None, created, p.done

    def _created(self, pid: str, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if self._creating.get(pid) is task:
            del self._creating[pid]
        if not task.cancelled():
            task.exception()  # retrieved: the caller may be gone

    def _new_proposal(self, pid: str, req: pb.ProposeRequest) -> pb.Proposal:
        protocol = req.protocol or pb.PROTOCOL_QUORUM
        voters = self.resolve(req.voters)
        n = len(voters)
        if not n:
            raise FailedPreconditionError(
                "no eligible voters: no connected agent matches the voters selector"
            )
        if req.quorum > n:
            raise InvalidArgumentError(f"quorum {req.quorum} is more than the {n} eligible voters")
        try:
            f = rules.bft_faulty(n, req.max_faulty) if protocol == pb.PROTOCOL_BFT else 0
            thr = rules.threshold(protocol, n, 1, req.quorum, f)
        except rules.RuleError as err:
            raise FailedPreconditionError(str(err)) from err
        now = self.clock.wall_us()
        timeout_us = int((req.timeout_s or self.cfg.default_timeout_s) * 1e6)
        return pb.Proposal(
            proposal_id=pid,
            topic=req.topic,
            payload=req.payload,
            options=req.options,
            protocol=protocol,  # type: ignore[arg-type]
            voters=voters,
            threshold=thr,
            max_faulty=f,
            round=1,
            created_at_us=now,
            deadline_at_us=now + timeout_us,
            round1_deadline_at_us=now + timeout_us // 2 if protocol == pb.PROTOCOL_FAST else 0,
            proposer=req.proposer,
            term=self.term,
            quorum=req.quorum,
        )

    def _adopt(self, proposal: pb.Proposal, records: list[pb.VoteRecord]) -> Open:
        """Take charge of an open proposal: count its committed votes, arm its timers,
        ask the voters who owe a vote, and decide at once if the votes already do."""
        done: asyncio.Future[pb.Decision] = asyncio.get_running_loop().create_future()
        p = Open(
            proposal=proposal,
            voters=frozenset(proposal.voters),
            choices=rules.choices_of(list(proposal.options)),
            done=done,
        )
        for record in records:
            p.records[record.agent_id] = record
            if record.agent_id not in p.voters:
                continue
            if record.HasField("excluded"):
                p.excluded.add(record.agent_id)
                continue
            vote = p.vote_in_round(record.agent_id, proposal.round)
            if vote is not None:
                name = rules.choice_name(vote.choice, vote.option)
                p.counted[record.agent_id] = name
                p.counts[name] += 1
        self.open[proposal.proposal_id] = p
        self._timer(proposal.deadline_at_us, proposal.proposal_id, "deadline")
        if proposal.protocol == pb.PROTOCOL_FAST and proposal.round == 1:
            self._timer(proposal.round1_deadline_at_us, proposal.proposal_id, "round1")
        self._ask(p)
        self._check(p)
        return p

    def _fire(self, pid: str, kind: str) -> None:
        p = self.open.get(pid)
        if p is None or p.state == "deciding":
            return
        if p.state == "advancing":
            # a round change is being written; look again right after
            self._timer(self.clock.wall_us() + 10_000, pid, kind)
            return
        if kind == "round1":
            if p.proposal.round == 1:
                self._next_round(p)
        else:
            self._decide(p, pb.OUTCOME_TIMED_OUT, "")

    # ---- votes ----

    def on_vote(self, voter: Voter, vote: pb.Vote) -> None:
        """A vote arrived on `voter`'s stream. It counts once committed; a fault is
        reported (and, for an eligible voter, excludes it)."""
        problem = limits.vote_size_problem(vote)
        if problem:
            # turned away before anything keeps it: as a fault's evidence it would go
            # to etcd whole, and a record over etcd's request limit ends the term
            self._reject(voter, vote, problem)
            return
        pid = vote.proposal_id
        p = self.open.get(pid) or self.finished.get(pid)
        if p is None:
            if pid in self.recent:
                return  # a late vote on a decided proposal: harmless
            self._probe(voter, vote, self._unknown_proposal)
            return
        agent = voter.agent_id
        if vote.agent_id != agent:
            self._fault(
                voter,
                vote,
                pb.FAULT_UNKNOWN_AGENT,
                f"vote names agent {vote.agent_id[:64]!r} on the stream of {agent!r}",
                p if agent in p.voters else None,
            )
            return
        if agent not in p.voters:
            self._outsider(p, voter, vote, "not an eligible voter of this proposal")
            return
        if agent in p.excluded or (agent in p.records and p.records[agent].HasField("excluded")):
            return  # already excluded: nothing it sends counts
        if vote.round != p.proposal.round:
            self._reject(voter, vote, "not the current round of this proposal")
            return
        problem = limits.vote_problem(vote, tuple(p.proposal.options))
        if problem:
            self._reject(voter, vote, problem)
            return
        if p.proposal.protocol == pb.PROTOCOL_BFT:
            if voter.key is None:
                # read at hello, but a pool whose lease was lost registers its agents'
                # keys again only after they may have reconnected: look again first
                self._probe(voter, vote, self._vote_with_key)
                return
            if not signing.verify(voter.key, vote):
                self._fault(voter, vote, pb.FAULT_FORGED_SIGNATURE, "signature does not verify", p)
                return
        earlier = p.vote_in_round(agent, vote.round)
        if earlier is not None:
            if not _same_vote(earlier, vote):
                self._fault(
                    voter,
                    vote,
                    pb.FAULT_EQUIVOCATION,
                    f"two different votes in round {vote.round}",
                    p,
                    conflicting=vote,
                )
            return  # the same vote again (a resend after reconnect): already recorded
        vote.received_at_us = self.clock.wall_us()
        record = p.records.get(agent)
        if record is None:
            record = pb.VoteRecord(proposal_id=pid, agent_id=agent)
            p.records[agent] = record
        record.votes.append(vote)  # appending copies it into the record
        if p.state != "open":
            # decided (or changing rounds): too late to count, but kept in memory, so
            # a conflicting second vote is still caught as equivocation
            return
        name = rules.choice_name(vote.choice, vote.option)
        p.counted[agent] = name
        p.counts[name] += 1
        self._write(p, agent)
        self._check(p)

    def _excluded(self, p: Open, agent: str) -> None:
        if p.state in ("deciding", "decided") or agent in p.excluded:
            return
        p.excluded.add(agent)
        name = p.counted.pop(agent, None)
        if name is not None:
            p.counts[name] -= 1
        self._check(p)

    def _write(self, p: Open, agent: str) -> None:
        """Commit the agent's record as it is now (group-committed); one write per
        agent at a time, so etcd ends with the latest state whatever order
        transactions land in."""
        p.version[agent] += 1
        p.dirty.add(agent)
        if agent in p.writing:
            p.again.add(agent)
        else:
            self._flush_agent(p, agent)

    def _flush_agent(self, p: Open, agent: str) -> None:
        version = p.version[agent]
        fut = self.store.put_vote(p.records[agent])  # serialized now: a snapshot
        p.writing[agent] = fut

        def written(f: asyncio.Future[None]) -> None:
            p.writing.pop(agent, None)
            if f.cancelled():
                return
            err = f.exception()
            if err is not None:
                self._fail(err)
                return
            if p.version[agent] == version:
                p.dirty.discard(agent)
                p.cleaned.set()
            if agent in p.again and not self.closed:
                p.again.discard(agent)
                self._flush_agent(p, agent)

        fut.add_done_callback(written)

    async def _vote_with_key(self, voter: Voter, vote: pb.Vote) -> None:
        """A BFT vote from a stream that had no key at its hello: read the key again,
        then take the vote; without one the voter is UNKNOWN_AGENT."""
        try:
            raw = await self.store.public_key(voter.agent_id)
        except StoreUnavailableError:
            self._reject(
                voter, vote, "your public key cannot be read now (etcd unreachable); vote again"
            )
            return
        if self.closed or self.voters.get(voter.agent_id) is not voter:
            return  # the term or the stream ended meanwhile
        if voter.key is None and raw:
            voter.key = signing.load_public(raw)
        if voter.key is not None:
            self.on_vote(voter, vote)
            return
        p = self.open.get(vote.proposal_id) or self.finished.get(vote.proposal_id)
        if p is not None and voter.agent_id not in p.excluded:
            self._fault(
                voter,
                vote,
                pb.FAULT_UNKNOWN_AGENT,
                "no public key registered under keys/<agent id>",
                p,
            )

    # ---- faults ----

    def _exclusion(self, agent: str, vote: pb.Vote, fault: int, detail: str) -> pb.Exclusion:
        return pb.Exclusion(
            agent_id=agent,
            fault=fault,  # type: ignore[arg-type]
            detail=detail,
            proposal_id=vote.proposal_id[: limits.MAX_ID],
            round=vote.round,
            at_us=self.clock.wall_us(),
        )

    def _report(self, voter: Voter, vote: pb.Vote, exclusion: pb.Exclusion) -> None:
        self.faults.append(exclusion)
        log.warning(
            "voter fault",
            extra={
                "agent": exclusion.agent_id,
                "fault": pb.Fault.Name(exclusion.fault),
                "proposal": exclusion.proposal_id,
                "detail": exclusion.detail,
            },
        )
        voter.send(
            pb.ConsensusMessage(
                rejected=pb.VoteRejected(
                    proposal_id=exclusion.proposal_id,
                    round=vote.round,
                    fault=exclusion.fault,
                    reason=exclusion.detail,
                )
            )
        )

    def _fault(
        self,
        voter: Voter,
        vote: pb.Vote,
        fault: int,
        detail: str,
        p: Open | None,
        *,
        conflicting: pb.Vote | None = None,
    ) -> None:
        """Report a fault; an eligible voter of `p` is excluded from it, durably."""
        agent = voter.agent_id
        exclusion = self._exclusion(agent, vote, fault, detail)
        self._report(voter, vote, exclusion)
        if p is None:
            return
        record = p.records.get(agent)
        if record is None:
            record = pb.VoteRecord(proposal_id=p.proposal.proposal_id, agent_id=agent)
            p.records[agent] = record
        if record.HasField("excluded"):
            return
        record.excluded.CopyFrom(exclusion)
        # the evidence: the second vote of an equivocation, or the offending vote
        record.conflicting.CopyFrom(conflicting or vote)
        # Excluded at once, before the record is committed: an exclusion only takes
        # votes away, so no decision can rest on it; and the vote it cancels (an
        # equivocator's first, perhaps still being committed) never counts.
        self._excluded(p, agent)
        self._write(p, agent)

    def _outsider(self, p: Open, voter: Voter, vote: pb.Vote, detail: str) -> None:
        exclusion = self._exclusion(voter.agent_id, vote, pb.FAULT_UNKNOWN_AGENT, detail)
        self._report(voter, vote, exclusion)
        if len(p.outsiders) < OUTSIDERS_PER_PROPOSAL and not any(
            o.agent_id == voter.agent_id for o in p.outsiders
        ):
            p.outsiders.append(exclusion)

    def _reject(self, voter: Voter, vote: pb.Vote, reason: str) -> None:
        voter.send(
            pb.ConsensusMessage(
                rejected=pb.VoteRejected(
                    proposal_id=vote.proposal_id[: limits.MAX_ID], round=vote.round, reason=reason
                )
            )
        )

    def _probe(
        self, voter: Voter, vote: pb.Vote, read: Callable[[Voter, pb.Vote], Awaitable[None]]
    ) -> None:
        """Run `read` (a vote that needs an etcd read before it can be judged), at most
        MAX_PROBES at a time per stream: a stream flooding such votes gets the rest turned
        away unread, not a read each."""
        if voter.probes >= MAX_PROBES:
            self._reject(
                voter,
                vote,
                f"{MAX_PROBES} of your votes are being checked against etcd; "
                "vote again once they are answered",
            )
            return
        voter.probes += 1

        async def probing() -> None:
            try:
                await read(voter, vote)
            finally:
                voter.probes -= 1

        self._spawn(probing())

    async def _unknown_proposal(self, voter: Voter, vote: pb.Vote) -> None:
        pid = vote.proposal_id
        known = False
        with contextlib.suppress(InvalidArgumentError):
            limits.check_id(pid, "proposal_id")
            try:
                # decided by an earlier term: a late vote, not a fault
                known = await self.store.get_proposal(pid) is not None
            except StoreUnavailableError:
                # etcd is away: a late vote cannot be told from a fault, and the vote
                # counts nowhere either way; not a reason to end the term
                return
        if not known:
            exclusion = self._exclusion(
                voter.agent_id, vote, pb.FAULT_UNKNOWN_PROPOSAL, "no such proposal"
            )
            self._report(voter, vote, exclusion)

    # ---- deciding ----

    def _check(self, p: Open) -> None:
        if p.state != "open":
            return
        verdict = rules.evaluate(
            protocol=p.proposal.protocol,
            round_=p.proposal.round,
            threshold_=p.proposal.threshold,
            choices=p.choices,
            counts=p.counts,
            pending=p.n - len(p.counted) - len(p.excluded),
        )
        if verdict.kind is rules.Kind.DECIDED:
            outcome, option = rules.outcome_of(verdict.choice)
            self._decide(p, outcome, option, verdict.choice)
        elif verdict.kind is rules.Kind.NO_QUORUM:
            self._decide(p, pb.OUTCOME_NO_QUORUM, "")
        elif verdict.kind is rules.Kind.NEXT_ROUND:
            self._next_round(p)

    def _next_round(self, p: Open) -> None:
        p.state = "advancing"
        self._spawn(self._advance(p))

    async def _advance(self, p: Open) -> None:
        nxt = pb.Proposal()
        nxt.CopyFrom(p.proposal)
        nxt.round = 2
        nxt.threshold = rules.threshold(nxt.protocol, p.n, 2, nxt.quorum, nxt.max_faulty)
        await self.store.update_proposal(nxt)
        p.previous_tally = dict(p.counts)
        p.proposal = nxt
        p.counted.clear()
        p.counts.clear()
        p.state = "open"
        self._ask(p)
        self._check(p)

    def _decide(self, p: Open, outcome: int, option: str, winner: str = "") -> None:
        p.state = "deciding"
        self._spawn(self._commit(p, self._decision(p, outcome, option, winner)))

    def _decision(self, p: Open, outcome: int, option: str, winner: str) -> pb.Decision:
        prop = p.proposal
        now = self.clock.wall_us()
        counted = len(p.counted)
        decision = pb.Decision(
            proposal_id=prop.proposal_id,
            outcome=outcome,  # type: ignore[arg-type]
            option=option,
            protocol=prop.protocol,
            topic=prop.topic,
            round=prop.round,
            eligible=p.n,
            threshold=prop.threshold,
            votes_counted=counted,
            participation=counted / p.n if p.n else 0.0,
            created_at_us=prop.created_at_us,
            decided_at_us=now,
            latency_ms=(now - prop.created_at_us) / 1000,
            term=self.term,
        )
        decision.tally.update({k: v for k, v in p.counts.items() if v})
        for agent in sorted(p.excluded):
            decision.excluded.append(p.records[agent].excluded)
        decision.excluded.extend(p.outsiders)
        if winner:
            for agent, name in p.counted.items():
                if name == winner and len(decision.winning_votes) < WINNING_VOTES_SHOWN:
                    vote = p.vote_in_round(agent, prop.round)
                    if vote is not None:
                        decision.winning_votes.append(vote)
        return decision

    async def _commit(self, p: Open, decision: pb.Decision) -> None:
        # The records the decision rests on that etcd may not have yet go in the
        # decision's own transaction (as many as fit; the rest are waited for).
        carried: list[pb.VoteRecord] = []
        versions: dict[str, int] = {}
        size = 0
        for agent in sorted(p.dirty):
            versions[agent] = p.version[agent]
            record = pb.VoteRecord()
            record.CopyFrom(p.records[agent])
            size += record.ByteSize()
            if len(carried) >= CARRIED_RECORDS or size > CARRIED_BYTES:
                break
            carried.append(record)
        left = p.dirty - {r.agent_id for r in carried}
        while left & p.dirty:
            p.cleaned.clear()
            await p.cleaned.wait()
        stored = await self.store.commit_decision(decision, carried)
        for record in carried:
            agent = record.agent_id
            if p.version[agent] != versions[agent]:
                self._write(p, agent)  # changed meanwhile (a late fault): etcd gets the latest
        pid = p.proposal.proposal_id
        self.open.pop(pid, None)
        p.state = "decided"
        p.request = None  # nobody is asked any more; the finished keep only their votes
        # kept a while: an equivocation that shows after the decision is still
        # detected, recorded and reported
        self.finished[pid] = p
        while len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)
        self.recent[pid] = stored
        while len(self.recent) > RECENT_DECISIONS:
            self.recent.popitem(last=False)
        if not p.done.done():
            p.done.set_result(stored)
        log.info(
            "decided",
            extra={
                "proposal": pid,
                "outcome": pb.Outcome.Name(stored.outcome),
                "protocol": rules.PROTOCOLS.get(stored.protocol, "?"),
                "latency_ms": round(stored.latency_ms, 2),
                "participation": round(stored.participation, 3),
            },
        )

    # ---- status ----

    def status(self) -> pb.ConsensusStatus:
        return pb.ConsensusStatus(
            term=self.term,
            voters=sorted(self.voters),
            open_proposals=len(self.open),
            recent_faults=list(self.faults),
        )
