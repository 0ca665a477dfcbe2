"""Measurements of one load-test run: latency histograms, throughput, counters.

Latencies go into HdrHistograms in microseconds (1 µs to 60 s, 3 significant
digits: every recorded value is exact to 0.1 %), so P99.9 of a million samples
costs a fixed 50 kB and no sorting. Everything here is plain data plus
arithmetic; callers pass the timestamps, so tests need no clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
"""Smallest trackable latency: 1 µs (a same-host round trip is never below it)."""
HIGHEST_US = 60_000_000
"""Largest trackable latency: 60 s. Longer samples are clamped and counted."""
SIGNIFICANT_DIGITS = 3

PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)


@dataclass(frozen=True, kw_only=True)
class LatencySummary:
    """One histogram's headline figures, in milliseconds."""

    name: str
    count: int
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    min_ms: float
    mean_ms: float
    stddev_ms: float
    clamped_low: int
    """Samples below 1 µs (negative ones included), recorded as 1 µs."""
    clamped_high: int
    """Samples above 60 s, recorded as 60 s."""

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class LatencyRecorder:
    """An HdrHistogram of one latency, recorded in microseconds.

    Samples taken from two clocks (a client's submit time and an agent's receive
    time) can come out negative when the agent is faster than the reply to the
    client; they are recorded as 1 µs and counted in `clamped_low` so the report
    shows how many there were instead of hiding them.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._hist = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
        self.clamped_low = 0
        self.clamped_high = 0

    @property
    def count(self) -> int:
        return int(self._hist.get_total_count())

    def record_us(self, value_us: float) -> None:
        """Record one sample given in microseconds."""
        v = int(round(value_us))
        if v < LOWEST_US:
            self.clamped_low += 1
            v = LOWEST_US
        elif v > HIGHEST_US:
            self.clamped_high += 1
            v = HIGHEST_US
        self._hist.record_value(v)

    def record_s(self, seconds: float) -> None:
        """Record one sample given in seconds."""
        self.record_us(seconds * 1e6)

    def record_ms(self, millis: float) -> None:
        self.record_us(millis * 1e3)

    def merge(self, other: LatencyRecorder) -> None:
        """Add every sample of `other` (e.g. per-worker recorders into one)."""
        self._hist.add(other._hist)
        self.clamped_low += other.clamped_low
        self.clamped_high += other.clamped_high

    def percentile_ms(self, pct: float) -> float:
        if self.count == 0:
            return 0.0
        return float(self._hist.get_value_at_percentile(pct)) / 1000.0

    def summary(self) -> LatencySummary:
        h = self._hist
        empty = self.count == 0

        def ms(v: float) -> float:
            return 0.0 if empty else round(float(v) / 1000.0, 4)

        return LatencySummary(
            name=self.name,
            count=self.count,
            p50_ms=ms(h.get_value_at_percentile(50.0)),
            p90_ms=ms(h.get_value_at_percentile(90.0)),
            p95_ms=ms(h.get_value_at_percentile(95.0)),
            p99_ms=ms(h.get_value_at_percentile(99.0)),
            p999_ms=ms(h.get_value_at_percentile(99.9)),
            max_ms=ms(h.get_max_value()),
            min_ms=ms(h.get_min_value()),
            mean_ms=ms(h.get_mean_value()),
            stddev_ms=ms(h.get_stddev()),
            clamped_low=self.clamped_low,
            clamped_high=self.clamped_high,
        )

    def percentile_curve(self, ticks_per_half_distance: int = 5) -> list[tuple[float, float]]:
        """HdrHistogram's percentile distribution as (percentile, value in ms) pairs.

        The same points `HistogramLogProcessor` prints: dense towards 100 %, so
        the tail is visible when plotted against 1 / (1 - percentile).
        """
        if self.count == 0:
            return []
        points: list[tuple[float, float]] = []
        for item in self._hist.get_percentile_iterator(ticks_per_half_distance):
            pct = float(item.percentile_level_iterated_to)
            value = float(self._hist.get_highest_equivalent_value(item.value_iterated_to))
            points.append((round(pct, 6), round(value / 1000.0, 4)))
            if pct >= 100.0:
                break
        if not points or points[-1][0] < 100.0:
            points.append((100.0, round(float(self._hist.get_max_value()) / 1000.0, 4)))
        return points

    def log_buckets(self, buckets_per_decade: int = 10) -> list[tuple[float, float, int]]:
        """Sample counts in logarithmic bins: (low ms, high ms, count), empty ends trimmed."""
        if self.count == 0:
            return []
        lo_us = max(LOWEST_US, int(self._hist.get_min_value()))
        hi_us = max(lo_us + 1, int(self._hist.get_max_value()))
        first = math.floor(math.log10(lo_us) * buckets_per_decade)
        last = math.ceil(math.log10(hi_us + 1) * buckets_per_decade)
        edges = [10 ** (i / buckets_per_decade) for i in range(first, last + 1)]
        counts = [0] * (len(edges) - 1)
        for item in self._hist.get_recorded_iterator():
            value = float(item.value_iterated_to)
            idx = int(math.floor(math.log10(max(value, 1.0)) * buckets_per_decade)) - first
            idx = min(max(idx, 0), len(counts) - 1)
            counts[idx] += int(item.count_added_in_this_iter_step)
        rows = [
            (round(edges[i] / 1000.0, 6), round(edges[i + 1] / 1000.0, 6), c)
            for i, c in enumerate(counts)
        ]
        while rows and rows[0][2] == 0:
            rows.pop(0)
        while rows and rows[-1][2] == 0:
            rows.pop()
        return rows

    def encode(self) -> str:
        """The histogram in HdrHistogram's compressed base64 form (for later re-analysis)."""
        raw = self._hist.encode()
        return raw.decode("ascii") if isinstance(raw, bytes) else str(raw)


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


def merge_all(recorders: Iterable[LatencyRecorder], name: str) -> LatencyRecorder:
    """One recorder holding the samples of all `recorders`."""
    out = LatencyRecorder(name)
    for rec in recorders:
        out.merge(rec)
    return out
