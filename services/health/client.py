"""A client of the active health monitor: found through etcd (or a given address), a
standby's pointer followed once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from protos.agentmesh.v1 import health_pb2 as hpb
from protos.agentmesh.v1 import health_pb2_grpc as hpb_grpc
from services._common.follow import LeaderClient, named_leader


class NoMonitorError(Exception):
    """No health monitor is active (none runs, or an election is under way)."""


class HealthClient(LeaderClient):
    """Args:
    etcd: etcd endpoints; the active monitor is looked up there.
    monitor: a monitor's host:port, used when etcd is not given.
    cluster: the cluster name (key prefix).
    timeout_s: deadline of each call.
    """

    def __init__(
        self,
        etcd: str | None = None,
        monitor: str | None = None,
        cluster: str = "default",
        timeout_s: float = 5.0,
    ) -> None:
        super().__init__("health", etcd, monitor, cluster, "health monitor")
        self._channel: grpc.aio.Channel | None = None
        self.timeout_s = timeout_s

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def active(self) -> str:
        """The active monitor's host:port ('' when none is elected)."""
        return await self.leader()

    async def _stub(self) -> hpb_grpc.HealthMonitorStub:
        if self._channel is None:
            endpoint = await self.active()
            if not endpoint:
                raise NoMonitorError(
                    self.no_leader_message(
                        "no health monitor is active (is `agentmesh serve health` running?)"
                    )
                )
            self._channel = grpc.aio.insecure_channel(endpoint)
        return hpb_grpc.HealthMonitorStub(self._channel)

    async def _call(self, method: str, request: Any) -> Any:
        for attempt in range(2):
            stub = await self._stub()
            try:
                return await getattr(stub, method)(request, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as err:
                pointed = named_leader(err)
                if attempt or err.code() != grpc.StatusCode.UNAVAILABLE or not pointed:
                    raise
                await self.close()
                self._etcd_endpoints, self._fixed = None, pointed
        raise AssertionError("unreachable")

    async def summary(self) -> hpb.HealthSummary:
        resp: hpb.HealthSummary = await self._call(
            "GetHealthSummary", hpb.GetHealthSummaryRequest()
        )
        return resp

    async def get(self, agent_id: str) -> hpb.AgentHealth:
        resp: hpb.AgentHealth = await self._call(
            "GetHealth", hpb.GetHealthRequest(agent_id=agent_id)
        )
        return resp

    async def agents(
        self, states: Sequence[int] = (), page_size: int = 1000
    ) -> AsyncIterator[hpb.AgentHealth]:
        """Every agent's health (in agent id order), page by page."""
        token = ""
        while True:
            resp = await self._call(
                "ListAgentHealth",
                hpb.ListAgentHealthRequest(
                    states=states,  # type: ignore[arg-type]
                    page_size=page_size,
                    page_token=token,
                ),
            )
            for agent in resp.agents:
                yield agent
            token = resp.next_page_token
            if not token:
                return

    async def watch(self, agent_ids: Sequence[str] = ()) -> AsyncIterator[hpb.HealthEvent]:
        """Events from now on (no deadline: as long as the caller reads)."""
        stub = await self._stub()
        async for event in stub.WatchHealth(hpb.WatchHealthRequest(agent_ids=agent_ids)):
            yield event
