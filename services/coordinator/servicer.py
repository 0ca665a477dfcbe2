"""The Coordinator gRPC service: validates, calls the core, maps errors."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common import tracing
from services._common.clock import Clock, SystemClock, Timer
from services._common.errors import (
    DomainError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotLeaderError,
    ResourceExhaustedError,
    StoreUnavailableError,
)
from services._common.grpcserver import rpc_errors
from services.coordinator import limits
from services.coordinator.config import CoordinatorConfig
from services.coordinator.core import CoordinatorCore
from services.coordinator.tasks import TERMINAL

log = logging.getLogger(__name__)

BASIC, FULL = cpb.TASK_VIEW_BASIC, cpb.TASK_VIEW_FULL
# A watcher that overflowed cannot be told so while its client reads nothing (the
# status queues behind what is in flight); after this long its stream is cancelled so
# that its slot and buffers are freed.
OVERFLOW_GRACE_S = 5.0
# How long a Connect stream that ends waits for its last write before it is cancelled.
WRITER_DRAIN_S = 2.0
# An accepted report's ack waits this long for the agent's next message to ride on
# (an assignment, most often) before it goes alone: one write per task instead of two
# when agents are busy. Only the agent's copy of the report waits meanwhile, never a
# task: the result is committed and published before its ack is sent. Refusals go at once.
# 0.3 s: at 770 tasks/s (an agent's next task ~260 ms away) the pools used 20 % less CPU
# per task than with 0.1 s; 1 s gave nothing more.
ACK_RIDE_S = 0.3
# Acks held at most for one stream; past this they go at once.
ACK_RIDE_MAX = 1000
# Reads of LIST_READ_RECORDS records per ListTasks call: a sparse filter gets a short
# page (with a token to go on), never a slow one.
LIST_MAX_READS = 40


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    """Retrieve an outcome nobody will read, so that asyncio does not log it."""
    if not future.cancelled():
        future.exception()


def basic(task: tpb.Task, *, shared: bool = True) -> tpb.Task:
    """`task` without its payload and result (the BASIC view). A task the caller does
    not own (`shared`) is copied first."""
    if shared:
        copy = tpb.Task()
        copy.CopyFrom(task)
        task = copy
    task.spec.ClearField("payload")
    task.ClearField("result")
    return task


class _Published:
    """One change (or progress) of a task, with each view's event built once, however
    many watchers take it."""

    __slots__ = ("_events", "previous", "progress", "task")

    def __init__(
        self, task: tpb.Task, previous: int, progress: tpb.ProgressUpdate | None = None
    ) -> None:
        self.task = task
        self.previous = previous
        self.progress = progress
        self._events: dict[int, tuple[tpb.TaskEvent, int]] = {}

    def event(self, view: int) -> tuple[tpb.TaskEvent, int]:
        """(the event in `view`, its size in bytes)."""
        made = self._events.get(view)
        if made is None:
            event = tpb.TaskEvent(
                task=self.task if view == FULL else basic(self.task),
                previous_state=self.previous,  # type: ignore[arg-type]
            )
            if self.progress is not None:
                event.progress.CopyFrom(self.progress)
            made = self._events[view] = (event, event.ByteSize())
        return made


class Hub:
    """Task events fan out to watchers; outlives a term so watchers see it end.

    `subscribers` is the core's set of callbacks (the hub's own `publish` among them);
    the watchers are `subscriptions`, at most `max_watchers` at once.
    """

    def __init__(self, cfg: CoordinatorConfig | None = None, clock: Clock | None = None) -> None:
        self.cfg = cfg or CoordinatorConfig()
        self.clock: Clock = clock or SystemClock()
        self.subscribers: set[Callable[[tpb.Task, int], None]] = {self.publish}
        self.subscriptions: set[Subscription] = set()
        self.watchers = 0
        """Watch streams open (an overflowed one counts until its stream ends)."""

    def publish(self, task: tpb.Task, previous: int) -> None:
        if self.subscriptions:
            published = _Published(task, previous)
            for sub in tuple(self.subscriptions):
                sub.offer(published)

    def progress(self, task: tpb.Task, fraction: float, message: str) -> None:
        if self.subscriptions:
            update = tpb.ProgressUpdate(fraction=fraction, message=message)
            published = _Published(task, task.state, update)
            for sub in tuple(self.subscriptions):
                sub.offer(published)

    def subscribe(self, accept: Callable[[tpb.Task], bool], view: int) -> Subscription:
        """A watcher's subscription (use it in `with`); RESOURCE_EXHAUSTED past the cap."""
        if self.watchers >= self.cfg.max_watchers:
            raise ResourceExhaustedError(
                f"this coordinator serves at most {self.cfg.max_watchers} watchers "
                "(WatchTask and WatchEvents streams) and all are in use: close one, or "
                "retry later (AGENTMESH_MAX_WATCHERS)"
            )
        return Subscription(self, accept, view)

    def end_term(self) -> None:
        for sub in tuple(self.subscriptions):
            sub.end_term()


class Subscription:
    """A watcher's bounded queue of task events, subscribed from `with` on.

    Bounded by events and bytes (the sizes of the events in the watcher's view). Past
    either, the queue is dropped at once, the watcher takes no more events, and its
    stream ends with RESOURCE_EXHAUSTED; if its client reads nothing for
    OVERFLOW_GRACE_S after that, the stream is cancelled. Events already handed to gRPC
    (one HTTP/2 flow-control window, a few MiB at most) are not counted: gRPC's flow
    control bounds them.
    """

    def __init__(self, hub: Hub, accept: Callable[[tpb.Task], bool], view: int) -> None:
        self.hub = hub
        self.accept = accept
        self.view = view
        self.items: collections.deque[tuple[tpb.TaskEvent, int] | None] = collections.deque()
        self.bytes = 0
        self.ready = asyncio.Event()
        self.overflow = False
        self._handler = asyncio.current_task()
        self._cancel: Timer | None = None

    def offer(self, published: _Published) -> None:
        if self.overflow or not self.accept(published.task):
            return
        event, size = published.event(self.view)
        cfg = self.hub.cfg
        if len(self.items) >= cfg.watch_buffer_events or self.bytes + size > cfg.watch_buffer_bytes:
            self._overflowed()
            return
        self.items.append((event, size))
        self.bytes += size
        self.ready.set()

    def end_term(self) -> None:
        self.items.append(None)  # the stream ends with UNAVAILABLE after what is queued
        self.ready.set()

    def _overflowed(self) -> None:
        self.overflow = True
        self.items.clear()
        self.bytes = 0
        self.ready.set()
        self.hub.subscriptions.discard(self)
        handler = self._handler
        if handler is not None:
            self._cancel = self.hub.clock.call_later(OVERFLOW_GRACE_S, handler.cancel)

    def __enter__(self) -> Subscription:
        self.hub.watchers += 1
        self.hub.subscriptions.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.hub.watchers -= 1
        self.hub.subscriptions.discard(self)
        if self._cancel is not None:
            self._cancel.cancel()

    async def events(
        self, leader: Callable[[], str], until_terminal: bool, max_batch: int = 1
    ) -> AsyncIterator[tpb.TaskEvent]:
        """The events in order; with `max_batch` > 1, each message carries in `batched`
        what is queued now (see WatchEventsRequest.max_batch): never waits for more."""
        cfg = self.hub.cfg
        while True:
            if self.overflow:
                raise ResourceExhaustedError(
                    f"this watcher fell more than {cfg.watch_buffer_events} events or "
                    f"{cfg.watch_buffer_bytes} bytes behind and was dropped; reconnect "
                    "(and re-read the tasks you care about with GetTask)"
                )
            if not self.items:
                self.ready.clear()
                await self.ready.wait()
                continue
            item = self.items.popleft()
            if item is None:
                raise NotLeaderError(
                    "the leader's term ended; reconnect to the new leader", leader()
                )
            event, size = item
            self.bytes -= size
            if max_batch > 1:
                yield self._batch(event, size, max_batch)
                continue
            yield event
            if until_terminal and event.task.state in TERMINAL and not event.HasField("progress"):
                return

    def _batch(self, event: tpb.TaskEvent, size: int, most: int) -> tpb.TaskEvent:
        carrier = tpb.TaskEvent()
        carrier.batched.append(event)
        items = self.items
        while len(carrier.batched) < most and items:
            head = items[0]
            if head is None or size + head[1] > limits.WATCH_BATCH_BYTES:
                break  # the term's end goes on its own, after the events before it
            items.popleft()
            carrier.batched.append(head[0])
            size += head[1]
            self.bytes -= head[1]
        return carrier


class CoordinatorServicer(cpb_grpc.CoordinatorServicer):
    """Adapts RPCs to the current term's core; a standby answers UNAVAILABLE with the leader.

    Every request is checked against limits.py before it reaches the core."""

    def __init__(
        self,
        status: Callable[[], Any],
        cfg: CoordinatorConfig | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.cfg = cfg or CoordinatorConfig()
        self.clock: Clock = clock or SystemClock()
        self.core: CoordinatorCore | None = None
        self.leader_endpoint = ""
        self.hub = Hub(self.cfg, self.clock)
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
        core = self._core()
        tracing.stamp([request.spec])  # tracing on: an untraced task's trace starts here
        ((task, created),) = await core.submit([request.spec])  # the core validates
        return cpb.SubmitResponse(task=task, created=created)

    @rpc_errors
    async def SubmitBatch(
        self, request: cpb.SubmitBatchRequest, context: grpc.aio.ServicerContext
    ) -> cpb.SubmitBatchResponse:
        core = self._core()
        tracing.stamp(request.specs)
        results = await core.submit(request.specs)  # the core validates
        return cpb.SubmitBatchResponse(
            results=[cpb.SubmitResponse(task=t, created=c) for t, c in results]
        )

    @rpc_errors
    async def SubmitStream(
        self, requests: AsyncIterator[cpb.SubmitRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cpb.SubmitResponse]:
        core = self._core()
        loop = asyncio.get_running_loop()
        # a request's submit starts as soon as it is read, so that one group commit
        # takes what arrived together; the answers go out in request order
        answers: asyncio.Queue[tuple[asyncio.Future[Any], int] | None] = asyncio.Queue()
        slots = asyncio.Semaphore(limits.SUBMIT_STREAM_PENDING)
        held = 0  # bytes of the requests pending
        freed = asyncio.Event()

        def failed(err: BaseException) -> asyncio.Future[Any]:
            future = loop.create_future()
            future.set_exception(err)
            return future

        async def read() -> None:
            nonlocal held
            unread = aiter(requests)
            try:
                while True:
                    await slots.acquire()  # nothing more is read while all are pending
                    try:
                        request = await anext(unread)
                    except StopAsyncIteration:
                        break
                    size = request.ByteSize()
                    while held and held + size > limits.SUBMIT_STREAM_PENDING_BYTES:
                        freed.clear()
                        await freed.wait()
                    held += size
                    answer: asyncio.Future[Any]
                    if request.HasField("spec"):
                        tracing.stamp([request.spec])
                        answer = asyncio.ensure_future(core.submit([request.spec]))
                    else:
                        answer = failed(InvalidArgumentError("spec is required"))
                    answers.put_nowait((answer, size))
            except Exception as err:  # noqa: BLE001 - an undecodable request: answered in turn
                answers.put_nowait((failed(err), 0))
            answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (pending := await answers.get()) is not None:
                answer, size = pending
                ((task, created),) = await answer
                yield cpb.SubmitResponse(task=task, created=created)
                held -= size
                freed.set()
                slots.release()
        finally:
            reader.cancel()
            # what was read after a refusal still runs to its end (the core owns it);
            # only its outcome is not told
            while not answers.empty():
                left = answers.get_nowait()
                if left is not None:
                    left[0].add_done_callback(_ignore_outcome)

    @rpc_errors
    async def GetTask(
        self, request: cpb.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> tpb.Task:
        limits.check_id("task_id", request.task_id)
        return await self._core().get(request.task_id)

    @rpc_errors
    async def CancelTask(
        self, request: cpb.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> tpb.Task:
        limits.check_id("task_id", request.task_id)
        limits.check_bytes("reason", request.reason, limits.REASON_BYTES)
        return await self._core().cancel(request.task_id, request.reason)

    @rpc_errors
    async def ListTasks(
        self, request: cpb.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> cpb.ListTasksResponse:
        limits.check_states("states", request.states)
        limits.check_bytes("kind", request.kind, limits.KIND_BYTES)
        limits.check_bytes("agent_id", request.agent_id, limits.ID_BYTES)
        limits.check_page_size("page_size", request.page_size)
        limits.check_id("page_token", request.page_token, required=False)
        core = self._core()
        size = request.page_size or 100
        full = request.view == FULL
        states = set(request.states)
        out: list[tpb.Task] = []
        used = 0
        # the page ends after the last record looked at, whether it matched or not
        consumed = cursor = request.page_token
        for _ in range(LIST_MAX_READS):
            tasks, last = await core.store.page(cursor, limits.LIST_READ_RECORDS)
            for task in tasks:
                live = core.active.get(task.task_id)
                shared = live is not None
                task = live.task if live else task
                if (
                    (states and task.state not in states)
                    or (request.kind and task.spec.kind != request.kind)
                    or (request.agent_id and task.agent_id != request.agent_id)
                ):
                    consumed = task.task_id
                    continue
                if not full:
                    task = basic(task, shared=shared)
                task_bytes = task.ByteSize()
                if out and (len(out) >= size or used + task_bytes > limits.LIST_PAGE_BYTES):
                    return cpb.ListTasksResponse(tasks=out, next_page_token=consumed)
                out.append(task)
                used += task_bytes
                consumed = task.task_id
            if not last:
                return cpb.ListTasksResponse(tasks=out)
            cursor = last
        return cpb.ListTasksResponse(tasks=out, next_page_token=consumed)

    @rpc_errors
    async def WatchTask(
        self, request: cpb.WatchTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tpb.TaskEvent]:
        limits.check_id("task_id", request.task_id)
        task_id = request.task_id
        core = self._core()
        # subscribe before reading the task, so no change can fall in between
        with self.hub.subscribe(lambda t: t.task_id == task_id, FULL) as sub:
            first = await core.get(task_id)
            yield tpb.TaskEvent(task=first, previous_state=first.state)
            if first.state in TERMINAL:
                return
            async for event in sub.events(lambda: self.leader_endpoint, until_terminal=True):
                yield event

    @rpc_errors
    async def WatchEvents(
        self, request: cpb.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tpb.TaskEvent]:
        limits.check_states("states", request.states)
        limits.check_watch_batch("max_batch", request.max_batch)
        self._core()
        states = frozenset(request.states)
        accept = (lambda t: t.state in states) if states else (lambda t: True)
        view = FULL if request.view == FULL else BASIC
        with self.hub.subscribe(accept, view) as sub:
            async for event in sub.events(
                lambda: self.leader_endpoint, until_terminal=False, max_batch=request.max_batch
            ):
                yield event

    @rpc_errors
    async def ListAgents(
        self, request: cpb.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> cpb.ListAgentsResponse:
        limits.check_page_size("page_size", request.page_size)
        limits.check_bytes("page_token", request.page_token, limits.ID_BYTES)
        core = self._core()
        size = request.page_size or limits.PAGE_SIZE_MAX
        after = request.page_token
        out: list[cpb.AgentStatus] = []
        used = 0
        for agent_id in sorted(a for a in core.agents if a > after):
            status = core.agents[agent_id].status()
            core.llm.fill_agent(status)
            status_bytes = status.ByteSize()
            if out and (len(out) >= size or used + status_bytes > limits.LIST_PAGE_BYTES):
                return cpb.ListAgentsResponse(agents=out, next_page_token=out[-1].agent_id)
            out.append(status)
            used += status_bytes
        return cpb.ListAgentsResponse(agents=out)

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

    @rpc_errors
    async def Connect(
        self, request_iterator: AsyncIterator[cpb.AgentMessage], context: grpc.aio.ServicerContext
    ) -> None:
        """One agent's stream. Reports are handled concurrently so a slow commit does
        not hold up the agent's next message; the stream's end requeues its claims."""
        try:
            core = self._core()
        except NotLeaderError:
            if self.leader_endpoint:  # an agent follows a redirect without a new lookup
                await context.write(
                    cpb.CoordinatorMessage(
                        redirect=cpb.Redirect(leader_endpoint=self.leader_endpoint)
                    )
                )
            raise
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("hello"):
            raise InvalidArgumentError("the first message on Connect must be hello")
        outbox: asyncio.Queue[cpb.CoordinatorMessage | None] = asyncio.Queue()
        overflow = asyncio.Event()
        riding: list[cpb.ReportAck] = []  # accepted acks waiting for a message to ride on
        ride_timer: Timer | None = None

        def send(msg: cpb.CoordinatorMessage | None) -> None:
            nonlocal ride_timer
            if msg is not None and msg.WhichOneof("body") == "ack" and msg.ack.accepted:
                riding.append(msg.ack)
                if len(riding) >= ACK_RIDE_MAX:
                    acks_alone()
                elif ride_timer is None:
                    ride_timer = self.clock.call_later(ACK_RIDE_S, acks_alone)
                return
            enqueue(msg)

        def enqueue(msg: cpb.CoordinatorMessage | None) -> None:
            # an agent that stops reading must not make the leader queue without end
            if msg is not None and outbox.qsize() >= limits.CONNECT_BUFFER_MESSAGES:
                overflow.set()
                return
            outbox.put_nowait(msg)

        def take_riding() -> list[cpb.ReportAck]:
            nonlocal ride_timer
            if ride_timer is not None:
                ride_timer.cancel()
                ride_timer = None
            acks = riding[:]
            riding.clear()
            return acks

        def acks_alone() -> None:  # nothing came for them to ride on
            if acks := take_riding():
                enqueue(cpb.CoordinatorMessage(ack=acks[0], acks=acks[1:]))

        async def writer() -> None:
            with contextlib.suppress(Exception):  # a dead peer: the reader side ends too
                while True:
                    batch = [await outbox.get()]
                    while not outbox.empty():
                        batch.append(outbox.get_nowait())
                    if acks := take_riding():
                        # they ride on the batch's first message (an agent reads a
                        # message's acks before its body), or go alone before the end
                        if batch[0] is None:
                            batch.insert(0, cpb.CoordinatorMessage(ack=acks[0], acks=acks[1:]))
                        else:
                            batch[0].acks.extend(acks)
                    for msg in _fold_acks(batch):
                        if msg is None:
                            return
                        await context.write(msg)

        agent = core.connect(first.hello, send)
        agent_id = agent.agent_id
        max_result = self.cfg.max_result_bytes

        async def handle(report: cpb.TaskResult | cpb.TaskFailure, note: str = "") -> None:
            # every report gets an ack, whatever happens to it (the agent keeps it until then)
            try:
                ack = await core.report(agent_id, report)
            except (NotLeaderError, StoreUnavailableError):
                return  # the term is ending: the agent re-sends it to the next leader
            except DomainError as err:
                ack = cpb.ReportAck(
                    task_id=report.task_id, claim_token=report.claim_token, reason=str(err)
                )
            except Exception:
                log.exception("report failed", extra={"agent": agent_id, "task": report.task_id})
                ack = cpb.ReportAck(
                    task_id=report.task_id,
                    claim_token=report.claim_token,
                    reason="the coordinator could not record this report; see its log",
                )
            if note:
                ack.reason = f"{note}; {ack.reason}" if ack.reason else note
            send(cpb.CoordinatorMessage(ack=ack))

        async def reader() -> None:
            async for msg in request_iterator:
                body = msg.WhichOneof("body")
                if body == "result" or body == "failure":
                    report = getattr(msg, body)
                    if limits.size_of(report.task_id) > limits.ID_BYTES:
                        send(_refused(report, "task_id is longer than 128 bytes: no such task"))
                        continue
                    note = ""
                    if body == "result" and len(report.output) > max_result:
                        # fail the task instead of hanging it: its record could not hold this
                        note = limits.result_too_large(len(report.output), max_result)
                        report = cpb.TaskFailure(
                            task_id=report.task_id,
                            claim_token=report.claim_token,
                            error=note,
                            retryable=False,
                            usage=report.usage,
                        )
                    elif body == "failure":
                        report.error = limits.clip(report.error, limits.ERROR_BYTES)
                    # concurrently: a slow commit must not hold up the agent's next message;
                    # the core owns it, so it completes the task even if the stream ends now
                    core.run_in_background(handle(report, note))
                elif body == "accepted":
                    if limits.size_of(msg.accepted.task_id) <= limits.ID_BYTES:
                        core.accepted(agent_id, msg.accepted)
                elif body == "progress":
                    progress = msg.progress
                    if (
                        limits.size_of(progress.task_id) <= limits.ID_BYTES
                        and progress.fraction == progress.fraction  # NaN: dropped
                    ):
                        progress.fraction = min(1.0, max(0.0, progress.fraction))
                        progress.message = limits.clip(
                            progress.message, limits.PROGRESS_MESSAGE_BYTES
                        )
                        core.progress(agent_id, progress)
                elif body == "draining":
                    core.drain(agent_id)

        read_task = asyncio.ensure_future(reader())
        write_task = asyncio.ensure_future(writer())
        overflowed = asyncio.ensure_future(overflow.wait())
        cancelled = False
        try:
            # either side ending ends the stream: the agent hung up, or the term ended
            await asyncio.wait(
                {read_task, write_task, overflowed}, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            # first and without awaiting: grpc cancels this handler when the peer vanishes,
            # and may cancel it again while it cleans up. Reports already received were
            # scheduled before the requeues this starts, so they commit first and win.
            if core.agents.get(agent_id) is agent:
                core.disconnect(agent_id)
            read_task.cancel()
            overflowed.cancel()
            outbox.put_nowait(None)  # the writer sends what is queued, then stops
            if ride_timer is not None:  # the writer takes what still rides, if it gets to
                ride_timer.cancel()
            if cancelled or overflow.is_set():
                write_task.cancel()
        if overflow.is_set():
            # its peer reads nothing, so no status can reach it: cut the stream (CANCELLED)
            log.warning(
                "agent stream cut off: it stopped reading",
                extra={"agent": agent_id, "queued": limits.CONNECT_BUFFER_MESSAGES},
            )
            raise asyncio.CancelledError
        # the call's status cannot go out while a write is pending (grpc refuses the batch
        # and the caller never hears back): let the writer finish, within a bound
        try:
            await self.clock.wait_for(asyncio.wait({write_task}), WRITER_DRAIN_S)
        except TimeoutError:
            write_task.cancel()
            raise asyncio.CancelledError from None
        if read_task.done() and not read_task.cancelled():
            failure = read_task.exception()
            if isinstance(failure, DomainError):
                raise failure  # an undecodable message: answered through the error table

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


def _refused(report: cpb.TaskResult | cpb.TaskFailure, reason: str) -> cpb.CoordinatorMessage:
    return cpb.CoordinatorMessage(
        ack=cpb.ReportAck(
            task_id=report.task_id[: limits.ID_BYTES], claim_token=report.claim_token, reason=reason
        )
    )


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


def split_services(instances: Sequence[Any]) -> list[cpb.ServiceInstance]:
    return [
        cpb.ServiceInstance(
            kind=i.kind, instance_id=i.instance_id, endpoint=i.endpoint, metadata=i.metadata
        )
        for i in instances
    ]
