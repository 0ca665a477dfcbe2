"""What every agentmesh gRPC server shares: health, reflection, error mapping, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services._common.errors import (
    LEADER_METADATA_KEY,
    AlreadyExistsError,
    DomainError,
    FailedPreconditionError,
    InvalidArgumentError,
    MalformedRequestError,
    NotFoundError,
    NotLeaderError,
    ResourceExhaustedError,
    StoreRefusedError,
    StoreUnavailableError,
)

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
"""The largest message any agentmesh server (or agent) accepts; gRPC answers a larger
one with RESOURCE_EXHAUSTED before decoding it. Mirrors limits.MAX_REQUEST_BYTES."""
STATUS_MESSAGE_CHARS = 1024
"""Status messages are cut to this: they travel in HTTP/2 headers, and a default client
refuses headers over 8-16 KiB, which would hide the real error from the caller."""

OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]

F = TypeVar("F", bound=Callable[..., Any])


def install_uvloop() -> None:
    """uvloop adds 8-40 % to gRPC throughput here (NOTES.md); fall back silently."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()


class HealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 with List, which the reference servicer leaves UNIMPLEMENTED although
    the service (and so reflection) advertises it."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._server_status.items()
            }
        )


def build_server(service_names: Sequence[str]) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A grpc.aio server with grpc.health.v1 and server reflection for `service_names`;
    every request that cannot be decoded is answered INVALID_ARGUMENT."""
    interceptors: list[grpc.aio.ServerInterceptor] = [UndecodableRequests()]
    from services._common import telemetry

    interceptor = telemetry.server_interceptor(service_names)
    if interceptor is not None:
        interceptors.append(interceptor)
    server = grpc.aio.server(options=OPTIONS, interceptors=interceptors)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return server, health_servicer


# The one error table. Lookup walks the exception's MRO, so a subclass maps like
# its base unless it has a row of its own. Anything not here is a bug: INTERNAL,
# logged with its stack trace, and the client is told only where to look.
STATUS: dict[type[Exception], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    DecodeError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotLeaderError: grpc.StatusCode.UNAVAILABLE,
    StoreUnavailableError: grpc.StatusCode.UNAVAILABLE,
    StoreRefusedError: grpc.StatusCode.INTERNAL,
}


def status_of(err: BaseException) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        code = STATUS.get(cls)  # type: ignore[arg-type]
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


async def abort(context: grpc.aio.ServicerContext, err: Exception) -> None:
    """End the call with the table's status for `err` (and the leader hint, if any)."""
    trailing: tuple[tuple[str, str], ...] = ()
    if isinstance(err, NotLeaderError) and err.leader_endpoint:
        trailing = ((LEADER_METADATA_KEY, err.leader_endpoint),)
    message = str(err)
    if len(message) > STATUS_MESSAGE_CHARS:  # never echo a huge input back whole
        message = message[: STATUS_MESSAGE_CHARS - 20] + " … (message cut)"
    await context.abort(status_of(err), message, trailing_metadata=trailing)


async def _internal(context: grpc.aio.ServicerContext, name: str) -> None:
    log.exception("unhandled error", extra={"rpc": name})
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name}; see the server log")


def rpc_errors(method: F) -> F:
    """Map what a handler raises through the error table, for unary and server-streaming
    handlers alike: domain errors → their status; cancellation passes; anything else
    → INTERNAL, logged."""
    name = method.__name__
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def streaming(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for item in method(self, request, context):
                    yield item
            except DomainError as err:
                await abort(context, err)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception:
                await _internal(context, name)

        return streaming  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except DomainError as err:
            await abort(context, err)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            await _internal(context, name)

    return unary  # type: ignore[return-value]


# ---------------------------------------------------------------- undecodable requests


class RateLimitedLog:
    """Logs one warning per `interval_s` at most, with how many were left out: a flood of
    bad requests must not flood the log (nor cost a stack trace each)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last = -float("inf")
        self._dropped = 0

    def warning(self, message: str, **extra: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._dropped += 1
            return
        self.logger.warning(message, extra={**extra, "suppressed_since_last": self._dropped})
        self._last = now
        self._dropped = 0


_undecodable_log = RateLimitedLog(log)


class _Undecodable:
    """What a guarded deserializer returns instead of raising: grpc.aio would answer
    UNKNOWN ("Unexpected <class 'DecodeError'>") and log a stack trace per call."""

    __slots__ = ("error", "size")

    def __init__(self, error: Exception, size: int) -> None:
        self.error = error
        self.size = size


def _guarded(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as err:  # noqa: BLE001 - DecodeError, or whatever a parser raises
            return _Undecodable(err, len(raw))

    return deserialize


def _malformed(
    context: grpc.aio.ServicerContext, method: str, bad: _Undecodable
) -> MalformedRequestError:
    _undecodable_log.warning(
        "undecodable request refused",
        rpc=method,
        bytes=bad.size,
        error=str(bad.error)[:200],
        peer=context.peer(),
    )
    return MalformedRequestError(
        f"the request to {method} is not a valid message ({bad.size} bytes): {str(bad.error)[:200]}"
    )


async def _refuse(context: grpc.aio.ServicerContext, method: str, bad: _Undecodable) -> None:
    await abort(context, _malformed(context, method, bad))


def _wrap_unary(behavior: Any, method: str) -> Any:
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await _refuse(context, method, request)
            async for item in behavior(request, context):
                yield item

        return streaming

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await _refuse(context, method, request)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result

    return unary


def _wrap_streaming(behavior: Any, method: str) -> Any:
    """A request stream's undecodable message ends the iteration with MalformedRequestError,
    which the handler may let through (it is answered here once the handler is done: a
    handler may be writing, and a status cannot go out while a write is pending)."""

    async def checked(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, _Undecodable):
                raise _malformed(context, method, request)
            yield request

    if inspect.isasyncgenfunction(behavior):

        async def streaming(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for item in behavior(checked(requests, context), context):
                    yield item
            except MalformedRequestError as err:
                await abort(context, err)

        return streaming

    async def unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            result = behavior(checked(requests, context), context)
            return await result if inspect.isawaitable(result) else result
        except MalformedRequestError as err:
            await abort(context, err)

    return unary


class UndecodableRequests(grpc.aio.ServerInterceptor):
    """Answers a request that cannot be decoded with INVALID_ARGUMENT, through the error
    table, logged at a rate-limited WARNING without a stack trace.

    grpc.aio decodes a request with the handler's `request_deserializer` before (unary)
    or while (streams) the handler runs; a DecodeError there becomes UNKNOWN with the
    exception's class in the message. This wraps each handler once: its deserializer
    returns a marker instead of raising, and its behavior refuses the marker.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    @staticmethod
    def _wrap(handler: Any, method: str) -> Any:
        changes: dict[str, Any] = {"request_deserializer": _guarded(handler.request_deserializer)}
        if handler.unary_unary is not None:
            changes["unary_unary"] = _wrap_unary(handler.unary_unary, method)
        elif handler.unary_stream is not None:
            changes["unary_stream"] = _wrap_unary(handler.unary_stream, method)
        elif handler.stream_unary is not None:
            changes["stream_unary"] = _wrap_streaming(handler.stream_unary, method)
        elif handler.stream_stream is not None:
            changes["stream_stream"] = _wrap_streaming(handler.stream_stream, method)
        return handler._replace(**changes)


def bind(server: grpc.aio.Server, listen: str) -> int:
    port = int(server.add_insecure_port(listen))
    if port == 0:
        raise OSError(f"cannot listen on {listen}: address in use or invalid")
    return port


def advertised(listen: str, port: int, advertise: str) -> str:
    if advertise:
        return advertise
    host = listen.rsplit(":", 1)[0]
    if host in ("0.0.0.0", "[::]", ""):
        # bound to every interface (a container): peers reach us by host name
        import socket

        host = socket.gethostname()
    return f"{host}:{port}"


def stop_event() -> asyncio.Event:
    """Set on SIGTERM or SIGINT."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, event.set)
    return event


async def shutdown(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    grace_s: float,
    cleanups: Sequence[Callable[[], Awaitable[None]]] = (),
) -> None:
    """NOT_SERVING first (so balancers stop sending), then cleanups, then stop with grace."""
    await health_servicer.enter_graceful_shutdown()
    for cleanup in cleanups:
        try:
            await asyncio.wait_for(cleanup(), timeout=grace_s)
        except Exception:  # noqa: BLE001 - shutdown must go on
            log.warning("cleanup failed during shutdown", exc_info=True)
    await server.stop(grace_s)
