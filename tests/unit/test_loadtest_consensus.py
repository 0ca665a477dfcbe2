"""The consensus load-test scenario's plumbing (no cluster)."""

from __future__ import annotations

import os

from loadtest.consensus import ConsensusLoad, PhaseResult, _env, cpu_seconds
from loadtest.metrics import LatencyRecorder


def test_faulty_voters_reach_every_pool_through_the_environment() -> None:
    env = _env(ConsensusLoad(byzantine="forge:1,equivocate:2", dead=3))
    assert env == {"AGENTMESH_BYZANTINE": "forge:1,equivocate:2,silent:3"}
    assert _env(ConsensusLoad(byzantine="", dead=0)) == {}


def test_cpu_of_a_process_comes_from_proc() -> None:
    before = cpu_seconds(os.getpid())
    sum(i * i for i in range(300_000))
    assert cpu_seconds(os.getpid()) > before
    assert cpu_seconds(2**22 + 12345) == 0.0  # no such process


def test_a_phase_reports_percentiles_rates_and_cpu_per_proposal() -> None:
    result = PhaseResult("QUORUM", LatencyRecorder("c"), LatencyRecorder("s"))
    for ms in range(1, 101):
        result.client.record_ms(ms)
        result.service.record_ms(ms / 2)
    result.wall_s = 2.0
    result.revisions = 500
    result.cpu_s = {"consensus-1": 1.0}
    doc = result.doc()
    assert doc["proposals"] == 100
    assert 94 <= doc["client_latency_ms"]["p95_ms"] <= 96
    assert doc["decisions_per_s"] == 50.0
    assert doc["etcd_revisions_per_proposal"] == 5.0
    assert doc["cpu_ms_per_proposal"] == {"consensus-1": 10.0}
