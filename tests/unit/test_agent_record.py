"""The agent record under agents/<id> (registry.discovery.AgentRecord): agents in any
language write it, so its bytes are a contract."""

from __future__ import annotations

import json

import pytest

from registry.discovery import AgentRecord


def test_the_record_is_the_json_every_agent_writes() -> None:
    record = AgentRecord("p-a0001", "p", ("echo", "llm"), ("coder",))
    assert json.loads(record.encode()) == {
        "pool": "p",
        "kinds": ["echo", "llm"],
        "roles": ["coder"],
    }
    assert AgentRecord.decode("p-a0001", record.encode()) == record


def test_a_node_agents_record_reads_back() -> None:
    # clients/node/lib/agent.js: JSON.stringify({ pool, kinds, roles })
    raw = b'{"pool":"node-pool","kinds":["upper","echo"],"roles":[]}'
    assert AgentRecord.decode("node-1", raw) == AgentRecord(
        "node-1", "node-pool", ("upper", "echo"), ()
    )
    # fields only ever grow: a newer writer's extra field is ignored, a missing one is empty
    assert AgentRecord.decode("x", b'{"pool": "p", "zone": "eu"}') == AgentRecord("x", "p")


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'"pool"', b'{"kinds": 5}'])
def test_what_is_not_a_record_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError, match="agents/x does not hold an agent record"):
        AgentRecord.decode("x", raw)
