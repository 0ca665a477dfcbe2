"""Latency percentiles from HdrHistograms: the one way agentmesh computes a percentile.

Samples are recorded in microseconds. The default range (1 µs to 60 s, 3 significant
digits) keeps every value exact to 0.1 %, so P99.9 of a million samples costs a fixed
size and no sorting. A caller with longer latencies (a health check's minutes, a
dashboard's queue waits) or many histograms at once (a ring of per-second buckets)
passes its own range and precision. Everything here is plain data plus arithmetic:
callers pass the values, so tests need no clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
"""Smallest trackable latency: 1 µs (a same-host round trip is never below it)."""
HIGHEST_US = 60_000_000
"""Default largest trackable latency: 60 s. Longer samples are clamped and counted."""
HOUR_US = 3_600_000_000
"""A wider range for figures of seconds to minutes (recovery times, LLM calls)."""
SIGNIFICANT_DIGITS = 3
"""Default precision: 3 digits, every recorded value exact to 0.1 % (about 140 kB a
histogram up to 60 s; 2 digits, 1 %, take about 25 kB)."""

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
    """Samples above the recorder's highest value, recorded as that value."""

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class LatencyRecorder:
    """An HdrHistogram of one latency, recorded in microseconds.

    Samples taken from two clocks (a client's submit time and an agent's receive
    time) can come out negative when the agent is faster than the reply to the
    client; they are recorded as 1 µs and counted in `clamped_low` so the report
    shows how many there were instead of hiding them.

    Args:
        name: what is measured (reports label it).
        highest_us: the largest trackable sample; longer ones count in `clamped_high`.
        significant_digits: precision (1 to 5); 3 is exact to 0.1 %.
    """

    def __init__(
        self,
        name: str,
        *,
        highest_us: int = HIGHEST_US,
        significant_digits: int = SIGNIFICANT_DIGITS,
    ) -> None:
        self.name = name
        self.highest_us = highest_us
        self._hist = HdrHistogram(LOWEST_US, highest_us, significant_digits)
        self.clamped_low = 0
        self.clamped_high = 0

    @classmethod
    def of_seconds(cls, name: str, values: Iterable[float], **kw: Any) -> LatencyRecorder:
        """A recorder holding `values` (seconds)."""
        rec = cls(name, **kw)
        for v in values:
            rec.record_s(v)
        return rec

    @property
    def count(self) -> int:
        return int(self._hist.get_total_count())

    def record_us(self, value_us: float) -> None:
        """Record one sample given in microseconds."""
        v = int(round(value_us))
        if v < LOWEST_US:
            self.clamped_low += 1
            v = LOWEST_US
        elif v > self.highest_us:
            self.clamped_high += 1
            v = self.highest_us
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

    def percentiles_ms(self, pcts: Iterable[float]) -> dict[float, float]:
        """Several percentiles in one pass over the histogram (0.0 each when empty)."""
        wanted = list(pcts)
        if self.count == 0:
            return dict.fromkeys(wanted, 0.0)
        found = self._hist.get_percentile_to_value_dict(wanted)
        return {p: float(found[p]) / 1000.0 for p in wanted}

    def max_ms(self) -> float:
        return float(self._hist.get_max_value()) / 1000.0

    def summary(self) -> LatencySummary:
        h = self._hist
        empty = self.count == 0
        p = self.percentiles_ms(PERCENTILES)

        def ms(v: float) -> float:
            return 0.0 if empty else round(float(v) / 1000.0, 4)

        return LatencySummary(
            name=self.name,
            count=self.count,
            p50_ms=round(p[50.0], 4),
            p90_ms=round(p[90.0], 4),
            p95_ms=round(p[95.0], 4),
            p99_ms=round(p[99.0], 4),
            p999_ms=round(p[99.9], 4),
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


def merge_all(recorders: Iterable[LatencyRecorder], name: str, **kw: Any) -> LatencyRecorder:
    """One recorder holding the samples of all `recorders` (`kw`: the range, as theirs)."""
    out = LatencyRecorder(name, **kw)
    for rec in recorders:
        out.merge(rec)
    return out
