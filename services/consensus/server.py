"""The consensus process: a Runner, one elected active instance, a thin servicer."""

from __future__ import annotations

import asyncio
import logging

from protos.agentmesh.v1 import consensus_pb2 as pb
from protos.agentmesh.v1 import consensus_pb2_grpc as pb_grpc
from registry.election import current_leader, observe
from registry.leadership import Term, parse_leader_value
from services._common.errors import StoreUnavailableError
from services._common.runner import Runner
from services.consensus.config import ConsensusConfig
from services.consensus.core import ConsensusCore
from services.consensus.servicer import ConsensusServicer
from services.consensus.store import ConsensusStore

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Consensus"].full_name
ROLE = "consensus"


async def serve(cfg: ConsensusConfig) -> None:
    runner = Runner("consensus", cfg, [SERVICE])

    async def leader() -> tuple[str, str, int]:
        found = await current_leader(runner.etcd, ROLE)
        if found is None:
            return "", "", 0
        node, endpoint = parse_leader_value(found.value)
        return node, endpoint, found.term

    servicer = ConsensusServicer(ConsensusStore(runner.etcd), leader)
    pb_grpc.add_ConsensusServicer_to_server(servicer, runner.server)

    async def lead(term: Term) -> None:
        store = ConsensusStore(
            runner.etcd,
            term.fenced,
            max_ops=cfg.vote_batch_ops,
            max_bytes=cfg.vote_batch_bytes,
            max_inflight=cfg.vote_inflight,
            sleep=runner.clock.sleep,
        )
        core = ConsensusCore(store, runner.clock, cfg, term=term.number, node_id=runner.node_id)
        servicer.core = core
        servicer.leader_endpoint = runner.endpoint
        await runner.serving(True)
        log.info("active consensus instance", extra={"term": term.number})
        try:
            await core.run()
        finally:
            await runner.serving(False)
            servicer.core = None
            if servicer.leader_endpoint == runner.endpoint:
                servicer.leader_endpoint = ""
            store.votes.close()
            await core.close()

    async def follow() -> None:
        """Keep the active instance's address at hand for the standby's redirects."""
        while True:
            try:
                async for found in observe(runner.etcd, ROLE):
                    servicer.leader_endpoint = parse_leader_value(found.value)[1] if found else ""
            except StoreUnavailableError:
                await asyncio.sleep(0.5)

    leadership = runner.leadership(ROLE)
    await runner.run(lambda: leadership.serve(lead), follow)
