"""The Python client: finds the root coordinator through etcd (or a given address),
follows a standby's pointer to the leader, and retries what is safe to retry."""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from typing import Any, TypeVar

import grpc
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common import tracing
from services._common.follow import LeaderClient, named_leader, no_leader

T = TypeVar("T")

# Submits are idempotent only with a task id or idempotency key; the client
# always sets one, so UNAVAILABLE (no leader, a failover) is safe to retry.
# Every call here is safe to repeat (submits carry an id or idempotency key), so a
# deadline is retried too: it is what a paused or partitioned leader looks like.
_RETRY_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def _retryable(err: BaseException) -> bool:
    return isinstance(err, grpc.aio.AioRpcError) and err.code() in _RETRY_CODES


class MeshClient(LeaderClient):
    """Args:
    etcd: etcd endpoints; the leader is looked up there (preferred).
    coordinator: a coordinator address, used when etcd is not given.
    cluster: the cluster name (key prefix).
    timeout_s: deadline of each call.
    retry_s: how long to keep retrying while no leader answers.
    """

    def __init__(
        self,
        etcd: str | None = None,
        coordinator: str | None = None,
        cluster: str = "default",
        timeout_s: float = 10.0,
        retry_s: float = 15.0,
    ) -> None:
        super().__init__("coordinator", etcd, coordinator, cluster, "coordinator")
        self._endpoint = coordinator or ""
        self._channel: grpc.aio.Channel | None = None
        self._stub: cpb_grpc.CoordinatorStub | None = None
        self._lookup = asyncio.Lock()
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        # told once per call, at its first retry, why it retries (the CLI prints it)
        self.on_retry: Callable[[str], None] | None = None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def stub(self) -> cpb_grpc.CoordinatorStub:
        async with self._lookup:  # concurrent first calls share one lookup and one channel
            if self._stub is None:
                endpoint = await self.leader() if self._etcd_endpoints else self._endpoint
                if not endpoint:
                    raise no_leader(self.no_leader_message("no coordinator leader is elected yet"))
                self._use(endpoint)
        assert self._stub is not None
        return self._stub

    def _use(self, endpoint: str) -> None:
        if endpoint == self._endpoint and self._channel is not None:
            self._stub = cpb_grpc.CoordinatorStub(self._channel)
            return
        if self._channel is not None:
            # calls still on the old leader fail with UNAVAILABLE and are retried here
            asyncio.ensure_future(self._channel.close(grace=1.0))
        self._endpoint = endpoint
        # with tracing on, each call gets a client span and carries the caller's context
        self._channel = grpc.aio.insecure_channel(
            endpoint, interceptors=tracing.client_interceptors()
        )
        self._stub = cpb_grpc.CoordinatorStub(self._channel)

    def _follow(self, err: grpc.aio.AioRpcError) -> None:
        """After UNAVAILABLE: go where the standby points, or look the leader up again."""
        pointed = named_leader(err)
        if pointed and pointed != self._endpoint:
            self._use(pointed)
        elif self._etcd_endpoints:
            self._stub = None  # look the leader up again (same channel if it did not move)

    async def _call(self, name: str, request: Any) -> Any:
        async for attempt in self._retrying():
            with attempt:
                stub = await self.stub()
                try:
                    return await getattr(stub, name)(request, timeout=self.timeout_s)
                except grpc.aio.AioRpcError as err:
                    if err.code() in _RETRY_CODES:
                        self._follow(err)
                    raise
        raise AssertionError("unreachable")

    def _retrying(self) -> AsyncRetrying:
        """UNAVAILABLE (no leader yet, a failover) is retried with jitter for `retry_s`."""
        return AsyncRetrying(
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            stop=stop_after_delay(self.retry_s),
            retry=retry_if_exception(_retryable),
            before_sleep=self._first_retry,
            reraise=True,
        )

    def _first_retry(self, state: RetryCallState) -> None:
        if self.on_retry is None or state.attempt_number != 1 or state.outcome is None:
            return
        err = state.outcome.exception()
        if isinstance(err, grpc.aio.AioRpcError):
            self.on_retry(f"{err.code().name}: {err.details()}")

    async def submit(self, spec: tpb.TaskSpec) -> cpb.SubmitResponse:
        if not spec.task_id and not spec.idempotency_key:
            spec.idempotency_key = _new_key()
        if not tracing.enabled() or spec.trace_context:
            return await self._call("Submit", cpb.SubmitRequest(spec=spec))  # type: ignore[no-any-return]
        # the task's trace starts here: the record keeps this span's context
        with tracing.tracer().start_as_current_span(
            "client.submit", kind=_producer(), attributes={"agentmesh.kind": spec.kind}
        ) as span:
            tracing.inject(spec.trace_context)
            reply: cpb.SubmitResponse = await self._call("Submit", cpb.SubmitRequest(spec=spec))
            span.set_attribute("agentmesh.task_id", reply.task.task_id)
            span.set_attribute("agentmesh.created", reply.created)
            return reply

    async def submit_batch(self, specs: Sequence[tpb.TaskSpec]) -> cpb.SubmitBatchResponse:
        for spec in specs:
            if not spec.task_id and not spec.idempotency_key:
                spec.idempotency_key = _new_key()
        if not tracing.enabled():
            return await self._call("SubmitBatch", cpb.SubmitBatchRequest(specs=specs))  # type: ignore[no-any-return]
        # one trace per task: each spec gets a submit span of its own, a root
        tracer = tracing.tracer()
        spans = []
        for spec in specs:
            if not spec.trace_context:
                span = tracer.start_span(
                    "client.submit", kind=_producer(), attributes={"agentmesh.kind": spec.kind}
                )
                tracing.inject(spec.trace_context, _in(span))
                spans.append(span)
        try:
            reply: cpb.SubmitBatchResponse = await self._call(
                "SubmitBatch", cpb.SubmitBatchRequest(specs=specs)
            )
        finally:
            for span in spans:
                span.end()
        return reply

    async def submit_stream(
        self, specs: Iterable[tpb.TaskSpec] | AsyncIterable[tpb.TaskSpec]
    ) -> AsyncIterator[cpb.SubmitResponse]:
        """Submit `specs` on one SubmitStream call, each as soon as it is produced, and
        yield each answer, in order, once its task is in etcd.

        A spec without an id gets an idempotency key first, in place (as with `submit`).
        The stream is not retried: if it fails, the error is raised (after a standby's
        pointer is followed, so the next call goes to the leader), and the specs not
        answered yet have an unknown outcome. Submit those same spec objects again: a
        replay returns the task with `created` false.
        """
        stub = await self.stub()
        # with tracing on, each spec gets a submit span of its own (a root, as in a
        # batch), from its send to its answer; None stands for a spec already traced
        spans: collections.deque[Any] = collections.deque()

        async def requests() -> AsyncIterator[cpb.SubmitRequest]:
            async for spec in _aiter(specs):
                if not spec.task_id and not spec.idempotency_key:
                    spec.idempotency_key = _new_key()
                span = None
                if tracing.enabled() and not spec.trace_context:
                    # a root: this runs inside the stream's own RPC span
                    span = tracing.tracer().start_span(
                        "client.submit",
                        context=_root(),
                        kind=_producer(),
                        attributes={"agentmesh.kind": spec.kind},
                    )
                    tracing.inject(spec.trace_context, _in(span))
                spans.append(span)
                yield cpb.SubmitRequest(spec=spec)

        call = stub.SubmitStream(requests())
        try:
            async for response in call:
                span = spans.popleft()
                if span is not None:
                    span.set_attribute("agentmesh.task_id", response.task.task_id)
                    span.set_attribute("agentmesh.created", response.created)
                    span.end()
                yield response
        except grpc.aio.AioRpcError as err:
            if err.code() in _RETRY_CODES:
                self._follow(err)
            raise
        finally:
            call.cancel()
            for span in spans:  # unanswered: their outcome is unknown
                if span is not None:
                    span.end()

    async def get(self, task_id: str) -> tpb.Task:
        return await self._call("GetTask", cpb.GetTaskRequest(task_id=task_id))  # type: ignore[no-any-return]

    async def cancel(self, task_id: str, reason: str = "") -> tpb.Task:
        return await self._call("CancelTask", cpb.CancelTaskRequest(task_id=task_id, reason=reason))  # type: ignore[no-any-return]

    async def list(self, **filters: Any) -> cpb.ListTasksResponse:
        return await self._call("ListTasks", cpb.ListTasksRequest(**filters))  # type: ignore[no-any-return]

    async def list_filled(
        self, page_size: int = 100, max_calls: int = 8, **filters: Any
    ) -> cpb.ListTasksResponse:
        """Up to `page_size` matching tasks, following next_page_token for at most
        `max_calls` ListTasks calls. Each call reads a bounded number of records, so a
        filter that matches few tasks (DEAD_LETTER behind a backlog) gets short or even
        empty pages that still carry a token. next_page_token is where to go on ("" once
        every task was looked at)."""
        out = cpb.ListTasksResponse()
        token = filters.pop("page_token", "")
        for _ in range(max_calls):
            page = await self.list(
                page_size=page_size - len(out.tasks), page_token=token, **filters
            )
            out.tasks.extend(page.tasks)
            token = page.next_page_token
            if not token or len(out.tasks) >= page_size:
                break
        out.next_page_token = token
        return out

    async def agents(self) -> cpb.ListAgentsResponse:
        """Every connected agent (ListAgents page by page)."""
        out = cpb.ListAgentsResponse()
        token = ""
        while True:
            page = await self._call("ListAgents", cpb.ListAgentsRequest(page_token=token))
            out.agents.extend(page.agents)
            token = page.next_page_token
            if not token:
                return out

    async def status(self) -> cpb.ClusterStatus:
        return await self._call("GetStatus", cpb.GetStatusRequest())  # type: ignore[no-any-return]

    def watch_events(self, states: Sequence[Any] = ()) -> AsyncIterator[tpb.TaskEvent]:
        """Every task change from now on; reconnects to a new leader by itself.

        Events during a reconnect are missed: callers that must not miss a terminal
        state re-read the tasks they care about (GetTask) after a gap.
        """
        return self._following(lambda stub: stub.WatchEvents(cpb.WatchEventsRequest(states=states)))

    def watch_task(self, task_id: str) -> AsyncIterator[tpb.TaskEvent]:
        """The task now, then each change until it is terminal. A standby's refusal or a
        failover reopens the watch on the leader: it starts again with the current
        state, so nothing is missed (that state may repeat the last one seen)."""
        return self._following(lambda stub: stub.WatchTask(cpb.WatchTaskRequest(task_id=task_id)))

    async def _following(
        self, open_call: Callable[[cpb_grpc.CoordinatorStub], Any]
    ) -> AsyncIterator[tpb.TaskEvent]:
        """The events of the stream `open_call` opens, reopened on the leader after a
        standby's refusal or a failover, until the server ends it."""
        backoff = 0.05
        while True:
            call = open_call(await self._retry_stub())
            try:
                async for event in call:
                    backoff = 0.05
                    _traced(event)
                    yield event
                return
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RETRY_CODES:
                    raise
                self._follow(err)
            finally:
                call.cancel()
            # while etcd still names a dead leader, do not spin on it (jittered, ≤ 1 s)
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, 1.0)

    async def _retry_stub(self) -> cpb_grpc.CoordinatorStub:
        async for attempt in self._retrying():
            with attempt:
                return await self.stub()
        raise AssertionError("unreachable")


def _traced(event: tpb.TaskEvent) -> None:
    """A watcher's view of a task's change, in the task's trace (tracing on only)."""
    if not tracing.enabled() or event.HasField("progress"):
        return
    task = event.task
    tracing.record(
        task,
        "client.watch.event",
        task.finished_at_us,
        _now_us(),
        {
            "agentmesh.task_id": task.task_id,
            "agentmesh.state": tpb.TaskState.Name(task.state),
            "agentmesh.previous_state": tpb.TaskState.Name(event.previous_state),
        },
    )


async def _aiter(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


def _now_us() -> int:
    import time

    return time.time_ns() // 1000


def _producer() -> Any:
    from opentelemetry.trace import SpanKind

    return SpanKind.PRODUCER


def _root() -> Any:
    from opentelemetry.context import Context

    return Context()


def _in(span: Any) -> Any:
    from opentelemetry import trace

    return trace.set_span_in_context(span)


def _new_key() -> str:
    import uuid

    return uuid.uuid4().hex
