"""Cost totals to etcd (services/coordinator/llm_costs.py) with a stub etcd and fence."""

from __future__ import annotations

from typing import Any

import pytest

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from registry.errors import StoreRefusedError
from services._common.clock import FakeClock
from services._common.errors import NotLeaderError, StoreUnavailableError
from services.agent_pool.llm_config import LlmConfig
from services.coordinator.llm_admission import LlmGate
from services.coordinator.llm_costs import flush_once


class StubEtcd:
    def key(self, *parts: str) -> bytes:
        return b"/agentmesh/default/" + "/".join(parts).encode()


def charged_gate() -> LlmGate:
    g = LlmGate(LlmConfig(), FakeClock())
    g.charge(
        agent="a1",
        role="",
        model="m",
        project="alpha",
        input_tokens=10,
        output_tokens=5,
        cost_usd=0.25,
    )
    return g


async def test_changed_totals_are_written_once_under_the_fence() -> None:
    g = charged_gate()
    sent: list[Any] = []

    async def fenced(request: Any) -> None:
        sent.append(request)

    assert await flush_once(StubEtcd(), g, fenced) == 4  # agent, role, model, project
    (txn,) = sent
    puts = {
        op.request_put.key: cpb.CostTotal.FromString(op.request_put.value) for op in txn.success
    }
    project = puts[b"/agentmesh/default/costs/project/alpha"]
    assert project.usage.cost_usd == 0.25
    assert puts[b"/agentmesh/default/costs/role/"].key == ""  # no role: the empty key
    assert await flush_once(StubEtcd(), g, fenced) == 0  # nothing changed since


async def test_an_unknown_outcome_is_written_again_and_a_lost_term_stops() -> None:
    g = charged_gate()

    async def down(request: Any) -> None:
        raise StoreUnavailableError("etcd is unreachable")

    assert await flush_once(StubEtcd(), g, down) == 0
    assert len(g.dirty) == 4  # absolute totals: writing them again is harmless

    async def deposed(request: Any) -> None:
        raise NotLeaderError("term over")

    with pytest.raises(NotLeaderError):
        await flush_once(StubEtcd(), g, deposed)


async def test_a_refused_write_is_logged_and_does_not_end_the_term(
    caplog: pytest.LogCaptureFixture,
) -> None:
    g = charged_gate()

    async def refuses(request: Any) -> None:
        raise StoreRefusedError("etcdserver: request is too large")

    assert await flush_once(StubEtcd(), g, refuses) == 0  # no raise: the leader goes on
    assert "refused by etcd" in caplog.text
    assert not g.dirty  # not retried every second: written again once they change
