"""Service discovery: instances register under services/<kind>/<id> on their lease, and
the agents a pool hosts under agents/<agent id> on the pool's lease."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field

from registry.errors import RegistryError
from registry.etcd import Etcd, RequestOp, WatchCompactedError, op_delete, op_put

MAX_TXN_OPS = 128
"""etcd's default limit of operations per transaction (--max-txn-ops)."""


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


# ---------------------------------------------------------------- agents


@dataclass(frozen=True)
class AgentRecord:
    """What agents/<agent id> holds: the agent's pool, and the kinds and roles it takes.

    The value is JSON {"pool", "kinds", "roles"}; agents in any language write it (the
    Node agent in clients/node does), so its fields only ever grow.
    """

    agent_id: str
    pool_id: str
    kinds: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return json.dumps(
            {"pool": self.pool_id, "kinds": list(self.kinds), "roles": list(self.roles)}
        ).encode()

    @staticmethod
    def decode(agent_id: str, raw: bytes) -> AgentRecord:
        """ValueError if `raw` is not a record."""
        try:
            doc = json.loads(raw)
            return AgentRecord(
                agent_id,
                str(doc.get("pool", "")),
                tuple(str(k) for k in doc.get("kinds", ())),
                tuple(str(r) for r in doc.get("roles", ())),
            )
        except (ValueError, TypeError, AttributeError):
            raise ValueError(f"agents/{agent_id} does not hold an agent record") from None


def agent_key(etcd: Etcd, agent_id: str) -> bytes:
    return etcd.key("agents", agent_id)


async def put_all(etcd: Etcd, lease_id: int, items: Sequence[tuple[bytes, bytes]]) -> None:
    """Put every (key, value) on `lease_id`, MAX_TXN_OPS to a transaction. Every batch is
    tried; the first error is raised after the last batch."""
    await _in_batches(etcd, [op_put(k, v, lease_id) for k, v in items])


async def delete_all(etcd: Etcd, keys: Iterable[bytes]) -> None:
    """Delete every key, MAX_TXN_OPS to a transaction (see `put_all`)."""
    await _in_batches(etcd, [op_delete(k) for k in keys])


async def register_agents(etcd: Etcd, lease_id: int, records: Iterable[AgentRecord]) -> None:
    """Publish agents on their pool's lease (they disappear with it)."""
    await put_all(etcd, lease_id, [(agent_key(etcd, r.agent_id), r.encode()) for r in records])


async def deregister_agents(etcd: Etcd, agent_ids: Iterable[str]) -> None:
    await delete_all(etcd, (agent_key(etcd, a) for a in agent_ids))


async def resolve_agents(etcd: Etcd, page: int = 1000) -> list[AgentRecord]:
    """Every registered agent, read `page` keys at a time; a record that cannot be read
    counts with an empty pool."""
    prefix = etcd.key("agents") + b"/"
    out: list[AgentRecord] = []
    async for kv in etcd.scan(prefix, page):
        agent_id = kv.key[len(prefix) :].decode(errors="replace")
        try:
            out.append(AgentRecord.decode(agent_id, kv.value))
        except ValueError:
            out.append(AgentRecord(agent_id, ""))
    return out


async def _in_batches(etcd: Etcd, ops: Sequence[RequestOp]) -> None:
    failed: RegistryError | None = None
    for i in range(0, len(ops), MAX_TXN_OPS):
        try:
            await etcd.txn([], ops[i : i + MAX_TXN_OPS])
        except RegistryError as err:  # the other batches still go out
            failed = failed or err
    if failed is not None:
        raise failed
