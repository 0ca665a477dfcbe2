"""The leader's group commit over a run: how full its etcd transactions were, how busy
it was, and how long task writes queued for it.

The coordinator packs task writes into one fenced transaction at a time (a queue with
one server, `GroupCommitter`). When that server is busy most of the time, writes wait
for the transaction in flight before their own goes out, and the commit hops of the
latency split grow with the load. The coordinators' Prometheus pages say by how much
(`agentmesh_etcd_commit_*`): the harness reads them before and after the run, like
etcd's disk (`etcd_disk`), and sums over the coordinators it could read at both ends.
Parsing and arithmetic are pure; only `etcd_disk.scrape` does I/O.
"""

from __future__ import annotations

from typing import Any

from loadtest.etcd_disk import Histogram, delta, figures, parse

HISTOGRAMS = {
    "wait": "agentmesh_etcd_commit_wait_seconds",
    "round_trip": "agentmesh_etcd_commit_seconds",
    "writes": "agentmesh_etcd_commit_writes",
}
BUSY = "agentmesh_etcd_commit_busy_seconds_total"


def busy_seconds(text: str) -> float:
    """The busy counter of one /metrics page (0 before the first transaction)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == BUSY:
            return float(value)
    return 0.0


def summarise(pages: list[tuple[str, str]], window_s: float) -> dict[str, Any]:
    """The report's `commits` section from (before, after) /metrics pages, one pair per
    coordinator, read `window_s` seconds apart. Empty when no transaction was seen."""
    total = {name: Histogram() for name in HISTOGRAMS}
    busy = 0.0
    for before, after in pages:
        first, last = parse(before, HISTOGRAMS), parse(after, HISTOGRAMS)
        for name in HISTOGRAMS:
            if name in last:
                d = delta(first.get(name, Histogram()), last[name])
                acc = total[name]
                for le, n in d.buckets.items():
                    acc.buckets[le] = acc.buckets.get(le, 0.0) + n
                acc.total_s += d.total_s
                acc.count += d.count
        busy += busy_seconds(after) - busy_seconds(before)
    txns = total["writes"]
    if txns.count <= 0:
        return {}
    return {
        "transactions": int(txns.count),
        "writes": int(txns.total_s),  # the histogram's sum: writes, not seconds
        "writes_per_transaction": round(txns.total_s / txns.count, 2),
        "busy_s": round(busy, 3),
        "busy_pct": round(100.0 * busy / window_s, 1) if window_s > 0 else None,
        "wait": figures(total["wait"]),
        "round_trip": figures(total["round_trip"]),
    }


def describe(commits: dict[str, Any]) -> str:
    """One line for the text report."""
    wait, trip = commits["wait"], commits["round_trip"]
    read, all_ = commits.get("coordinators_read", 0), commits.get("coordinators", 0)
    partial = (
        f" (read from {read} of {all_} coordinators: the others did not answer before and "
        "after the run, and their commits are not counted)"
        if read < all_
        else ""
    )
    return (
        f"leader's etcd commits over the run: {commits['transactions']:,} transactions of "
        f"{commits['writes_per_transaction']} task writes, one in flight "
        f"{commits['busy_pct']} % of the time; a write waited mean {wait['mean_ms']} ms "
        f"(P99 {_bound(wait)}) for its transaction to leave, which took mean "
        f"{trip['mean_ms']} ms (P99 {_bound(trip)}){partial}"
    )


def _bound(timing: dict[str, Any]) -> str:
    p99 = timing["p99_le_ms"]
    return f"≤ {p99} ms" if p99 is not None else "past the last bucket, 1 s"
