"""The ready queue: where QUEUED tasks wait for an agent.

One FIFO line of task ids per priority (0-9, highest served first) and a heap of
retries that back off until their `not_before_us`. An entry's `queued` flag says its
id is in one of them, once. An entry busy with another write keeps its place.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.clock import Clock
from services.coordinator.sessions import AgentSession
from services.coordinator.tasks import QUEUED

if TYPE_CHECKING:  # core.py builds the queue; the queue only holds core's entries
    from services.coordinator.core import Entry


class Gate(Protocol):
    """What the dispatcher asks before it assigns (llm_admission.LlmGate)."""

    def held(self, task: tpb.Task) -> bool: ...

    def admit(self, task: tpb.Task) -> bool: ...


class ReadyQueue:
    def __init__(self, clock: Clock, wake: asyncio.Event) -> None:
        self.clock = clock
        self.wake = wake
        """Set whenever an entry gets in line: the dispatcher has work."""
        self.ready: list[collections.deque[str]] = [collections.deque() for _ in range(10)]
        self.delayed: list[tuple[int, str]] = []  # (not_before_us, task_id), a heap

    def push(self, entry: Entry, *, front: bool = False) -> None:
        """Put a QUEUED entry in line: the retry heap while it backs off, else a ready
        queue (`front`: first in line). An entry already in line keeps its place."""
        if entry.queued:
            return
        entry.queued = True
        task = entry.task
        if task.not_before_us > self.clock.wall_us():
            heapq.heappush(self.delayed, (task.not_before_us, task.task_id))
        elif front:
            self.ready[task.spec.priority].appendleft(task.task_id)
        else:
            self.ready[task.spec.priority].append(task.task_id)
        self.wake.set()

    def has_ready(self) -> bool:
        """Some task waits in a ready line (it may be busy or unplaceable)."""
        return any(self.ready)

    def in_line(self) -> set[str]:
        """The ids really in line, whatever the entries' flags say."""
        ids = {t for line in self.ready for t in line}
        ids.update(t for _, t in self.delayed)
        return ids

    def promote_due(self, active: Mapping[str, Entry]) -> float | None:
        """Move due retries to the ready queues; seconds until the next one is due."""
        now = self.clock.wall_us()
        while self.delayed and self.delayed[0][0] <= now:
            _, task_id = heapq.heappop(self.delayed)
            entry = active.get(task_id)
            if entry is not None:
                entry.queued = False
                if entry.task.state == QUEUED:
                    self.push(entry)
        return (self.delayed[0][0] - now) / 1e6 if self.delayed else None

    def plan(
        self,
        active: Mapping[str, Entry],
        free: dict[str, AgentSession],
        pick: Callable[[tpb.TaskSpec, dict[str, AgentSession]], AgentSession | None],
        reserve: Callable[[AgentSession, str], None],
        gate: Gate | None = None,
    ) -> list[tuple[Entry, AgentSession]]:
        """Match ready tasks to agents: highest priority first, FIFO within one. Each
        match takes its entry and reserves its slot (`reserve` drops a full agent from
        `free`). An entry busy with another write (a cancel, say) keeps its place."""
        if not free:
            return []
        picks: list[tuple[Entry, AgentSession]] = []
        # What no free agent could run, by the task's requirements: `free` only shrinks
        # during a plan, so later tasks that need the same are kept without asking again.
        # Tens of thousands of tasks nobody can run (a label no agent has) in front
        # otherwise used up every scan, and nothing behind them was ever dispatched.
        unrunnable: set[tuple[str, str, tuple[tuple[str, str], ...]]] = set()
        for priority in range(9, -1, -1):
            queue = self.ready[priority]
            kept: list[str] = []
            scanned = skipped = 0
            while queue and free and scanned + skipped // SKIP_COST < SCAN_LIMIT:
                task_id = queue.popleft()
                entry = active.get(task_id)
                if entry is None or entry.task.state != QUEUED:
                    if entry is not None:
                        entry.queued = False
                    continue
                scanned += 1
                if entry.busy or (gate is not None and gate.held(entry.task)):
                    kept.append(task_id)
                    continue
                spec = entry.task.spec
                if unrunnable and _needs(spec) in unrunnable:
                    kept.append(task_id)
                    scanned -= 1
                    skipped += 1
                    continue
                agent = pick(spec, free)
                if agent is None:
                    unrunnable.add(_needs(spec))
                if agent is None or task_id in agent.inflight:
                    # nobody free can run it now (or the one picked still lists an older
                    # claim of it, being settled): keep its place
                    kept.append(task_id)
                    continue
                if gate is not None and not gate.admit(entry.task):
                    # an llm task its model's rate limits cannot take now: it waits QUEUED
                    # in its place (asked only once an agent is found, so an admission is
                    # never spent on a task that then finds no agent)
                    kept.append(task_id)
                    continue
                entry.queued = False
                entry.try_take()
                reserve(agent, task_id)
                picks.append((entry, agent))
            queue.extendleft(reversed(kept))
            if not free:
                break
        return picks


SCAN_LIMIT = 10_000
"""Tasks one plan looks at per priority (its time, with the event loop held)."""
SKIP_COST = 20
"""A task kept because an earlier one with the same requirements found no agent costs
this many times less than one offered to the agents (a set lookup)."""


def _needs(spec: tpb.TaskSpec) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """What `pick` looks at: kind, role and required labels."""
    return spec.kind, spec.role, tuple(sorted(spec.required_labels.items()))
