"""One trace per task, across real processes (issue 14).

A real cluster (etcd, a coordinator, two agent pools) exports its spans over OTLP to a
receiver inside this test, a grpc server implementing the collector's TraceService and
keeping the spans in memory. A task is submitted by a tracing client in this process; the
pool running it is SIGKILLed, so the task is requeued and finished by the other pool. Its
trace must hold every step, from the client's submit through both dispatches to the
completion and the watcher's event, from more than one process.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common import tracing
from services.client import MeshClient

S = tpb.TaskState


@dataclass
class Received:
    service: str
    pid: int
    span: trace_pb2.Span


class Receiver(otlp_grpc.TraceServiceServicer):
    """The collector's OTLP/gRPC trace endpoint, keeping what it is sent."""

    def __init__(self) -> None:
        self.spans: list[Received] = []

    async def Export(  # noqa: N802 - the generated servicer's name
        self, request: otlp.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> otlp.ExportTraceServiceResponse:
        for rs in request.resource_spans:
            attrs = {kv.key: kv.value for kv in rs.resource.attributes}
            service = attrs["service.name"].string_value if "service.name" in attrs else ""
            pid = attrs["process.pid"].int_value if "process.pid" in attrs else 0
            for scope in rs.scope_spans:
                self.spans.extend(Received(service, pid, s) for s in scope.spans)
        return otlp.ExportTraceServiceResponse()

    def trace(self, trace_id: bytes) -> list[Received]:
        return [r for r in self.spans if r.span.trace_id == trace_id]


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    server = grpc.aio.server()
    found = Receiver()
    otlp_grpc.add_TraceServiceServicer_to_server(found, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield found, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def _trace_id(task: tpb.Task) -> bytes:
    # traceparent: version-traceid-spanid-flags
    return bytes.fromhex(task.spec.trace_context["traceparent"].split("-")[1])


async def _until(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := await check():
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(90)
async def test_requeued_task_is_one_trace_from_submit_to_completion_across_processes(
    cluster: Any, receiver: tuple[Receiver, str]
) -> None:
    spans, endpoint = receiver
    c = await cluster(
        agents=4,
        pools=2,
        health_monitors=0,
        consensus=0,
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{endpoint}",
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: spans reach the receiver soon
        },
    )
    tracing.start("agentmesh-test-client", OTLPSpanExporter(endpoint=endpoint, insecure=True))
    try:
        async with MeshClient(etcd=c.etcd_endpoint, timeout_s=5.0) as client:
            spec = tpb.TaskSpec(
                task_id="traced-1", kind="sleep", payload=json.dumps({"ms": 3000}).encode()
            )
            await client.submit(spec)

            async def running() -> tpb.Task | None:
                task = await client.get("traced-1")
                return task if task.state in (S.TASK_STATE_ASSIGNED, S.TASK_STATE_RUNNING) else None

            first = await _until(running, 20, "the task to be assigned")
            assert first.spec.trace_context["traceparent"], "the record keeps the trace context"
            pool = first.agent_id.rsplit("-a", 1)[0]
            c.kill(pool, signal.SIGKILL)  # its claim is released: the task is requeued

            done = None
            async for event in client.watch_task("traced-1"):
                if event.task.state == S.TASK_STATE_SUCCEEDED:
                    done = event.task
                    break
            assert done is not None
            assert done.agent_id.rsplit("-a", 1)[0] != pool, "the other pool finished it"

            # a client that does not trace (no context, no interceptors): the coordinator
            # starts the task's trace at its Submit span
            async with grpc.aio.insecure_channel(await client.leader()) as channel:
                stub = cpb_grpc.CoordinatorStub(channel)
                await stub.Submit(
                    cpb.SubmitRequest(spec=tpb.TaskSpec(task_id="plain-1", kind="noop")),
                    timeout=5.0,
                )

            async def plain_done() -> tpb.Task | None:
                task = await client.get("plain-1")
                return task if task.state == S.TASK_STATE_SUCCEEDED else None

            plain = await _until(plain_done, 20, "the untraced client's task to finish")

            # a task sent on a SubmitStream: a trace of its own, rooted at its submit span
            streamed_spec = tpb.TaskSpec(task_id="streamed-1", kind="noop")
            answers = [r async for r in client.submit_stream([streamed_spec])]
            assert [r.task.task_id for r in answers] == ["streamed-1"]

            async def streamed_done() -> tpb.Task | None:
                task = await client.get("streamed-1")
                return task if task.state == S.TASK_STATE_SUCCEEDED else None

            streamed = await _until(streamed_done, 20, "the streamed task to finish")
    finally:
        await asyncio.to_thread(tracing.stop)  # flush the client's spans (off the loop)

    trace_id = _trace_id(first)

    async def completed() -> list[Received] | None:
        found = spans.trace(trace_id)
        names = {r.span.name for r in found}
        want = {"coordinator.complete", "agent.execute", "client.watch.event"}
        return found if want <= names else None

    found = await _until(completed, 15, "the completion's spans")
    by_name: dict[str, list[Received]] = {}
    for r in found:
        by_name.setdefault(r.span.name, []).append(r)
    names = set(by_name)

    # every step of the task, in its one trace
    for step in (
        "client.submit",
        "/agentmesh.v1.Coordinator/Submit",
        "coordinator.commit",
        "coordinator.dispatch",
        "coordinator.requeue",
        "agent.execute",
        "coordinator.complete",
        "client.watch.event",
    ):
        assert step in names, f"{step} missing from the trace: {sorted(names)}"

    # the requeue shows: two dispatches, to agents of different pools
    dispatched = {
        _attr(r.span, "agentmesh.agent_id").rsplit("-a", 1)[0]
        for r in by_name["coordinator.dispatch"]
    }
    assert dispatched == {pool, done.agent_id.rsplit("-a", 1)[0]}
    # the surviving pool's run of the requeued task is in the same trace (the killed
    # pool's attempt never ended, so it has no span to send)
    runs = by_name["agent.execute"]
    assert all(r.service == "agentmesh-agentpool" for r in runs)
    assert {_attr(r.span, "agentmesh.pool_id") for r in runs} == {done.agent_id.rsplit("-a", 1)[0]}

    # spans from more than one process: this client, the coordinator, the pool
    services = {r.service for r in found}
    assert {"agentmesh-test-client", "agentmesh-coordinator", "agentmesh-agentpool"} <= services
    assert len({r.pid for r in found}) >= 3

    # one tree: every parent named in the trace is a span of the trace, or the root's
    ids = {r.span.span_id for r in found}
    roots = [r for r in found if not r.span.parent_span_id]
    assert [r.span.name for r in roots] == ["client.submit"]
    assert all(r.span.parent_span_id in ids for r in found if r.span.parent_span_id)

    # the untraced client's task: a trace all the same, rooted at the leader's Submit
    plain_trace = _trace_id(plain)

    async def plain_spans() -> list[Received] | None:
        got = spans.trace(plain_trace)
        return got if "coordinator.complete" in {r.span.name for r in got} else None

    got = await _until(plain_spans, 15, "the untraced client's task's spans")
    assert {r.service for r in got} == {"agentmesh-coordinator", "agentmesh-agentpool"}
    assert [r.span.name for r in got if not r.span.parent_span_id] == [
        "/agentmesh.v1.Coordinator/Submit"
    ]
    assert {"coordinator.commit", "agent.execute"} <= {r.span.name for r in got}

    # the streamed task: its own trace, rooted at the client's submit span, through
    # the leader and the pool (the client's span arrived when the tracer flushed)
    streamed_trace = _trace_id(streamed)

    async def streamed_spans() -> list[Received] | None:
        got = spans.trace(streamed_trace)
        return got if "coordinator.complete" in {r.span.name for r in got} else None

    got = await _until(streamed_spans, 15, "the streamed task's spans")
    roots = [r for r in got if not r.span.parent_span_id]
    assert [(r.span.name, r.service) for r in roots] == [("client.submit", "agentmesh-test-client")]
    assert _attr(roots[0].span, "agentmesh.task_id") == "streamed-1"
    assert {"coordinator.commit", "agent.execute", "coordinator.complete"} <= {
        r.span.name for r in got
    }


def _attr(span: trace_pb2.Span, key: str) -> Any:
    for kv in span.attributes:
        if kv.key == key:
            v = kv.value
            return v.string_value if v.HasField("string_value") else v.int_value
    raise KeyError(key)
