"""The consensus process: a Runner, one elected active instance, a thin servicer."""

from __future__ import annotations

import logging

from protos.agentmesh.v1 import consensus_pb2 as pb
from protos.agentmesh.v1 import consensus_pb2_grpc as pb_grpc
from registry.leadership import Term
from services._common import heap
from services._common.follow import Leader, leading
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
        self.runner = runner = Runner(ROLE, cfg, [SERVICE])
        self.leader = Leader(runner.etcd, ROLE, runner.clock)
        self.servicer = ConsensusServicer(ConsensusStore(runner.etcd), self.leader.current)
        self.leader.servicer = self.servicer
        pb_grpc.add_ConsensusServicer_to_server(self.servicer, runner.server)

    async def lead(self, term: Term) -> None:
        runner, cfg = self.runner, self.cfg
        store = ConsensusStore.for_term(runner.etcd, term.fenced, cfg, runner.clock.sleep)
        core = ConsensusCore(store, runner.clock, cfg, term=term.number, node_id=runner.node_id)
        self.servicer.core = core
        try:
            async with leading(runner, self.leader):
                log.info("active consensus instance", extra={"term": term.number})
                await core.run()
        finally:
            self.servicer.core = None
            store.votes.close()
            await core.close()

    async def run(self) -> None:
        leadership = self.runner.leadership(ROLE)
        try:
            await self.runner.run(lambda: leadership.serve(self.lead), self.leader.follow)
        finally:
            await self.leader.close()


async def serve(cfg: ConsensusConfig) -> None:
    node = ConsensusNode(cfg)
    # Every vote allocates a handful of short-lived objects; at CPython's default
    # gen-0 threshold (700) the collector runs thousands of times a second here.
    heap.settle()
    await node.run()
