"""etcd's own disk latency over a run: the floor under every durable write.

etcd serves Prometheus metrics on its client port (`/metrics`). Two histograms there
say how much of a commit is etcd's disk: `etcd_disk_wal_fsync_duration_seconds` (the
write-ahead log's fsync, which every write waits for before etcd answers) and
`etcd_disk_backend_commit_duration_seconds` (bbolt's commit, batched in the
background). The harness reads both before and after a run; the difference is the
run's. etcd's buckets double from 1 ms, so a percentile is the bucket's upper bound
("P99 ≤ 4 ms"); the mean is exact. Parsing and arithmetic are pure; only `scrape`
does I/O.
"""

from __future__ import annotations

import asyncio
import math
import urllib.request
from dataclasses import dataclass, field
from typing import Any

HISTOGRAMS = {
    "wal_fsync": "etcd_disk_wal_fsync_duration_seconds",
    "backend_commit": "etcd_disk_backend_commit_duration_seconds",
}
SCRAPE_TIMEOUT_S = 2.0


@dataclass
class Histogram:
    """One Prometheus histogram: cumulative counts per upper bound (seconds)."""

    buckets: dict[float, float] = field(default_factory=dict)
    total_s: float = 0.0
    count: float = 0.0


def parse(text: str, histograms: dict[str, str] = HISTOGRAMS) -> dict[str, Histogram]:
    """The histograms named in `histograms` (short name → metric) found in a /metrics
    page, by their short name."""
    names = {metric: short for short, metric in histograms.items()}
    out: dict[str, Histogram] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, labels = head.partition("{")
        for suffix in ("_bucket", "_sum", "_count"):
            if metric.endswith(suffix) and metric[: -len(suffix)] in names:
                hist = out.setdefault(names[metric[: -len(suffix)]], Histogram())
                if suffix == "_bucket":
                    le = labels.split('le="', 1)[1].split('"', 1)[0]
                    hist.buckets[math.inf if le == "+Inf" else float(le)] = float(value)
                elif suffix == "_sum":
                    hist.total_s = float(value)
                else:
                    hist.count = float(value)
    return out


def delta(before: Histogram, after: Histogram) -> Histogram:
    """What was observed between two readings of one histogram."""
    return Histogram(
        {le: n - before.buckets.get(le, 0.0) for le, n in after.buckets.items()},
        after.total_s - before.total_s,
        after.count - before.count,
    )


def percentile_bound_ms(hist: Histogram, q: float) -> float | None:
    """The upper bound, in ms, of the bucket holding the q-th percentile (None: empty,
    or beyond the last finite bucket)."""
    if hist.count <= 0:
        return None
    rank = q / 100.0 * hist.count
    for le in sorted(hist.buckets):
        if hist.buckets[le] >= rank:
            return None if math.isinf(le) else round(le * 1000.0, 3)
    return None


def figures(hist: Histogram) -> dict[str, Any]:
    """Count, exact mean and bucket-bound percentiles of a histogram of seconds, in ms."""
    return {
        "count": int(hist.count),
        "mean_ms": round(1000.0 * hist.total_s / hist.count, 3) if hist.count > 0 else None,
        "p50_le_ms": percentile_bound_ms(hist, 50.0),
        "p99_le_ms": percentile_bound_ms(hist, 99.0),
        "p999_le_ms": percentile_bound_ms(hist, 99.9),
    }


def summarise(before: str, after: str) -> dict[str, Any]:
    """The report's `etcd_disk` section from two /metrics pages."""
    first, last = parse(before), parse(after)
    return {
        name: figures(delta(first[name], last[name]))
        for name in HISTOGRAMS
        if name in first and name in last
    }


async def scrape(endpoint: str) -> str | None:
    """A /metrics page (endpoint: host:port, e.g. etcd's client URL); None if unreachable."""
    url = endpoint if "://" in endpoint else f"http://{endpoint}"

    def get() -> str:
        with urllib.request.urlopen(f"{url}/metrics", timeout=SCRAPE_TIMEOUT_S) as resp:
            return str(resp.read().decode())

    try:
        return await asyncio.to_thread(get)
    except OSError:
        return None
