"""What the health monitor lets each agent take, from its `health/<agent>` records.

The active health monitor writes a record (fenced by its term) for every agent that
is not healthy with a closed breaker. The coordinator reads them when its term begins
and watches them after, so an ejected or FAILED agent gets no new work whatever the
agent itself does, across reconnects and coordinator failovers alike.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from google.protobuf.message import DecodeError

from protos.agentmesh.v1 import health_pb2 as hpb
from registry.etcd import Etcd, WatchCompactedError

log = logging.getLogger(__name__)

_LIMITS = {hpb.ADMISSION_NONE: 0, hpb.ADMISSION_ONE: 1}


def limit_of(raw: bytes) -> int:
    """The `Agent.admit` limit a record says: -1 (no limit), 1 or 0."""
    try:
        record = hpb.AgentHealth.FromString(raw)
    except DecodeError:
        log.warning("unreadable health record; ignoring it")
        return -1
    return _LIMITS.get(record.admission, -1)


def _agent_of(prefix: bytes, key: bytes) -> str:
    return key[len(prefix) :].decode(errors="replace")


async def admissions(etcd: Etcd) -> AsyncIterator[tuple[bool, dict[str, int]]]:
    """(True, every agent's limit now), then (False, the agents that changed) after each
    change (-1: no limit any more). A watch that fell behind etcd's compaction lists
    afresh: (True, ...) again, and agents left out of it have no limit."""
    prefix = etcd.key("health") + b"/"
    while True:
        resp = await etcd.range(prefix)
        yield True, {_agent_of(prefix, kv.key): limit_of(kv.value) for kv in resp.kvs}
        try:
            async for _, events in etcd.watch_forever(
                prefix, prefix=True, start_revision=int(resp.header.revision) + 1
            ):
                yield (
                    False,
                    {
                        _agent_of(prefix, ev.kv.key): limit_of(ev.kv.value)
                        if ev.kind == "put"
                        else -1
                        for ev in events
                    },
                )
        except WatchCompactedError:
            continue
