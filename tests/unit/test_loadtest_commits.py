"""The leader's group commit in the load-test report: the coordinators' /metrics pages
read before and after a run become one summary."""

from __future__ import annotations

from loadtest.commits import describe, summarise


def page(txns: int, writes: int, waits_under_1ms: int, waits: int, busy: float) -> str:
    """A coordinator's page: `txns` transactions of `writes` writes in all, each of them
    100 ms; `waits` waits of 1 ms each, `waits_under_1ms` of them in the 1 ms bucket."""
    lines = [
        "# TYPE agentmesh_etcd_commit_writes histogram",
        f'agentmesh_etcd_commit_writes_bucket{{le="1.0"}} {txns}',
        f'agentmesh_etcd_commit_writes_bucket{{le="+Inf"}} {txns}',
        f"agentmesh_etcd_commit_writes_count {txns}",
        f"agentmesh_etcd_commit_writes_sum {writes}",
        f'agentmesh_etcd_commit_seconds_bucket{{le="0.1"}} {txns}',
        f'agentmesh_etcd_commit_seconds_bucket{{le="+Inf"}} {txns}',
        f"agentmesh_etcd_commit_seconds_count {txns}",
        f"agentmesh_etcd_commit_seconds_sum {0.1 * txns}",
        f'agentmesh_etcd_commit_wait_seconds_bucket{{le="0.001"}} {waits_under_1ms}',
        f'agentmesh_etcd_commit_wait_seconds_bucket{{le="0.002"}} {waits}',
        f'agentmesh_etcd_commit_wait_seconds_bucket{{le="+Inf"}} {waits}',
        f"agentmesh_etcd_commit_wait_seconds_count {waits}",
        f"agentmesh_etcd_commit_wait_seconds_sum {0.001 * waits}",
        "# TYPE agentmesh_etcd_commit_busy_seconds counter",
        f"agentmesh_etcd_commit_busy_seconds_total {busy}",
        "agentmesh_etcd_commit_busy_seconds_created 1.7e9",
    ]
    return "\n".join(lines) + "\n"


def test_only_the_runs_commits_count_summed_over_the_coordinators_read() -> None:
    # coordinator 1 led the run: 10 → 110 transactions, 10 → 310 writes, 2 s busy of 4 s;
    # coordinator 2 took over at the end: 5 transactions of 20 writes, 0.5 s busy
    pages = [
        (page(10, 10, 10, 10, 1.0), page(110, 310, 307, 310, 3.0)),
        (page(0, 0, 0, 0, 0.0), page(5, 20, 20, 20, 0.5)),
    ]
    out = summarise(pages, window_s=4.0)
    assert out["transactions"] == 105
    assert out["writes"] == 320
    assert out["writes_per_transaction"] == round(320 / 105, 2)
    assert out["busy_s"] == 2.5
    assert out["busy_pct"] == 62.5
    assert out["round_trip"]["mean_ms"] == 100.0
    assert out["round_trip"]["p99_le_ms"] == 100.0
    # 320 waits of 1 ms: 317 in the 1 ms bucket, 3 in the 2 ms one (P99 is the 317th)
    assert out["wait"]["mean_ms"] == 1.0
    assert out["wait"]["p50_le_ms"] == 1.0
    assert out["wait"]["p99_le_ms"] == 1.0
    line = describe(out)
    assert "105 transactions of 3.05 task writes" in line
    assert "one in flight 62.5 % of the time" in line
    assert "which took mean 100.0 ms (P99 ≤ 100.0 ms)" in line
    assert "read from" not in line
    # a leader killed during the run cannot be read at the end: the line says so
    out.update(coordinators_read=1, coordinators=2)
    assert "(read from 1 of 2 coordinators" in describe(out)


def test_no_transaction_in_the_window_gives_nothing() -> None:
    same = page(10, 10, 10, 10, 1.0)
    assert summarise([(same, same)], window_s=2.0) == {}
    assert summarise([], window_s=2.0) == {}
    # a page without the metrics (a coordinator of an older release) counts nothing
    assert summarise([("", "")], window_s=2.0) == {}
