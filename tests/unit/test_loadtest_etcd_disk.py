"""etcd's disk histograms over a run: parsing /metrics, the difference, bucket bounds."""

from __future__ import annotations

from loadtest.etcd_disk import Histogram, parse, percentile_bound_ms, summarise

PAGE = """\
# HELP etcd_disk_wal_fsync_duration_seconds The latency distributions of fsync called by WAL.
# TYPE etcd_disk_wal_fsync_duration_seconds histogram
etcd_disk_wal_fsync_duration_seconds_bucket{le="0.001"} {a}
etcd_disk_wal_fsync_duration_seconds_bucket{le="0.002"} {b}
etcd_disk_wal_fsync_duration_seconds_bucket{le="0.004"} {c}
etcd_disk_wal_fsync_duration_seconds_bucket{le="+Inf"} {c}
etcd_disk_wal_fsync_duration_seconds_sum {s}
etcd_disk_wal_fsync_duration_seconds_count {c}
etcd_disk_backend_commit_duration_seconds_bucket{le="0.001"} 5
etcd_disk_backend_commit_duration_seconds_bucket{le="+Inf"} 5
etcd_disk_backend_commit_duration_seconds_sum 0.002
etcd_disk_backend_commit_duration_seconds_count 5
etcd_server_proposals_committed_total 42
"""


def page(a: int, b: int, c: int, s: float) -> str:
    return (
        PAGE.replace("{a}", str(a))
        .replace("{b}", str(b))
        .replace("{c}", str(c))
        .replace("{s}", str(s))
    )


def test_only_the_runs_fsyncs_count_and_percentiles_are_bucket_bounds() -> None:
    # before: 10 fsyncs all under 1 ms; the run adds 90 under 1 ms, 8 under 2, 2 under 4
    out = summarise(page(10, 10, 10, 0.005), page(100, 108, 110, 0.005 + 0.1))
    fsync = out["wal_fsync"]
    assert fsync["count"] == 100
    assert fsync["mean_ms"] == 1.0
    assert fsync["p50_le_ms"] == 1.0
    assert fsync["p99_le_ms"] == 4.0
    # unchanged between the readings: nothing observed
    assert out["backend_commit"]["count"] == 0
    assert out["backend_commit"]["mean_ms"] is None


def test_other_metrics_are_ignored_and_an_empty_page_gives_nothing() -> None:
    assert set(parse(page(1, 1, 1, 0.0))) == {"wal_fsync", "backend_commit"}
    assert summarise("", "") == {}


def test_a_percentile_past_the_last_finite_bucket_has_no_bound() -> None:
    hist = Histogram({0.001: 1.0, float("inf"): 2.0}, 1.0, 2.0)
    assert percentile_bound_ms(hist, 99.0) is None
    assert percentile_bound_ms(Histogram(), 50.0) is None
