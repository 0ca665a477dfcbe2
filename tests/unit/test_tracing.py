"""services/_common/tracing.py: off costs nothing and records nothing; on, a task's
spans all join the trace its record carries."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from protos.agentmesh.v1 import task_pb2 as tpb
from services._common import tracing

S = tpb.TaskState


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.start("agentmesh-test", exporter)
    try:
        yield exporter
    finally:
        tracing.stop()


def test_mode_follows_the_environment() -> None:
    assert tracing.mode({}) == ""
    assert tracing.mode({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) == "otlp"
    assert tracing.mode({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}) == "otlp"
    assert tracing.mode({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}) == ""  # compose's default
    assert tracing.mode({"AGENTMESH_OTEL": "console"}) == "console"
    assert (
        tracing.mode({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"})
        == ""
    )


def test_off_nothing_is_stamped_or_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AGENTMESH_OTEL", raising=False)
    tracing.stop()  # forget any earlier decision
    assert not tracing.enabled()
    spec = tpb.TaskSpec(kind="noop")
    tracing.stamp([spec])
    assert not spec.trace_context
    assert tracing.transitions(1, lambda: 0) is None
    assert tracing.server_interceptor(["agentmesh.v1.Coordinator"]) is None
    assert tracing.client_interceptors() is None
    with tracing.task_span(spec, "x") as span:
        assert span is None
    tracing.stop()


def _traced_task(spans: InMemorySpanExporter) -> tuple[tpb.Task, int]:
    spec = tpb.TaskSpec(task_id="t1", kind="sleep")
    with tracing.tracer().start_as_current_span("client.submit") as root:
        tracing.stamp([spec])  # one Submit continues the caller's trace
    assert spec.trace_context["traceparent"]
    return tpb.Task(task_id="t1", spec=spec, term=7), root.get_span_context().trace_id


def test_a_task_through_a_requeue_is_one_trace(spans: InMemorySpanExporter) -> None:
    task, trace_id = _traced_task(spans)
    now = [1_000_000]
    on_change = tracing.transitions(7, lambda: now[0])
    assert on_change is not None

    task.state, task.created_at_us = S.TASK_STATE_QUEUED, 999_000
    on_change(task, S.TASK_STATE_UNSPECIFIED)
    task.state, task.agent_id, task.attempts, task.assigned_at_us = (
        S.TASK_STATE_ASSIGNED,
        "pool-1-a0001",
        1,
        1_000_000,
    )
    on_change(task, S.TASK_STATE_QUEUED)
    # the agent is executing in another process: its span joins through the record
    with tracing.task_span(task, "agent.execute", kind="CONSUMER") as run:
        assert run is not None
    task.state, task.last_error = S.TASK_STATE_QUEUED, "agent disconnected"
    on_change(task, S.TASK_STATE_RUNNING)
    task.state, task.agent_id, task.attempts = S.TASK_STATE_ASSIGNED, "pool-2-a0001", 2
    on_change(task, S.TASK_STATE_QUEUED)
    now[0] = 1_500_000
    task.state, task.finished_at_us = S.TASK_STATE_SUCCEEDED, 1_400_000
    on_change(task, S.TASK_STATE_RUNNING)

    tracing.flush()
    finished = spans.get_finished_spans()
    assert {s.context.trace_id for s in finished} == {trace_id}
    names = [s.name for s in finished]
    assert names == [
        "client.submit",
        "coordinator.commit",
        "coordinator.dispatch",
        "agent.execute",
        "coordinator.requeue",
        "coordinator.dispatch",
        "coordinator.complete",
    ]
    complete = finished[-1]
    assert (complete.start_time, complete.end_time) == (1_400_000_000, 1_500_000_000)
    assert complete.attributes is not None
    assert complete.attributes["agentmesh.agent_id"] == "pool-2-a0001"
    commit = finished[1]
    assert (commit.start_time, commit.end_time) == (999_000_000, 1_000_000_000)


def test_adopted_records_and_untraced_tasks_make_no_spans(spans: InMemorySpanExporter) -> None:
    task, _ = _traced_task(spans)
    on_change = tracing.transitions(8, lambda: 5)
    assert on_change is not None
    task.state = S.TASK_STATE_QUEUED  # written in term 7, loaded by term 8's leader
    on_change(task, S.TASK_STATE_UNSPECIFIED)
    on_change(tpb.Task(task_id="plain", state=S.TASK_STATE_SUCCEEDED), S.TASK_STATE_RUNNING)
    tracing.flush()
    assert [s.name for s in spans.get_finished_spans()] == ["client.submit"]


def test_a_batch_gives_each_task_a_trace_of_its_own(spans: InMemorySpanExporter) -> None:
    specs = [tpb.TaskSpec(kind="noop") for _ in range(3)]
    given = tpb.TaskSpec(
        kind="noop", trace_context={"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"}
    )
    with tracing.tracer().start_as_current_span("batch call"):
        tracing.stamp([*specs, given])
    trace_ids = {s.trace_context["traceparent"].split("-")[1] for s in specs}
    assert len(trace_ids) == 3
    assert given.trace_context["traceparent"].split("-")[1] == "ab" * 16  # the client's, kept


def test_an_unsampled_task_makes_no_span_anywhere(spans: InMemorySpanExporter) -> None:
    # the root decided not to sample (flags 00): no process builds spans for it
    unsampled = {"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00"}
    task = tpb.Task(task_id="u", spec=tpb.TaskSpec(kind="noop", trace_context=unsampled), term=3)
    on_change = tracing.transitions(3, lambda: 10)
    assert on_change is not None
    task.state = S.TASK_STATE_SUCCEEDED
    on_change(task, S.TASK_STATE_RUNNING)
    with tracing.task_span(task, "agent.execute") as run:
        assert run is None
    tracing.flush()
    assert spans.get_finished_spans() == ()
