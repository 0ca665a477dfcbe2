"""The Consensus gRPC service: validates, calls the core (or etcd for reads), maps errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from protos.agentmesh.v1 import consensus_pb2 as pb
from protos.agentmesh.v1 import consensus_pb2_grpc as pb_grpc
from registry.etcd import WatchCompactedError
from services._common.errors import InvalidArgumentError, NotFoundError, NotLeaderError
from services._common.grpcserver import rpc_errors
from services.consensus import limits
from services.consensus.core import ConsensusCore
from services.consensus.store import ConsensusStore, decode_decision

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0
MAX_PAGE = 1000


class ConsensusServicer(pb_grpc.ConsensusServicer):
    """Adapts RPCs to the current term's core; reads go to etcd on every instance."""

    def __init__(
        self, reader: ConsensusStore, leader: Callable[[], Awaitable[tuple[str, str, int]]]
    ) -> None:
        self.reader = reader
        self.core: ConsensusCore | None = None
        self.leader_endpoint = ""
        self._leader = leader

    async def _core(self) -> ConsensusCore:
        core = self.core
        if core is None or core.closed or core.failed is not None:
            # the follower may lag an election by a moment: ask etcd before answering
            endpoint = self.leader_endpoint or (await self._leader())[1]
            hint = f"; the active instance is {endpoint}" if endpoint else "; none is elected yet"
            raise NotLeaderError(f"this consensus instance is a standby{hint}", endpoint)
        return core

    @rpc_errors
    async def Propose(
        self, request: pb.ProposeRequest, context: grpc.aio.ServicerContext
    ) -> pb.ProposeResponse:
        core = await self._core()
        proposal, decision, created, pending = await core.propose(request)
        if decision is None and pending is not None and request.wait:
            # shielded: a caller that goes away leaves the proposal to be decided
            decision = await asyncio.shield(pending)
        resp = pb.ProposeResponse(proposal=proposal, created=created)
        if decision is not None:
            resp.decision.CopyFrom(decision)
        return resp

    @rpc_errors
    async def GetDecision(
        self, request: pb.GetDecisionRequest, context: grpc.aio.ServicerContext
    ) -> pb.Decision:
        limits.check_id(request.proposal_id, "proposal_id")
        decision = await self.reader.get_decision(request.proposal_id)
        if decision is None:
            proposal = await self.reader.get_proposal(request.proposal_id)
            state = "still open" if proposal is not None else "unknown"
            raise NotFoundError(f"proposal {request.proposal_id} is {state}: no decision yet")
        return decision

    @rpc_errors
    async def ListDecisions(
        self, request: pb.ListDecisionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDecisionsResponse:
        size = request.page_size or 100
        if not 1 <= size <= MAX_PAGE:
            raise InvalidArgumentError(f"page_size must be 1-{MAX_PAGE} (0: 100)")
        after = 0
        if request.page_token:
            token = request.page_token
            # an etcd revision: ASCII digits that fit an int64 (int() would also take
            # "-5", "1_000" or other scripts' digits, and a longer number overflows
            # the etcd request, INTERNAL)
            if not (token.isascii() and token.isdigit() and len(token) <= 18):
                raise InvalidArgumentError("page_token is not one this service gave")
            after = int(token)
        decisions, cursor = await self.reader.list_decisions(after, size, request.protocol)
        return pb.ListDecisionsResponse(
            decisions=decisions, next_page_token=str(cursor) if cursor else ""
        )

    @rpc_errors  # type: ignore[type-var]  # works for async generators too
    async def WatchDecisions(
        self, request: pb.WatchDecisionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Decision]:
        etcd = self.reader.etcd
        prefix = self.reader.prefix("decisions")
        after = request.after_revision
        if not 0 <= after < 2**63 - 1:  # the next revision must fit etcd's int64 too
            raise InvalidArgumentError("after_revision must be 0 or a Decision.revision")
        if after:
            # catch up from etcd first, then watch from where the listing ended
            while True:
                page, cursor = await self.reader.list_decisions(after, MAX_PAGE, request.protocol)
                for decision in page:
                    yield decision
                after = max(after, cursor, *(d.revision for d in page)) if page else after
                if not cursor:
                    break
        start = after + 1 if after else 0
        sent = after  # the revision of the last decision delivered (or skipped)
        while True:
            try:
                async for _, events in etcd.watch_forever(
                    prefix, prefix=True, start_revision=start
                ):
                    for ev in events:
                        if ev.kind != "put" or ev.kv.version != 1:
                            continue  # a decision is written once: only creations count
                        decision = decode_decision(ev.kv)
                        if decision.revision <= sent:
                            continue  # listed already, after a compaction
                        sent = decision.revision
                        start = sent + 1
                        if not request.protocol or decision.protocol == request.protocol:
                            yield decision
                return
            except WatchCompactedError as err:
                # history compacted under a slow or idle watcher: list what it missed,
                # then watch from the compaction on (from `start` again, the watch
                # would be refused at once, forever, whenever nothing was missed)
                cursor = start - 1
                while True:
                    page, cursor = await self.reader.list_decisions(
                        cursor, MAX_PAGE, request.protocol
                    )
                    for decision in page:
                        sent = max(sent, decision.revision)
                        yield decision
                    if not cursor:
                        break
                start = max(sent, err.compact_revision) + 1

    @rpc_errors
    async def GetStatus(
        self, request: pb.GetConsensusStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ConsensusStatus:
        core = self.core
        status = core.status() if core is not None and not core.closed else pb.ConsensusStatus()
        status.leader_id, status.leader_endpoint, status.term = await self._leader()
        return status

    async def Participate(
        self, request_iterator: AsyncIterator[pb.VoterMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ConsensusMessage]:
        async for msg in _participate(self, request_iterator, context):
            yield msg


@rpc_errors  # type: ignore[type-var]
async def _participate(
    self: ConsensusServicer,
    request_iterator: AsyncIterator[pb.VoterMessage],
    context: grpc.aio.ServicerContext,
) -> AsyncIterator[pb.ConsensusMessage]:
    core = await self._core()
    try:
        first = await asyncio.wait_for(anext(request_iterator), HELLO_TIMEOUT_S)
    except (StopAsyncIteration, TimeoutError):
        raise InvalidArgumentError(
            f"send hello first, within {HELLO_TIMEOUT_S:g} s of opening the stream"
        ) from None
    if first.WhichOneof("body") != "hello":
        raise InvalidArgumentError("the first message on Participate must be hello")
    outbox: asyncio.Queue[pb.ConsensusMessage | None] = asyncio.Queue()
    voter = await core.connect(first.hello, outbox.put_nowait)
    reader = asyncio.ensure_future(_read(core, voter, request_iterator, outbox))
    try:
        while (msg := await outbox.get()) is not None:
            yield msg
        if core.closed or core.failed is not None:
            raise NotLeaderError(
                "the consensus term ended; reconnect to the active instance", self.leader_endpoint
            )
    finally:
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
        core.disconnect(voter)


async def _read(
    core: ConsensusCore,
    voter: Any,
    request_iterator: AsyncIterator[pb.VoterMessage],
    outbox: asyncio.Queue[pb.ConsensusMessage | None],
) -> None:
    try:
        async for msg in request_iterator:
            if msg.WhichOneof("body") == "vote":
                core.on_vote(voter, msg.vote)
    except grpc.aio.AioRpcError:
        pass
    finally:
        outbox.put_nowait(None)  # the agent half-closed or went away: end the stream
