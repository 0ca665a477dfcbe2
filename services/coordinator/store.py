"""The task store on etcd: fenced group commit of task writes.

Layout under the cluster prefix:
  tasks/<id>   the Task record (serialized proto); terminal ones on a retention lease
  claims/<id>  the claiming agent's id, on that agent's lease; its mod revision is
               the claim token
  open/<id>    empty; exists while the task is not terminal, put in the same
               transaction as every non-terminal version of the record (so its mod
               revision is the record's) and deleted with the terminal one. Takeover
               and reconcile read this index, keys only, instead of every retained
               record: their cost follows the open tasks, not the history.
  meta/open-index  present once every open record is in the index (records written
               before the index existed are indexed by the first leader that finds the
               marker missing)

Each `Write` becomes one nested transaction (its own compares and outcome);
concurrent writes are packed into one outer transaction that compares the
leader's term. So a burst of N task changes costs about N/128 etcd round
trips, and a deposed leader changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

from aetcd import rpc

from protos.agentmesh.v1 import task_pb2 as tpb
from registry.election import Election
from registry.errors import StoreRefusedError
from registry.etcd import Etcd, LeaseNotFoundError, prefix_end
from services._common.clock import Clock
from services._common.errors import RecordTooLargeError
from services._common.telemetry import (
    COMMIT_BUSY_SECONDS,
    COMMIT_SECONDS,
    COMMIT_WAIT_SECONDS,
    COMMIT_WRITES,
)
from services.coordinator import limits
from services.coordinator.port import READ_CHUNK, Committed, OpenTasks, Write
from services.coordinator.tasks import TERMINAL

log = logging.getLogger(__name__)

# etcd's default --max-txn-ops is 128, and a nested transaction may hold at most
# (128 - ops in its parent) ops; our nested ones hold at most 3 per branch (record,
# claim, open index) and 2 compares.
MAX_OPS = 120
# Keys-only pages of the open index and the claims: ~100 bytes a key on the wire.
INDEX_PAGE = 10_000
# Record pages at takeover start at this many and adapt so that a reply carries about
# LOAD_PAGE_BYTES: retained records can be near etcd's 1.5 MiB request limit each, and
# a page by count could pass gRPC's 64 MiB receive limit (issue 8, item 2).
LOAD_PAGE_KEYS = 1000
LOAD_PAGE_BYTES = 8 * 1024 * 1024
# Record reads in flight at once at takeover (open tasks are read by id, in chunks).
READ_PARALLEL = 4
INDEX_MARKER = "open-index"
LOOKAHEAD = 4 * MAX_OPS


class Packable(Protocol):
    """What the group commit needs to know of a write to pack it."""

    @property
    def size(self) -> int:
        """Bytes it adds to the transaction (an estimate with margin)."""
        ...

    @property
    def key(self) -> bytes:
        """The record it writes: two writes of one key never share a transaction
        (etcd refuses the whole transaction: "duplicate key given in txn request")."""
        ...


REFUSED = (StoreRefusedError, LeaseNotFoundError)
"""What etcd answers when one write of a transaction is at fault: request too large,
duplicate key, a claim on a dead lease. Nothing of the transaction was applied, so its
writes are retried in halves until each fault is alone; everything else (unreachable,
deposed) is every write's answer."""


class GroupCommitter:
    """Packs concurrent writes into few transactions, by count and by bytes.

    A write goes out at once when fewer than `max_inflight` transactions are in
    flight (no added latency at light load); otherwise it waits for one to return
    and leaves with everything that queued up meanwhile (throughput under load).
    One in flight is the default: at 770 tasks/s on two cores it halved the P99 of
    submit → assignment against four (fewer, fuller transactions: etcd -18 % CPU per
    task, the leader -6 %), with no change at 100/s or in the closed loop
    (BENCHMARKS.md, issue 13).
    A transaction holds at most `max_ops` writes and `max_bytes` bytes (one larger
    write goes alone), never two writes of one key. When etcd refuses a transaction,
    only the writes at fault fail: the rest are committed in smaller packs, so every
    caller gets its own answer (a refused write's is its error, as its result).
    Prometheus sees each write's wait, each transaction's size, and the time with one
    in flight (`agentmesh_etcd_commit_*`, telemetry.py).
    """

    def __init__(
        self,
        flush: Callable[[list[Any]], Awaitable[list[Any]]],
        max_ops: int = MAX_OPS,
        max_inflight: int = 1,
        max_bytes: int = limits.TXN_PACK_BYTES,
    ) -> None:
        self._flush = flush
        self._max_ops = max_ops
        self._max_bytes = max_bytes
        self._max_inflight = max_inflight
        self._pending: list[tuple[Packable, asyncio.Future[Any], float]] = []
        self._inflight = 0
        self._busy_since = 0.0

    async def submit(self, ops: Sequence[Packable]) -> list[Any]:
        loop = asyncio.get_running_loop()
        futures = []
        now = time.monotonic()
        for op in ops:
            fut: asyncio.Future[Any] = loop.create_future()
            self._pending.append((op, fut, now))
            futures.append(fut)
        self._pump()
        if len(futures) == 1:  # most writes (a report, a claim): no gather machinery
            return [await futures[0]]
        return list(await asyncio.gather(*futures))

    def _take(self) -> list[tuple[Packable, asyncio.Future[Any], float]]:
        """The next transaction's writes, in arrival order. What does not fit, or writes a
        key already in it, keeps its place at the front for the next one. The scan looks
        at most LOOKAHEAD writes ahead, so a long queue of large writes costs no more."""
        pending = self._pending
        batch: list[tuple[Packable, asyncio.Future[Any], float]] = []
        skipped: list[tuple[Packable, asyncio.Future[Any], float]] = []
        keys: set[bytes] = set()
        used = 0
        end = min(len(pending), LOOKAHEAD)
        for i in range(end):
            if len(batch) >= self._max_ops:
                end = i
                break
            item = pending[i]
            op = item[0]
            if batch and (used + op.size > self._max_bytes or op.key in keys):
                skipped.append(item)
                continue
            batch.append(item)
            keys.add(op.key)
            used += op.size
        self._pending = skipped + pending[end:]
        return batch

    def _pump(self) -> None:
        while self._pending and self._inflight < self._max_inflight:
            batch = self._take()
            now = time.monotonic()
            for _, _, queued in batch:
                COMMIT_WAIT_SECONDS.observe(now - queued)
            COMMIT_WRITES.observe(len(batch))
            if not self._inflight:
                self._busy_since = now
            self._inflight += 1
            asyncio.ensure_future(self._run(batch))

    async def _run(self, batch: list[tuple[Packable, asyncio.Future[Any], float]]) -> None:
        try:
            responses = await self._isolating([op for op, _, _ in batch])
            for (_, fut, _), resp in zip(batch, responses, strict=True):
                if not fut.done():
                    fut.set_result(resp)
        except BaseException as err:  # noqa: BLE001 - handed to every waiter
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(err)
        finally:
            self._inflight -= 1
            if not self._inflight:
                COMMIT_BUSY_SECONDS.inc(time.monotonic() - self._busy_since)
            self._pump()

    async def _isolating(self, ops: list[Packable]) -> list[Any]:
        """`flush(ops)`; when etcd refuses it, the halves again, down to the writes at
        fault, whose result is the refusal (about 2·log2(n) round trips for one bad write
        among n, instead of n)."""
        try:
            return await self._flush(ops)
        except REFUSED as err:
            if len(ops) == 1:
                return [err]
            half = len(ops) // 2
            return [*await self._isolating(ops[:half]), *await self._isolating(ops[half:])]


class EtcdTaskStore:
    def __init__(
        self,
        etcd: Etcd,
        election: Election,
        clock: Clock,
        retention_s: int,
        max_write_bytes: int = limits.WRITE_MAX_BYTES,
    ) -> None:
        self.etcd = etcd
        self.election = election
        self.clock = clock
        self.retention_s = retention_s
        self._tasks = etcd.key("tasks") + b"/"
        self._claims = etcd.key("claims") + b"/"
        self._open = etcd.key("open") + b"/"
        self._marker = etcd.key("meta", INDEX_MARKER)
        self._committer = GroupCommitter(self._flush)
        self.max_write_bytes = max_write_bytes
        self._retention_lease = 0
        self._retention_granted = 0.0

    def task_key(self, task_id: str) -> bytes:
        return self._tasks + task_id.encode()

    def claim_key(self, task_id: str) -> bytes:
        return self._claims + task_id.encode()

    def open_key(self, task_id: str) -> bytes:
        return self._open + task_id.encode()

    async def _flush(self, batch: list[_Prepared]) -> list[Any]:
        """One fenced transaction; each result is (commit revision, nested response).

        The nested transactions are filled in place in the outgoing request: building
        them as separate messages and nesting them costs a copy per level (~12 % of
        the leader's CPU under load, measured with py-spy)."""
        request = rpc.TxnRequest()
        for p in batch:
            p.fill(request.success.add().request_txn)
        with COMMIT_SECONDS.time():
            resp = await self.election.fenced_request(request)
        rev = int(resp.header.revision)
        return [(rev, r) for r in resp.responses]

    async def _retention(self) -> int:
        """A lease shared by the terminal records of one period, renewed each tenth of
        the retention time, so records expire between retention and 1.1 x retention."""
        if not self.retention_s:
            return 0
        now = self.clock.monotonic()
        if not self._retention_lease or now - self._retention_granted > self.retention_s / 10:
            self._retention_lease = await self.etcd.grant(int(self.retention_s * 1.1) + 1)
            self._retention_granted = now
        return self._retention_lease

    async def commit(self, writes: Sequence[Write]) -> list[Committed]:
        retention = 0
        if any(w.task.state in TERMINAL for w in writes):
            retention = await self._retention()
        prepared = [
            _Prepared(
                w,
                self.task_key(w.task.task_id),
                self.claim_key(w.task.task_id),
                self.open_key(w.task.task_id),
                retention,
            )
            for w in writes
        ]
        for p in prepared:
            if p.size > self.max_write_bytes:
                # a bug or a misconfiguration (limits.check_config): fail this caller only,
                # clearly, instead of the transaction it would share with others
                raise RecordTooLargeError(
                    f"task {p.write.task.task_id!r} would be a {p.size}-byte etcd write; "
                    f"the limit is {self.max_write_bytes} bytes (payload, result and "
                    "other fields must fit one etcd request)"
                )
        responses = await self._committer.submit(prepared)
        out = []
        for w, resp in zip(writes, responses, strict=True):
            if isinstance(resp, LeaseNotFoundError):
                out.append(Committed(False, lease_missing=True))
                continue
            if isinstance(resp, StoreRefusedError):
                # the writes that shared its transaction went through; this one cannot
                raise StoreRefusedError(
                    f"etcd refused the write of task {w.task.task_id!r}: {resp}"
                )
            revision, op_resp = resp
            nested = op_resp.response_txn
            if nested.succeeded:
                # every op of one transaction shares its revision
                out.append(Committed(True, revision=revision))
            elif w.expect_mod == 0 and nested.responses and nested.responses[0].response_range.kvs:
                kv = nested.responses[0].response_range.kvs[0]
                out.append(
                    Committed(False, existing=_decode(kv), existing_mod=int(kv.mod_revision))
                )
            else:
                out.append(Committed(False))
        return out

    async def outcomes(self, writes: Sequence[Write]) -> list[Committed | None]:
        """Resolve writes whose commit raised after it may have been sent: read each
        record back. Our bytes → it landed (revision = the record's mod revision, the
        claim token for ASSIGNED); mod revision unchanged → it did not; else someone
        else changed it. Raises StoreUnavailableError while etcd cannot answer."""
        found = await self._read_raw([w.task.task_id for w in writes])
        out: list[Committed | None] = []
        for w in writes:
            kv = found.get(w.task.task_id)
            if kv is not None and w.sent and kv[2] == w.sent:
                out.append(Committed(True, revision=kv[1]))
            elif (kv[1] if kv is not None else 0) == w.expect_mod:
                out.append(None)
            elif kv is None:
                out.append(Committed(False))
            else:
                out.append(Committed(False, existing=kv[0], existing_mod=kv[1]))
        return out

    async def read(self, task_id: str) -> tuple[tpb.Task, int] | None:
        kv = await self.etcd.get(self.task_key(task_id))
        return None if kv is None else (_decode(kv), int(kv.mod_revision))

    async def read_many(self, task_ids: Sequence[str]) -> dict[str, tuple[tpb.Task, int]]:
        """Records by id (absent ones left out) and their mod revisions."""
        found = await self._read_raw(task_ids)
        return {task_id: (task, mod) for task_id, (task, mod, _) in found.items()}

    async def _read_raw(self, task_ids: Sequence[str]) -> dict[str, tuple[tpb.Task, int, bytes]]:
        """Records by id as (task, mod revision, raw value), in read-only transactions
        sized by bytes: the first ones hold READ_CHUNK ids (a reply stays under gRPC's
        limit even if every record is near etcd's 1.5 MiB), later ones as many as fit
        LOAD_PAGE_BYTES at the sizes seen (at most MAX_OPS, etcd's limit per
        transaction), READ_PARALLEL at a time. A reply that is still too large is asked
        for again in halves."""
        out: dict[str, tuple[tpb.Task, int, bytes]] = {}
        chunk = READ_CHUNK
        seen_bytes = seen_records = 0
        pos = 0
        while pos < len(task_ids):
            wave = []
            for _ in range(READ_PARALLEL):
                if pos >= len(task_ids):
                    break
                wave.append(task_ids[pos : pos + chunk])
                pos += chunk
            for ids, resp in zip(
                wave, await asyncio.gather(*(self._read_chunk(ids) for ids in wave)), strict=True
            ):
                for task_id, op in zip(ids, resp, strict=True):
                    kvs = op.response_range.kvs
                    if kvs:
                        value = bytes(kvs[0].value)
                        seen_bytes += len(value)
                        seen_records += 1
                        out[task_id] = (_decode(kvs[0]), int(kvs[0].mod_revision), value)
            if seen_records:
                per_record = max(1, seen_bytes // seen_records)
                chunk = max(1, min(MAX_OPS, LOAD_PAGE_BYTES // per_record))
        return out

    async def _read_chunk(self, task_ids: Sequence[str]) -> list[Any]:
        request = rpc.TxnRequest()
        for task_id in task_ids:
            request.success.add().request_range.key = self.task_key(task_id)
        try:
            return list((await self.etcd.txn_request(request)).responses)
        except StoreRefusedError as err:
            if "RESOURCE_EXHAUSTED" not in str(err) or len(task_ids) == 1:
                raise
            half = len(task_ids) // 2
            return [
                *await self._read_chunk(task_ids[:half]),
                *await self._read_chunk(task_ids[half:]),
            ]

    async def claim_revision(self, task_id: str) -> int:
        kv = await self.etcd.get(self.claim_key(task_id))
        return 0 if kv is None else int(kv.mod_revision)

    async def revision(self) -> int:
        """One linearizable read of one key: answers only when etcd has a leader."""
        resp = await self.etcd.range(self._marker, count_only=True)
        return int(resp.header.revision)

    async def _keys(self, prefix: bytes, revision: int = 0) -> tuple[dict[str, int], int, int]:
        """Every key under `prefix` (keys only, paged), as id → mod revision; and the
        revision read and the reply bytes. Later pages read at the first page's
        revision, so the whole listing is one consistent snapshot."""
        keys: dict[str, int] = {}
        start = prefix
        size = 0
        while True:
            req = rpc.RangeRequest(
                key=start,
                range_end=prefix_end(prefix),
                limit=INDEX_PAGE,
                keys_only=True,
                revision=revision,
            )
            resp = await self.etcd.range_request(req)
            size += resp.ByteSize()
            revision = revision or int(resp.header.revision)
            for kv in resp.kvs:
                keys[kv.key[len(prefix) :].decode()] = int(kv.mod_revision)
            if not resp.more or not resp.kvs:
                return keys, revision, size
            start = resp.kvs[-1].key + b"\0"

    async def open_tasks(self) -> OpenTasks:
        """The open-task index and the live claims, keys and revisions only, read at one
        revision: what reconcile compares with the leader's memory."""
        index, revision, size = await self._keys(self._open)
        claims, _, claim_size = await self._keys(self._claims, revision)
        return OpenTasks(index, claims, revision, size + claim_size)

    async def load(self) -> tuple[list[tuple[tpb.Task, int]], dict[str, int], int]:
        """What a new leader takes over: the open task records, the live claims (task id
        → mod revision), and the revision read.

        Reads the open-task index (keys only) and then only those records, in chunks
        that fit gRPC's receive limit whatever their size; retained terminal records
        are never read. Once, on a store written before the index existed, every
        record is scanned in pages sized by bytes and the open ones are indexed.
        """
        if await self.etcd.get(self._marker) is None:
            await self._build_index()
        index, revision, _ = await self._keys(self._open)
        claims, _, _ = await self._keys(self._claims, revision)
        records: list[tuple[tpb.Task, int]] = []
        ids = list(index)
        found = await self.read_many(ids)
        for task_id in ids:
            kv = found.get(task_id)
            if kv is not None and kv[0].state not in TERMINAL:
                records.append((kv[0], kv[1]))
        return records, claims, revision

    async def scan(self) -> AsyncIterator[list[tuple[tpb.Task, int]]]:
        """Every record, in pages sized by bytes: a page starts at LOAD_PAGE_KEYS keys and
        shrinks (or grows back) so a reply carries about LOAD_PAGE_BYTES; a reply over
        gRPC's receive limit is asked for again in halves."""
        start = self._tasks
        limit = LOAD_PAGE_KEYS
        revision = 0
        while True:
            req = rpc.RangeRequest(
                key=start, range_end=prefix_end(self._tasks), limit=limit, revision=revision
            )
            try:
                resp = await self.etcd.range_request(req)
            except StoreRefusedError as err:
                if "RESOURCE_EXHAUSTED" not in str(err) or limit == 1:
                    raise
                limit = max(1, limit // 2)
                continue
            revision = revision or int(resp.header.revision)
            yield [(_decode(kv), int(kv.mod_revision)) for kv in resp.kvs]
            if not resp.more or not resp.kvs:
                return
            start = resp.kvs[-1].key + b"\0"
            per_key = max(1, resp.ByteSize() // len(resp.kvs))
            limit = max(1, min(LOAD_PAGE_KEYS, LOAD_PAGE_BYTES // per_key))

    async def _build_index(self) -> None:
        """Index the open records of a store written before the index existed, then
        mark the index complete. Fenced: only the leader writes it."""
        indexed = 0
        async for page in self.scan():
            ops = []
            for task, mod in page:
                if task.state in TERMINAL:
                    continue
                # only while the record is the one read, so a change made meanwhile
                # (which writes the index itself) is never overwritten by a stale one
                txn = rpc.TxnRequest()
                c = txn.compare.add()
                c.key, c.target, c.result, c.mod_revision = (
                    self.task_key(task.task_id),
                    _MOD,
                    _EQUAL,
                    mod,
                )
                txn.success.add().request_put.key = self.open_key(task.task_id)
                ops.append(txn)
            for i in range(0, len(ops), MAX_OPS):
                request = rpc.TxnRequest()
                for txn in ops[i : i + MAX_OPS]:
                    request.success.add().request_txn.CopyFrom(txn)
                await self.election.fenced_request(request)
            indexed += len(ops)
        request = rpc.TxnRequest()
        put = request.success.add().request_put
        put.key, put.value = self._marker, b"1"
        await self.election.fenced_request(request)
        log.info("open-task index built", extra={"open_tasks": indexed})

    async def page(self, start_after: str, limit: int) -> tuple[list[tpb.Task], str]:
        """Up to `limit` records after `start_after` in key order, and the last key seen."""
        start = self.task_key(start_after) + b"\0" if start_after else None
        resp = await self.etcd.range(self._tasks, start=start, limit=limit)
        tasks = [_decode(kv) for kv in resp.kvs]
        last = resp.kvs[-1].key[len(self._tasks) :].decode() if resp.kvs and resp.more else ""
        return tasks, last

    async def claim_deletions(self, start_revision: int) -> AsyncIterator[tuple[str, int]]:
        """(task id, deleted claim's token) for every claim etcd deletes from now on.
        Claims are created as often as deleted (one each per task): etcd drops the
        creations before they are sent, which halves this stream."""
        async for _, events in self.etcd.watch_forever(
            self._claims, prefix=True, start_revision=start_revision, prev_kv=True, no_put=True
        ):
            for ev in events:
                if ev.kind == "delete" and ev.prev_kv is not None:
                    yield ev.kv.key[len(self._claims) :].decode(), int(ev.prev_kv.mod_revision)


class _Prepared:
    """One Write, ready to be filled into a nested transaction."""

    __slots__ = ("claim_key", "open_key", "record", "record_lease", "size", "task_key", "write")

    def __init__(
        self, w: Write, task_key: bytes, claim_key: bytes, open_key: bytes, retention: int
    ) -> None:
        self.write = w
        self.task_key = task_key
        self.claim_key = claim_key
        self.open_key = open_key
        record = w.task
        if record.state in (tpb.TASK_STATE_ASSIGNED, tpb.TASK_STATE_RUNNING):
            # the token is this commit's revision, known only after it: readers take
            # it from the record's mod revision
            record = tpb.Task()
            record.CopyFrom(w.task)
            record.claim_token = 0
            record.state = tpb.TASK_STATE_ASSIGNED
        self.record = record.SerializeToString()
        w.sent = self.record  # what a read-back looks for if the reply is lost
        self.record_lease = retention if w.task.state in TERMINAL else 0
        # the record, its key three times (compare, put, range on failure), the claim key
        # twice and the agent id, the open-index key, plus tags, revisions and leases:
        # an upper bound
        self.size = len(self.record) + 3 * len(task_key) + 2 * len(claim_key) + len(open_key) + 256

    @property
    def key(self) -> bytes:
        return self.task_key

    def fill(self, txn: Any) -> None:
        w = self.write
        c = txn.compare.add()
        c.key, c.target, c.result, c.mod_revision = self.task_key, _MOD, _EQUAL, w.expect_mod
        if w.expect_claim:
            c = txn.compare.add()
            c.key, c.target, c.result, c.mod_revision = self.claim_key, _MOD, _EQUAL, w.expect_claim
        put = txn.success.add().request_put
        put.key, put.value, put.lease = self.task_key, self.record, self.record_lease
        if w.claim_lease:
            put = txn.success.add().request_put
            put.key, put.value, put.lease = self.claim_key, w.task.agent_id.encode(), w.claim_lease
        elif w.delete_claim:
            txn.success.add().request_delete_range.key = self.claim_key
        if w.task.state in TERMINAL:
            txn.success.add().request_delete_range.key = self.open_key
        else:
            txn.success.add().request_put.key = self.open_key
        if w.expect_mod == 0:
            txn.failure.add().request_range.key = self.task_key


_MOD = rpc.Compare.MOD
_EQUAL = rpc.Compare.EQUAL


def _decode(kv: Any) -> tpb.Task:
    task = tpb.Task.FromString(kv.value)
    if task.state == tpb.TASK_STATE_ASSIGNED:
        task.claim_token = int(kv.mod_revision)
    return task
