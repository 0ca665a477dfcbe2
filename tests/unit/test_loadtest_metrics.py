"""The load test's measurements: HdrHistogram percentiles, throughput buckets, counters."""

from __future__ import annotations

import pytest

from loadtest.metrics import (
    COUNTER_NAMES,
    HIGHEST_US,
    Counters,
    LatencyRecorder,
    RunMetrics,
    ThroughputSeries,
    merge_all,
)


def uniform_1_to_10000_us() -> LatencyRecorder:
    rec = LatencyRecorder("uniform")
    for v in range(1, 10_001):
        rec.record_us(v)
    return rec


def test_percentiles_of_a_known_input_are_within_three_significant_digits() -> None:
    s = uniform_1_to_10000_us().summary()
    assert s.count == 10_000
    # 1..10,000 µs: the q-th percentile is q * 100 µs; HdrHistogram keeps 3 digits (0.1 %)
    assert s.p50_ms == pytest.approx(5.0, rel=1e-3)
    assert s.p95_ms == pytest.approx(9.5, rel=1e-3)
    assert s.p99_ms == pytest.approx(9.9, rel=1e-3)
    assert s.p999_ms == pytest.approx(9.99, rel=1e-3)
    assert s.max_ms == pytest.approx(10.0, rel=1e-3)
    assert s.min_ms == pytest.approx(0.001)
    assert s.mean_ms == pytest.approx(5.0005, rel=1e-3)


def test_a_single_value_is_every_percentile() -> None:
    rec = LatencyRecorder("one")
    rec.record_ms(2.5)
    s = rec.summary()
    assert s.p50_ms == s.p99_ms == s.max_ms == pytest.approx(2.5, rel=1e-3)


def test_an_empty_recorder_reports_zeros() -> None:
    s = LatencyRecorder("empty").summary()
    assert s.count == 0
    assert s.p99_ms == 0.0
    assert LatencyRecorder("empty").percentile_curve() == []
    assert LatencyRecorder("empty").log_buckets() == []


def test_out_of_range_samples_are_clamped_and_counted() -> None:
    rec = LatencyRecorder("clamp")
    rec.record_us(-250)  # an agent's clock ran ahead of the client's acknowledgement
    rec.record_us(0.2)
    rec.record_s(120.0)
    s = rec.summary()
    assert s.count == 3
    assert s.clamped_low == 2
    assert s.clamped_high == 1
    assert s.min_ms == pytest.approx(0.001)
    assert s.max_ms == pytest.approx(HIGHEST_US / 1000, rel=1e-3)


def test_units_agree() -> None:
    a, b, c = LatencyRecorder("a"), LatencyRecorder("b"), LatencyRecorder("c")
    a.record_s(0.0015)
    b.record_ms(1.5)
    c.record_us(1500)
    assert a.summary().p50_ms == b.summary().p50_ms == c.summary().p50_ms


def test_merge_adds_samples_and_clamp_counts() -> None:
    a, b = LatencyRecorder("a"), LatencyRecorder("b")
    for v in range(1, 101):
        a.record_us(v)
    for v in range(101, 201):
        b.record_us(v)
    b.record_us(-1)
    merged = merge_all([a, b], "all")
    assert merged.count == 201
    assert merged.clamped_low == 1
    assert merged.summary().max_ms == pytest.approx(0.2, rel=1e-3)


def test_percentile_curve_is_monotonic_and_ends_at_the_maximum() -> None:
    rec = uniform_1_to_10000_us()
    curve = rec.percentile_curve()
    pcts = [p for p, _ in curve]
    values = [v for _, v in curve]
    assert pcts == sorted(pcts)
    assert values == sorted(values)
    assert pcts[-1] == 100.0
    assert values[-1] == pytest.approx(10.0, rel=1e-3)
    # dense towards the tail: more points above 99 % than a linear spacing would give
    assert sum(1 for p in pcts if p > 99.0) >= 10


def test_log_buckets_hold_every_sample() -> None:
    rec = uniform_1_to_10000_us()
    buckets = rec.log_buckets(buckets_per_decade=10)
    assert sum(c for _, _, c in buckets) == 10_000
    for (lo, hi, _), (lo2, _, _) in zip(buckets, buckets[1:], strict=False):
        assert lo < hi == pytest.approx(lo2)
    assert buckets[0][0] <= 0.001 <= buckets[0][1]


def test_encoded_histogram_decodes_to_the_same_counts() -> None:
    from hdrh.histogram import HdrHistogram

    rec = uniform_1_to_10000_us()
    decoded = HdrHistogram.decode(rec.encode())
    assert decoded.get_total_count() == 10_000
    assert decoded.get_value_at_percentile(99.0) == pytest.approx(9900, rel=1e-3)


def test_throughput_counts_per_bucket_from_the_start() -> None:
    tp = ThroughputSeries(start_s=100.0)
    for t in (100.1, 100.5, 101.2, 103.9, 103.95):
        tp.record(t)
    tp.record(102.0, n=3)
    assert tp.series() == [2, 1, 3, 2]
    assert tp.total == 8
    assert tp.peak_per_s() == 3
    assert tp.rate_per_s() == pytest.approx(8 / 3.95)
    # the first and last buckets are ramp-up and drain
    assert tp.steady_rate_per_s() == pytest.approx(2.0)


def test_throughput_before_the_start_falls_in_the_first_bucket() -> None:
    tp = ThroughputSeries(start_s=10.0, bucket_s=0.5)
    tp.record(9.0)
    tp.record(10.6)
    assert tp.series() == [1, 1]


def test_throughput_rejects_a_zero_bucket() -> None:
    with pytest.raises(ValueError, match="bucket_s"):
        ThroughputSeries(start_s=0.0, bucket_s=0)


def test_counters_always_report_the_standard_names() -> None:
    c = Counters()
    assert set(COUNTER_NAMES) <= set(c.as_dict())
    c.inc("errors")
    c.inc("rpc_retries", 3)
    assert c["errors"] == 1
    assert c["rpc_retries"] == 3
    assert c["never_touched"] == 0


def test_run_metrics_creates_recorders_on_first_use() -> None:
    m = RunMetrics(start_s=0.0)
    m.latency("dispatch").record_ms(1.0)
    assert m.latency("dispatch").count == 1
    m.add_sample("reassign_s", 0.4)
    assert m.samples == {"reassign_s": [0.4]}
    assert [s.name for s in m.summaries()] == ["dispatch"]
