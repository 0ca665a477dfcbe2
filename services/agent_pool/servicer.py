"""The AgentPool API: checks each request, calls the pool's core, and answers; errors
go through the one table (`rpc_errors`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from protos.agentmesh.v1 import agent_pool_pb2 as ppb
from protos.agentmesh.v1 import agent_pool_pb2_grpc as ppb_grpc
from services._common.errors import InvalidArgumentError
from services._common.grpcserver import rpc_errors
from services.agent_pool.core import MAX_SPAWN, AgentPool
from services.coordinator import limits

SERVICE = ppb.DESCRIPTOR.services_by_name["AgentPool"].full_name


def _template(request: ppb.SpawnAgentsRequest | ppb.SpawnWavesRequest) -> ppb.AgentTemplate | None:
    return request.template if request.HasField("template") else None


class PoolServicer(ppb_grpc.AgentPoolServicer):
    def __init__(self, core: AgentPool) -> None:
        self.core = core

    @rpc_errors
    async def SpawnAgents(
        self, request: ppb.SpawnAgentsRequest, context: grpc.aio.ServicerContext
    ) -> ppb.SpawnAgentsResponse:
        template = _template(request)
        self.core.check_reply(request.count, template)
        spawned = await self.core.spawn(
            request.count, request.batch_size, template, replaces=request.replaces
        )
        return ppb.SpawnAgentsResponse(
            agents=[a.info() for a in spawned.agents],
            elapsed_s=spawned.elapsed_s,
            from_warm=spawned.from_warm,
        )

    @rpc_errors
    async def SpawnWaves(
        self, request: ppb.SpawnWavesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ppb.SpawnProgress]:
        waves = self.core.spawn_waves(
            request.count, request.wave_size, request.wave_interval_s, _template(request)
        )
        async for p in waves:
            yield ppb.SpawnProgress(
                wave=p.wave,
                started=p.started,
                ready=p.ready,
                failed=p.failed,
                elapsed_s=p.elapsed_s,
            )

    @rpc_errors
    async def StopAgents(
        self, request: ppb.StopAgentsRequest, context: grpc.aio.ServicerContext
    ) -> ppb.StopAgentsResponse:
        if not request.agent_ids and not request.count:
            raise InvalidArgumentError("give agent_ids or a count of agents to stop")
        limits.check_items("agent_ids", request.agent_ids, MAX_SPAWN, limits.ID_BYTES)
        if request.count > MAX_SPAWN:
            raise InvalidArgumentError(f"count {request.count} is out of range: use 0-{MAX_SPAWN}")
        stopped = await self.core.stop(list(request.agent_ids), request.count, request.graceful)
        return ppb.StopAgentsResponse(stopped=stopped)

    @rpc_errors
    async def ListAgents(
        self, request: ppb.ListPoolAgentsRequest, context: grpc.aio.ServicerContext
    ) -> ppb.ListPoolAgentsResponse:
        if request.page_size > MAX_SPAWN:
            raise InvalidArgumentError(
                f"page_size {request.page_size} is too large: use 1-{MAX_SPAWN} (0: as many as fit)"
            )
        limits.check_bytes("page_token", request.page_token, limits.ID_BYTES)
        core = self.core
        resp = ppb.ListPoolAgentsResponse(pool_id=core.pool_id, warm=len(core.warm))
        size = request.page_size or len(core.agents)
        used = 0
        # by id, so a page token is a place in the list whatever starts or stops meanwhile
        for agent_id in sorted(a for a in core.agents if a > request.page_token):
            info = core.agents[agent_id].info()
            info_bytes = info.ByteSize()
            if resp.agents and (
                len(resp.agents) >= size or used + info_bytes > limits.LIST_PAGE_BYTES
            ):
                resp.next_page_token = resp.agents[-1].agent_id
                break
            resp.agents.append(info)
            used += info_bytes
        return resp

    @rpc_errors
    async def Drain(
        self, request: ppb.DrainPoolRequest, context: grpc.aio.ServicerContext
    ) -> ppb.DrainPoolResponse:
        limits.check_bytes("reason", request.reason, limits.REASON_BYTES)
        return ppb.DrainPoolResponse(draining=self.core.drain(request.reason or "pool drain"))
