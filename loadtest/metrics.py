"""Measurements of one load-test run: latency histograms, throughput, counters.

Latencies go into `LatencyRecorder`s (services/_common/latency.py: HdrHistograms in
microseconds, 1 µs to 60 s, exact to 0.1 %), the one percentile code of the project.
Everything here is plain data plus arithmetic; callers pass the timestamps, so tests
need no clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from services._common.latency import (
    HIGHEST_US,
    LOWEST_US,
    PERCENTILES,
    SIGNIFICANT_DIGITS,
    LatencyRecorder,
    LatencySummary,
    merge_all,
)

__all__ = [
    "COUNTER_NAMES",
    "HIGHEST_US",
    "LOWEST_US",
    "PERCENTILES",
    "SIGNIFICANT_DIGITS",
    "Counters",
    "LatencyRecorder",
    "LatencySummary",
    "RunMetrics",
    "ThroughputSeries",
    "merge_all",
]


class ThroughputSeries:
    """Completions counted in fixed buckets (1 s by default) from a start time.

    Times are whatever clock the caller uses (monotonic seconds); only
    differences from `start_s` matter.
    """

    def __init__(self, start_s: float, bucket_s: float = 1.0) -> None:
        if bucket_s <= 0:
            raise ValueError("bucket_s must be positive")
        self.start_s = start_s
        self.bucket_s = bucket_s
        self._counts: list[int] = []
        self.total = 0
        self.first_s: float | None = None
        self.last_s: float | None = None

    def record(self, at_s: float, n: int = 1) -> None:
        """Count `n` completions that happened at `at_s`."""
        idx = max(0, int((at_s - self.start_s) // self.bucket_s))
        if idx >= len(self._counts):
            self._counts.extend([0] * (idx + 1 - len(self._counts)))
        self._counts[idx] += n
        self.total += n
        self.first_s = at_s if self.first_s is None else min(self.first_s, at_s)
        self.last_s = at_s if self.last_s is None else max(self.last_s, at_s)

    def series(self) -> list[int]:
        """Completions per bucket, from the start to the last completion."""
        return list(self._counts)

    def rate_per_s(self, over_s: float | None = None) -> float:
        """Average completions per second over `over_s`, or start → last completion."""
        if self.total == 0:
            return 0.0
        span = over_s if over_s is not None else (self.last_s or self.start_s) - self.start_s
        return self.total / span if span > 0 else 0.0

    def steady_rate_per_s(self) -> float:
        """Mean of the full buckets, leaving out the first and the last (ramp-up, drain).

        Falls back to the overall rate when the run is shorter than three buckets.
        """
        counts = self._counts
        if len(counts) < 3:
            return self.rate_per_s()
        middle = counts[1:-1]
        return sum(middle) / (len(middle) * self.bucket_s)

    def peak_per_s(self) -> float:
        return max(self._counts, default=0) / self.bucket_s


COUNTER_NAMES = ("errors", "retries", "claim_conflicts")
"""Counters every run reports, even at zero."""


@dataclass
class Counters:
    """Named event counts. The standard names always exist; others appear on first use."""

    values: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTER_NAMES, 0))

    def inc(self, name: str, n: int = 1) -> None:
        self.values[name] = self.values.get(name, 0) + n

    def __getitem__(self, name: str) -> int:
        return self.values.get(name, 0)

    def as_dict(self) -> dict[str, int]:
        return dict(self.values)


class RunMetrics:
    """All measurements of one system's run: named latencies, throughput, counters."""

    def __init__(self, start_s: float, bucket_s: float = 1.0) -> None:
        self.latencies: dict[str, LatencyRecorder] = {}
        self.throughput = ThroughputSeries(start_s, bucket_s)
        self.counters = Counters()
        self.samples: dict[str, list[float]] = {}
        """Small named sample lists kept verbatim (recovery times, spawn times)."""

    def latency(self, name: str) -> LatencyRecorder:
        """The recorder called `name`, created on first use."""
        rec = self.latencies.get(name)
        if rec is None:
            rec = self.latencies[name] = LatencyRecorder(name)
        return rec

    def add_sample(self, name: str, value: float) -> None:
        self.samples.setdefault(name, []).append(value)

    def summaries(self) -> Iterator[LatencySummary]:
        for rec in self.latencies.values():
            yield rec.summary()
