"""A thin Coordinator client for the harness: deadlines, leader following, bounded retries.

Only the protos: it does not use the repository's SDK, so the harness measures
what any client written from the contract would see. Retrying a submit is safe
because every task id is chosen by the harness (Submit is idempotent on it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from loadtest.metrics import Counters
from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc

LEADER_METADATA_KEY = "agentmesh-leader"
"""Trailing metadata a standby sets to the leader's endpoint (coordinator.proto)."""

RETRY_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        # safe: ids are client-chosen, so a submit that did land is returned, not duplicated
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)

STREAM_RETRY_CODES = RETRY_CODES | {grpc.StatusCode.INTERNAL}
"""SubmitStream: grpc.aio reports a write that meets a stream the server has just ended
(a standby's UNAVAILABLE, a leader that stepped down) as INTERNAL, "Internal error from
Core", in place of the server's status. The unanswered specs are unknown either way,
and sending them again is safe."""

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]

StubFactory = Callable[[str], Any]
"""endpoint → an object with the Coordinator stub's methods (a fake in unit tests)."""


class RpcFailed(Exception):
    """A call failed for good: not retryable, or retried until its time ran out."""

    def __init__(self, method: str, code: grpc.StatusCode | None, details: str) -> None:
        name = code.name if code is not None else "UNKNOWN"
        super().__init__(f"{method} failed: {name}: {details}")
        self.method, self.code, self.details = method, code, details


def _leader_hint(err: BaseException) -> str:
    trailing: Any = ()
    if isinstance(err, grpc.aio.AioRpcError):
        trailing = err.trailing_metadata() or ()
    else:
        trailing = getattr(err, "trailing", ()) or ()
    for key, value in trailing:
        if key == LEADER_METADATA_KEY and value:
            return str(value)
    return ""


def _code(err: BaseException) -> grpc.StatusCode | None:
    code = getattr(err, "code", None)
    if callable(code):
        result = code()
        return result if isinstance(result, grpc.StatusCode) else None
    return None


class CoordinatorClient:
    """Calls the root coordinator among `targets`, following it when it moves.

    Args:
        targets: coordinator endpoints (host:port); the first is tried first.
        timeout_s: deadline of each unary call.
        retry_s: how long one logical call keeps retrying retryable codes.
        counters: `rpc_retries` and `leader_redirects` are counted here.
        stub_factory: endpoint → stub; default opens an insecure grpc.aio channel.
    """

    def __init__(
        self,
        targets: Sequence[str],
        *,
        timeout_s: float = 10.0,
        retry_s: float = 15.0,
        counters: Counters | None = None,
        stub_factory: StubFactory | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not targets:
            raise ValueError("at least one coordinator target is needed")
        self.targets = list(dict.fromkeys(targets))
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.counters = counters or Counters()
        self._factory = stub_factory or self._grpc_stub
        self._rng = rng or random.Random()
        self._current = 0
        self._stubs: dict[str, Any] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    @property
    def endpoint(self) -> str:
        return self.targets[self._current]

    def _grpc_stub(self, endpoint: str) -> Any:
        channel = grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
        self._channels[endpoint] = channel
        return cpb_grpc.CoordinatorStub(channel)

    def stub(self) -> Any:
        ep = self.endpoint
        stub = self._stubs.get(ep)
        if stub is None:
            stub = self._stubs[ep] = self._factory(ep)
        return stub

    def follow(self, err: BaseException) -> None:
        """After UNAVAILABLE: go where a standby points, else try the next target."""
        hint = _leader_hint(err)
        if hint:
            self.use(hint)
        elif len(self.targets) > 1:
            self._current = (self._current + 1) % len(self.targets)

    async def backoff(self, attempt: int) -> None:
        # full jitter: retries from many coroutines must not arrive in lockstep
        await asyncio.sleep(self._rng.uniform(0, min(1.0, 0.02 * 2**attempt)))

    async def call(self, method: str, request: Any, *, timeout_s: float | None = None) -> Any:
        """One unary call with its deadline, retried on `RETRY_CODES` for `retry_s`."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.retry_s
        attempt = 0
        while True:
            try:
                return await getattr(self.stub(), method)(
                    request, timeout=timeout_s or self.timeout_s
                )
            except (grpc.aio.AioRpcError, grpc.RpcError) as err:
                code = _code(err)
                details = err.details() if hasattr(err, "details") else str(err)
                if code not in RETRY_CODES or loop.time() >= give_up:
                    raise RpcFailed(method, code, str(details)) from err
                if code == grpc.StatusCode.UNAVAILABLE:
                    self.follow(err)
                self.counters.inc("rpc_retries")
                await self.backoff(attempt)
                attempt += 1

    async def submit_batch(self, specs: Sequence[Any]) -> cpb.SubmitBatchResponse:
        return await self.call("SubmitBatch", cpb.SubmitBatchRequest(specs=list(specs)))  # type: ignore[no-any-return]

    async def submit(self, spec: Any) -> cpb.SubmitResponse:
        return await self.call("Submit", cpb.SubmitRequest(spec=spec))  # type: ignore[no-any-return]

    async def get_task(self, task_id: str) -> Any:
        return await self.call("GetTask", cpb.GetTaskRequest(task_id=task_id))

    async def status(self) -> cpb.ClusterStatus:
        """The cluster as the leader sees it (a standby answers too, but knows no agents)."""
        resp: cpb.ClusterStatus = await self.call("GetStatus", cpb.GetStatusRequest())
        leader = resp.leader_endpoint
        if leader and leader != self.endpoint:
            self.use(leader)
            resp = await self.call("GetStatus", cpb.GetStatusRequest())
        return resp

    def use(self, endpoint: str) -> None:
        """Call `endpoint` from now on (added to the targets when new)."""
        if endpoint not in self.targets:
            self.targets.append(endpoint)
        new = self.targets.index(endpoint)
        if new != self._current:
            self.counters.inc("leader_redirects")
        self._current = new

    async def list_agents(self) -> cpb.ListAgentsResponse:
        return await self.call("ListAgents", cpb.ListAgentsRequest())  # type: ignore[no-any-return]

    async def list_all_tasks(self, page_size: int = 1000) -> AsyncIterator[Any]:
        """Every task in the store, page by page (ListTasks in key order)."""
        token = ""
        while True:
            resp = await self.call(
                "ListTasks",
                cpb.ListTasksRequest(page_size=page_size, page_token=token),
                timeout_s=30.0,
            )
            for task in resp.tasks:
                yield task
            token = resp.next_page_token
            if not token:
                return

    def watch_events(self, states: Sequence[Any] = (), max_batch: int = 0) -> Any:
        """Open WatchEvents on the current target; the caller iterates and cancels it.
        With `max_batch` > 1 each message carries its events in `batched`."""
        request = cpb.WatchEventsRequest(max_batch=max_batch)
        request.states.extend(states)
        return self.stub().WatchEvents(request)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(grace=None)
        self._channels.clear()
        self._stubs.clear()


class SubmitStreamer:
    """Submits one task per message on one SubmitStream call (open loop, `--submit stream`).

    Answers come back in request order, so the oldest unanswered spec is the one each
    answer is for. A stream that breaks leaves the outcome of every unanswered spec
    unknown: they are sent again, in order, on a new stream (after following the
    leader), which is safe because the harness chooses every task id. That goes on for
    the client's `retry_s` from the first failure in a row; then `failed` gets them.

    Args:
        client: whose stub, leader following, backoff and retry window are used.
        answered: called with each response.
        failed: called with the specs given up on and why.
    """

    def __init__(
        self,
        client: CoordinatorClient,
        answered: Callable[[cpb.SubmitResponse], None],
        failed: Callable[[list[Any], RpcFailed], None],
    ) -> None:
        self.client = client
        self.answered = answered
        self.failed = failed
        self._unanswered: collections.deque[Any] = collections.deque()
        self._call: Any = None
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._closing = False

    async def send(self, spec: Any) -> None:
        async with self._lock:
            self._unanswered.append(spec)
            if self._call is None:
                await self._open()
                return  # _open sent every unanswered spec
            # a broken stream is noticed by the reader, which sends this one again
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                await self._call.write(cpb.SubmitRequest(spec=spec))

    async def close(self) -> None:
        """Send nothing more and wait until every spec is answered or given up on."""
        async with self._lock:
            self._closing = True  # a stream opened again from now on is closed at once
            if self._call is not None:
                with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                    await self._call.done_writing()
        if self._reader is not None:
            await self._reader

    async def _open(self) -> None:
        self._call = self.client.stub().SubmitStream()
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            for spec in self._unanswered:
                await self._call.write(cpb.SubmitRequest(spec=spec))
            if self._closing:
                await self._call.done_writing()
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        give_up: float | None = None
        attempt = 0
        while self._call is not None:
            call = self._call
            try:
                async for response in call:
                    self._unanswered.popleft()
                    give_up, attempt = None, 0
                    self.answered(response)
                if not self._unanswered:
                    self._call = None  # closed and all answered; a later send opens anew
                    return
                code, details = (
                    grpc.StatusCode.UNAVAILABLE,
                    "the stream ended with specs unanswered",
                )
            except (grpc.aio.AioRpcError, grpc.RpcError) as err:
                code = _code(err)
                details = str(err.details() if hasattr(err, "details") else err)
                if code == grpc.StatusCode.UNAVAILABLE:
                    self.client.follow(err)
            give_up = give_up or loop.time() + self.client.retry_s
            if code not in STREAM_RETRY_CODES or loop.time() >= give_up:
                async with self._lock:
                    lost, self._call = list(self._unanswered), None
                    self._unanswered.clear()
                self.failed(lost, RpcFailed("SubmitStream", code, details))
                return
            self.client.counters.inc("rpc_retries")
            await self.client.backoff(attempt)
            attempt += 1
            async with self._lock:
                await self._open()
