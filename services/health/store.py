"""The monitor's records in etcd: `health/<agent>`, read at takeover and written after
every change of the core, each batch one transaction fenced by the term."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aetcd import rpc
from google.protobuf.message import DecodeError

from protos.agentmesh.v1 import health_pb2 as hpb
from registry.errors import StoreUnavailableError
from registry.etcd import Etcd, op_delete, op_put
from services._common.clock import Clock
from services.health.core import HealthCore

log = logging.getLogger(__name__)

MAX_TXN_OPS = 100
MAX_TXN_BYTES = 1 << 20
"""A record batch stays under etcd's 128 operations and 1.5 MiB per request."""

Fenced = Callable[[rpc.TxnRequest], Awaitable[Any]]
"""`Term.fenced`: applies a transaction only while the term holds."""


async def read_records(etcd: Etcd) -> list[hpb.AgentHealth]:
    """Every stored record; one that cannot be read is logged and skipped."""
    out: list[hpb.AgentHealth] = []
    async for kv in etcd.scan(etcd.key("health") + b"/"):
        try:
            out.append(hpb.AgentHealth.FromString(kv.value))
        except DecodeError:
            log.warning("unreadable health record", extra={"key": kv.key.decode()})
    return out


async def write_records(
    etcd: Etcd,
    clock: Clock,
    core: HealthCore,
    fenced: Fenced,
    wanted: asyncio.Event,
    stored: set[str],
) -> None:
    """Make `health/<agent>` match the core whenever `wanted` is set: one fenced
    transaction per batch. `stored` holds the agents that may have a record (those
    read at takeover, then those written).

    A write whose reply was lost is written again (a put of the whole record, or a
    delete, is idempotent), so etcd converges on the core's latest word; a deposed
    monitor's write is refused by the fence (NotLeaderError ends the term)."""
    delay = 0.05
    while True:
        await wanted.wait()
        wanted.clear()
        pending = collections.deque(core.take_dirty())
        while pending:
            batch: list[tuple[str, bool]] = []
            ops: list[Any] = []
            size = 0
            while pending and len(ops) < MAX_TXN_OPS:
                agent_id = pending[0]
                record = core.record(agent_id)
                key = etcd.key("health", agent_id)
                if record is None and agent_id not in stored:
                    pending.popleft()  # nothing stored, nothing to delete
                    continue
                value = b"" if record is None else record.SerializeToString()
                if ops and size + len(key) + len(value) > MAX_TXN_BYTES:
                    break
                pending.popleft()
                ops.append(op_delete(key) if record is None else op_put(key, value))
                batch.append((agent_id, record is not None))
                size += len(key) + len(value)
            if not ops:
                break
            for agent_id, put in batch:
                if put:
                    stored.add(agent_id)  # it may exist from now on, whatever the reply
            try:
                await fenced(rpc.TxnRequest(success=ops))
            except StoreUnavailableError as err:
                log.warning("health records not written; retrying", extra={"error": str(err)})
                core.dirty.update(agent_id for agent_id, _ in batch)
                core.dirty.update(pending)
                await clock.sleep(delay)
                delay = min(delay * 2, 2.0)
                wanted.set()
                break
            delay = 0.05
            for agent_id, put in batch:
                if not put:
                    stored.discard(agent_id)
