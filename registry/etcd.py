"""A small asyncio etcd v3 client on aetcd's generated API stubs.

aetcd (Apache-2.0) supplies the etcd v3 protocol stubs; this module owns the
channel so every call carries a deadline, errors become domain errors, and the
hot paths (nested transactions for group commit, resumable watches) stay one
round trip with no wrapper objects in between.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from aetcd import rpc

from registry.errors import LeaseNotFoundError as LeaseNotFoundError  # re-exported
from registry.errors import StoreRefusedError, StoreUnavailableError

log = logging.getLogger(__name__)

KeyValue = Any  # mvccpb.KeyValue
Compare = Any  # etcdserverpb.Compare
RequestOp = Any  # etcdserverpb.RequestOp
TxnResponse = Any  # etcdserverpb.TxnResponse

_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    # etcd never answers INTERNAL itself (its own errors are InvalidArgument, NotFound,
    # ResourceExhausted ... or Unknown): INTERNAL is the transport, e.g. a stream reset
    # ("RST_STREAM") when etcd is killed mid-call, after which the call may have applied
    grpc.StatusCode.INTERNAL,
}


class WatchCompactedError(Exception):
    """The watch's start revision was compacted; re-list and watch again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted up to {compact_revision}")
        self.compact_revision = compact_revision


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with `prefix`."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


# ---- builders for transactions ----


def cmp_create(key: bytes, revision: int, result: str = "==") -> Compare:
    return rpc.Compare(
        key=key, target=rpc.Compare.CREATE, result=_RESULT[result], create_revision=revision
    )


def cmp_mod(key: bytes, revision: int, result: str = "==") -> Compare:
    return rpc.Compare(
        key=key, target=rpc.Compare.MOD, result=_RESULT[result], mod_revision=revision
    )


def cmp_value(key: bytes, value: bytes, result: str = "==") -> Compare:
    return rpc.Compare(key=key, target=rpc.Compare.VALUE, result=_RESULT[result], value=value)


_RESULT = {
    "==": rpc.Compare.EQUAL,
    "!=": rpc.Compare.NOT_EQUAL,
    "<": rpc.Compare.LESS,
    ">": rpc.Compare.GREATER,
}


def op_put(key: bytes, value: bytes, lease: int = 0) -> RequestOp:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def op_delete(key: bytes) -> RequestOp:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))


def op_get(key: bytes) -> RequestOp:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key))


def op_txn(
    compare: Sequence[Compare], success: Sequence[RequestOp], failure: Sequence[RequestOp] = ()
) -> RequestOp:
    return rpc.RequestOp(
        request_txn=rpc.TxnRequest(compare=compare, success=success, failure=failure)
    )


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: str  # "put" | "delete"
    kv: KeyValue
    prev_kv: KeyValue | None


class Etcd:
    """One connection to an etcd cluster, with every key under `prefix`.

    Args:
        endpoints: comma-separated host:port list, e.g. "127.0.0.1:2379".
        prefix: key prefix of the cluster, e.g. "/agentmesh/default/".
        timeout_s: deadline of each unary call.
    """

    def __init__(
        self, endpoints: str, prefix: str = "/agentmesh/default/", timeout_s: float = 3.0
    ) -> None:
        hosts = [e.strip().removeprefix("http://") for e in endpoints.split(",") if e.strip()]
        if not hosts:
            raise ValueError("no etcd endpoint given: set AGENTMESH_ETCD (host:port)")
        self.endpoints = ",".join(hosts)
        self.prefix = prefix.encode() if not prefix.endswith("/") else prefix.encode()
        if not self.prefix.endswith(b"/"):
            self.prefix += b"/"
        self.timeout_s = timeout_s
        target = hosts[0] if len(hosts) == 1 else "ipv4:" + ",".join(hosts)
        self._channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1_000),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        self._kv = rpc.KVStub(self._channel)
        self._lease = rpc.LeaseStub(self._channel)
        self._watch = rpc.WatchStub(self._channel)
        self._maint = rpc.MaintenanceStub(self._channel)

    def key(self, *parts: str) -> bytes:
        return self.prefix + "/".join(parts).encode()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any, timeout_s: float | None = None) -> Any:
        try:
            return await method(request, timeout=timeout_s or self.timeout_s)
        except grpc.aio.AioRpcError as err:
            raise _domain_error(err) from err

    # ---- key-value ----

    async def get(self, key: bytes) -> KeyValue | None:
        resp = await self._call(self._kv.Range, rpc.RangeRequest(key=key))
        return resp.kvs[0] if resp.kvs else None

    async def range(
        self,
        prefix: bytes,
        *,
        start: bytes | None = None,
        limit: int = 0,
        keys_only: bool = False,
        max_create_revision: int = 0,
        min_create_revision: int = 0,
        by_create: str = "",
        count_only: bool = False,
    ) -> Any:
        """Keys under `prefix` (from `start`, inclusive), as a RangeResponse.

        `by_create` sorts by create revision: "asc" (oldest first) or "desc".
        """
        req = rpc.RangeRequest(
            key=start or prefix,
            range_end=prefix_end(prefix),
            limit=limit,
            keys_only=keys_only,
            max_create_revision=max_create_revision,
            min_create_revision=min_create_revision,
            count_only=count_only,
        )
        if by_create:
            req.sort_order = (
                rpc.RangeRequest.ASCEND if by_create == "asc" else rpc.RangeRequest.DESCEND
            )
            req.sort_target = rpc.RangeRequest.CREATE
        return await self._call(self._kv.Range, req)

    async def scan(self, prefix: bytes, page: int = 1000) -> AsyncIterator[KeyValue]:
        """Every key-value under `prefix` in key order, read `page` keys a request (each
        page at its own revision: a key written meanwhile may or may not be seen)."""
        start = None
        while True:
            resp = await self.range(prefix, start=start, limit=page)
            for kv in resp.kvs:
                yield kv
            if not resp.more or not resp.kvs:
                return
            start = resp.kvs[-1].key + b"\0"

    async def range_request(self, request: Any, timeout_s: float | None = None) -> Any:
        """A RangeRequest the caller built itself (a read at a fixed revision, say)."""
        return await self._call(self._kv.Range, request, timeout_s)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        resp = await self._call(self._kv.Put, rpc.PutRequest(key=key, value=value, lease=lease))
        return int(resp.header.revision)

    async def delete(self, key: bytes) -> int:
        resp = await self._call(self._kv.DeleteRange, rpc.DeleteRangeRequest(key=key))
        return int(resp.deleted)

    async def txn(
        self,
        compare: Iterable[Compare],
        success: Iterable[RequestOp] = (),
        failure: Iterable[RequestOp] = (),
        timeout_s: float | None = None,
    ) -> TxnResponse:
        return await self._call(
            self._kv.Txn,
            rpc.TxnRequest(compare=compare, success=success, failure=failure),
            timeout_s,
        )

    async def txn_request(self, request: Any, timeout_s: float | None = None) -> TxnResponse:
        """A TxnRequest the caller built itself."""
        return await self._call(self._kv.Txn, request, timeout_s)

    async def status(self) -> Any:
        return await self._call(self._maint.Status, rpc.StatusRequest())

    # ---- leases ----

    async def grant(self, ttl_s: int) -> int:
        resp = await self._call(self._lease.LeaseGrant, rpc.LeaseGrantRequest(TTL=ttl_s))
        if resp.error:
            raise StoreUnavailableError(f"etcd refused a lease: {resp.error}")
        return int(resp.ID)

    async def keepalive_once(self, lease_id: int) -> int:
        """Refresh a lease; returns its new TTL, 0 when it no longer exists."""
        call = self._lease.LeaseKeepAlive(
            iter([rpc.LeaseKeepAliveRequest(ID=lease_id)]), timeout=self.timeout_s
        )
        try:
            # bounded here too: the keeper's loop must never wait on one refresh forever
            async with asyncio.timeout(self.timeout_s + 1.0):
                async for reply in call:
                    return int(reply.TTL)
            return 0
        except grpc.aio.AioRpcError as err:
            raise _domain_error(err) from err
        except (TimeoutError, asyncio.InvalidStateError) as err:
            raise StoreUnavailableError(f"etcd lease refresh did not complete: {err!r}") from err
        finally:
            call.cancel()

    async def ttl(self, lease_id: int) -> int:
        """Seconds left on a lease; -1 when it does not exist."""
        resp = await self._call(
            self._lease.LeaseTimeToLive, rpc.LeaseTimeToLiveRequest(ID=lease_id)
        )
        return int(resp.TTL)

    async def revoke(self, lease_id: int) -> None:
        try:
            await self._call(self._lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease_id))
        except (StoreUnavailableError, StoreRefusedError) as err:
            if "not found" not in str(err):
                raise

    # ---- watches ----

    async def watch(
        self,
        key: bytes,
        *,
        prefix: bool = False,
        start_revision: int = 0,
        prev_kv: bool = False,
        no_put: bool = False,
    ) -> AsyncIterator[tuple[int, list[WatchEvent]]]:
        """Yield (revision, events) for changes of `key` (or keys under it).

        `no_put`: deletions only; etcd drops the puts before they are sent.
        Ends with StoreUnavailableError when the stream breaks, or
        WatchCompactedError when `start_revision` is gone. Callers resume from the
        last revision + 1 (see `watch_forever`).
        """
        create = rpc.WatchCreateRequest(
            key=key,
            range_end=prefix_end(key) if prefix else b"",
            start_revision=start_revision,
            prev_kv=prev_kv,
            filters=[rpc.WatchCreateRequest.NOPUT] if no_put else [],
        )
        # Writer style, not a request generator: grpc.aio cancels a generator's consumer
        # task only when the call is cancelled while still live, so every stream that etcd
        # broke (a restart) would leave a task blocked in the generator forever.
        call = self._watch.Watch()
        try:
            await call.write(rpc.WatchRequest(create_request=create))
            async for resp in call:
                if resp.compact_revision:
                    raise WatchCompactedError(int(resp.compact_revision))
                if resp.canceled:
                    raise StoreUnavailableError(f"etcd cancelled the watch: {resp.cancel_reason}")
                if not resp.events:
                    continue
                events = [
                    WatchEvent(
                        "delete" if ev.type == 1 else "put",
                        ev.kv,
                        ev.prev_kv if ev.HasField("prev_kv") else None,
                    )
                    for ev in resp.events
                ]
                yield int(resp.header.revision), events
            raise StoreUnavailableError("etcd closed the watch stream")
        except asyncio.InvalidStateError as err:  # write() on a call that already failed
            raise StoreUnavailableError(
                f"etcd watch stream ended before it started: {err}"
            ) from err
        except grpc.aio.AioRpcError as err:
            raise _domain_error(err) from err
        finally:
            call.cancel()

    async def watch_forever(
        self,
        key: bytes,
        *,
        prefix: bool = False,
        start_revision: int = 0,
        prev_kv: bool = False,
        no_put: bool = False,
    ) -> AsyncIterator[tuple[int, list[WatchEvent]]]:
        """Like `watch`, but survives etcd restarts by resuming after the last revision seen.

        WatchCompactedError still propagates: the caller must re-list.
        """
        next_rev = start_revision
        delay = 0.05
        broken = False  # one warning per break, not one per retry while etcd is down
        while True:
            try:
                if not next_rev:
                    # Pin "now" once: a watch from revision 0 that broke before its first
                    # event would otherwise resume from a later "now" and skip what was
                    # written while it reconnected.
                    resp = await self._call(
                        self._kv.Range, rpc.RangeRequest(key=key, count_only=True)
                    )
                    next_rev = int(resp.header.revision) + 1
                async for rev, events in self.watch(
                    key, prefix=prefix, start_revision=next_rev, prev_kv=prev_kv, no_put=no_put
                ):
                    delay = 0.05
                    broken = False
                    # Resume after the last event, not after the header revision: while a
                    # watch catches up, etcd sends events in batches whose header carries
                    # the store's current revision, past events not yet sent (clientv3 does
                    # the same).
                    next_rev = int(events[-1].kv.mod_revision) + 1
                    yield rev, events
            except StoreUnavailableError as err:
                log.log(
                    logging.DEBUG if broken else logging.WARNING,
                    "etcd watch broke, resuming",
                    extra={"key": key.decode(errors="replace"), "error": str(err)},
                )
                broken = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)


def _domain_error(err: grpc.aio.AioRpcError) -> StoreUnavailableError | StoreRefusedError:
    details = err.details() or ""
    if "lease not found" in details:
        return LeaseNotFoundError(f"etcd: {details}")
    if err.code() in _RETRYABLE:
        return StoreUnavailableError(
            f"etcd is unreachable ({err.code().name}: {details}); retry shortly"
        )
    return StoreRefusedError(f"etcd refused the request ({err.code().name}: {details})")
