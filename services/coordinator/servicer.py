"""The Coordinator gRPC service: validates, calls the core, maps errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.errors import (
    DomainError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotLeaderError,
    ResourceExhaustedError,
    StoreUnavailableError,
)
from services._common.grpcserver import abort, rpc_errors
from services.coordinator.core import TERMINAL, CoordinatorCore

log = logging.getLogger(__name__)

WATCH_QUEUE_LIMIT = 100_000


class Hub:
    """Task events fan out to watchers; outlives a term so watchers see it end."""

    def __init__(self) -> None:
        self.subscribers: set[Callable[[tpb.Task, int], None]] = set()

    def end_term(self) -> None:
        for callback in tuple(self.subscribers):
            callback(tpb.Task(), -1)  # a sentinel: the stream ends with UNAVAILABLE


class Subscription:
    """A watcher's bounded queue of task events, subscribed from `with` on."""

    def __init__(self, hub: Hub, accept: Callable[[tpb.Task], bool]) -> None:
        self.hub = hub
        self.accept = accept
        self.queue: asyncio.Queue[tuple[tpb.Task, int]] = asyncio.Queue(WATCH_QUEUE_LIMIT)
        self.overflow = False

    def _on_event(self, task: tpb.Task, previous: int) -> None:
        if previous == -1 or self.accept(task):
            try:
                self.queue.put_nowait((task, previous))
            except asyncio.QueueFull:
                self.overflow = True

    def __enter__(self) -> Subscription:
        self.hub.subscribers.add(self._on_event)
        return self

    def __exit__(self, *exc: object) -> None:
        self.hub.subscribers.discard(self._on_event)

    async def events(
        self, leader: Callable[[], str], until_terminal: bool
    ) -> AsyncIterator[tpb.TaskEvent]:
        while True:
            task, previous = await self.queue.get()
            if self.overflow:
                raise ResourceExhaustedError(
                    "watcher fell more than 100,000 events behind; reconnect"
                )
            if previous == -1:
                raise NotLeaderError(
                    "the leader's term ended; reconnect to the new leader", leader()
                )
            yield tpb.TaskEvent(task=task, previous_state=previous)  # type: ignore[arg-type]
            if until_terminal and task.state in TERMINAL:
                return


class CoordinatorServicer(cpb_grpc.CoordinatorServicer):
    """Adapts RPCs to the current term's core; a standby answers UNAVAILABLE with the leader."""

    def __init__(self, status: Callable[[], Any]) -> None:
        self.core: CoordinatorCore | None = None
        self.leader_endpoint = ""
        self.hub = Hub()
        self._status = status
        self.health_term: Callable[[], Awaitable[int]] | None = None
        """The active health monitor's term now (ReleaseClaims checks the caller's)."""

    def _core(self) -> CoordinatorCore:
        core = self.core
        if core is None or core.deposed:
            hint = (
                f"; the leader is {self.leader_endpoint}"
                if self.leader_endpoint
                else "; no leader is elected yet"
            )
            raise NotLeaderError(f"this coordinator is a standby{hint}", self.leader_endpoint)
        return core

    @rpc_errors
    async def Submit(
        self, request: cpb.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> cpb.SubmitResponse:
        if not request.HasField("spec"):
            raise InvalidArgumentError("spec is required")
        ((task, created),) = await self._core().submit([request.spec])
        return cpb.SubmitResponse(task=task, created=created)

    @rpc_errors
    async def SubmitBatch(
        self, request: cpb.SubmitBatchRequest, context: grpc.aio.ServicerContext
    ) -> cpb.SubmitBatchResponse:
        results = await self._core().submit(request.specs)
        return cpb.SubmitBatchResponse(
            results=[cpb.SubmitResponse(task=t, created=c) for t, c in results]
        )

    @rpc_errors
    async def GetTask(
        self, request: cpb.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> tpb.Task:
        if not request.task_id:
            raise InvalidArgumentError("task_id is required")
        return await self._core().get(request.task_id)

    @rpc_errors
    async def CancelTask(
        self, request: cpb.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> tpb.Task:
        if not request.task_id:
            raise InvalidArgumentError("task_id is required")
        return await self._core().cancel(request.task_id, request.reason)

    @rpc_errors
    async def ListTasks(
        self, request: cpb.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> cpb.ListTasksResponse:
        core = self._core()
        size = request.page_size or 100
        if size > 1000:
            raise InvalidArgumentError(f"page_size {size} is too large: use 1-1000")
        states = set(request.states)
        out: list[tpb.Task] = []
        cursor = request.page_token
        store = core.store
        for _ in range(20):  # bounded: a sparse filter returns a short page, never a slow one
            tasks, last = await store.page(cursor, size)  # type: ignore[attr-defined]
            for task in tasks:
                live = core.active.get(task.task_id)
                task = live.task if live else task
                if states and task.state not in states:
                    continue
                if request.kind and task.spec.kind != request.kind:
                    continue
                if request.agent_id and task.agent_id != request.agent_id:
                    continue
                out.append(task)
            cursor = last
            if not last or len(out) >= size:
                break
        if len(out) > size:
            cursor = out[size - 1].task_id
            out = out[:size]
        return cpb.ListTasksResponse(tasks=out, next_page_token=cursor)

    async def WatchTask(
        self, request: cpb.WatchTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tpb.TaskEvent]:
        try:
            if not request.task_id:
                raise InvalidArgumentError("task_id is required")
            task_id = request.task_id
            core = self._core()
            # subscribe before reading the task, so no change can fall in between
            with Subscription(self.hub, lambda t: t.task_id == task_id) as sub:
                first = await core.get(task_id)
                yield tpb.TaskEvent(task=first, previous_state=first.state)
                if first.state in TERMINAL:
                    return
                async for event in sub.events(lambda: self.leader_endpoint, until_terminal=True):
                    yield event
        except DomainError as err:
            await abort(context, err)

    async def WatchEvents(
        self, request: cpb.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tpb.TaskEvent]:
        try:
            self._core()
            states = frozenset(request.states)
            accept = (lambda t: t.state in states) if states else (lambda t: True)
            with Subscription(self.hub, accept) as sub:
                async for event in sub.events(lambda: self.leader_endpoint, until_terminal=False):
                    yield event
        except DomainError as err:
            await abort(context, err)

    @rpc_errors
    async def ListAgents(
        self, request: cpb.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> cpb.ListAgentsResponse:
        core = self._core()
        return cpb.ListAgentsResponse(agents=[a.status() for a in core.agents.values()])

    @rpc_errors
    async def GetStatus(
        self, request: cpb.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> cpb.ClusterStatus:
        # answered by standbys too: status is what an operator asks when things are wrong
        status: cpb.ClusterStatus = await self._status()
        return status

    @rpc_errors
    async def ReleaseClaims(
        self, request: cpb.ReleaseClaimsRequest, context: grpc.aio.ServicerContext
    ) -> cpb.ReleaseClaimsResponse:
        core = self._core()
        current = await self.health_term() if self.health_term is not None else 0
        if not request.health_term or request.health_term != current:
            raise FailedPreconditionError(
                f"health_term {request.health_term} is not the active health monitor's term "
                f"({current or 'none is elected'}); only the active monitor releases claims"
            )
        released, skipped = await core.release_claims(
            request.agent_id, [(c.task_id, c.claim_token) for c in request.claims], request.reason
        )
        return cpb.ReleaseClaimsResponse(
            released=[cpb.ClaimRef(task_id=t, claim_token=c) for t, c in released],
            skipped=[cpb.ClaimRef(task_id=t, claim_token=c) for t, c in skipped],
        )

    async def Connect(
        self, request_iterator: AsyncIterator[cpb.AgentMessage], context: grpc.aio.ServicerContext
    ) -> None:
        """One agent's stream. Reports are handled concurrently so a slow commit does
        not hold up the agent's next message; the stream's end requeues its claims."""
        try:
            core = self._core()
            first = await anext(request_iterator, None)
            if first is None or not first.HasField("hello"):
                raise InvalidArgumentError("the first message on Connect must be hello")
        except DomainError as err:
            if isinstance(err, NotLeaderError) and self.leader_endpoint:
                await context.write(
                    cpb.CoordinatorMessage(
                        redirect=cpb.Redirect(leader_endpoint=self.leader_endpoint)
                    )
                )
            await abort(context, err)
            return
        outbox: asyncio.Queue[cpb.CoordinatorMessage | None] = asyncio.Queue()

        async def writer() -> None:
            with contextlib.suppress(Exception):  # a dead peer: the reader side ends too
                while True:
                    batch = [await outbox.get()]
                    while not outbox.empty():
                        batch.append(outbox.get_nowait())
                    for msg in _fold_acks(batch):
                        if msg is None:
                            return
                        await context.write(msg)

        hello = first.hello
        try:
            agent = core.connect(hello, outbox.put_nowait)
        except DomainError as err:
            await abort(context, err)
            return
        agent_id = agent.agent_id

        async def handle(report: cpb.TaskResult | cpb.TaskFailure) -> None:
            with contextlib.suppress(NotLeaderError, StoreUnavailableError):
                ack = await core.report(agent_id, report)
                outbox.put_nowait(cpb.CoordinatorMessage(ack=ack))

        async def reader() -> None:
            async for msg in request_iterator:
                body = msg.WhichOneof("body")
                if body == "result" or body == "failure":
                    # concurrently: a slow commit must not hold up the agent's next message;
                    # the core owns it, so it completes the task even if the stream ends now
                    core.spawn(handle(getattr(msg, body)))
                elif body == "accepted":
                    core.accepted(agent_id, msg.accepted)
                elif body == "progress":
                    core.progress(agent_id, msg.progress)
                elif body == "draining":
                    core.drain(agent_id)

        read_task = asyncio.ensure_future(reader())
        write_task = asyncio.ensure_future(writer())
        try:
            # either side ending ends the stream: the agent hung up, or the term ended
            await asyncio.wait({read_task, write_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # first and without awaiting: grpc cancels this handler when the peer vanishes,
            # and may cancel it again while it cleans up. Reports already received were
            # scheduled before the requeues this starts, so they commit first and win.
            if core.agents.get(agent_id) is agent:
                core.disconnect(agent_id)
            read_task.cancel()
            write_task.cancel()
            outbox.put_nowait(None)

    def end_term(self, redirect_to: str) -> None:
        """Tell every agent of the ended term where to go, and close the watchers."""
        core = self.core
        self.core = None
        self.hub.end_term()
        if core is None:
            return
        for agent in tuple(core.agents.values()):
            if redirect_to:
                agent.send(
                    cpb.CoordinatorMessage(redirect=cpb.Redirect(leader_endpoint=redirect_to))
                )
            agent.send(None)  # ends the writer, so the stream closes


def _fold_acks(
    batch: list[cpb.CoordinatorMessage | None],
) -> list[cpb.CoordinatorMessage | None]:
    """Fold the acks among queued messages into one message (a write each costs more
    than the rest of an ack's handling); order among the other messages is kept."""
    if len(batch) == 1:
        return batch
    acks = [m for m in batch if m is not None and m.WhichOneof("body") == "ack"]
    if len(acks) < 2:
        return batch
    rest = [m for m in batch if m is None or m.WhichOneof("body") != "ack"]
    carrier = acks[0]
    carrier.acks.extend(m.ack for m in acks[1:])
    return [carrier, *rest]


def leader_value(node_id: str, endpoint: str) -> bytes:
    return f"{node_id} {endpoint}".encode()


def parse_leader_value(raw: bytes) -> tuple[str, str]:
    node, _, endpoint = raw.decode().partition(" ")
    return node, endpoint


def split_services(instances: Sequence[Any]) -> list[cpb.ServiceInstance]:
    return [
        cpb.ServiceInstance(
            kind=i.kind, instance_id=i.instance_id, endpoint=i.endpoint, metadata=i.metadata
        )
        for i in instances
    ]
