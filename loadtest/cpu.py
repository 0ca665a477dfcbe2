"""CPU seconds per task, per process role, over a run's measured window.

Throughput and latency swing with whatever else the machine runs; the CPU time a
server process spends per completed task does not, so it is the figure to compare
across runs and against Celery on a busy machine.

The harness samples every server process it started (utime + stime from
/proc/<pid>/stat) when the measured window opens, about once a second during it
(so a process killed half-way still counts up to its last sample) and when it closes.
`used` turns those samples into the CPU each process used inside the window, and
`summarise` divides by the tasks completed, per role (`coordinator-1` and
`coordinator-2` are both `coordinator`). The parsing and arithmetic are pure; only
`read_cpu_seconds` and `CpuSampler.sample` touch /proc.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

HARNESS = "harness"
"""The load generator's own process: reported beside the servers, never in their total."""
SAMPLE_INTERVAL_S = 1.0
"""How often the sampler reads /proc during the window (a handful of small files)."""

Sample = Mapping[str, tuple[int, float]]
"""Process name → (pid, CPU seconds it had used when read). A process that is gone is absent."""


def cpu_seconds_from_stat(stat: str, ticks_per_s: float) -> float:
    """utime + stime, in seconds, from the text of /proc/<pid>/stat.

    The command name (field 2) may hold spaces and parentheses, so fields are counted
    from its closing parenthesis: field 3 (state) comes first, utime is field 14 and
    stime field 15."""
    rest = stat[stat.rindex(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / ticks_per_s


def read_cpu_seconds(pid: int) -> float | None:
    """CPU seconds a live process has used; None when it is gone or /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return cpu_seconds_from_stat(fh.read(), os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def role_of(name: str) -> str:
    """`coordinator-2` → `coordinator`, `pool-1` → `pool`; a name without a number is its role."""
    base, sep, tail = name.rpartition("-")
    return base if sep and base and tail.isdigit() else name


@dataclass(frozen=True)
class ProcessCpu:
    """The CPU one named process used inside the window."""

    cpu_s: float
    complete: bool
    """False when a process of that name died (or was replaced) before the window closed:
    its CPU after its last sample is unknown, so `cpu_s` is a lower bound."""


def used(samples: Sequence[Sample]) -> dict[str, ProcessCpu]:
    """CPU used between the first sample and the last, per process name.

    A name may be served by several pids in turn (a killed coordinator started again):
    each pid counts from its first sample, or from 0 when it was started after the
    window opened (all of its CPU falls inside the window), to its last sample.
    """
    if not samples:
        return {}
    first, last = samples[0], samples[-1]
    # (name, pid) → [baseline, last value seen]
    spans: dict[tuple[str, int], list[float]] = {}
    for sample in samples:
        for name, (pid, cpu_s) in sample.items():
            key = (name, pid)
            if key not in spans:
                born_inside = first.get(name, (None, 0.0))[0] != pid
                spans[key] = [0.0 if born_inside else cpu_s, cpu_s]
            else:
                spans[key][1] = max(spans[key][1], cpu_s)
    out: dict[str, ProcessCpu] = {}
    for (name, pid), (base, end) in spans.items():
        complete = last.get(name, (None, 0.0))[0] == pid
        prev = out.get(name)
        total = (prev.cpu_s if prev else 0.0) + max(0.0, end - base)
        # a replaced pid leaves an unknown tail, whatever its successor did
        out[name] = ProcessCpu(total, complete and (prev.complete if prev else True))
    return out


def summarise(
    processes: Mapping[str, ProcessCpu], *, completed: int, window_s: float
) -> dict[str, Any]:
    """The report's `cpu` section: per role and per process, CPU seconds, milliseconds
    of CPU per completed task and cores busy on average; and the servers' total."""
    roles: dict[str, dict[str, Any]] = {}
    for name in sorted(processes):
        p = processes[name]
        r = roles.setdefault(role_of(name), {"processes": 0, "cpu_s": 0.0, "complete": True})
        r["processes"] += 1
        r["cpu_s"] += p.cpu_s
        r["complete"] = r["complete"] and p.complete

    def figures(cpu_s: float) -> dict[str, Any]:
        return {
            "cpu_s": round(cpu_s, 3),
            "ms_per_task": round(1000.0 * cpu_s / completed, 4) if completed > 0 else None,
            "cores": round(cpu_s / window_s, 3) if window_s > 0 else None,
        }

    servers = sum(p.cpu_s for n, p in processes.items() if role_of(n) != HARNESS)
    return {
        "measured": True,
        "window_s": round(window_s, 3),
        "completed": completed,
        "roles": {
            role: {"processes": r["processes"], "complete": r["complete"], **figures(r["cpu_s"])}
            for role, r in roles.items()
        },
        "processes": {
            name: {"complete": p.complete, **figures(p.cpu_s)}
            for name, p in sorted(processes.items())
        },
        "servers": figures(servers),
    }


def not_measured(why: str) -> dict[str, Any]:
    """The `cpu` section of a run whose server processes the harness cannot see."""
    return {"measured": False, "why": why}


class CpuSampler:
    """Samples the CPU counters of named processes over a window.

    Args:
        pids: returns the live processes now, name → pid (asked at each sample, so a
            process started again during the window is followed under its new pid).
        include_harness: add this process as `harness`.
    """

    def __init__(
        self, pids: Callable[[], Mapping[str, int]], *, include_harness: bool = True
    ) -> None:
        self._pids = pids
        self._harness = include_harness
        self.samples: list[Sample] = []

    def sample(self) -> None:
        pids = dict(self._pids())
        if self._harness:
            pids[HARNESS] = os.getpid()
        now: dict[str, tuple[int, float]] = {}
        for name, pid in pids.items():
            cpu_s = read_cpu_seconds(pid)
            if cpu_s is not None:
                now[name] = (pid, cpu_s)
        self.samples.append(now)

    def summary(self, *, completed: int, window_s: float) -> dict[str, Any]:
        if len(self.samples) < 2:
            return not_measured("fewer than two CPU samples were taken")
        return summarise(used(self.samples), completed=completed, window_s=window_s)
