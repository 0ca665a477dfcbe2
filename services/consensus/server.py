"""The consensus process: a Runner, one elected active instance, a thin servicer."""

from __future__ import annotations

import asyncio
import gc
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


class ConsensusNode:
    """One consensus process: the Runner, the servicer, and the leadership loop."""

    def __init__(self, cfg: ConsensusConfig) -> None:
        self.cfg = cfg
        self.runner = Runner("consensus", cfg, [SERVICE])
        self.servicer = ConsensusServicer(ConsensusStore(self.runner.etcd), self._leader)
        pb_grpc.add_ConsensusServicer_to_server(self.servicer, self.runner.server)

    async def _leader(self) -> tuple[str, str, int]:
        found = await current_leader(self.runner.etcd, ROLE)
        if found is None:
            return "", "", 0
        node, endpoint = parse_leader_value(found.value)
        return node, endpoint, found.term

    async def lead(self, term: Term) -> None:
        runner, cfg, servicer = self.runner, self.cfg, self.servicer
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

    async def follow(self) -> None:
        """Keep the active instance's address at hand for the standby's redirects."""
        while True:
            try:
                async for found in observe(self.runner.etcd, ROLE):
                    endpoint = parse_leader_value(found.value)[1] if found else ""
                    self.servicer.leader_endpoint = endpoint
            except StoreUnavailableError:
                await asyncio.sleep(0.5)

    async def run(self) -> None:
        leadership = self.runner.leadership(ROLE)
        await self.runner.run(lambda: leadership.serve(self.lead), self.follow)


async def serve(cfg: ConsensusConfig) -> None:
    node = ConsensusNode(cfg)
    # Every vote allocates a handful of short-lived objects; at CPython's default
    # gen-0 threshold (700) the collector runs thousands of times a second here.
    # Freezing what startup allocated and collecting gen 0 less often leaves the
    # cycles to the votes.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    await node.run()
