"""The agentmesh driver against an in-memory coordinator (no sockets, no cluster).

The fake speaks the Coordinator stub's methods with the proto messages and
completes each task after a short delay, like an agent would; knobs inject the
faults the exactly-once check exists for.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from loadtest.client import CoordinatorClient, RpcFailed, SubmitStreamer
from loadtest.driver import Driver
from loadtest.tracker import HOPS, task_hops
from loadtest.workload import BurstSchedule, RateSchedule, Workload, task_id
from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb

pytestmark = pytest.mark.timeout(60)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "", trailing: tuple = ()) -> None:
        super().__init__(details)
        self._code, self._details, self.trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class FakeCall:
    """A WatchEvents call: iterate for events; cancel() ends it."""

    def __init__(self, owner: FakeCoordinator, states: frozenset[int]) -> None:
        self.owner, self.states = owner, states
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        owner.watchers.append(self)

    def push(self, event: tpb.TaskEvent) -> None:
        if not self.states or event.task.state in self.states:
            self.queue.put_nowait(event)

    def cancel(self) -> None:
        with contextlib.suppress(ValueError):
            self.owner.watchers.remove(self)

    def __aiter__(self) -> AsyncIterator[tpb.TaskEvent]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[tpb.TaskEvent]:
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item


class FakeSubmitStream:
    """A SubmitStream call: each write is submitted at once and answered in order.
    `break_at`: the write with this index is submitted, but the stream then fails with
    `code` instead of answering (the reply of an applied submit is lost)."""

    def __init__(self, owner: FakeCoordinator, break_at: int | None, code: grpc.StatusCode) -> None:
        self.owner, self.break_at, self.code = owner, break_at, code
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.written: list[str] = []
        self.over = False

    async def write(self, req: cpb.SubmitRequest) -> None:
        if self.over:
            raise asyncio.InvalidStateError("the call is over")
        self.written.append(req.spec.task_id)
        resp = await self.owner.SubmitBatch(cpb.SubmitBatchRequest(specs=[req.spec]), 1.0)
        if len(self.written) - 1 == self.break_at:
            self.over = True
            self.queue.put_nowait(FakeRpcError(self.code, "leader gone"))
        else:
            self.queue.put_nowait(resp.results[0])

    async def done_writing(self) -> None:
        self.over = True
        self.queue.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[cpb.SubmitResponse]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[cpb.SubmitResponse]:
        while (item := await self.queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item


class FakeCoordinator:
    def __init__(
        self,
        *,
        delay_s: float = 0.002,
        duplicate: frozenset[str] = frozenset(),
        lose: frozenset[str] = frozenset(),
        silent: frozenset[str] = frozenset(),
        unavailable_submits: int = 0,
        agents: int = 4,
        stream_breaks: tuple[int, ...] = (),
        stream_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
    ) -> None:
        self.streams: list[FakeSubmitStream] = []
        self.stream_breaks, self.stream_code = list(stream_breaks), stream_code
        self.delay_s = delay_s
        self.duplicate, self.lose, self.silent = duplicate, lose, silent
        self.unavailable_submits = unavailable_submits
        self.tasks: dict[str, tpb.Task] = {}
        self.watchers: list[FakeCall] = []
        self.token = 1000
        self.submit_calls = 0
        self.agents = agents

    # -- the stub's methods

    async def Submit(
        self, req: cpb.SubmitRequest, timeout: float | None = None
    ) -> cpb.SubmitResponse:
        resp = await self.SubmitBatch(cpb.SubmitBatchRequest(specs=[req.spec]), timeout)
        return resp.results[0]

    async def SubmitBatch(
        self, req: cpb.SubmitBatchRequest, timeout: float | None = None
    ) -> cpb.SubmitBatchResponse:
        assert timeout is not None, "every call carries a deadline"
        self.submit_calls += 1
        await asyncio.sleep(0)
        if self.unavailable_submits:
            self.unavailable_submits -= 1
            raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "no leader yet")
        out = cpb.SubmitBatchResponse()
        loop = asyncio.get_running_loop()
        for spec in req.specs:
            existing = self.tasks.get(spec.task_id)
            if existing is not None:
                out.results.add(task=existing, created=False)
                continue
            task = tpb.Task(
                task_id=spec.task_id,
                spec=spec,
                state=tpb.TASK_STATE_QUEUED,
                created_at_us=time.time_ns() // 1000,
            )
            self.tasks[spec.task_id] = task
            out.results.add(task=task, created=True)
            loop.call_later(self.delay_s, self._run, spec.task_id)
        return out

    async def GetTask(self, req: cpb.GetTaskRequest, timeout: float | None = None) -> tpb.Task:
        assert timeout is not None
        task = self.tasks.get(req.task_id)
        if task is None:
            raise FakeRpcError(grpc.StatusCode.NOT_FOUND, f"no task {req.task_id}")
        return task

    async def ListTasks(
        self, req: cpb.ListTasksRequest, timeout: float | None = None
    ) -> cpb.ListTasksResponse:
        ids = sorted(self.tasks)
        start = int(req.page_token or 0)
        size = req.page_size or 100
        page = ids[start : start + size]
        nxt = str(start + size) if start + size < len(ids) else ""
        return cpb.ListTasksResponse(tasks=[self.tasks[i] for i in page], next_page_token=nxt)

    async def GetStatus(
        self, req: cpb.GetStatusRequest, timeout: float | None = None
    ) -> cpb.ClusterStatus:
        return cpb.ClusterStatus(agents_connected=self.agents, leader_id="c1", term=7)

    def SubmitStream(self) -> FakeSubmitStream:
        breaks = self.stream_breaks.pop(0) if self.stream_breaks else None
        self.streams.append(FakeSubmitStream(self, breaks, self.stream_code))
        return self.streams[-1]

    def WatchEvents(self, req: cpb.WatchEventsRequest) -> FakeCall:
        return FakeCall(self, frozenset(req.states))

    # -- the "agents"

    def _publish(self, task: tpb.Task, previous: int) -> None:
        event = tpb.TaskEvent(task=task, previous_state=previous)
        for w in list(self.watchers):
            w.push(event)

    def _run(self, tid: str) -> None:
        task = self.tasks[tid]
        self.token += 1
        held = tpb.Task()
        held.CopyFrom(task)
        held.state, held.claim_token, held.agent_id, held.attempts = (
            tpb.TASK_STATE_ASSIGNED,
            self.token,
            f"agent-{self.token % self.agents}",
            1,
        )
        held.assigned_at_us = time.time_ns() // 1000
        held.received_at_us = time.time_ns() // 1000
        self._publish(held, tpb.TASK_STATE_QUEUED)
        done = tpb.Task()
        done.CopyFrom(held)
        done.state = tpb.TASK_STATE_SUCCEEDED
        done.finished_at_us = time.time_ns() // 1000
        if tid in self.lose:
            del self.tasks[tid]
            return
        self.tasks[tid] = done
        if tid in self.silent:
            return  # the record is right; the event never came (a stream gap)
        self._publish(done, tpb.TASK_STATE_RUNNING)
        if tid in self.duplicate:
            twice = tpb.Task()
            twice.CopyFrom(done)
            twice.claim_token = done.claim_token + 10_000
            self._publish(twice, tpb.TASK_STATE_RUNNING)

    def break_watches(self) -> None:
        for w in list(self.watchers):
            w.queue.put_nowait(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "leader gone"))


def client_for(fake: FakeCoordinator, **kw: Any) -> CoordinatorClient:
    return CoordinatorClient(
        ["fake:1"], stub_factory=lambda ep: fake, timeout_s=2.0, retry_s=2.0, **kw
    )


def workload(**kw: Any) -> Workload:
    base: dict[str, Any] = {
        "max_tasks": 300,
        "duration_s": 5.0,
        "concurrency": 20,
        "batch_size": 10,
        "drain_timeout_s": 2.0,
    }
    base.update(kw)
    return Workload(**base)


async def test_closed_loop_runs_every_task_once() -> None:
    fake = FakeCoordinator()
    driver = Driver(client_for(fake), workload(), run_id="t1")
    result = await driver.run()
    assert result.ok
    assert result.submitted == result.acknowledged == result.completed == 300
    assert result.terminal_states == {"SUCCEEDED": 300}
    assert result.metrics.latency("end_to_end").count == 300
    assert result.metrics.latency("dispatch").count == 300
    assert result.metrics.throughput.total == 300
    # the split of each task's path, hop by hop, from the timestamps its record carries
    split = result.extra["latency_split"]
    assert list(split) == [name for name, _ in HOPS]
    assert all(h["count"] >= 300 for h in split.values())
    assert sum(h["share_pct"] for h in split.values()) == pytest.approx(100.0, abs=0.5)
    # the fake runs each task 2 ms after its submit: that wait is "queued"
    assert split["queued"]["p50_ms"] >= 1.5
    # the warm-up task is not part of the run
    assert "lt-t1-warmup" in fake.tasks
    assert all(t.startswith("lt-t1-") for t in fake.tasks)


async def test_closed_loop_never_exceeds_its_concurrency() -> None:
    fake = FakeCoordinator(delay_s=0.01)
    seen: list[int] = []
    original = fake.SubmitBatch

    async def watching(req: cpb.SubmitBatchRequest, timeout: float | None = None) -> Any:
        in_flight = sum(1 for t in fake.tasks.values() if t.state == tpb.TASK_STATE_QUEUED)
        seen.append(in_flight + len(req.specs))
        return await original(req, timeout)

    fake.SubmitBatch = watching  # type: ignore[method-assign]
    result = await Driver(client_for(fake), workload(concurrency=8), run_id="t2").run()
    assert result.ok
    assert max(seen) <= 8 + 1  # +1: the warm-up task


async def test_single_submits_when_batch_size_is_one() -> None:
    fake = FakeCoordinator()
    result = await Driver(client_for(fake), workload(max_tasks=40, batch_size=1), run_id="t3").run()
    assert result.ok
    assert result.completed == 40
    assert fake.submit_calls == 41  # one per task, plus the warm-up


async def test_a_second_success_under_another_claim_is_a_duplicate() -> None:
    fake = FakeCoordinator(duplicate=frozenset({"lt-t4-00000005"}))
    result = await Driver(client_for(fake), workload(max_tasks=20), run_id="t4").run()
    assert result.duplicated == ["lt-t4-00000005"]
    assert not result.ok
    assert result.metrics.counters["claim_conflicts"] == 1


async def test_an_acknowledged_task_missing_from_the_store_is_lost() -> None:
    fake = FakeCoordinator(lose=frozenset({"lt-t5-00000003"}))
    result = await Driver(
        client_for(fake), workload(max_tasks=20, drain_timeout_s=0.5), run_id="t5"
    ).run()
    assert result.lost == ["lt-t5-00000003"]
    assert not result.ok
    assert result.completed == 19


async def test_a_missed_terminal_event_is_found_by_polling() -> None:
    fake = FakeCoordinator(silent=frozenset({"lt-t6-00000002"}))
    driver = Driver(client_for(fake), workload(max_tasks=10, concurrency=4), run_id="t6")
    result = await driver.run()
    assert result.ok
    assert result.completed == 10
    assert result.metrics.counters["completions_seen_by_poll"] == 1


async def test_unavailable_submits_are_retried_with_the_same_ids() -> None:
    fake = FakeCoordinator(unavailable_submits=3)
    client = client_for(fake)
    result = await Driver(client, workload(max_tasks=30), run_id="t7").run()
    assert result.ok
    assert result.completed == 30
    assert result.metrics.counters["rpc_retries"] == 3
    assert result.metrics.counters["errors"] == 0


async def test_a_broken_event_stream_is_reopened_and_resynced() -> None:
    fake = FakeCoordinator(delay_s=0.005)
    driver = Driver(client_for(fake), workload(max_tasks=400, duration_s=3.0), run_id="t8")

    async def breaker() -> None:
        while driver.completed < 50:
            await asyncio.sleep(0.005)
        fake.break_watches()

    result, _ = await asyncio.gather(driver.run(), breaker())
    assert result.ok
    assert result.completed == 400
    assert result.metrics.counters["watch_reconnects"] >= 1


async def test_open_loop_follows_the_rate() -> None:
    fake = FakeCoordinator()
    w = workload(max_tasks=1000, duration_s=1.0, rate_per_s=100.0)
    result = await Driver(client_for(fake), w, run_id="t9").run()
    assert result.ok
    # 100/s for 1 s: about 100 tasks (the schedule sends the first at t=0)
    assert 90 <= result.submitted <= 102
    assert not [n for n in result.notes if "fell behind" in n], result.notes


async def test_an_open_loop_that_cannot_keep_its_rate_says_so() -> None:
    fake = FakeCoordinator()
    w = workload(max_tasks=1_000_000, duration_s=0.2, rate_per_s=5_000_000.0, stream=True)
    result = await Driver(client_for(fake), w, run_id="t9b").run()
    assert result.ok
    assert result.submitted < 1_000_000  # no harness sends five million a second
    (note,) = [n for n in result.notes if "fell behind" in n]
    assert f"it sent {result.submitted:,} of the 1,000,000 tasks due in 0.2 s" in note
    assert "of the 5,000,000/s asked" in note


async def test_open_loop_streams_one_task_per_message() -> None:
    fake = FakeCoordinator()
    w = workload(max_tasks=1000, duration_s=0.5, rate_per_s=100.0, stream=True)
    result = await Driver(client_for(fake), w, run_id="t9s").run()
    assert result.ok
    assert len(fake.streams) == 1
    assert fake.streams[0].written == [task_id("t9s", i) for i in range(result.submitted)]
    assert result.metrics.latency("submit_ack").count == result.submitted


async def test_a_broken_submit_stream_sends_the_unanswered_again_on_a_new_one() -> None:
    # the 6th submit is applied but its answer is lost, and the stream ends: it and
    # everything written after it go again on a new stream; nothing lost or doubled
    fake = FakeCoordinator(stream_breaks=(5,))
    w = workload(max_tasks=1000, duration_s=0.5, rate_per_s=100.0, stream=True)
    result = await Driver(client_for(fake), w, run_id="t9b").run()
    assert result.ok
    assert result.completed == result.submitted == result.acknowledged
    first, second = fake.streams
    assert first.written[5] == second.written[0] == task_id("t9b", 5)
    assert result.metrics.counters["rpc_retries"] == 1
    assert result.metrics.counters["submit_replays"] >= 1  # the lost answer's task


async def test_a_submit_stream_closed_while_it_waits_to_reopen_still_ends() -> None:
    # close() comes during the backoff before the second stream: that stream must be
    # half-closed too, or the reader would wait for its end for ever
    fake = FakeCoordinator(stream_breaks=(1,))
    client = client_for(fake)
    closing, answered = asyncio.Event(), []

    async def backoff(attempt: int) -> None:
        await closing.wait()

    client.backoff = backoff  # type: ignore[method-assign]
    streamer = SubmitStreamer(client, answered.append, lambda specs, err: None)
    for i in range(3):
        await streamer.send(tpb.TaskSpec(task_id=f"c-{i}", kind="noop"))
    closed = asyncio.ensure_future(streamer.close())
    await asyncio.sleep(0.01)
    closing.set()
    await asyncio.wait_for(closed, 5.0)
    assert [r.task.task_id for r in answered] == ["c-0", "c-1", "c-2"]
    assert fake.streams[1].written == ["c-1", "c-2"]


async def test_a_submit_stream_refused_for_good_fails_its_unanswered_tasks() -> None:
    fake = FakeCoordinator(stream_breaks=(5,), stream_code=grpc.StatusCode.INVALID_ARGUMENT)
    w = workload(max_tasks=20, duration_s=0.5, rate_per_s=100.0, stream=True)
    result = await Driver(client_for(fake), w, run_id="t9f").run()
    # no retry: the one task unanswered then is given up on, and the next send opens
    # a new stream (the store has that task all the same, so the audit finds it done)
    assert result.metrics.counters["errors"] == 1
    assert result.metrics.counters["submit_failed_tasks"] == 1
    assert result.metrics.counters["rpc_retries"] == 0
    assert len(fake.streams) == 2
    assert fake.streams[1].written[0] == task_id("t9f", 6)
    assert result.ok


def test_schedules() -> None:
    rate = RateSchedule(10.0)
    assert rate.due(0.0) == 1
    assert rate.due(0.95) == 10
    assert rate.next_at(10) == pytest.approx(1.0)
    burst = BurstSchedule(size=100, interval_s=5.0)
    assert burst.due(0.0) == 100
    assert burst.due(4.9) == 100
    assert burst.due(5.0) == 200
    assert burst.next_at(100) == 5.0
    assert burst.next_at(99) == 0.0


async def test_bursts_submit_in_batches_up_to_the_limit() -> None:
    fake = FakeCoordinator()
    w = workload(max_tasks=250, duration_s=0.5, batch_size=100)
    result = await Driver(
        client_for(fake), w, run_id="t10", schedule=BurstSchedule(250, 10.0)
    ).run()
    assert result.ok
    assert result.completed == 250
    assert fake.submit_calls == 1 + 3  # warm-up, then 100 + 100 + 50


async def test_stop_ends_the_run_early_and_still_checks() -> None:
    fake = FakeCoordinator(delay_s=0.01)
    driver = Driver(client_for(fake), workload(max_tasks=100_000, duration_s=30.0), run_id="t11")

    async def stopper() -> None:
        while driver.completed < 20:
            await asyncio.sleep(0.005)
        driver.stop()

    t0 = time.monotonic()
    result, _ = await asyncio.gather(driver.run(), stopper())
    assert time.monotonic() - t0 < 10
    assert result.ok
    assert result.completed == result.acknowledged < 100_000


async def test_simulated_specs_carry_the_sleep_and_say_so() -> None:
    fake = FakeCoordinator()
    driver = Driver(client_for(fake), workload(executor="sleep", sleep_ms=7), run_id="t12")
    spec = driver.spec("lt-t12-00000000")
    assert spec.kind == "sleep"
    assert spec.payload == b'{"ms": 7}'
    assert spec.metadata["simulated"] == "true"
    assert driver.spec("x").task_id == "x"


async def test_a_standby_redirect_moves_the_client_to_the_leader() -> None:
    calls: list[str] = []
    fake = FakeCoordinator()

    class Standby:
        async def GetStatus(self, req: Any, timeout: float | None = None) -> Any:
            calls.append("standby")
            raise FakeRpcError(
                grpc.StatusCode.UNAVAILABLE, "not the leader", (("agentmesh-leader", "leader:2"),)
            )

    stubs = {"standby:1": Standby(), "leader:2": fake}
    client = CoordinatorClient(["standby:1"], stub_factory=stubs.__getitem__, retry_s=2.0)
    status = await client.status()
    assert status.term == 7
    assert client.endpoint == "leader:2"
    assert calls == ["standby"]
    assert client.counters["leader_redirects"] == 1


async def test_a_non_retryable_error_is_raised_at_once() -> None:
    class Broken:
        async def GetTask(self, req: Any, timeout: float | None = None) -> Any:
            raise FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad id")

    client = CoordinatorClient(["x:1"], stub_factory=lambda ep: Broken())
    with pytest.raises(RpcFailed, match="INVALID_ARGUMENT: bad id"):
        await client.get_task("?")


async def test_no_agent_taking_the_warm_up_task_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import loadtest.submit

    monkeypatch.setattr(loadtest.submit, "WARMUP_TIMEOUT_S", 0.2)
    fake = FakeCoordinator(delay_s=3600)  # queued forever: no agent
    with pytest.raises(RuntimeError, match="are agents connected"):
        await Driver(client_for(fake), workload(), run_id="t13").run()
    assert fake.watchers == []  # the event stream was closed


def test_a_task_missing_a_timestamp_has_no_split() -> None:
    task = tpb.Task(created_at_us=110, assigned_at_us=120, received_at_us=150, finished_at_us=170)
    assert task_hops(100, task, 200) == (10, 10, 30, 20, 30)
    task.received_at_us = 0  # never received by an agent (a poll found it dead-lettered)
    assert task_hops(100, task, 200) is None
