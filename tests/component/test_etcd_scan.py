"""`Etcd.scan` against a real etcd: every key under a prefix, in order, across pages,
and nothing from beside the prefix (what the health monitor's takeover and the agent
registry read with it), and a role's leader found through it."""

from __future__ import annotations

from registry import discovery
from registry.election import Election
from registry.etcd import Etcd
from registry.leadership import leader_value
from services._common.follow import find_leader


async def test_scan_reads_every_key_across_pages_and_stops_at_the_prefix(etcd: Etcd) -> None:
    for i in range(7):
        await etcd.put(etcd.key("health", f"a{i}"), str(i).encode())
    await etcd.put(etcd.key("healthz"), b"beside")  # shares the prefix's text, not its /
    keys = [kv.key async for kv in etcd.scan(etcd.key("health") + b"/", page=3)]
    assert keys == [etcd.key("health", f"a{i}") for i in range(7)]


async def test_scan_of_an_empty_prefix_yields_nothing(etcd: Etcd) -> None:
    assert [kv async for kv in etcd.scan(etcd.key("nothing") + b"/")] == []


async def test_registered_agents_read_in_pages_and_unreadable_ones_count(etcd: Etcd) -> None:
    records = [discovery.AgentRecord(f"a{i}", "p1", ("echo",)) for i in range(5)]
    await discovery.register_agents(etcd, 0, records)
    await etcd.put(discovery.agent_key(etcd, "odd"), b"not json")
    got = await discovery.resolve_agents(etcd, page=2)
    assert [(r.agent_id, r.pool_id) for r in got] == [
        *((f"a{i}", "p1") for i in range(5)),
        ("odd", ""),
    ]


async def test_a_leader_is_found_by_its_role_and_none_is_empty(etcd: Etcd) -> None:
    assert await find_leader(etcd, "health") == ""
    lease = await etcd.grant(5)
    try:
        await Election(etcd, "health", lease, leader_value("h1", "a:1")).campaign()
        assert await find_leader(etcd, "health") == "a:1"
        assert await find_leader(etcd, "coordinator") == ""
    finally:
        await etcd.revoke(lease)
    assert await find_leader(etcd, "health") == ""
