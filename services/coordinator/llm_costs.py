"""The leader's llm cost totals in etcd: `costs/<dimension>/<key>` → `CostTotal`.

Read when a term begins (`load_costs`), so budgets and totals survive a leader change;
written by `flush_costs` about once a second while the term lasts, only the totals that
changed, each write fenced by the term so a deposed leader cannot overwrite its
successor's totals, and once more when the term ends (`flush_last`: a leader stopped
with SIGTERM keeps its last second's spend). A crash loses at most the spend of the last
interval (the budget may then let a second's worth of tasks more through).

If a fenced write's reply is lost, the totals are marked dirty again and rewritten:
every record is an absolute total, so writing it twice is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aetcd import rpc
from google.protobuf.message import DecodeError

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from registry.errors import NotLeaderError, StoreRefusedError, StoreUnavailableError
from registry.etcd import Etcd, op_put
from services.coordinator.llm_admission import LlmGate, cost_key_parts

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0
MAX_OPS = 100
"""Records per transaction, under etcd's default 128 operations."""

Fenced = Callable[..., Awaitable[Any]]
"""Applies a TxnRequest only while the term holds (raises NotLeaderError after); a
second argument, when given, is the call's timeout in seconds."""


async def load_costs(etcd: Etcd) -> list[cpb.CostTotal]:
    prefix = etcd.key("costs") + b"/"
    resp = await etcd.range(prefix)
    out = []
    for kv in resp.kvs:
        try:
            out.append(cpb.CostTotal.FromString(kv.value))
        except DecodeError:
            log.warning("unreadable cost record; ignoring it", extra={"key": kv.key[:200]})
    return out


async def flush_costs(
    etcd: Etcd, gate: LlmGate, fenced: Fenced, interval_s: float = FLUSH_INTERVAL_S
) -> None:
    """Write changed totals until cancelled or deposed (NotLeaderError ends the loop)."""
    while True:
        await gate.clock.sleep(interval_s)  # the leader's clock
        await flush_once(etcd, gate, fenced)


async def flush_last(etcd: Etcd, gate: LlmGate, fenced: Fenced, timeout_s: float = 0.5) -> None:
    """At the end of a term: write what changed since the last flush, if the term still
    holds (best effort, briefly: a term that ended with etcd away must not hold up the
    next campaign)."""
    try:
        await flush_once(etcd, gate, lambda request: fenced(request, timeout_s))
    except NotLeaderError as err:
        log.info("llm cost totals not saved at step-down", extra={"error": str(err)})


async def flush_once(etcd: Etcd, gate: LlmGate, fenced: Fenced) -> int:
    records = gate.take_dirty()
    written = 0
    for i in range(0, len(records), MAX_OPS):
        chunk = records[i : i + MAX_OPS]
        request = rpc.TxnRequest(
            success=[op_put(etcd.key(*cost_key_parts(r)), r.SerializeToString()) for r in chunk]
        )
        try:
            await fenced(request)
        except NotLeaderError:
            raise
        except StoreUnavailableError:
            # outcome unknown: write them again next time (absolute totals, idempotent)
            gate.dirty.update((r.dimension, r.key) for r in records[i:])
            return written
        except StoreRefusedError as err:
            # etcd will refuse these again: say so and go on with the rest, rather than
            # end the term (a job that raises ends it). They are written when they change.
            log.warning(
                "llm cost totals refused by etcd; not persisted until they change",
                extra={"records": len(chunk), "error": str(err)[:200]},
            )
            continue
        written += len(chunk)
    return written
