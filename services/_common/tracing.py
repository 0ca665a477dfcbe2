"""One trace per task (OpenTelemetry).

A task's W3C trace context lives in its record (`TaskSpec.trace_context`) and rides on
every Assign, so each process that touches the task adds its spans to the same trace,
whichever attempt, agent or leader it is:

    client.submit (client, PRODUCER)
      Coordinator/Submit (gRPC server span, from opentelemetry-instrumentation-grpc)
        coordinator.commit      the record is durable (created → committed)
      coordinator.dispatch      claim committed and sent to an agent (one per attempt)
      agent.execute             the agent's run of one attempt (CONSUMER)
        llm.call                one model call, with tokens and cost
      coordinator.requeue       the attempt ended without a result (agent died, failure)
      coordinator.complete      the terminal record is committed
      client.watch.event        a watcher saw the change

Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set
(OTLP over gRPC) or `AGENTMESH_OTEL` is `console` or `otlp`; `OTEL_SDK_DISABLED=true`
turns it off. Off, nothing is imported and every helper here is one flag check:
no spans, no context in the records. The usual OTEL_* variables apply (sampler,
batch delay, service name, resource attributes).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the SDK is imported only when tracing is on
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

    from protos.agentmesh.v1 import task_pb2 as tpb

_on: bool | None = None
_provider: TracerProvider | None = None
_tracer: Tracer | None = None
_NULL: contextlib.nullcontext[None] = contextlib.nullcontext()

# Long-lived streams (an agent's Connect lives for hours) and health checks make no
# useful spans: one per stream or probe, outside any task's trace.
_UNTRACED_METHODS = ("Connect", "Report", "Participate", "WatchEvents", "WatchStatus")


def mode(environ: MutableMapping[str, str] | None = None) -> str:
    """ "otlp", "console" or "" (off), from the environment."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ""
    asked = env.get("AGENTMESH_OTEL", "").strip().lower()
    if asked in ("console", "otlp"):
        return asked
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return "otlp"
    return ""


def enabled() -> bool:
    global _on
    if _on is None:
        _on = bool(mode())
    return _on


def setup(service: str = "agentmesh") -> None:
    """Start the process's tracer provider if tracing is on (idempotent; the first
    caller names the process: service.name = OTEL_SERVICE_NAME or `service`)."""
    if _provider is not None or not enabled():
        return
    exporter: SpanExporter
    if mode() == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    start(service, exporter)


def start(service: str, exporter: SpanExporter) -> None:
    """Turn tracing on in this process with `exporter` (tests and `setup`)."""
    global _on, _provider, _tracer
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes: dict[str, Any] = {"process.pid": os.getpid(), "host.name": socket.gethostname()}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service
    # spans leave in batches from a background thread (OTEL_BSP_* tune it): the hot
    # path only appends to a queue
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider, _tracer, _on = provider, provider.get_tracer("agentmesh"), True


def flush() -> None:
    """Export what is queued now (tests, and before a process hands over)."""
    if _provider is not None:
        _provider.force_flush()


def stop() -> None:
    """Flush what is queued and turn tracing off (tests; at exit the SDK flushes itself)."""
    global _on, _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider, _tracer, _on = None, None, None


def tracer() -> Tracer:
    if _tracer is None:
        setup()
    assert _tracer is not None, "tracing is off: check enabled() first"
    return _tracer


# ---- gRPC instrumentation (our channels and servers only: etcd's are never traced) ----


def server_interceptor(service_names: Sequence[str] = ()) -> Any | None:
    """Server spans for our RPCs (None when tracing is off)."""
    if not enabled():
        return None
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    setup(_service_of(service_names))
    return aio_server_interceptor(tracer_provider=_provider, filter_=_filter())  # type: ignore[no-untyped-call]


def client_interceptors() -> list[Any] | None:
    """Client spans (and the caller's context in the request metadata) for a channel."""
    if not enabled():
        return None
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    setup("agentmesh-client")
    return aio_client_interceptors(tracer_provider=_provider, filter_=_filter())  # type: ignore[no-untyped-call,no-any-return]


def _filter() -> Any:
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(
        filters.any_of(
            filters.service_prefix("grpc."),  # health and reflection
            filters.service_prefix("etcdserverpb"),
            *(filters.method_name(m) for m in _UNTRACED_METHODS),
        )
    )


def _service_of(service_names: Sequence[str]) -> str:
    """agentmesh.v1.AgentPool → agentmesh-agentpool."""
    for name in service_names:
        if name.startswith("agentmesh."):
            return "agentmesh-" + name.rsplit(".", 1)[-1].lower()
    return "agentmesh"


# ---- a task's context ----


def inject(carrier: MutableMapping[str, str], context: Context | None = None) -> None:
    """Write the (current) span's W3C context into a TaskSpec.trace_context map."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    TraceContextTextMapPropagator().inject(carrier, context=context)


def context_of(task: tpb.Task | tpb.TaskSpec) -> Context | None:
    """The trace a task belongs to (None when it carries no valid context)."""
    spec = task if not hasattr(task, "spec") else task.spec
    carried = spec.trace_context
    if not carried:
        return None
    from opentelemetry import trace

    # parsed by hand: the propagator's regex and its copies cost more than the span does
    # on the leader, which does this for every traced transition
    parts = carried.get("traceparent", "").split("-")
    if len(parts) != 4 or parts[0] != "00" or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id or not flags & 1:
        # a task's sampling is decided once, at its root: an unsampled task makes no
        # span anywhere (what a parent-based sampler would do, minus building each one)
        return None
    state = carried.get("tracestate")
    parent = trace.SpanContext(
        trace_id,
        span_id,
        is_remote=True,
        trace_flags=trace.TraceFlags(flags & 0xFF),
        trace_state=trace.TraceState.from_header([state]) if state else None,
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


def task_span(
    task: tpb.Task | tpb.TaskSpec,
    name: str,
    attributes: dict[str, Any] | None = None,
    *,
    kind: str = "INTERNAL",
    start_us: int = 0,
) -> contextlib.AbstractContextManager[Span | None]:
    """A span in the task's trace, current inside the `with` (None: not traced)."""
    if not enabled():
        return _NULL
    ctx = context_of(task)
    if ctx is None:
        return _NULL
    return _current(name, ctx, attributes, kind, start_us)


def span(
    name: str, attributes: dict[str, Any] | None = None
) -> contextlib.AbstractContextManager[Span | None]:
    """A child of the current span (None when tracing is off or nothing is current)."""
    if not enabled():
        return _NULL
    from opentelemetry import trace

    if not trace.get_current_span().get_span_context().is_valid:
        return _NULL
    return _current(name, None, attributes, "INTERNAL", 0)


@contextlib.contextmanager
def _current(
    name: str, ctx: Context | None, attributes: dict[str, Any] | None, kind: str, start_us: int
) -> Iterator[Span]:
    from opentelemetry.trace import SpanKind

    with tracer().start_as_current_span(
        name,
        context=ctx,
        kind=SpanKind[kind],
        attributes=attributes,
        start_time=start_us * 1000 if start_us else None,
    ) as current:
        yield current


def record(
    task: tpb.Task,
    name: str,
    start_us: int,
    end_us: int,
    attributes: dict[str, Any] | None = None,
) -> None:
    """A finished span in the task's trace, from times the caller already has."""
    ctx = context_of(task)
    if ctx is not None:
        _record(ctx, name, start_us, end_us, attributes)


def _record(
    ctx: Context, name: str, start_us: int, end_us: int, attributes: dict[str, Any] | None
) -> None:
    start_ns = start_us * 1000 if 0 < start_us <= end_us else end_us * 1000
    s = tracer().start_span(name, context=ctx, attributes=attributes, start_time=start_ns)
    s.end(end_time=end_us * 1000)


def stamp(specs: Sequence[tpb.TaskSpec]) -> None:
    """Give every untraced spec a trace (the coordinator, on Submit): one Submit's task
    continues the call's trace; each task of a batch gets a trace of its own, linked
    to the call's, since a trace is one task's story."""
    if not enabled():
        return
    from opentelemetry import trace

    current = trace.get_current_span()
    here = current.get_span_context()
    for spec in specs:
        if spec.trace_context:
            continue
        if len(specs) == 1 and here.is_valid:
            inject(spec.trace_context)
            continue
        links = [trace.Link(here)] if here.is_valid else None
        root = tracer().start_span(
            "coordinator.submit", context=_ROOT(), kind=trace.SpanKind.SERVER, links=links
        )
        inject(spec.trace_context, trace.set_span_in_context(root))
        root.end()


def _ROOT() -> Context:  # noqa: N802 - reads as the constant it stands for
    from opentelemetry.context import Context

    return Context()


def outcome(current: Span, report: Any) -> None:
    """Mark an agent's attempt span with what it reports (an AgentMessage)."""
    from opentelemetry.trace import Status, StatusCode

    body = report.WhichOneof("body")
    if body == "result":
        usage = report.result.usage
        current.set_attribute("agentmesh.output_bytes", len(report.result.output))
    else:
        usage = report.failure.usage
        current.set_attribute("agentmesh.retryable", report.failure.retryable)
        current.set_status(Status(StatusCode.ERROR, report.failure.error[:256]))
    if usage.input_tokens or usage.output_tokens:
        current.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
        current.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
        current.set_attribute("agentmesh.cost_usd", usage.cost_usd)


# ---- the coordinator's view of a task ----


def transitions(term: int, now_us: Callable[[], int]) -> Callable[[tpb.Task, int], None] | None:
    """A core subscriber that turns the leader's state changes into spans (None when off).

    Each span runs from the time the record already holds (created, assigned,
    finished) to now, so it costs no bookkeeping of its own.
    """
    if not enabled():
        return None
    from protos.agentmesh.v1 import task_pb2 as tpb

    S = tpb.TaskState
    terminal = {S.TASK_STATE_SUCCEEDED, S.TASK_STATE_CANCELLED, S.TASK_STATE_DEAD_LETTER}

    def on_change(task: tpb.Task, previous: int) -> None:
        if not task.spec.trace_context:
            return
        ctx = context_of(task)
        if ctx is None:
            return  # not sampled
        now = now_us()
        # few attributes: each one is validated, stored and encoded per span, and the
        # span's name already says which transition it was
        attrs: dict[str, Any] = {
            "agentmesh.task_id": task.task_id,
            "agentmesh.attempt": task.attempts,
        }
        if previous == S.TASK_STATE_UNSPECIFIED:
            if task.term != term:  # adopted at takeover, not created now
                return
            _record(ctx, "coordinator.commit", task.created_at_us, now, attrs)
        if task.state == S.TASK_STATE_ASSIGNED:
            attrs["agentmesh.agent_id"] = task.agent_id
            attrs["agentmesh.claim_token"] = task.claim_token
            _record(ctx, "coordinator.dispatch", task.assigned_at_us, now, attrs)
        elif task.state in terminal:
            attrs["agentmesh.state"] = S.Name(task.state)
            attrs["agentmesh.agent_id"] = task.agent_id
            if task.last_error:
                attrs["agentmesh.error"] = task.last_error[:256]
            if task.usage.input_tokens or task.usage.output_tokens:
                attrs["gen_ai.usage.input_tokens"] = task.usage.input_tokens
                attrs["gen_ai.usage.output_tokens"] = task.usage.output_tokens
                attrs["agentmesh.cost_usd"] = task.usage.cost_usd
            _record(ctx, "coordinator.complete", task.finished_at_us, now, attrs)
        elif task.state == S.TASK_STATE_QUEUED and previous != S.TASK_STATE_UNSPECIFIED:
            attrs["agentmesh.previous_state"] = S.Name(previous)
            attrs["agentmesh.agent_id"] = task.agent_id
            if task.last_error:
                attrs["agentmesh.error"] = task.last_error[:256]
            _record(ctx, "coordinator.requeue", now, now, attrs)

    return on_change
