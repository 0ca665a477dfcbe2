"""The `llm` executor through the real `anthropic` SDK against the local Messages API server.

No key and no network: the server is `loadtest.fake_anthropic` on 127.0.0.1, in this
test's event loop, so a test can script its next answers and read its counters.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from loadtest.fake_anthropic import FakeAnthropic, FakeConfig
from protos.agentmesh.v1 import agent_pool_pb2 as ppb
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.clock import SystemClock
from services._common.follow import Leader
from services._common.llm_cost import DEFAULT_PRICES
from services._common.ratelimit import ModelLimits
from services.agent_pool.agent import Agent, PoolContext
from services.agent_pool.llm import LlmError, LlmExecutor
from services.agent_pool.llm_config import LlmConfig

# Bounds that only catch a hang (a normal call here takes milliseconds).
HANG_S = 20.0


class RecordingClock(SystemClock):
    """Real time, except retry waits: recorded and skipped, so tests check them exactly."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    server = FakeAnthropic(FakeConfig(latency_ms="fixed:1", output_tokens="fixed:40", seed=1))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def executor(fake: FakeAnthropic, clock: RecordingClock | None = None, **cfg: Any) -> LlmExecutor:
    seen: list[tuple[str, dict[str, str]]] = []
    ex = LlmExecutor(
        LlmConfig(**cfg),
        api_key="sk-test-not-a-real-key",
        base_url=fake.url,
        clock=clock or RecordingClock(),
        on_ratelimit=lambda model, headers: seen.append((model, headers)),
    )
    ex.seen = seen  # type: ignore[attr-defined]
    return ex


def llm_task(payload: dict[str, Any], role: str = "") -> tpb.Task:
    return tpb.Task(
        task_id="t-1",
        claim_token=7,
        spec=tpb.TaskSpec(kind="llm", role=role, payload=json.dumps(payload).encode()),
    )


async def run(ex: LlmExecutor, task: tpb.Task, progress: Any = None) -> Any:
    try:
        return await asyncio.wait_for(ex.run(task, progress), HANG_S)
    finally:
        await ex.close()


@pytest.mark.parametrize("stream", [True, False])
async def test_success_records_text_usage_and_cost(fake: FakeAnthropic, stream: bool) -> None:
    ex = executor(fake, stream=stream)
    out = await run(
        ex, llm_task({"prompt": "Say hello.", "complexity": "simple", "max_tokens": 100})
    )
    doc = json.loads(out.output)
    assert doc["text"].startswith("[simulated]")
    assert doc["stop_reason"] == "end_turn"
    assert doc["model"] == "claude-haiku-5-5"
    assert doc["model_source"] == "complexity:simple"
    assert doc["attempts"] == 1
    assert out.usage.output_tokens == 40
    assert out.usage.input_tokens == fake.stats.input_tokens > 0
    expected = DEFAULT_PRICES["claude-haiku-5-5"].cost(out.usage.input_tokens, 40)
    assert out.usage.cost_usd == pytest.approx(expected)
    assert doc["usage"]["cost_usd"] == pytest.approx(expected)
    assert doc["estimated_input_tokens"] >= out.usage.input_tokens
    assert fake.stats.requests == 1


async def test_streaming_reports_progress(fake: FakeAnthropic) -> None:
    fake.cfg.tokens_per_s = 400  # 8 words per event: one event every 20 ms
    ex = executor(fake, progress_interval_s=0.0)
    sent: list[tuple[float, str]] = []
    await run(ex, llm_task({"prompt": "x", "max_tokens": 100}), lambda f, m: sent.append((f, m)))
    assert len(sent) >= 3
    fractions = [f for f, _ in sent]
    assert fractions == sorted(fractions)
    assert fractions[0] > 0
    assert fractions[-1] < 1
    assert "claude-sonnet-5-5: about" in sent[-1][1]


async def test_rate_limit_headers_reach_the_observer_and_the_result() -> None:
    server = FakeAnthropic(
        FakeConfig(latency_ms="fixed:1", limits={"*": ModelLimits(50, 40_000, 8_000)})
    )
    await server.start()
    try:
        ex = executor(server)
        outcome = await run(ex, llm_task({"prompt": "x", "max_tokens": 100}))
        doc = json.loads(outcome.output)
    finally:
        await server.stop()
    # what TaskResult.ratelimit carries to the leader's admission buckets
    assert outcome.ratelimit.model == "claude-sonnet-5-5"
    assert dict(outcome.ratelimit.headers) == doc["ratelimit"]
    assert outcome.ratelimit.seen_at_us > 0
    assert doc["ratelimit"]["anthropic-ratelimit-requests-limit"] == "50"
    assert doc["ratelimit"]["anthropic-ratelimit-requests-remaining"] == "49"
    assert doc["ratelimit"]["anthropic-ratelimit-output-tokens-limit"] == "8000"
    assert ex.seen == [("claude-sonnet-5-5", doc["ratelimit"])]  # type: ignore[attr-defined]


async def test_429_waits_what_retry_after_says_then_succeeds(fake: FakeAnthropic) -> None:
    clock = RecordingClock()
    fake.script("429:3")
    out = await run(executor(fake, clock), llm_task({"prompt": "x"}))
    assert json.loads(out.output)["attempts"] == 2
    assert fake.stats.requests == 2
    assert len(clock.sleeps) == 1
    assert 3.0 <= clock.sleeps[0] <= 3.0 * 1.2


async def test_the_account_limit_answers_429_with_retry_after() -> None:
    # 2 requests per minute: a token every 30 s; the third request finds the bucket empty
    server = FakeAnthropic(FakeConfig(latency_ms="fixed:1", limits={"*": ModelLimits(2, 0, 0)}))
    await server.start()
    try:
        for _ in range(2):
            await run(executor(server), llm_task({"prompt": "x"}))
        with pytest.raises(LlmError) as info:
            await run(executor(server, max_attempts=1), llm_task({"prompt": "x"}))
    finally:
        await server.stop()
    assert server.stats.rate_limited == 1
    assert info.value.status == 429
    assert info.value.retryable
    # whole seconds until the next token (30 s per token, less the time since the first call)
    assert 1 <= int(info.value.ratelimit["retry-after"]) <= 30
    assert info.value.ratelimit["anthropic-ratelimit-requests-remaining"] == "0"
    # what TaskFailure.ratelimit carries to the leader (it pauses the model on retry-after)
    report = info.value.ratelimit_report
    assert report is not None
    assert dict(report.headers) == info.value.ratelimit
    assert "2 requests per minute" in str(info.value)


@pytest.mark.parametrize("fault", ["529", "500"])
async def test_overloaded_and_server_errors_are_retried(fake: FakeAnthropic, fault: str) -> None:
    clock = RecordingClock()
    fake.script(fault, fault)
    out = await run(executor(fake, clock), llm_task({"prompt": "x"}))
    assert json.loads(out.output)["attempts"] == 3
    assert fake.stats.requests == 3
    assert len(clock.sleeps) == 2  # exponential backoff with jitter, no hint
    assert all(0 <= s <= 1.0 for s in clock.sleeps)


async def test_persistent_529_fails_retryable_after_max_attempts(fake: FakeAnthropic) -> None:
    fake.script(*["529"] * 10)
    with pytest.raises(LlmError) as info:
        await run(executor(fake, max_attempts=4), llm_task({"prompt": "x"}))
    err = info.value
    assert err.retryable  # the coordinator's retry and dead-letter rules apply
    assert err.attempts == 4
    assert fake.stats.requests == 4
    assert "gave up after 4 attempts" in str(err)
    assert "529 overloaded_error" in str(err)


async def test_400_is_not_retried_and_fails_for_good(fake: FakeAnthropic) -> None:
    fake.script("400", "400")
    with pytest.raises(LlmError) as info:
        await run(executor(fake), llm_task({"prompt": "x"}))
    assert not info.value.retryable
    assert fake.stats.requests == 1
    assert "not retried: the request itself was refused" in str(info.value)
    assert "400 invalid_request_error" in str(info.value)


async def test_a_malformed_payload_never_reaches_the_api(fake: FakeAnthropic) -> None:
    with pytest.raises(LlmError, match="'max_tokens' must be an integer") as info:
        await run(executor(fake), llm_task({"prompt": "x", "max_tokens": -1}))
    assert not info.value.retryable
    assert fake.stats.requests == 0


@pytest.mark.parametrize(
    ("fault", "stream", "message"),
    [
        ("malformed", True, "the API sent a malformed response"),
        ("malformed", False, "the API sent a malformed response"),
        ("drop", True, "connection to the API failed or dropped"),
        ("drop", False, "connection to the API failed or dropped"),
        ("drop_mid", True, "connection to the API failed or dropped"),
        ("stream_error", True, "stream error overloaded_error"),
    ],
)
async def test_broken_answers_fail_clearly_never_hang(
    fake: FakeAnthropic, fault: str, stream: bool, message: str
) -> None:
    fake.script(*[fault] * 3)
    with pytest.raises(LlmError, match=message) as info:
        await run(executor(fake, stream=stream, max_attempts=3), llm_task({"prompt": "x"}))
    assert info.value.retryable
    assert fake.stats.requests == 3


async def test_a_stream_broken_mid_way_still_reports_what_it_was_billed(
    fake: FakeAnthropic,
) -> None:
    fake.script("drop_mid")
    with pytest.raises(LlmError) as info:
        await run(executor(fake, max_attempts=1), llm_task({"prompt": "x" * 400}))
    # message_start had stated the input tokens before the connection dropped
    assert info.value.usage.input_tokens > 100
    assert info.value.usage.cost_usd > 0


async def test_a_broken_answer_then_a_good_one_succeeds(fake: FakeAnthropic) -> None:
    fake.script("drop_mid", "malformed")
    out = await run(executor(fake), llm_task({"prompt": "x"}))
    assert json.loads(out.output)["attempts"] == 3


async def test_retry_after_beyond_the_limit_fails_now_and_retryable(fake: FakeAnthropic) -> None:
    clock = RecordingClock()
    fake.script("429:120")
    with pytest.raises(LlmError, match="asked to wait 120 s") as info:
        await run(executor(fake, clock, retry_after_max_s=60), llm_task({"prompt": "x"}))
    assert info.value.retryable
    assert clock.sleeps == []
    assert fake.stats.requests == 1


@pytest.mark.parametrize("stream", [True, False])
async def test_a_deadline_closes_the_request_on_the_server(
    fake: FakeAnthropic, stream: bool
) -> None:
    ex = executor(fake, stream=stream)
    await ex.run(llm_task({"prompt": "warm the client up"}))
    fake.script("stall")  # the server never answers this one
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ex.run(llm_task({"prompt": "x"})), 0.5)
    finally:
        await ex.close()
    # the cancelled call closed its connection: the server saw the client go away
    for _ in range(int(HANG_S / 0.01)):
        if fake.stats.disconnects:
            break
        await asyncio.sleep(0.01)
    assert fake.stats.disconnects == 1
    assert fake.stats.in_flight == 0


async def test_a_deadline_mid_stream_closes_the_stream(fake: FakeAnthropic) -> None:
    fake.cfg.tokens_per_s = 10  # 40 tokens: 4 s of streaming
    ex = executor(fake)
    sent: list[float] = []
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                ex.run(llm_task({"prompt": "x"}), lambda f, m: sent.append(f)), 1.5
            )
    finally:
        await ex.close()
    for _ in range(int(HANG_S / 0.01)):
        if fake.stats.disconnects:
            break
        await asyncio.sleep(0.01)
    assert sent  # it was streaming when the deadline came
    assert fake.stats.disconnects == 1
    assert fake.stats.succeeded == 0


async def test_role_system_prompt_and_context_reach_the_request(fake: FakeAnthropic) -> None:
    async def context(keys: list[str]) -> dict[str, str | None]:
        return {k: f"value of {k}" for k in keys}

    ex = executor(fake)
    ex.context_source = context
    out = await run(
        ex, llm_task({"prompt": "x", "context_keys": ["style/python"]}, role="reviewer")
    )
    doc = json.loads(out.output)
    assert doc["model_source"] == "role:reviewer"
    # the simulated tokenizer counted the role prompt and the context in the input
    assert out.usage.input_tokens > 60


async def test_missing_context_fails_for_good(fake: FakeAnthropic) -> None:
    async def context(keys: list[str]) -> dict[str, str | None]:
        return dict.fromkeys(keys)

    ex = executor(fake)
    ex.context_source = context
    with pytest.raises(LlmError, match="context_keys not found: \\['nope'\\]") as info:
        await run(ex, llm_task({"prompt": "x", "context_keys": ["nope"]}))
    assert not info.value.retryable
    assert fake.stats.requests == 0


async def test_each_model_call_is_a_child_span_with_tokens_and_cost(fake: FakeAnthropic) -> None:
    # with tracing on, the agent's attempt span is current while the executor runs: each
    # model call (the refused one included) is its child, the answered one with its usage
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from services._common import tracing

    spans = InMemorySpanExporter()
    tracing.start("agentmesh-test", spans)
    try:
        fake.script("429:0")
        with tracing.tracer().start_as_current_span("agent.execute") as attempt:
            out = await run(executor(fake), llm_task({"prompt": "x", "complexity": "simple"}))
        tracing.flush()
        calls = [s for s in spans.get_finished_spans() if s.name == "llm.call"]
    finally:
        tracing.stop()
    assert len(calls) == 2
    assert all(c.parent is not None for c in calls)
    assert {c.parent.span_id for c in calls if c.parent} == {attempt.get_span_context().span_id}
    refused, answered = calls
    assert refused.status.status_code.name == "ERROR"
    assert answered.attributes is not None
    assert answered.attributes["gen_ai.request.model"] == "claude-haiku-5-5"
    assert answered.attributes["gen_ai.usage.output_tokens"] == out.usage.output_tokens == 40
    assert answered.attributes["gen_ai.usage.input_tokens"] == out.usage.input_tokens
    assert answered.attributes["agentmesh.cost_usd"] == pytest.approx(out.usage.cost_usd)


async def test_the_agent_sends_the_rate_limit_headers_to_the_leader() -> None:
    # the leader's admission follows them (server-stated limits, a 429's retry-after);
    # they were dropped between the executor and the agent's TaskResult/TaskFailure
    server = FakeAnthropic(FakeConfig(latency_ms="fixed:1", limits={"*": ModelLimits(1, 0, 0)}))
    await server.start()
    clock = SystemClock()
    ex = executor(server, max_attempts=1)
    ctx = PoolContext(
        pool_id="p",
        lease_id=lambda: 1,
        coordinator=Leader(None, "coordinator", clock),  # type: ignore[arg-type]  # no etcd
        executors={"llm": ex},
        task_timeout_s=HANG_S,
        clock=clock,
    )
    agent = Agent("p-a0001", ctx, ppb.AgentTemplate(kinds=["llm"], capacity=1))
    try:
        ok = await agent._attempt(llm_task({"prompt": "x", "max_tokens": 10}), 0)
        refused = await agent._attempt(llm_task({"prompt": "x", "max_tokens": 10}), 0)
    finally:
        await ex.close()
        await server.stop()
    assert ok.WhichOneof("body") == "result"
    assert ok.result.ratelimit.model == "claude-sonnet-5-5"
    assert ok.result.ratelimit.headers["anthropic-ratelimit-requests-limit"] == "1"
    assert ok.result.ratelimit.seen_at_us > 0
    assert refused.WhichOneof("body") == "failure"
    assert refused.failure.retryable
    assert refused.failure.ratelimit.model == "claude-sonnet-5-5"
    assert int(refused.failure.ratelimit.headers["retry-after"]) >= 1
    assert refused.failure.ratelimit.headers["anthropic-ratelimit-requests-remaining"] == "0"


async def test_a_task_timed_out_mid_stream_reports_what_it_was_billed(
    fake: FakeAnthropic,
) -> None:
    # message_start had stated the input tokens (billed) when the task's timeout cut the
    # stream: the failure used to carry no usage, so the spend never reached the totals
    # and the budgets, however often such tasks were retried
    fake.cfg.tokens_per_s = 10  # 40 tokens: 4 s of streaming
    clock = SystemClock()
    ex = executor(fake)
    ctx = PoolContext(
        pool_id="p",
        lease_id=lambda: 1,
        coordinator=Leader(None, "coordinator", clock),  # type: ignore[arg-type]  # no etcd
        executors={"llm": ex},
        task_timeout_s=HANG_S,
        clock=clock,
    )
    agent = Agent("p-a0001", ctx, ppb.AgentTemplate(kinds=["llm"], capacity=1))
    task = llm_task({"prompt": "x" * 400})
    task.spec.timeout_s = 1.0
    try:
        report = await agent._attempt(task, 0)
    finally:
        await ex.close()
    assert report.WhichOneof("body") == "failure"
    assert "timed out after 1.0 s" in report.failure.error
    assert report.failure.retryable
    assert report.failure.usage.input_tokens > 100
    assert report.failure.usage.cost_usd > 0
    assert ex.interrupted == {}  # nothing kept once it was reported


async def test_an_answer_too_large_to_store_still_reports_what_it_was_billed(
    fake: FakeAnthropic,
) -> None:
    # the call succeeded and was billed in full; the agent refused its output as too large
    # for the task record and used to report the failure with no usage at all
    clock = SystemClock()
    ex = executor(fake)
    ctx = PoolContext(
        pool_id="p",
        lease_id=lambda: 1,
        coordinator=Leader(None, "coordinator", clock),  # type: ignore[arg-type]  # no etcd
        executors={"llm": ex},
        task_timeout_s=HANG_S,
        clock=clock,
        max_result_bytes=64,
    )
    agent = Agent("p-a0001", ctx, ppb.AgentTemplate(kinds=["llm"], capacity=1))
    try:
        report = await agent._attempt(llm_task({"prompt": "x" * 400}), 0)
    finally:
        await ex.close()
    assert report.WhichOneof("body") == "failure"
    assert "the limit is 64 bytes" in report.failure.error
    assert not report.failure.retryable
    assert report.failure.usage.input_tokens > 100
    assert report.failure.usage.output_tokens == 40
    assert report.failure.usage.cost_usd > 0
