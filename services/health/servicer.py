"""The HealthMonitor gRPC service: adapts streams and calls to the current term's core."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import grpc

from protos.agentmesh.v1 import health_pb2 as hpb
from protos.agentmesh.v1 import health_pb2_grpc as hpb_grpc
from services._common.errors import (
    DomainError,
    InvalidArgumentError,
    NotLeaderError,
    ResourceExhaustedError,
)
from services._common.grpcserver import abort, rpc_errors
from services.health import metrics
from services.health.core import HealthCore

WATCH_QUEUE_LIMIT = 10_000
WRITER_GRACE_S = 1.0
"""How long a closing stream waits for the directive being written before it ends."""
_END = hpb.HealthEvent()
"""The sentinel a watcher gets when the term ends."""


class HealthServicer(hpb_grpc.HealthMonitorServicer):
    """A standby answers UNAVAILABLE with the active monitor's address."""

    def __init__(self) -> None:
        self.core: HealthCore | None = None
        self.leader_endpoint = ""
        self.subscribers: set[Callable[[hpb.HealthEvent], None]] = set()
        """Watchers; outlives a term so they see it end. Each term's core shares it."""
        self._outboxes: set[asyncio.Queue[hpb.HealthDirective | None]] = set()

    def _core(self) -> HealthCore:
        core = self.core
        if core is None:
            hint = (
                f"; the active monitor is {self.leader_endpoint}"
                if self.leader_endpoint
                else "; no monitor is active yet"
            )
            raise NotLeaderError(f"this health monitor is a standby{hint}", self.leader_endpoint)
        return core

    async def Report(
        self, request_iterator: AsyncIterator[hpb.Heartbeat], context: grpc.aio.ServicerContext
    ) -> None:
        """One agent's heartbeats in, directives out; the stream's end is the core's news."""
        outbox: asyncio.Queue[hpb.HealthDirective | None] = asyncio.Queue()
        try:
            core = self._core()
            first = await anext(request_iterator, None)
            if first is None:
                raise InvalidArgumentError("send a heartbeat (with info) first")
            stream = core.connect(first, outbox.put_nowait)
        except DomainError as err:
            if isinstance(err, NotLeaderError) and self.leader_endpoint:
                await context.write(
                    hpb.HealthDirective(
                        redirect=hpb.HealthRedirect(monitor_endpoint=self.leader_endpoint)
                    )
                )
            await abort(context, err)
            return
        agent_id = first.agent_id
        self._outboxes.add(outbox)

        async def reader() -> None:
            core.heartbeat(stream, first)
            async for hb in request_iterator:
                metrics.HEARTBEATS.inc()
                if hb.agent_id != agent_id:
                    raise InvalidArgumentError(
                        f"agent_id {hb.agent_id[:128]!r} on a stream opened by {agent_id!r}: "
                        "one stream per agent"
                    )
                core.heartbeat(stream, hb)

        async def writer() -> None:
            with contextlib.suppress(Exception):  # a dead peer: the reader side ends too
                while (msg := await outbox.get()) is not None:
                    await context.write(msg)

        read_task = asyncio.ensure_future(reader())
        write_task = asyncio.ensure_future(writer())
        try:
            await asyncio.wait({read_task, write_task}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            write_task.cancel()  # grpc cancelled the call: nothing more can be written
            raise
        finally:
            core.disconnect(agent_id, stream)
            self._outboxes.discard(outbox)
            read_task.cancel()
            outbox.put_nowait(None)  # the writer sends what is queued, then stops
        # as in the coordinator's Connect: the call's status cannot go out while a write is
        # pending, and a write cancelled half-way left this stream hanging for good; so the
        # writer finishes, within a bound
        done, _ = await asyncio.wait({write_task}, timeout=WRITER_GRACE_S)
        if not done:
            write_task.cancel()
            raise asyncio.CancelledError  # its peer reads nothing: no status can reach it
        if read_task.done() and not read_task.cancelled():
            failure = read_task.exception()
            if isinstance(failure, DomainError):
                await abort(context, failure)  # a heartbeat over a limit: say which field

    @rpc_errors
    async def GetHealth(
        self, request: hpb.GetHealthRequest, context: grpc.aio.ServicerContext
    ) -> hpb.AgentHealth:
        if not request.agent_id:
            raise InvalidArgumentError("agent_id is required")
        return self._core().get(request.agent_id)

    @rpc_errors
    async def ListAgentHealth(
        self, request: hpb.ListAgentHealthRequest, context: grpc.aio.ServicerContext
    ) -> hpb.ListAgentHealthResponse:
        agents, token = self._core().page(request.states, request.page_size, request.page_token)
        return hpb.ListAgentHealthResponse(agents=agents, next_page_token=token)

    @rpc_errors
    async def GetHealthSummary(
        self, request: hpb.GetHealthSummaryRequest, context: grpc.aio.ServicerContext
    ) -> hpb.HealthSummary:
        return self._core().summary()

    async def WatchHealth(
        self, request: hpb.WatchHealthRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[hpb.HealthEvent]:
        try:
            self._core()
            async for event in self._watch(request):
                yield event
        except DomainError as err:
            await abort(context, err)

    async def _watch(self, request: hpb.WatchHealthRequest) -> AsyncIterator[hpb.HealthEvent]:
        wanted = frozenset(request.agent_ids)
        queue: asyncio.Queue[hpb.HealthEvent] = asyncio.Queue(WATCH_QUEUE_LIMIT)
        overflow = False

        def on_event(event: hpb.HealthEvent) -> None:
            nonlocal overflow
            if wanted and event is not _END and _agent_of(event) not in wanted:
                return
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                overflow = True

        self.subscribers.add(on_event)
        try:
            while True:
                event = await queue.get()
                if overflow:
                    raise ResourceExhaustedError(
                        f"watcher fell more than {WATCH_QUEUE_LIMIT:,} events behind; reconnect"
                    )
                if event is _END:
                    raise NotLeaderError(
                        "the monitor's term ended; watch the new active monitor",
                        self.leader_endpoint,
                    )
                yield event
        finally:
            self.subscribers.discard(on_event)

    def end_term(self, redirect_to: str = "") -> None:
        """Close every Report stream (agents reconnect to whoever etcd names, or to
        `redirect_to`) and every watch."""
        self.core = None
        for callback in tuple(self.subscribers):
            callback(_END)
        for outbox in tuple(self._outboxes):
            if redirect_to:
                outbox.put_nowait(
                    hpb.HealthDirective(redirect=hpb.HealthRedirect(monitor_endpoint=redirect_to))
                )
            outbox.put_nowait(None)


def _agent_of(event: hpb.HealthEvent) -> str:
    body = event.WhichOneof("body")
    return getattr(event, body).agent_id if body else ""
