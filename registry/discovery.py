"""Service discovery: instances register under services/<kind>/<id> on their lease."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from registry.etcd import Etcd, WatchCompactedError


@dataclass(frozen=True)
class Instance:
    kind: str
    instance_id: str
    endpoint: str
    metadata: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps(
            {
                "kind": self.kind,
                "id": self.instance_id,
                "endpoint": self.endpoint,
                "metadata": self.metadata,
            }
        ).encode()

    @staticmethod
    def decode(raw: bytes) -> Instance:
        doc = json.loads(raw)
        return Instance(doc["kind"], doc["id"], doc["endpoint"], dict(doc.get("metadata", {})))


def key(etcd: Etcd, instance: Instance) -> bytes:
    """Where an instance is registered: services/<kind>/<id>."""
    return etcd.key("services", instance.kind, instance.instance_id)


async def register(etcd: Etcd, lease_id: int, instance: Instance) -> None:
    """Publish an instance; it disappears when the lease does."""
    await etcd.put(key(etcd, instance), instance.encode(), lease=lease_id)


async def deregister(etcd: Etcd, instance: Instance) -> None:
    await etcd.delete(key(etcd, instance))


async def resolve(etcd: Etcd, kind: str = "") -> list[Instance]:
    """Live instances of one kind (all kinds when empty)."""
    prefix = etcd.key("services", kind) + b"/" if kind else etcd.key("services") + b"/"
    resp = await etcd.range(prefix)
    return [Instance.decode(kv.value) for kv in resp.kvs]


async def watch(etcd: Etcd, kind: str) -> AsyncIterator[list[Instance]]:
    """The instances of `kind` now, then again after every change."""
    prefix = etcd.key("services", kind) + b"/"
    while True:
        resp = await etcd.range(prefix)
        current = {kv.key: Instance.decode(kv.value) for kv in resp.kvs}
        yield list(current.values())
        try:
            async for _, events in etcd.watch_forever(
                prefix, prefix=True, start_revision=resp.header.revision + 1
            ):
                for ev in events:
                    if ev.kind == "put":
                        current[ev.kv.key] = Instance.decode(ev.kv.value)
                    else:
                        current.pop(ev.kv.key, None)
                yield list(current.values())
        except WatchCompactedError:
            # A watch that broke after a quiet spell resumes from a revision etcd's
            # auto-compaction may have dropped: list afresh instead of failing.
            continue
