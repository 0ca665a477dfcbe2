"""The health monitor's section of the live `agentmesh status` and the dashboard: a
`SectionFeed` (services/observe/collector.py) that reads the active monitor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from protos.agentmesh.v1 import health_pb2 as hpb
from protos.agentmesh.v1 import health_pb2_grpc as hpb_grpc
from services._common.follow import named_leader

AGENTS_SHOWN = 1000
"""Agents' health read per refresh (one page): a view shows fewer than that."""


def _name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)


class HealthFeed:
    """Reads the active monitor (any registered monitor points to it) into the model:
    counts by state, ejections, the open alerts, and each agent's state."""

    kind = "health"

    def __init__(self, timeout_s: float = 2.0) -> None:
        self.timeout_s = timeout_s

    async def _call(self, endpoint: str, method: str, request: Any) -> Any:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            stub = hpb_grpc.HealthMonitorStub(channel)
            return await getattr(stub, method)(request, timeout=self.timeout_s)

    async def _active(self, endpoints: Sequence[str]) -> tuple[str, hpb.HealthSummary]:
        last: grpc.aio.AioRpcError | None = None
        for endpoint in endpoints:
            try:
                summary = await self._call(
                    endpoint, "GetHealthSummary", hpb.GetHealthSummaryRequest()
                )
                return endpoint, summary
            except grpc.aio.AioRpcError as err:
                last = err
                if pointed := named_leader(err):
                    summary = await self._call(
                        pointed, "GetHealthSummary", hpb.GetHealthSummaryRequest()
                    )
                    return pointed, summary
        assert last is not None
        raise last

    async def read(self, instances: Sequence[Mapping[str, Any]], model: Any) -> None:
        endpoints = [str(i["endpoint"]) for i in instances if i.get("endpoint")]
        if not endpoints:
            return
        endpoint, s = await self._active(endpoints)
        listed = await self._call(
            endpoint, "ListAgentHealth", hpb.ListAgentHealthRequest(page_size=AGENTS_SHOWN)
        )
        model.apply_section(
            self.kind,
            status="ok",
            message=f"active monitor {s.monitor_id}, term {s.term}",
            data={
                "state_counts": dict(s.state_counts),
                "ejected": s.ejected,
                "half_open": s.half_open,
                "open_alerts": s.open_alert_count,
                "reporting": s.reporting,
            },
            alerts=[
                {
                    "kind": _name(hpb.AlertKind, a.kind, "ALERT_KIND_").lower(),
                    "agent_id": a.agent_id,
                    "task_id": a.task_id,
                    "message": a.message,
                    "opened_at_us": a.opened_at_us,
                }
                for a in s.open_alerts
            ],
            agent_health={
                a.agent_id: {
                    "state": _name(hpb.HealthState, a.state, "HEALTH_STATE_"),
                    "breaker": _name(hpb.BreakerState, a.breaker, "BREAKER_STATE_").lower(),
                    "response_s": round(a.response_s, 1),
                    "reason": a.reason,
                }
                for a in listed.agents
            },
        )
