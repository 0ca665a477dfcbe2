"""The agentmesh side of a run: warm up, submit, watch, measure, and check exactly-once.

The parts: `submit.Submitter` (the warm-up task, the closed and open loops),
`tracker.Tracker` (each task's record, the events stream, polls, reassignments, the
measurements) and `audit.audit` (the exactly-once verdict, from plain data). The driver
runs them in order, bounded throughout, runs a scenario's actions at their times, and
ends with a scan of the store: every acknowledged id must be in exactly one terminal
state, and no id may have been completed twice (two SUCCEEDED events under different
claim tokens, or two different terminal states).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from loadtest.audit import audit
from loadtest.client import CoordinatorClient, RpcFailed
from loadtest.cpu import SAMPLE_INTERVAL_S, CpuSampler, not_measured
from loadtest.metrics import RunMetrics
from loadtest.result import Marker, RunResult
from loadtest.submit import Submitter
from loadtest.tracker import (
    POLL_CONCURRENCY,
    Clock,
    Reassignment,
    Record,
    Tracker,
    split_summary,
)
from loadtest.workload import (
    BurstSchedule,
    ProgressSink,
    ProgressSnapshot,
    RateSchedule,
    Schedule,
    Workload,
)
from protos.agentmesh.v1 import task_pb2 as tpb

FINAL_CHECK_TIMEOUT_S = 120.0
STOPPED_DRAIN_S = 2.0
"""After Ctrl-C: how long the tasks in flight get before the check."""


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall_us(self) -> int:
        return time.time_ns() // 1000


@dataclass(frozen=True)
class Action:
    """Something a scenario does during the run (kill a process ...), at `at_s` after the start."""

    at_s: float
    label: str
    run: Callable[[Driver], Awaitable[dict[str, Any] | None]]


class Driver:
    """Runs one workload against a coordinator and returns a `RunResult`.

    Args:
        client: the coordinator client.
        workload: what to submit and the bounds.
        run_id: prefix of every task id of this run.
        scenario: the scenario name, for the report.
        schedule: open loop schedule (None: closed loop, or a rate when the workload has one).
        watch_all_states: watch every state change, not only terminal ones (needed to see
            reassignments; costs about four events per task instead of one).
        actions: scenario steps at fixed times (fault injection).
        cpu: samples the server processes' CPU over the measured window (None: the
            harness cannot see them, and the report says "not measured").
    """

    def __init__(
        self,
        client: CoordinatorClient,
        workload: Workload,
        *,
        run_id: str,
        scenario: str = "steady",
        schedule: Schedule | None = None,
        watch_all_states: bool = False,
        actions: Iterable[Action] = (),
        clock: Clock | None = None,
        progress: ProgressSink | None = None,
        cpu: CpuSampler | None = None,
    ) -> None:
        self.client = client
        self.cpu = cpu
        self.w = workload
        self.run_id = run_id
        self.scenario = scenario
        if schedule is None and not workload.closed_loop:
            schedule = RateSchedule(workload.rate_per_s)
        self.schedule = schedule
        self.actions = sorted(actions, key=lambda a: a.at_s)
        self.clock: Clock = clock or SystemClock()
        self.progress = progress
        self.metrics = RunMetrics(start_s=self.clock.monotonic())
        self.counters = client.counters = self.metrics.counters
        self.tracker = Tracker(
            client,
            self.metrics,
            self.clock,
            watch_all_states=watch_all_states,
            stale_after_s=5.0 + (workload.sleep_ms / 1000.0 if workload.simulated else 0.0),
            on_done=self._on_done,
        )
        self.submitter = Submitter(
            client,
            workload,
            self.tracker,
            self.metrics,
            self.clock,
            run_id=run_id,
            schedule=schedule,
        )
        self.markers: list[Marker] = []
        self.extra: dict[str, Any] = {}
        self.notes: list[str] = []
        self.phase = "starting"
        self._drained = asyncio.Event()
        self._start = 0.0

    # ------------------------------------------------------------ what scenarios read

    @property
    def tasks(self) -> dict[str, Record]:
        return self.tracker.records

    @property
    def inflight(self) -> dict[str, None]:
        return self.tracker.inflight

    @property
    def completed(self) -> int:
        return self.tracker.completed

    @property
    def reassignments(self) -> list[Reassignment]:
        return self.tracker.reassignments

    @property
    def first_completion_in_term(self) -> dict[int, float]:
        return self.tracker.first_completion_in_term

    def holders(self) -> dict[str, str]:
        """In-flight task id → the agent last seen holding it (needs watch_all_states)."""
        return self.tracker.holders()

    def track_reassignment(
        self, victims: dict[str, str], t_kill: float, t_kill_wall_us: int
    ) -> Reassignment:
        return self.tracker.track_reassignment(victims, t_kill, t_kill_wall_us)

    def spec(self, tid: str) -> tpb.TaskSpec:
        return self.submitter.spec(tid)

    def stop(self) -> None:
        """End the submit phase now (Ctrl-C): drain briefly, then check and report."""
        self.submitter.stop()

    def elapsed(self) -> float:
        return self.clock.monotonic() - self._start if self._start else 0.0

    def snapshot(self) -> ProgressSnapshot:
        return ProgressSnapshot(
            system="agentmesh",
            phase=self.phase,
            elapsed_s=self.elapsed(),
            submitted=self.submitter.submitted,
            acknowledged=self.submitter.acknowledged,
            completed=self.tracker.completed,
            inflight=len(self.tracker.inflight),
            errors=self.counters["errors"],
            rate_last_s=float(self.tracker.recent(1.0)),
            submit_to_receive_p99_ms=self.metrics.latency("submit_to_receive").percentile_ms(99.0),
        )

    def describe(self) -> str:
        mode = self.schedule.describe() if isinstance(self.schedule, BurstSchedule) else None
        return self.w.describe(mode)

    # ------------------------------------------------------------ the run

    async def run(self) -> RunResult:
        """Warm up, submit for the workload's duration, drain, check; bounded throughout.

        Raises:
            RuntimeError: the warm-up task found no agent, or the event stream stayed silent.
            RpcFailed: the coordinator refused or could not be reached within the retry time.
        """
        end = 0.0
        try:
            async with asyncio.TaskGroup() as tg:
                background = [
                    tg.create_task(self.tracker.watch_loop(), name="watch"),
                    tg.create_task(self.tracker.poll_loop(), name="poll"),
                ]
                if self.progress:
                    background.append(tg.create_task(self._progress_loop(), name="progress"))
                try:
                    self.phase = "warm-up"
                    await self.submitter.warmup()
                    self._start = self.clock.monotonic()
                    self.metrics.throughput.start_s = self._start
                    if self.cpu is not None:
                        self.cpu.sample()
                        background.append(tg.create_task(self._cpu_loop(), name="cpu"))
                    self.phase = "submitting"
                    background.append(tg.create_task(self._run_actions(), name="actions"))
                    await self.submitter.run(tg, self._start)
                    self.phase = "draining"
                    await self._drain()
                    end = self.clock.monotonic()
                    if self.cpu is not None:
                        self.cpu.sample()
                finally:
                    for t in background:
                        t.cancel()
        except BaseExceptionGroup as group:
            # one failure is the usual case: raise it as itself, not wrapped
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        self.phase = "checking"
        if self.progress:
            self.progress(self.snapshot())
        result = await asyncio.wait_for(self._final_check(end - self._start), FINAL_CHECK_TIMEOUT_S)
        self.phase = "done"
        return result

    def _on_done(self) -> None:
        """A task of the run completed."""
        if self.schedule is None:
            self.submitter.release()
        if self.submitter.over.is_set() and not self.tracker.inflight:
            self._drained.set()

    async def _run_actions(self) -> None:
        stopped = self.submitter.stopped
        for action in self.actions:
            wait = self._start + action.at_s - self.clock.monotonic()
            if wait > 0:
                try:
                    await asyncio.wait_for(stopped.wait(), wait)
                    return
                except TimeoutError:
                    pass
            if self.submitter.over.is_set():
                return
            self.markers.append(Marker(t_s=self.elapsed(), label=action.label))
            try:
                info = await action.run(self)
            except Exception as err:  # noqa: BLE001 - reported, the run goes on
                self.notes.append(f"action {action.label!r} failed: {err!r}")
                continue
            if info:
                self.extra.setdefault("actions", []).append({"label": action.label, **info})

    async def _cpu_loop(self) -> None:
        # a process killed during the window still counts up to its last sample
        assert self.cpu is not None
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL_S)
            self.cpu.sample()

    async def _progress_loop(self) -> None:
        assert self.progress is not None
        while True:
            self.progress(self.snapshot())
            await asyncio.sleep(0.25)

    async def _drain(self) -> None:
        if not self.tracker.inflight:
            return
        self._drained.clear()
        timeout = STOPPED_DRAIN_S if self.submitter.stopped.is_set() else self.w.drain_timeout_s
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            # a last look before calling them unfinished
            await self.tracker.poll(list(self.tracker.inflight))

    # ------------------------------------------------------------ the final check

    async def _read_store(self, ids: set[str]) -> dict[str, Any]:
        """The run's tasks as the store holds them: one ListTasks scan, then GetTask for
        the ids it did not return (or for all, if the scan failed)."""
        prefix = self.submitter.prefix
        found: dict[str, Any] = {}
        try:
            async for task in self.client.list_all_tasks():
                if task.task_id.startswith(prefix):
                    found[task.task_id] = task
        except RpcFailed as err:
            self.notes.append(f"ListTasks scan failed ({err}); checked with GetTask per id")
        sem = asyncio.Semaphore(POLL_CONCURRENCY)

        async def get(tid: str) -> None:
            async with sem:
                try:
                    found[tid] = await self.client.get_task(tid)
                except RpcFailed as err:
                    if err.code is not None and err.code.name != "NOT_FOUND":
                        self.counters.inc("errors")

        await asyncio.gather(*(get(t) for t in ids if t not in found))
        return found

    async def _final_check(self, duration_s: float) -> RunResult:
        acknowledged = self.tracker.run_ids()
        failed = self.submitter.failed
        stored = await self._read_store(acknowledged | (failed - acknowledged))
        verdict = audit(
            acknowledged=acknowledged,
            unacknowledged=failed,
            stored=stored,
            first_terminal=self.tracker.first_terminal(),
            completed_twice=self.tracker.duplicated,
        )
        if verdict.late:
            self.counters.inc("acknowledged_late", len(verdict.late))
        if verdict.disagreed:
            # the stream said one terminal state and the store holds another
            self.counters.inc("claim_conflicts", len(verdict.disagreed))
        self.counters.inc("retries", verdict.retries)
        if self.submitter.late:
            self.counters.inc("late_submits", self.submitter.late)
        self.extra.update(self.tracker.reassignment_figures())
        if self.tracker.hops:
            self.extra["latency_split"] = split_summary(self.tracker.hops)
        if self.submitter.stopped.is_set():
            self.notes.append(f"stopped early (Ctrl-C) after {duration_s:.1f} s of submitting")
        elif behind := self.w.fell_behind(self.submitter.submitted):
            self.notes.append(behind)
        if verdict.unfinished:
            states_text = ", ".join(
                f"{k} {v}" for k, v in sorted(verdict.unfinished_states.items())
            )
            self.notes.append(
                f"{len(verdict.unfinished)} acknowledged task(s) were not terminal "
                f"{self.w.drain_timeout_s:g} s after submitting stopped ({states_text})"
            )
            self.extra["unfinished_examples"] = verdict.unfinished_examples
        return RunResult(
            system="agentmesh",
            scenario=self.scenario,
            metrics=self.metrics,
            duration_s=duration_s,
            submitted=self.submitter.submitted,
            acknowledged=self.submitter.acknowledged + len(verdict.late),
            completed=self.tracker.completed,
            terminal_states=verdict.terminal_states,
            lost=verdict.lost,
            unfinished=verdict.unfinished,
            duplicated=verdict.duplicated,
            markers=list(self.markers),
            notes=[self.describe(), *self.notes],
            cpu=(
                self.cpu.summary(completed=self.tracker.completed, window_s=duration_s)
                if self.cpu is not None
                else not_measured("the harness did not start this cluster's processes")
            ),
            extra={"run_id": self.run_id, **self.extra},
        )
