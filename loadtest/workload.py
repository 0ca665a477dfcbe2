"""The workload both sides run, and the progress both sides report.

One `Workload` drives agentmesh and the Celery peer alike, so a comparison is
the same number of tasks at the same concurrency or rate.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal, Protocol

Executor = Literal["noop", "sleep"]


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What the clients submit, how fast, and for how long at most."""

    max_tasks: int
    """Upper bound on tasks submitted (the run stops submitting at this count)."""
    duration_s: float
    """Upper bound on the submit phase, in seconds."""
    rate_per_s: float = 0.0
    """Open loop at this many submits per second; 0 means closed loop."""
    concurrency: int = 200
    """Closed loop: tasks kept in flight (submitted, not yet terminal)."""
    executor: Executor = "noop"
    """`noop` returns at once; `sleep` is simulated work (labelled so in every output)."""
    sleep_ms: float = 50.0
    """How long a `sleep` task sleeps, in milliseconds."""
    batch_size: int = 100
    """Closed loop: most specs per SubmitBatch (1 uses Submit). Open loop batches what is due."""
    stream: bool = False
    """Open loop: each task in a message of its own on one SubmitStream call, instead of
    a Submit (or SubmitBatch of what is due) per send."""
    clients: int = 0
    """Closed loop: submit RPCs in flight at once (0: 4 when batching, else up to 64)."""
    drain_timeout_s: float = 30.0
    """After submitting stops, how long to wait for the tasks still in flight."""

    def __post_init__(self) -> None:
        if self.max_tasks < 1:
            raise ValueError("max_tasks must be at least 1")
        if self.duration_s <= 0:
            raise ValueError("duration_s must be positive")
        if self.rate_per_s < 0:
            raise ValueError("rate_per_s must be 0 (closed loop) or positive")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not 1 <= self.batch_size <= 1000:
            raise ValueError("batch_size must be 1 to 1000 (SubmitBatch's limit)")
        if self.clients < 0:
            raise ValueError("clients must be 0 (automatic) or positive")
        if self.executor not in ("noop", "sleep"):
            raise ValueError("executor must be noop or sleep")

    @property
    def simulated(self) -> bool:
        return self.executor == "sleep"

    @property
    def closed_loop(self) -> bool:
        return self.rate_per_s == 0

    def fell_behind(self, submitted: int) -> str:
        """A note for the report when the open loop sent under 95 % of what its schedule
        held for the run ('' otherwise): the harness, or the system under test taking its
        submits, could not keep up, and the figures describe the load it reached."""
        if self.closed_loop:
            return ""
        due = min(self.max_tasks, round(self.rate_per_s * self.duration_s))
        if submitted >= 0.95 * due:
            return ""
        return (
            f"the open loop fell behind its schedule: it sent {submitted:,} of the {due:,} "
            f"tasks due in {self.duration_s:g} s ({submitted / self.duration_s:,.0f}/s of the "
            f"{self.rate_per_s:,.10g}/s asked); the figures describe the load it reached"
        )

    def describe(self, mode: str | None = None) -> str:
        """One line for reports; `mode` replaces the loop description (bursts)."""
        mode = mode or (
            f"closed loop, {self.concurrency} in flight"
            if self.closed_loop
            else f"open loop at {self.rate_per_s:g}/s"
        )
        work = f"simulated work: sleep {self.sleep_ms:g} ms" if self.simulated else "no-op tasks"
        return f"{mode}, {work}, at most {self.max_tasks} tasks in {self.duration_s:g} s"


class Schedule(Protocol):
    """Open loop: how many tasks are due `t` seconds after the start."""

    def due(self, t: float) -> int: ...

    def next_at(self, n: int) -> float:
        """When the task with index `n` is due, in seconds after the start."""
        ...


@dataclass(frozen=True)
class RateSchedule:
    rate_per_s: float

    def due(self, t: float) -> int:
        return int(t * self.rate_per_s) + 1

    def next_at(self, n: int) -> float:
        return n / self.rate_per_s


@dataclass(frozen=True)
class BurstSchedule:
    size: int
    interval_s: float

    def describe(self) -> str:
        return f"open loop, bursts of {self.size} every {self.interval_s:g} s"

    def due(self, t: float) -> int:
        return self.size * (int(t // self.interval_s) + 1)

    def next_at(self, n: int) -> float:
        return (n // self.size) * self.interval_s


def new_run_id() -> str:
    """A short id that prefixes every task id of one run (so runs never collide)."""
    return secrets.token_hex(4)


def task_id(run_id: str, seq: int) -> str:
    return f"lt-{run_id}-{seq:08d}"


@dataclass(frozen=True, kw_only=True)
class ProgressSnapshot:
    """What the live view shows, taken a few times a second."""

    system: str
    phase: str
    elapsed_s: float
    submitted: int
    acknowledged: int
    completed: int
    inflight: int
    errors: int
    rate_last_s: float
    """Completions in the last full second."""
    submit_to_receive_p99_ms: float
    """The headline dispatch figure: submit sent → assignment received, never negative."""


class ProgressSink(Protocol):
    def __call__(self, snapshot: ProgressSnapshot) -> None: ...
