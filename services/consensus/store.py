"""The consensus records in etcd, every write fenced by the active instance's term.

Layout under the cluster prefix:
  proposals/<id>          the Proposal (create-only; rewritten when FAST goes to round 2)
  open/<id>               empty marker while the proposal is undecided (what a new
                          active instance loads)
  votes/<id>/<agent>      the agent's VoteRecord: its vote in each round, and the
                          exclusion with its evidence
  decisions/<id>          the Decision, written exactly once (create-only compare)
  log/<seq>               ORDERED: the decision log, seq = 1, 2, 3 … without gaps
  log-head                ORDERED: the last seq
  keys/<agent>            an agent's Ed25519 public key (written by its pool)

Votes are group-committed: concurrent vote records leave together in one fenced
transaction, packed by count and bytes under etcd's 128-ops and 1.5 MiB limits,
so 100 voters cost a handful of round trips per proposal, not 100.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aetcd import rpc

from protos.agentmesh.v1 import consensus_pb2 as pb
from registry.errors import NotLeaderError, StoreUnavailableError
from registry.etcd import (
    Etcd,
    cmp_create,
    cmp_value,
    op_delete,
    op_get,
    op_put,
    op_txn,
    prefix_end,
)
from services.consensus import limits
from services.consensus.config import ConsensusConfig

log = logging.getLogger(__name__)

Fenced = Callable[[Any], Any]
"""`term.fenced`: sends a TxnRequest with the term's fence as its only compare."""

RETRY_FIRST_S = 0.05
RETRY_CAP_S = 1.0
# Overhead per op in a txn request beyond its key and value (tags, lengths).
OP_OVERHEAD = 32
LOAD_READS = 16
"""Open proposals read at once when a term starts."""


class VoteBatcher:
    """Packs concurrent vote records into few fenced transactions.

    A record goes out at once while fewer than `max_inflight` transactions are in
    flight (no added latency at light load); otherwise it waits for one to return
    and leaves with everything that queued meanwhile. A batch whose reply is lost
    is sent again: each op is a plain put of the record's whole state, so applying
    it twice changes nothing. NotLeaderError fails every waiter: the term is over.
    """

    def __init__(
        self,
        send: Callable[[list[tuple[bytes, bytes]]], Any],
        *,
        max_ops: int,
        max_bytes: int,
        max_inflight: int,
        sleep: Callable[[float], Any],
    ) -> None:
        self._send = send
        self._max_ops = max_ops
        self._max_bytes = max_bytes
        self._max_inflight = max_inflight
        self._sleep = sleep
        self._pending: list[tuple[bytes, bytes, asyncio.Future[None]]] = []
        self._inflight = 0
        self.transactions = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def put(self, key: bytes, value: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((key, value, fut))
        self._pump()
        return fut

    def _take(self) -> list[tuple[bytes, bytes, asyncio.Future[None]]]:
        size = 0
        n = 0
        for key, value, _ in self._pending:
            item = len(key) + len(value) + OP_OVERHEAD
            if n and (n >= self._max_ops or size + item > self._max_bytes):
                break
            size += item
            n += 1
        batch, self._pending = self._pending[:n], self._pending[n:]
        return batch

    def _pump(self) -> None:
        while self._pending and self._inflight < self._max_inflight:
            batch = self._take()
            self._inflight += 1
            task = asyncio.ensure_future(self._run(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run(self, batch: list[tuple[bytes, bytes, asyncio.Future[None]]]) -> None:
        delay = RETRY_FIRST_S
        try:
            while True:
                try:
                    await self._send([(k, v) for k, v, _ in batch])
                    self.transactions += 1
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_result(None)
                    return
                except StoreUnavailableError as err:
                    log.warning("vote commit failed; retrying", extra={"error": str(err)})
                    await self._sleep(delay)
                    delay = min(delay * 2, RETRY_CAP_S)
        except BaseException as err:  # noqa: BLE001 - handed to every waiter
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(
                        err if isinstance(err, Exception) else NotLeaderError("stopped")
                    )
        finally:
            self._inflight -= 1
            self._pump()

    def close(self) -> None:
        for task in tuple(self.tasks):
            task.cancel()
        for _, _, fut in self._pending:
            if not fut.done():
                fut.set_exception(NotLeaderError("the term ended"))
        self._pending.clear()


def decode_decision(kv: Any) -> pb.Decision:
    decision = pb.Decision.FromString(kv.value)
    decision.revision = int(kv.create_revision)
    return decision


class ConsensusStore:
    """Reads for every instance; fenced writes for the active one (`fenced` set)."""

    def __init__(
        self,
        etcd: Etcd,
        fenced: Fenced | None = None,
        *,
        max_ops: int = 120,
        max_bytes: int = 1024 * 1024,
        max_inflight: int = 4,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.etcd = etcd
        self._fenced = fenced
        self._sleep = sleep
        self.votes = VoteBatcher(
            self._send_votes,
            max_ops=max_ops,
            max_bytes=max_bytes,
            max_inflight=max_inflight,
            sleep=sleep,
        )
        self._log_lock = asyncio.Lock()
        self._log_head: int | None = None

    @classmethod
    def for_term(
        cls, etcd: Etcd, fenced: Fenced, cfg: ConsensusConfig, sleep: Callable[[float], Any]
    ) -> ConsensusStore:
        """The active instance's store: writes fenced by its term, votes batched as
        `cfg` says."""
        return cls(
            etcd,
            fenced,
            max_ops=cfg.vote_batch_ops,
            max_bytes=cfg.vote_batch_bytes,
            max_inflight=cfg.vote_inflight,
            sleep=sleep,
        )

    # ---- keys ----

    def key(self, kind: str, *parts: str) -> bytes:
        return self.etcd.key(kind, *parts)

    def prefix(self, kind: str) -> bytes:
        return self.etcd.key(kind) + b"/"

    # ---- fenced writes ----

    async def _txn(self, request: Any) -> Any:
        if self._fenced is None:
            raise NotLeaderError("this consensus instance is not active")
        return await self._fenced(request)

    async def _send_votes(self, items: list[tuple[bytes, bytes]]) -> None:
        request = rpc.TxnRequest()
        for key, value in items:
            request.success.append(op_put(key, value))
        await self._txn(request)

    def put_vote(self, record: pb.VoteRecord) -> asyncio.Future[None]:
        """Commit an agent's vote record (group-committed); the future resolves once
        it is in etcd."""
        key = self.key("votes", record.proposal_id, record.agent_id)
        return self.votes.put(key, record.SerializeToString())

    async def create_proposal(
        self, proposal: pb.Proposal
    ) -> tuple[pb.Proposal, pb.Decision | None, bool]:
        """Create proposals/<id> and open/<id> unless the id exists.

        Returns (the stored proposal, its decision if any, created). A create whose
        reply was lost is sent again: it then finds the proposal, and the creation
        time tells that it was this very write.
        """
        key = self.key("proposals", proposal.proposal_id)
        request = rpc.TxnRequest()
        request.success.append(
            op_txn(
                [cmp_create(key, 0)],
                [
                    op_put(key, proposal.SerializeToString()),
                    op_put(self.key("open", proposal.proposal_id), b""),
                ],
                [op_get(key), op_get(self.key("decisions", proposal.proposal_id))],
            )
        )
        resp = await self._retry(lambda: self._txn(request))
        nested = resp.responses[0].response_txn
        if nested.succeeded:
            return proposal, None, True
        stored = pb.Proposal.FromString(nested.responses[0].response_range.kvs[0].value)
        kvs = nested.responses[1].response_range.kvs
        decision = decode_decision(kvs[0]) if kvs else None
        mine = stored.created_at_us == proposal.created_at_us and stored.term == proposal.term
        return stored, decision, mine

    async def update_proposal(self, proposal: pb.Proposal) -> None:
        key = self.key("proposals", proposal.proposal_id)
        request = rpc.TxnRequest()
        request.success.append(op_put(key, proposal.SerializeToString()))
        await self._retry(lambda: self._txn(request))

    async def commit_decision(
        self,
        decision: pb.Decision,
        records: list[pb.VoteRecord] = (),  # type: ignore[assignment]
    ) -> pb.Decision:
        """Write decisions/<id> exactly once, with the vote `records` it rests on that
        etcd may not have yet, and close the proposal; return the stored decision.

        Create-only: if a decision is already there (this write's own, whose reply
        was lost), that one is returned. ORDERED decisions also take the next
        sequence number in the log, one at a time, so the log has no gaps.
        """
        votes = [
            op_put(self.key("votes", r.proposal_id, r.agent_id), r.SerializeToString())
            for r in records
        ]
        if decision.protocol == pb.PROTOCOL_ORDERED:
            async with self._log_lock:
                return await self._commit_ordered(decision, votes)
        stored: pb.Decision = await self._retry(lambda: self._commit_once(decision, votes))
        return stored

    def _decision_ops(self, decision: pb.Decision, extra: list[Any]) -> tuple[list[Any], ...]:
        key = self.key("decisions", decision.proposal_id)
        return (
            [cmp_create(key, 0)],
            [
                op_put(key, decision.SerializeToString()),
                op_delete(self.key("open", decision.proposal_id)),
                *extra,
            ],
            [op_get(key)],
        )

    async def _commit_once(
        self, decision: pb.Decision, extra: list[Any], compares: list[Any] | None = None
    ) -> pb.Decision:
        cmp, success, failure = self._decision_ops(decision, extra)
        request = rpc.TxnRequest()
        request.success.append(op_txn([*cmp, *(compares or [])], success, failure))
        resp = await self._txn(request)
        nested = resp.responses[0].response_txn
        if nested.succeeded:
            out = pb.Decision()
            out.CopyFrom(decision)
            out.revision = int(resp.header.revision)
            return out
        kvs = nested.responses[0].response_range.kvs
        if kvs:
            return decode_decision(kvs[0])
        raise _HeadMoved()

    async def _read_head(self) -> int:
        kv = await self.etcd.get(self.key("log-head"))
        return int(kv.value) if kv is not None else 0

    async def _commit_ordered(self, decision: pb.Decision, votes: list[Any]) -> pb.Decision:
        while True:
            if self._log_head is None:
                self._log_head = await self._retry(self._read_head)
            head = self._log_head
            seq = head + 1
            decision.sequence = seq
            head_key = self.key("log-head")
            guard = cmp_value(head_key, str(head).encode()) if head else cmp_create(head_key, 0)
            extra = [
                *votes,
                op_put(self.key("log", f"{seq:020d}"), decision.proposal_id.encode()),
                op_put(head_key, str(seq).encode()),
            ]
            try:
                stored: pb.Decision = await self._retry(
                    lambda e=extra, g=guard: self._commit_once(decision, e, [g])  # type: ignore[misc]
                )
            except _HeadMoved:
                self._log_head = None  # someone (an earlier term) moved it: read again
                continue
            if (
                stored.sequence == seq
                and stored.revision
                and stored.proposal_id == decision.proposal_id
            ):
                self._log_head = seq
            else:
                self._log_head = None
            return stored

    async def _retry(self, call: Callable[[], Any]) -> Any:
        """Retry an idempotent write (or read) while etcd is unreachable; NotLeaderError
        and refusals go up. Every write here is create-only or a whole-state put, so
        sending it again after a lost reply is safe, and its answer says what happened."""
        delay = RETRY_FIRST_S
        while True:
            try:
                return await call()
            except StoreUnavailableError as err:
                log.warning("etcd write failed; retrying", extra={"error": str(err)})
                await self._sleep(delay)
                delay = min(delay * 2, RETRY_CAP_S)

    # ---- reads (any instance) ----

    async def load_open(self) -> list[tuple[pb.Proposal, list[pb.VoteRecord]]]:
        """Every undecided proposal with the vote records committed for it.

        One read transaction per proposal (its decision, itself, its votes), LOAD_READS
        at a time: a new active instance serves nothing until this is done, and three
        sequential reads each took 1.35 ms a proposal (14 s for 10,000 open)."""
        prefix = self.prefix("open")
        opened = await self.etcd.range(prefix, keys_only=True)
        gate = asyncio.Semaphore(LOAD_READS)

        async def one(pid: str) -> tuple[pb.Proposal, list[pb.VoteRecord]] | None:
            votes = self.key("votes", pid) + b"/"
            async with gate:
                resp = await self.etcd.txn(
                    [],
                    [
                        op_get(self.key("decisions", pid)),
                        op_get(self.key("proposals", pid)),
                        rpc.RequestOp(
                            request_range=rpc.RangeRequest(key=votes, range_end=prefix_end(votes))
                        ),
                    ],
                )
            decided, stored, records = (r.response_range.kvs for r in resp.responses)
            if decided or not stored:
                return None
            return (
                pb.Proposal.FromString(stored[0].value),
                [pb.VoteRecord.FromString(v.value) for v in records],
            )

        reads = [
            asyncio.ensure_future(one(bytes(kv.key)[len(prefix) :].decode())) for kv in opened.kvs
        ]
        try:
            loaded = await asyncio.gather(*reads)
        except BaseException:
            for read in reads:
                read.cancel()
            raise
        return [item for item in loaded if item is not None]

    async def public_key(self, agent_id: str) -> bytes | None:
        kv = await self.etcd.get(self.key("keys", agent_id))
        return bytes(kv.value) if kv is not None else None

    async def get_decision(self, proposal_id: str) -> pb.Decision | None:
        kv = await self.etcd.get(self.key("decisions", proposal_id))
        return decode_decision(kv) if kv is not None else None

    async def get_proposal(self, proposal_id: str) -> pb.Proposal | None:
        kv = await self.etcd.get(self.key("proposals", proposal_id))
        return pb.Proposal.FromString(kv.value) if kv is not None else None

    async def votes_of(self, proposal_id: str) -> list[pb.VoteRecord]:
        resp = await self.etcd.range(self.key("votes", proposal_id) + b"/")
        return [pb.VoteRecord.FromString(v.value) for v in resp.kvs]

    async def list_decisions(
        self, after_revision: int, limit: int, protocol: int = 0
    ) -> tuple[list[pb.Decision], int]:
        """Decisions created after `after_revision`, oldest first: at most `limit`, and
        no more than limits.LIST_PAGE_BYTES (at least one); returns them and the create
        revision to continue after (0 when there are no more)."""
        out: list[pb.Decision] = []
        used = 0
        prefix = self.prefix("decisions")
        cursor = after_revision
        while True:
            resp = await self.etcd.range(
                prefix,
                limit=min(limit, limits.LIST_READ_RECORDS),
                min_create_revision=cursor + 1,
                by_create="asc",
            )
            for kv in resp.kvs:
                decision = decode_decision(kv)
                if not protocol or decision.protocol == protocol:
                    size = decision.ByteSize()
                    if out and (len(out) >= limit or used + size > limits.LIST_PAGE_BYTES):
                        return out, cursor
                    out.append(decision)
                    used += size
                cursor = int(kv.create_revision)
            if not resp.more:
                return out, 0


class _HeadMoved(Exception):
    """The ORDERED log's head is not what this instance thought."""
