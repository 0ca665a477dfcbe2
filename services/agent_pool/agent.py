"""One agent: a coroutine with its own Connect stream to the root coordinator.

Work outlives streams: a task keeps running when the stream drops (a failover,
say); its result waits in `unacked` and is sent again on the next stream, with
the same claim token, until the coordinator acknowledges it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from protos.agentmesh.v1 import agent_pool_pb2 as ppb
from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common import tracing
from services._common.clock import Clock
from services._common.follow import Leader
from services.agent_pool.executors import Executor, ExecutorError

log = logging.getLogger(__name__)

ACCEPTED_AFTER_S = 0.02
DRAIN_POLL_S = 0.02


class Reconnect(Exception):
    """The stream ended; connect again (to the leader etcd names now)."""


@dataclass
class PoolContext:
    """What a pool's agents share."""

    pool_id: str
    lease_id: Callable[[], int]
    """The pool's etcd lease now: each hello carries it, so claims die with the pool."""
    coordinator: Leader
    """The root coordinator (etcd's word, or a redirect's)."""
    executors: dict[str, Executor]
    task_timeout_s: float
    clock: Clock
    max_result_bytes: int = 512 * 1024
    """A larger output fails the task here: the coordinator would not store it."""


@dataclass(eq=False)
class Agent:
    agent_id: str
    ctx: PoolContext
    template: ppb.AgentTemplate
    requested_at: float = -1.0
    """When the agent was asked for (clock time; default: when it was made)."""
    state: int = ppb.AGENT_STATE_STARTING
    spawn_ms: float = 0.0
    completed: int = 0
    failed: int = 0
    welcomed: asyncio.Event = field(default_factory=asyncio.Event)
    running: dict[str, tuple[int, asyncio.Task[None]]] = field(default_factory=dict)
    unacked: dict[str, cpb.AgentMessage] = field(default_factory=dict)
    draining: bool = False
    _outbox: asyncio.Queue[cpb.AgentMessage | None] | None = None
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        if self.requested_at < 0:
            self.requested_at = self.ctx.clock.monotonic()

    def info(self) -> ppb.PoolAgent:
        return ppb.PoolAgent(
            agent_id=self.agent_id,
            pool_id=self.ctx.pool_id,
            state=self.state,  # type: ignore[arg-type]
            spawn_ms=self.spawn_ms,
            inflight=len(self.running),
            completed=self.completed,
            failed=self.failed,
            template=self.template,
        )

    # ---- the connection ----

    async def run(self) -> None:
        """Connect, work, reconnect with jittered backoff; until cancelled.

        Backoff restarts after every session that was welcomed, and a sleep ends
        early when the pool learns of a new leader, so a failover costs no extra wait.
        """
        while True:
            async for attempt in AsyncRetrying(
                wait=wait_random_exponential(multiplier=0.05, max=1.0),
                retry=retry_if_exception_type((Reconnect, grpc.aio.AioRpcError, OSError)),
                sleep=self._backoff_sleep,
            ):
                with attempt:
                    await self._session()

    async def _backoff_sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await self.ctx.clock.wait_for(self.ctx.coordinator.changed().wait(), seconds)

    def _hello(self) -> cpb.AgentHello:
        t = self.template
        hello = cpb.AgentHello(
            agent_id=self.agent_id,
            pool_id=self.ctx.pool_id,
            lease_id=self.ctx.lease_id(),
            roles=t.roles,
            labels=t.labels,
            kinds=t.kinds,
            capacity=t.capacity or 1,
        )
        for task_id, (token, _) in self.running.items():
            hello.held_claims.append(cpb.ClaimRef(task_id=task_id, claim_token=token))
        for task_id, msg in self.unacked.items():
            body = getattr(msg, msg.WhichOneof("body") or "result")
            hello.held_claims.append(cpb.ClaimRef(task_id=task_id, claim_token=body.claim_token))
        return hello

    async def _session(self) -> None:
        coordinator = self.ctx.coordinator
        endpoint = coordinator.endpoint
        if not endpoint:
            raise Reconnect("no leader known yet")
        if self.state != ppb.AGENT_STATE_STARTING:
            self.state = ppb.AGENT_STATE_RECONNECTING
        call = cpb_grpc.CoordinatorStub(coordinator.channel(endpoint)).Connect()
        outbox: asyncio.Queue[cpb.AgentMessage | None] = asyncio.Queue()
        self._outbox = outbox
        outbox.put_nowait(cpb.AgentMessage(hello=self._hello()))
        for msg in self.unacked.values():
            outbox.put_nowait(msg)
        if self.draining:
            outbox.put_nowait(cpb.AgentMessage(draining=cpb.AgentDraining(reason="stopping")))

        async def writer() -> None:
            while (msg := await outbox.get()) is not None:
                await call.write(msg)
            await call.done_writing()

        write_task = asyncio.ensure_future(writer())
        # a paused leader keeps our stream open but silent: leave when etcd names another
        moved = asyncio.ensure_future(coordinator.moved_from(endpoint, to_none=False))
        moved.add_done_callback(lambda _: call.cancel())
        welcomed = False
        try:
            try:
                async for msg in call:
                    welcomed = welcomed or msg.HasField("welcome")
                    self._on_message(msg)
            except asyncio.CancelledError:
                if not moved.done():
                    raise  # the agent itself is being stopped
                log.info("leader moved; reconnecting", extra={"agent": self.agent_id})
            except grpc.aio.AioRpcError as err:
                if err.code() in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.ALREADY_EXISTS,
                ):
                    log.error(
                        "coordinator refused the agent",
                        extra={"agent": self.agent_id, "error": err.details()},
                    )
                if not welcomed:
                    raise Reconnect(f"stream failed: {err.code().name}") from err
            if not welcomed:
                raise Reconnect("coordinator closed the stream before welcoming")
            # a session that worked ends normally: the caller reconnects with fresh backoff
        finally:
            moved.cancel()
            if self._outbox is outbox:  # a newer session may have its own by now
                self._outbox = None
            if self.state == ppb.AGENT_STATE_READY:
                self.state = ppb.AGENT_STATE_RECONNECTING
            write_task.cancel()
            with contextlib.suppress(BaseException):
                await write_task
            call.cancel()

    def _send(self, msg: cpb.AgentMessage) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(msg)

    def _on_message(self, msg: cpb.CoordinatorMessage) -> None:
        for ack in msg.acks:
            self._on_ack(ack)
        body = msg.WhichOneof("body")
        if body == "assign":
            task = msg.assign.task
            if task.task_id in self.running:
                return
            if self.draining:
                # it crossed our "draining": hand it back now (the coordinator requeues it
                # without counting an attempt) instead of sitting on it until the stream ends
                report = cpb.AgentMessage(
                    failure=cpb.TaskFailure(
                        task_id=task.task_id,
                        claim_token=task.claim_token,
                        error="the agent is draining; it did not start the task",
                        retryable=True,
                        not_started=True,
                    )
                )
                self.unacked[task.task_id] = report
                self._send(report)
                return
            received = self.ctx.clock.wall_us()
            runner = asyncio.ensure_future(self._execute(task, received))
            self.running[task.task_id] = (task.claim_token, runner)
            self._idle.clear()
        elif body == "welcome":
            if not self.welcomed.is_set():
                self.spawn_ms = (self.ctx.clock.monotonic() - self.requested_at) * 1000
                self.welcomed.set()
            self.state = ppb.AGENT_STATE_DRAINING if self.draining else ppb.AGENT_STATE_READY
        elif body == "ack":
            self._on_ack(msg.ack)
        elif body == "cancel":
            held = self.running.pop(msg.cancel.task_id, None)
            if held:
                held[1].cancel()
            self.unacked.pop(msg.cancel.task_id, None)
        elif body == "redirect":
            if msg.redirect.leader_endpoint:
                self.ctx.coordinator.redirected(msg.redirect.leader_endpoint)
        elif body == "drain":
            log.info(
                "coordinator asked the agent to drain",
                extra={"agent": self.agent_id, "reason": msg.drain.reason},
            )

    def _on_ack(self, ack: cpb.ReportAck) -> None:
        held = self.unacked.get(ack.task_id)
        if (
            held is not None
            and getattr(held, held.WhichOneof("body") or "result").claim_token == ack.claim_token
        ):
            del self.unacked[ack.task_id]
        if not ack.accepted:
            log.info(
                "report refused",
                extra={"agent": self.agent_id, "task": ack.task_id, "reason": ack.reason},
            )

    async def _execute(self, task: tpb.Task, received_at_us: int) -> None:
        if tracing.enabled():
            report = await self._traced(task, received_at_us)
        else:
            report = await self._attempt(task, received_at_us)
        self.unacked[task.task_id] = report
        self._send(report)

    async def _traced(self, task: tpb.Task, received_at_us: int) -> cpb.AgentMessage:
        """The attempt as a span of the task's trace (the executor's own spans nest in it)."""
        attributes = {
            "agentmesh.task_id": task.task_id,
            "agentmesh.kind": task.spec.kind,
            "agentmesh.attempt": task.attempts,
            "agentmesh.agent_id": self.agent_id,
            "agentmesh.pool_id": self.ctx.pool_id,
            "agentmesh.claim_token": task.claim_token,
        }
        with tracing.task_span(
            task, "agent.execute", attributes, kind="CONSUMER", start_us=received_at_us
        ) as span:
            report = await self._attempt(task, received_at_us)
            if span is not None:
                tracing.outcome(span, report)
            return report

    async def _attempt(self, task: tpb.Task, received_at_us: int) -> cpb.AgentMessage:
        token = task.claim_token
        # "accepted" (→ RUNNING) only for work that takes a while: a fast task's result
        # carries received_at_us itself, which saves a message per task under load
        accepted = cpb.AgentMessage(
            accepted=cpb.TaskAccepted(
                task_id=task.task_id, claim_token=token, received_at_us=received_at_us
            )
        )
        clock = self.ctx.clock
        announce = clock.call_later(ACCEPTED_AFTER_S, lambda: self._send(accepted))
        executor = self.ctx.executors.get(task.spec.kind)
        report: cpb.AgentMessage
        try:
            if executor is None:
                raise ExecutorError(
                    f"this agent has no executor for kind {task.spec.kind!r}", retryable=True
                )
            timeout = task.spec.timeout_s or self.ctx.task_timeout_s
            outcome = await clock.wait_for(executor.run(task, self._progress(task)), timeout)
            if len(outcome.output) > self.ctx.max_result_bytes:
                self.failed += 1
                report = _failure(
                    task,
                    f"the output is {len(outcome.output)} bytes; the limit is "
                    f"{self.ctx.max_result_bytes} bytes (AGENTMESH_MAX_RESULT_BYTES)",
                    False,  # the same input would give the same output
                    outcome.usage,  # the work was done (an llm call billed in full)
                    outcome.ratelimit,
                )
            else:
                report = cpb.AgentMessage(
                    result=cpb.TaskResult(
                        task_id=task.task_id,
                        claim_token=token,
                        output=outcome.output,
                        usage=outcome.usage,
                        received_at_us=received_at_us,
                        ratelimit=outcome.ratelimit,
                    )
                )
                self.completed += 1
        except asyncio.CancelledError:
            _interrupted_usage(executor, task)  # cancelled: no report, nothing to keep
            raise
        except TimeoutError:
            self.failed += 1
            report = _failure(
                task,
                f"timed out after {task.spec.timeout_s or self.ctx.task_timeout_s} s",
                True,
                _interrupted_usage(executor, task),  # an llm call cut short is billed too
            )
        except ExecutorError as err:
            self.failed += 1
            # a failed LLM attempt may still have been billed (a stream that broke mid-way)
            # and its rate-limit headers (a 429's retry-after) pause the leader's admissions
            report = _failure(
                task,
                str(err),
                err.retryable,
                getattr(err, "usage", None),
                getattr(err, "ratelimit_report", None),
            )
        except Exception as err:  # noqa: BLE001 - an executor bug fails the attempt, not the agent
            self.failed += 1
            log.exception("executor crashed", extra={"agent": self.agent_id, "task": task.task_id})
            report = _failure(task, f"executor crashed: {type(err).__name__}: {err}", True)
        finally:
            announce.cancel()
            if self.running.get(task.task_id, (None,))[0] == token:
                del self.running[task.task_id]
            if not self.running:
                self._idle.set()
        return report

    def _progress(self, task: tpb.Task) -> Callable[[float, str], None]:
        """What an executor calls to report progress (a stream message, no etcd write)."""

        def send(fraction: float, message: str) -> None:
            self._send(
                cpb.AgentMessage(
                    progress=cpb.TaskProgress(
                        task_id=task.task_id,
                        claim_token=task.claim_token,
                        fraction=fraction,
                        message=message[:200],
                    )
                )
            )

        return send

    def start_draining(self, reason: str) -> None:
        """Take nothing new from now on, and tell the coordinator so."""
        self.draining = True
        self.state = ppb.AGENT_STATE_DRAINING
        self._send(cpb.AgentMessage(draining=cpb.AgentDraining(reason=reason)))

    async def drain(self, timeout_s: float) -> None:
        """Take nothing new; wait (bounded) for what is held to finish and be reported."""
        self.start_draining("stopping")
        clock = self.ctx.clock
        deadline = clock.monotonic() + timeout_s
        while (self.running or self.unacked) and clock.monotonic() < deadline:
            await clock.sleep(DRAIN_POLL_S)


def _interrupted_usage(executor: Executor | None, task: tpb.Task) -> tpb.TokenUsage | None:
    """What the executor was billed for an attempt cut short (the `llm` executor's
    `interrupted_usage`; None for the others)."""
    get = getattr(executor, "interrupted_usage", None)
    return get(task) if get is not None else None


def _failure(
    task: tpb.Task,
    error: str,
    retryable: bool,
    usage: tpb.TokenUsage | None = None,
    ratelimit: cpb.RateLimitReport | None = None,
) -> cpb.AgentMessage:
    return cpb.AgentMessage(
        failure=cpb.TaskFailure(
            task_id=task.task_id,
            claim_token=task.claim_token,
            error=error,
            retryable=retryable,
            usage=usage,
            ratelimit=ratelimit,
        )
    )
