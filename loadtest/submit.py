"""The submit side of a run: the warm-up task, then a closed or an open loop.

Clients submit with SubmitBatch (or Submit when the batch size is 1), either in
closed loop (a fixed number of tasks in flight: a completion frees a slot) or in
open loop (a schedule: a rate or bursts, whatever the completions do; a send that
starts late is counted, not hidden). Every id is known to the tracker before its
RPC goes out, so an event that beats the acknowledgement is kept, not dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from loadtest.audit import TERMINAL, state_name
from loadtest.client import CoordinatorClient, RpcFailed, SubmitStreamer
from loadtest.metrics import RunMetrics
from loadtest.tracker import Clock, Tracker
from loadtest.workload import Schedule, Workload, task_id
from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb

log = logging.getLogger(__name__)

WARMUP_TIMEOUT_S = 20.0
MAX_OPEN_LOOP_RPCS = 64
"""Open loop: submit RPCs in flight at once. Past this the pacer waits and counts late tasks."""
LATE_AFTER_S = 0.01


class Submitter:
    """Submits one run's tasks and counts what was sent and acknowledged.

    Args:
        client: the coordinator client.
        workload: what to submit and the bounds.
        tracker: told of every id before it is sent, and of every acknowledgement.
        metrics: the run's measurements (`submit_ack` latency, counters).
        clock: the run's clock.
        run_id: prefix of every task id of this run.
        schedule: open loop schedule (None: closed loop).
    """

    def __init__(
        self,
        client: CoordinatorClient,
        workload: Workload,
        tracker: Tracker,
        metrics: RunMetrics,
        clock: Clock,
        *,
        run_id: str,
        schedule: Schedule | None,
    ) -> None:
        self.client = client
        self.w = workload
        self.tracker = tracker
        self.metrics = metrics
        self.counters = metrics.counters
        self.clock = clock
        self.run_id = run_id
        self.prefix = task_id(run_id, 0)[: -len("00000000")]
        self.schedule = schedule
        self.submitted = 0
        self.acknowledged = 0
        self.failed: set[str] = set()
        """Ids whose submit failed (the store may hold them all the same)."""
        self.late = 0
        """Open loop: tasks sent later than the schedule said."""
        self.stopped = asyncio.Event()
        """Set by `stop()` (Ctrl-C): the run ends early."""
        self.over = asyncio.Event()
        """Set when no more tasks will be sent."""
        self._seq = 0
        self._free = workload.concurrency
        self._slot = asyncio.Event()
        self._streamer: SubmitStreamer | None = None

    def stop(self) -> None:
        """End the submit phase now."""
        self.stopped.set()
        self.over.set()
        self._slot.set()

    def release(self, n: int = 1) -> None:
        """Closed loop: `n` tasks left flight, so `n` more may go."""
        self._free += n
        self._slot.set()

    def spec(self, tid: str) -> tpb.TaskSpec:
        if self.w.simulated:
            return tpb.TaskSpec(
                task_id=tid,
                kind="sleep",
                payload=json.dumps({"ms": self.w.sleep_ms}).encode(),
                metadata={"loadtest": self.run_id, "simulated": "true"},
            )
        return tpb.TaskSpec(task_id=tid, kind="noop", metadata={"loadtest": self.run_id})

    def _next_ids(self, n: int) -> list[str]:
        n = max(0, min(n, self.w.max_tasks - self._seq))
        ids = [task_id(self.run_id, self._seq + i) for i in range(n)]
        self._seq += n
        return ids

    # ------------------------------------------------------------ warm-up

    async def warmup(self) -> None:
        """One task through the whole path: proves the watch is live and agents take work.

        Raises:
            RuntimeError: no agent finished it in time, or the events stream said nothing.
        """
        tid = f"{self.prefix}warmup"
        self.tracker.sent([tid], self.clock.monotonic(), self.clock.wall_us(), warmup=True)
        # the watch is opened by its own task; give it a moment to subscribe first
        await asyncio.sleep(0.05)
        resp = await self.client.submit(self.spec(tid))
        self.tracker.acknowledged(resp.task, self.clock.monotonic(), self.clock.wall_us())
        try:
            await asyncio.wait_for(self.tracker.warm.wait(), WARMUP_TIMEOUT_S)
        except TimeoutError:
            task = await self.client.get_task(tid)
            watch_error = self.tracker.watch_error
            if watch_error is not None:
                raise RuntimeError(f"WatchEvents failed: {watch_error}") from watch_error
            if task.state in TERMINAL:
                raise RuntimeError(
                    "the warm-up task finished but WatchEvents delivered no event for it"
                ) from None
            raise RuntimeError(
                f"no agent finished the warm-up task within {WARMUP_TIMEOUT_S:g} s "
                f"(state {state_name(task.state)}): are agents connected?"
            ) from None

    # ------------------------------------------------------------ the loops

    async def run(self, tg: asyncio.TaskGroup, start: float) -> None:
        """Submit from `start` until the workload's duration or task count runs out."""
        deadline = start + self.w.duration_s
        if self.schedule is None:
            submitters = [
                tg.create_task(self._closed_submitter(deadline), name=f"submitter-{i}")
                for i in range(self._submitter_count())
            ]
            await asyncio.gather(*submitters)
        else:
            await self._open_loop(tg, self.schedule, start, deadline)

    def _submitter_count(self) -> int:
        if self.w.clients:
            return self.w.clients
        # batches refill many slots per RPC; single submits need one caller per slot
        return 4 if self.w.batch_size > 1 else min(self.w.concurrency, 64)

    async def _take_slots(self, most: int, deadline: float) -> int:
        while self._free <= 0:
            if self.over.is_set():
                return 0
            self._slot.clear()
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                return 0
            try:
                await asyncio.wait_for(self._slot.wait(), remaining)
            except TimeoutError:
                return 0
        if self.over.is_set() or self.clock.monotonic() >= deadline:
            return 0
        n = min(self._free, most)
        self._free -= n
        return n

    async def _closed_submitter(self, deadline: float) -> None:
        while not self.over.is_set():
            n = await self._take_slots(self.w.batch_size, deadline)
            if n == 0:
                break
            ids = self._next_ids(n)
            if len(ids) < n:
                self.release(n - len(ids))
            if not ids:
                break
            await self._send(ids)
        self.over.set()
        self._slot.set()

    async def _open_loop(
        self, tg: asyncio.TaskGroup, schedule: Schedule, start: float, deadline: float
    ) -> None:
        rpcs = asyncio.Semaphore(MAX_OPEN_LOOP_RPCS)

        async def send(ids: list[str]) -> None:
            try:
                await self._send(ids)
            finally:
                rpcs.release()

        while not self.stopped.is_set() and self._seq < self.w.max_tasks:
            now = self.clock.monotonic()
            if now >= deadline:
                break
            due = min(self.w.max_tasks, schedule.due(now - start))
            if due <= self._seq:
                wait = start + schedule.next_at(self._seq) - now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopped.wait(), max(0.0, min(wait, deadline - now)))
                continue
            ids = self._next_ids(min(due - self._seq, self.w.batch_size))
            lateness = now - (start + schedule.next_at(self._seq - len(ids)))
            if lateness > LATE_AFTER_S:
                self.late += len(ids)
            if self.w.stream:
                await self._stream(ids)
                continue
            await rpcs.acquire()
            tg.create_task(send(ids))
        for _ in range(MAX_OPEN_LOOP_RPCS):  # every send has returned
            await rpcs.acquire()
        if self._streamer is not None:  # every streamed task is answered or given up on
            await self._streamer.close()
        self.over.set()

    async def _stream(self, ids: list[str]) -> None:
        """Open loop, `stream`: each task in a message of its own, as soon as it is due."""
        if self._streamer is None:
            self._streamer = SubmitStreamer(self.client, self._answered, self._stream_failed)
        for tid in ids:
            spec = self.spec(tid)
            self.tracker.sent([tid], self.clock.monotonic(), self.clock.wall_us())
            self.submitted += 1
            await self._streamer.send(spec)

    def _answered(self, response: cpb.SubmitResponse) -> None:
        ack_mono = self.clock.monotonic()
        record = self.tracker.records.get(response.task.task_id)
        if record is not None:  # from the first send, as a retried Submit counts it
            self.metrics.latency("submit_ack").record_s(ack_mono - record.sent_mono)
        self._acknowledged([response], ack_mono, self.clock.wall_us())

    def _stream_failed(self, specs: list[tpb.TaskSpec], err: RpcFailed) -> None:
        self._submit_failed([spec.task_id for spec in specs], err)

    async def _send(self, ids: list[str]) -> None:
        specs = [self.spec(tid) for tid in ids]
        t_send = self.clock.monotonic()
        self.tracker.sent(ids, t_send, self.clock.wall_us())
        self.submitted += len(ids)
        try:
            if len(specs) == 1 and self.w.batch_size == 1:
                results = [await self.client.submit(specs[0])]
            else:
                results = list((await self.client.submit_batch(specs)).results)
        except RpcFailed as err:
            self._submit_failed(ids, err)
            return
        ack_mono = self.clock.monotonic()
        self.metrics.latency("submit_ack").record_s(ack_mono - t_send)
        self._acknowledged(results, ack_mono, self.clock.wall_us())

    def _submit_failed(self, ids: list[str], err: RpcFailed) -> None:
        self.counters.inc("errors")
        self.counters.inc("submit_failed_tasks", len(ids))
        log.warning("submit failed", extra={"error": str(err), "tasks": len(ids)})
        self.failed.update(ids)
        if self.schedule is None:
            self.release(len(ids))

    def _acknowledged(
        self, results: list[cpb.SubmitResponse], ack_mono: float, ack_wall: int
    ) -> None:
        for r in results:
            if not self.tracker.acknowledged(r.task, ack_mono, ack_wall):
                continue
            self.acknowledged += 1
            if not r.created:
                self.counters.inc("submit_replays")
