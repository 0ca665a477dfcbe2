"""The Celery peer on a tiny workload: real redis-server, real worker, everything stopped."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest

from loadtest import procs
from loadtest.workload import Workload

celery = pytest.importorskip("celery")
pytest.importorskip("redis")


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen[bytes]]:
    """Every process the peer starts, to check that each one is gone afterwards."""
    seen: list[subprocess.Popen[bytes]] = []
    real = procs.start

    def recording(*args: Any, **kw: Any) -> subprocess.Popen[bytes]:
        proc = real(*args, **kw)
        seen.append(proc)
        return proc

    monkeypatch.setattr(procs, "start", recording)
    return seen


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_celery_peer_runs_a_small_workload_and_stops_everything(
    started: list[subprocess.Popen[bytes]],
) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    from loadtest.celery_peer import CeleryPeerConfig, run_celery

    w = Workload(max_tasks=200, duration_s=20.0, concurrency=50, drain_timeout_s=20.0)
    result = run_celery(w, config=CeleryPeerConfig(concurrency=50, startup_timeout_s=60))
    assert result.system == "celery"
    assert result.ok, (result.lost, result.unfinished, result.duplicated)
    assert result.submitted == result.acknowledged == result.completed == 200
    assert result.terminal_states == {"SUCCEEDED": 200}
    assert result.metrics.latency("dispatch").count == 200
    assert result.metrics.latency("end_to_end").count == 200
    assert result.metrics.throughput.total == 200
    assert result.extra["worker_ready_s"] > 0
    # redis-server and the worker, both exited
    assert len(started) == 2
    assert all(p.poll() is not None for p in started)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_celery_peer_stops_redis_when_the_worker_cannot_start(
    started: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from loadtest import celery_peer

    def broken_start(self: celery_peer.CeleryWorker) -> None:
        self.proc = procs.start(["false"], log_path=self.log_path)

    monkeypatch.setattr(celery_peer.CeleryWorker, "start", broken_start)
    w = Workload(max_tasks=10, duration_s=5.0)
    with pytest.raises(celery_peer.PeerError, match="worker exited"):
        celery_peer.run_celery(w, config=celery_peer.CeleryPeerConfig(startup_timeout_s=10))
    assert started
    assert all(p.poll() is not None for p in started)
