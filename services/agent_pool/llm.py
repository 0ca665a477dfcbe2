"""The `llm` executor: one Claude call per task attempt, through the official SDK.

One `AsyncAnthropic` client per pool carries every agent's calls (one connection pool, one
place for limits). The SDK's own retries are off; `llm_retry.RetryPolicy` retries instead,
so each HTTP attempt is counted once and 429s honour `retry-after`. A task's deadline is
the agent's `clock.wait_for` around `run`: its cancellation reaches the HTTP request,
which closes the connection (the server sees the client go away).

Seams for the leader (phase 2):
- every response's rate-limit headers go to `on_ratelimit(model, headers)` and, for a
  success, into the result's "ratelimit" field; an `LlmError` carries the last ones;
- the result's "usage" and "model" say what to settle and charge.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx2

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common import tracing
from services._common.clock import Clock, SystemClock
from services._common.llm_cost import PriceTable
from services._common.ratelimit import ratelimit_headers_of
from services.agent_pool.executors import ContextSource, ExecutorError, Outcome, Progress
from services.agent_pool.llm_config import LlmConfig, Role
from services.agent_pool.llm_payload import (
    LlmRequest,
    PayloadError,
    estimate_input_tokens,
    parse_payload,
    with_context,
)
from services.agent_pool.llm_retry import RetryPolicy, Verdict, classify

log = logging.getLogger(__name__)

RateLimitObserver = Callable[[str, dict[str, str]], None]
# Characters per output token while streaming (only for the progress fraction).
CHARS_PER_TOKEN = 4.0


class LlmError(ExecutorError):
    """A failed `llm` attempt, with what the coordinator and the leader need to know."""

    def __init__(
        self,
        message: str,
        retryable: bool,
        *,
        usage: tpb.TokenUsage | None = None,
        ratelimit: dict[str, str] | None = None,
        attempts: int = 0,
        status: int = 0,
    ) -> None:
        super().__init__(message, retryable=retryable)
        self.usage = usage or tpb.TokenUsage()
        self.ratelimit = ratelimit or {}
        self.attempts = attempts
        self.status = status
        self.ratelimit_report: cpb.RateLimitReport | None = None
        """What TaskFailure.ratelimit carries (set by the executor)."""


@dataclass
class _Call:
    """What one task's call saw, over all its HTTP attempts."""

    model: str
    attempts: int = 0
    ratelimit: dict[str, str] = field(default_factory=dict)
    ratelimit_seen_us: int = 0
    failed_input_tokens: int = 0
    failed_output_tokens: int = 0
    waits: list[float] = field(default_factory=list)


class LlmExecutor:
    """Runs a task of kind `llm` (payload: llm_payload.schema.json) against the Messages API."""

    def __init__(
        self,
        cfg: LlmConfig,
        *,
        api_key: str,
        base_url: str | None = None,
        client: anthropic.AsyncAnthropic | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        on_ratelimit: RateLimitObserver | None = None,
        context_source: ContextSource | None = None,
    ) -> None:
        self.cfg = cfg
        self.roles: dict[str, Role] = cfg.roles()
        self.prices: PriceTable = cfg.price_table()
        self.policy = RetryPolicy(
            max_attempts=cfg.max_attempts,
            backoff_initial_s=cfg.backoff_initial_s,
            backoff_max_s=cfg.backoff_max_s,
            retry_after_max_s=cfg.retry_after_max_s,
        )
        self.clock: Clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.on_ratelimit = on_ratelimit
        self.context_source = context_source
        self._api_key = api_key
        self._base_url = base_url
        self._client = client
        self.interrupted: dict[tuple[str, int], tpb.TokenUsage] = {}
        """(task, claim token) → what a call cut short by its deadline was billed, until
        the agent reports it (`interrupted_usage`)."""

    @property
    def client(self) -> anthropic.AsyncAnthropic:
        if self._client is None:
            self._client = anthropic.AsyncAnthropic(
                api_key=self._api_key,
                base_url=self._base_url or None,
                max_retries=0,  # one retry policy, ours: attempts are counted once
                timeout=httpx2.Timeout(
                    self.cfg.request_timeout_s, connect=self.cfg.connect_timeout_s
                ),
                http_client=anthropic.DefaultAsyncHttpxClient(
                    limits=httpx2.Limits(
                        max_connections=self.cfg.max_connections,
                        max_keepalive_connections=self.cfg.max_connections,
                    )
                ),
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def run(self, task: tpb.Task, progress: Progress | None = None) -> Outcome:
        try:
            request = parse_payload(task.spec.payload, self.cfg, task.spec.role, self.roles)
        except PayloadError as err:
            raise LlmError(str(err), retryable=False) from None
        system = with_context(request.system, await self._context(request))
        kwargs = request.api_kwargs(system)
        call = _Call(model=request.model)

        def on_retry(attempt: int, verdict: Verdict, wait_s: float) -> None:
            call.waits.append(wait_s)
            log.info(
                "llm attempt failed; retrying",
                extra={
                    "task": task.task_id,
                    "attempt": attempt,
                    "error": verdict.what,
                    "wait_s": round(wait_s, 3),
                },
            )

        message: Any = None
        try:
            retries = self.policy.retrying(self.clock.sleep, self.rng, on_retry, self._wall_s)
            async for attempt in retries:
                with attempt:
                    call.attempts += 1
                    message = await self._call_traced(request, kwargs, call, progress)
        except asyncio.CancelledError:
            # a deadline (or a cancel) mid-call: the API bills what it read and wrote all
            # the same; the agent's timeout failure carries it (interrupted_usage)
            if call.failed_input_tokens or call.failed_output_tokens:
                usage, _ = self._usage(
                    call.model, call.failed_input_tokens, call.failed_output_tokens
                )
                self.interrupted[(task.task_id, task.claim_token)] = usage
            raise
        except Exception as err:  # noqa: BLE001 - classified below; cancellation is not an Exception
            raise self._failure(err, call) from err
        return self._outcome(request, system, message, call)

    def interrupted_usage(self, task: tpb.Task) -> tpb.TokenUsage | None:
        """What `task`'s attempt was billed before its deadline cut it short (once)."""
        return self.interrupted.pop((task.task_id, task.claim_token), None)

    async def _call_traced(
        self, request: LlmRequest, kwargs: dict[str, Any], call: _Call, progress: Progress | None
    ) -> Any:
        """One model call; with tracing on, a child span of the agent's attempt."""
        if not tracing.enabled():
            return await self._attempt(request, kwargs, call, progress)
        with tracing.span(
            "llm.call",
            {
                "gen_ai.system": "anthropic",
                "gen_ai.request.model": request.model,
                "gen_ai.request.max_tokens": request.max_tokens,
                "agentmesh.llm_attempt": call.attempts,
            },
        ) as span:
            message = await self._attempt(request, kwargs, call, progress)
            if span is not None:
                u = message.usage
                usage, _ = self._usage(
                    message.model or request.model, u.input_tokens, u.output_tokens
                )
                span.set_attribute("gen_ai.response.model", message.model or request.model)
                span.set_attribute("gen_ai.usage.input_tokens", u.input_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", u.output_tokens)
                span.set_attribute("agentmesh.cost_usd", usage.cost_usd)
            return message

    async def _context(self, request: LlmRequest) -> dict[str, str]:
        if not request.context_keys:
            return {}
        if self.context_source is None:
            raise LlmError(
                "llm payload names context_keys but this pool has no shared-context source",
                retryable=False,
            )
        found = await self.context_source(request.context_keys)
        missing = [k for k in request.context_keys if found.get(k) is None]
        if missing:
            raise LlmError(f"llm payload context_keys not found: {missing}", retryable=False)
        values = {k: found[k] or "" for k in request.context_keys}
        size = sum(len(v.encode()) for v in values.values())
        if size > self.cfg.max_context_bytes:
            raise LlmError(
                f"llm payload context_keys add {size} bytes; at most {self.cfg.max_context_bytes} "
                "(AGENTMESH_LLM_MAX_CONTEXT_BYTES)",
                retryable=False,
            )
        return values

    async def _attempt(
        self, request: LlmRequest, kwargs: dict[str, Any], call: _Call, progress: Progress | None
    ) -> Any:
        try:
            if not self.cfg.stream:
                raw = await self.client.messages.with_raw_response.create(**kwargs)
                self._seen(call, raw.headers)
                return await raw.parse()
            async with self.client.messages.stream(**kwargs) as stream:
                self._seen(call, stream.response.headers)
                try:
                    await self._follow(stream, request, progress)
                    return await stream.get_final_message()
                except BaseException:  # a cancel (the task's deadline) as well
                    # billed for what it read and wrote before the break, as far as we know
                    snapshot_of = getattr(stream, "_current_snapshot_or_none", None)
                    usage = getattr(snapshot_of() if snapshot_of else None, "usage", None)
                    if usage is not None:
                        call.failed_input_tokens += usage.input_tokens or 0
                        call.failed_output_tokens += usage.output_tokens or 0
                    raise
        except anthropic.APIStatusError as err:
            self._seen(call, err.response.headers)
            raise

    async def _follow(self, stream: Any, request: LlmRequest, progress: Progress | None) -> None:
        chars, last = 0, float("-inf")
        async for event in stream:
            if event.type != "text" or progress is None:
                continue
            chars += len(event.text)
            now = self.clock.monotonic()
            if now - last >= self.cfg.progress_interval_s:
                last = now
                tokens = chars / CHARS_PER_TOKEN
                progress(
                    min(0.99, tokens / request.max_tokens),
                    f"{request.model}: about {tokens:.0f} of at most {request.max_tokens} tokens",
                )

    def _seen(self, call: _Call, headers: Mapping[str, str]) -> None:
        found = ratelimit_headers_of(headers)
        if not found:
            return
        call.ratelimit = found
        call.ratelimit_seen_us = self.clock.wall_us()
        if self.on_ratelimit is not None:
            try:
                self.on_ratelimit(call.model, found)
            except Exception:  # noqa: BLE001 - an observer's bug must not fail the task
                log.exception("rate-limit observer failed")

    def _wall_s(self) -> float:
        return self.clock.wall_us() / 1_000_000

    def _usage(
        self, model: str, input_tokens: int, output_tokens: int
    ) -> tuple[tpb.TokenUsage, bool]:
        price, known = self.prices.price(model)
        cost = price.cost(input_tokens, output_tokens)
        return tpb.TokenUsage(
            input_tokens=input_tokens, output_tokens=output_tokens, cost_usd=cost
        ), known

    def _failure(self, err: BaseException, call: _Call) -> LlmError:
        if isinstance(err, LlmError):
            return err
        verdict = classify(err, self._wall_s())
        usage, _ = self._usage(call.model, call.failed_input_tokens, call.failed_output_tokens)
        if (
            verdict.retry
            and verdict.retry_after_s is not None
            and verdict.retry_after_s > self.policy.retry_after_max_s
        ):
            why = (
                f"the API asked to wait {verdict.retry_after_s:.0f} s, more than "
                f"AGENTMESH_LLM_RETRY_AFTER_MAX_S={self.policy.retry_after_max_s:.0f}"
            )
        elif verdict.retry:
            why = f"gave up after {call.attempts} attempt{'s' if call.attempts != 1 else ''}"
        else:
            why = "not retried: the request itself was refused" if verdict.status else "not retried"
        failure = LlmError(
            f"llm call to {call.model} failed ({why}); last error: {verdict.what}",
            retryable=verdict.retry,
            usage=usage,
            ratelimit=call.ratelimit,
            attempts=call.attempts,
            status=verdict.status,
        )
        failure.ratelimit_report = _report(call)
        return failure

    def _outcome(self, request: LlmRequest, system: str, message: Any, call: _Call) -> Outcome:
        u = message.usage
        cache_in = (u.cache_creation_input_tokens or 0) + (u.cache_read_input_tokens or 0)
        # cache tokens are charged at the base input rate: an upper bound (we set no cache_control)
        input_tokens = u.input_tokens + cache_in + call.failed_input_tokens
        output_tokens = u.output_tokens + call.failed_output_tokens
        model = message.model or request.model
        usage, priced = self._usage(model, input_tokens, output_tokens)
        text = "".join(b.text for b in message.content if b.type == "text")
        tool_calls = [
            {"id": b.id, "name": b.name, "input": b.input}
            for b in message.content
            if b.type == "tool_use"
        ]
        doc = {
            "text": text,
            "stop_reason": message.stop_reason,
            "stop_sequence": getattr(message, "stop_sequence", None),
            "model": model,
            "model_source": request.model_source,
            "tool_calls": tool_calls,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "cache_creation_input_tokens": u.cache_creation_input_tokens or 0,
                "cache_read_input_tokens": u.cache_read_input_tokens or 0,
                "cost_usd": usage.cost_usd,
                "priced": priced,
            },
            "estimated_input_tokens": estimate_input_tokens(request, system),
            "attempts": call.attempts,
            "id": message.id,
            "ratelimit": call.ratelimit,
        }
        return Outcome(json.dumps(doc).encode(), usage, _report(call))


def _report(call: _Call) -> cpb.RateLimitReport | None:
    """The headers the leader's admission buckets follow (None if the server sent none)."""
    if not call.ratelimit:
        return None
    return cpb.RateLimitReport(
        model=call.model, headers=call.ratelimit, seen_at_us=call.ratelimit_seen_us
    )


def llm_unavailable(environ: Mapping[str, str] | None = None) -> str | None:
    """Why the `llm` executor cannot run here, or None when it can."""
    env = os.environ if environ is None else environ
    if not env.get("ANTHROPIC_API_KEY"):
        return (
            "the llm executor is off: ANTHROPIC_API_KEY is not set (set it, or point "
            "ANTHROPIC_BASE_URL at a local server such as `python -m loadtest.fake_anthropic` "
            "with any key)"
        )
    return None


def build_llm_executor(
    cfg: LlmConfig,
    environ: Mapping[str, str] | None = None,
    context_source: ContextSource | None = None,
    clock: Clock | None = None,
) -> LlmExecutor:
    """The pool's `llm` executor (its row in executors.EXECUTORS); ValueError if the
    credentials are missing."""
    env = os.environ if environ is None else environ
    reason = llm_unavailable(env)
    if reason is not None:
        raise ValueError(reason)
    # httpx logs every request at INFO: thousands of lines a minute at 200 agents, and
    # each costs CPU the agents need; our own log line per failed attempt says more
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    return LlmExecutor(
        cfg,
        api_key=env["ANTHROPIC_API_KEY"],
        base_url=env.get("ANTHROPIC_BASE_URL") or None,
        context_source=context_source,
        clock=clock,
    )
