"""Executors run a task's payload. The local ones here stand in for an LLM and say so;
`llm` (services/agent_pool/llm.py) calls Claude, `propose` opens a vote (voter.py).

`EXECUTORS` is the table of kinds a pool can run: adding an executor is one row. A row
may bring its own config section, a frozen dataclass filled from
AGENTMESH_<KIND>_<FIELD> variables (the `llm` row's `LlmConfig`, for instance).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common import config
from services._common.clock import Clock, SystemClock
from services.agent_pool.llm_config import LlmConfig


class ExecutorError(Exception):
    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass
class Outcome:
    output: bytes
    usage: tpb.TokenUsage = field(default_factory=tpb.TokenUsage)
    ratelimit: cpb.RateLimitReport | None = None
    """llm: the rate-limit headers the call saw, for the leader's admission buckets."""


Progress = Callable[[float, str], None]
"""progress(fraction 0..1, message): sent on the agent's stream as a TaskProgress."""


ContextSource = Callable[[list[str]], Awaitable[dict[str, str | None]]]
"""Reads shared-knowledge values (etcd `context/<key>`) by key; None for a missing key."""


def etcd_context_source(etcd: Any) -> ContextSource:
    """A ContextSource on a `registry.etcd.Etcd` client (keys under its cluster prefix)."""

    async def read(keys: list[str]) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for key in keys:
            kv = await etcd.get(etcd.key("context", key))
            out[key] = None if kv is None else bytes(kv.value).decode("utf-8", "replace")
        return out

    return read


class Executor(Protocol):
    async def run(self, task: tpb.Task, progress: Progress | None = None) -> Outcome: ...


class EchoExecutor:
    """Returns the payload unchanged."""

    async def run(self, task: tpb.Task, progress: Progress | None = None) -> Outcome:
        return Outcome(task.spec.payload)


class NoopExecutor:
    """Returns at once with no output (measures the mesh, not the work)."""

    async def run(self, task: tpb.Task, progress: Progress | None = None) -> Outcome:
        return Outcome(b"")


def parse_latency(spec: str) -> tuple[str, float, float]:
    """'fixed:50', 'uniform:10:100' or 'lognormal:50:0.5' (median ms, sigma)."""
    parts = spec.split(":")
    try:
        if parts[0] == "fixed" and len(parts) == 2:
            return "fixed", float(parts[1]), 0.0
        if parts[0] in ("uniform", "lognormal") and len(parts) == 3:
            return parts[0], float(parts[1]), float(parts[2])
        if len(parts) == 1:
            return "fixed", float(parts[0]), 0.0
    except ValueError:
        pass
    raise ValueError(f"latency {spec!r} must be fixed:MS, uniform:LO:HI or lognormal:MEDIAN:SIGMA")


class SleepExecutor:
    """SIMULATED work: sleeps for a latency drawn from a distribution.

    A payload {"ms": N} sleeps exactly N ms. The output says "simulated": true.
    """

    def __init__(
        self, latency: str, rng: random.Random | None = None, clock: Clock | None = None
    ) -> None:
        self.dist, self.a, self.b = parse_latency(latency)
        self.rng = rng or random.Random()
        self.clock: Clock = clock or SystemClock()

    def draw_ms(self) -> float:
        if self.dist == "fixed":
            return self.a
        if self.dist == "uniform":
            return self.rng.uniform(self.a, self.b)
        return self.a * math.exp(self.rng.gauss(0.0, self.b))

    async def run(self, task: tpb.Task, progress: Progress | None = None) -> Outcome:
        ms = self.draw_ms()
        if task.spec.payload:
            try:
                doc = json.loads(task.spec.payload)
                if isinstance(doc, dict) and "ms" in doc:
                    ms = float(doc["ms"])
            except (ValueError, TypeError):
                raise ExecutorError(
                    'sleep payload must be JSON like {"ms": 50}', retryable=False
                ) from None
        await self.clock.sleep(max(0.0, ms) / 1000.0)
        return Outcome(json.dumps({"simulated": True, "slept_ms": round(ms, 3)}).encode())


class FailExecutor:
    """Always fails (to exercise retries and the dead letter state).

    Payload {"retryable": false} fails permanently.
    """

    async def run(self, task: tpb.Task, progress: Progress | None = None) -> Outcome:
        retryable = True
        if task.spec.payload:
            with contextlib.suppress(ValueError, AttributeError):
                retryable = bool(json.loads(task.spec.payload).get("retryable", True))
        raise ExecutorError(
            f"fail executor: attempt {task.attempts} failed on purpose", retryable=retryable
        )


def _fault_payload(task: tpb.Task, kind: str) -> dict[str, float]:
    if not task.spec.payload:
        return {}
    try:
        doc = json.loads(task.spec.payload)
        if not isinstance(doc, dict):
            raise ValueError(doc)
        return {k: float(v) for k, v in doc.items()}
    except (ValueError, TypeError):
        raise ExecutorError(
            f'{kind} payload must be JSON numbers like {{"attempts": 1, "ms": 10}}', retryable=False
        ) from None


class HangExecutor:
    """SIMULATED fault: an executor that hangs. On attempts up to payload "attempts"
    (default 1) it awaits forever, a coroutine that never returns (cancellable, as a
    stuck LLM call is); later attempts sleep payload "ms" (default 10) and succeed.
    The output says {"simulated": true, "fault": "hang"}."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()

    async def run(self, task: tpb.Task, progress: Progress | None = None) -> Outcome:
        doc = _fault_payload(task, "hang")
        if task.attempts <= doc.get("attempts", 1):
            await asyncio.Event().wait()
        ms = doc.get("ms", 10.0)
        await self.clock.sleep(max(0.0, ms) / 1000.0)
        out = {"simulated": True, "fault": "hang", "attempt": task.attempts, "slept_ms": ms}
        return Outcome(json.dumps(out).encode())


class BlockExecutor:
    """SIMULATED fault: an executor that blocks its whole pool. On attempts up to payload
    "attempts" (default 1) it calls time.sleep(payload "block_s", default 15, at most 300):
    a synchronous call that freezes the pool's event loop, so its streams, heartbeats and
    lease refreshes all stop while its sockets stay open. Later attempts return at once.
    The output says {"simulated": true, "fault": "block"}."""

    async def run(self, task: tpb.Task, progress: Progress | None = None) -> Outcome:
        doc = _fault_payload(task, "block")
        blocked = 0.0
        if task.attempts <= doc.get("attempts", 1):
            blocked = min(max(doc.get("block_s", 15.0), 0.0), 300.0)
            time.sleep(blocked)  # noqa: ASYNC251 - the point: a blocking call in a coroutine
        out = {"simulated": True, "fault": "block", "attempt": task.attempts, "blocked_s": blocked}
        return Outcome(json.dumps(out).encode())


# ---------------------------------------------------------------- the table


@dataclass(frozen=True, kw_only=True)
class ExecutorContext:
    """What a pool offers the executors it builds."""

    sleep_ms: str = "fixed:0"
    """The `sleep` executor's simulated latency (the pool's --sleep-ms)."""
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    """Where config sections and credentials (ANTHROPIC_API_KEY) are read."""
    etcd: Any = None
    """The pool's `registry.etcd.Etcd` client: shared context reads, proposals."""
    clock: Clock = field(default_factory=SystemClock)


@dataclass(frozen=True)
class ExecutorKind:
    """One row of `EXECUTORS`: how a kind's executor is built, and its own settings."""

    build: Callable[[ExecutorContext, Any], Executor]
    """(what the pool offers, the section's config or None) → the executor."""
    config: type[Any] | None = None
    """A frozen dataclass of the kind's settings, filled from AGENTMESH_<KIND>_<FIELD>."""


def _llm(ctx: ExecutorContext, cfg: LlmConfig) -> Executor:
    # imported here: the SDK is only loaded by pools that run llm tasks
    from services.agent_pool.llm import build_llm_executor

    source = None if ctx.etcd is None else etcd_context_source(ctx.etcd)
    return build_llm_executor(cfg, ctx.environ, source, ctx.clock)


def _propose(ctx: ExecutorContext, _: None) -> Executor:
    from services.agent_pool.voter import ProposeExecutor
    from services.consensus.client import ConsensusClient

    if ctx.etcd is None:
        raise ValueError("the propose executor needs the pool's etcd (to find consensus)")
    return ProposeExecutor(ConsensusClient(ctx.etcd))


EXECUTORS: dict[str, ExecutorKind] = {
    "echo": ExecutorKind(lambda ctx, _: EchoExecutor()),
    "noop": ExecutorKind(lambda ctx, _: NoopExecutor()),
    "sleep": ExecutorKind(lambda ctx, _: SleepExecutor(ctx.sleep_ms, clock=ctx.clock)),
    "fail": ExecutorKind(lambda ctx, _: FailExecutor()),
    # SIMULATED faults, for tests and the load test; never in a pool's default kinds
    "hang": ExecutorKind(lambda ctx, _: HangExecutor(ctx.clock)),
    "block": ExecutorKind(lambda ctx, _: BlockExecutor()),
    "llm": ExecutorKind(_llm, LlmConfig),
    "propose": ExecutorKind(_propose),
}


def section_config(kind: str, environ: Mapping[str, str] | None = None) -> Any:
    """The config section of `kind` from AGENTMESH_<KIND>_<FIELD> variables (None if the
    kind has none); ValueError naming the variable when one is wrong."""
    row = EXECUTORS[kind]
    if row.config is None:
        return None
    return config.load(row.config, environ=environ, section=kind.replace("-", "_"))


def build_executors(kinds: tuple[str, ...], ctx: ExecutorContext) -> dict[str, Executor]:
    """The executors of `kinds`, each with its config section; ValueError saying what is
    wrong (an unknown kind, a bad setting, a missing credential)."""
    missing = [k for k in kinds if k not in EXECUTORS]
    if missing:
        raise ValueError(f"no executor for kinds {missing}; available: {', '.join(EXECUTORS)}")
    return {k: EXECUTORS[k].build(ctx, section_config(k, ctx.environ)) for k in kinds}
