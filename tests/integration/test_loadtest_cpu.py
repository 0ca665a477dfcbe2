"""The load-test harness on a real local cluster: CPU per task is measured for every
server process it started, the latency split comes from the task records, and the
leader's group commit from its Prometheus page."""

from __future__ import annotations

import pytest

from loadtest.cluster import local_cluster
from loadtest.scenarios import ScenarioOptions, run_agentmesh
from loadtest.tracker import HOPS
from loadtest.workload import Workload

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_a_short_run_measures_cpu_per_task_for_every_process_role(etcd_binary: str) -> None:
    workload = Workload(max_tasks=2000, duration_s=2.0, concurrency=20, drain_timeout_s=20.0)
    async with local_cluster(pools=2) as target:
        result = await run_agentmesh("steady", target, workload, ScenarioOptions(agents=20))
    assert result.ok, (result.lost, result.unfinished, result.duplicated)
    cpu = result.cpu
    assert cpu["measured"] is True
    assert cpu["completed"] == result.completed > 0
    # etcd is not one of the cluster's service processes: it must be sampled too
    assert set(cpu["roles"]) == {"coordinator", "etcd", "pool", "health", "harness"}
    assert cpu["roles"]["pool"]["processes"] == 2
    for role, figures in cpu["roles"].items():
        assert figures["complete"] is True, role  # nothing died in a steady run
        assert figures["cpu_s"] >= 0.0, role
    # the coordinator and the harness cannot do 2 s of work for nothing
    assert cpu["roles"]["coordinator"]["ms_per_task"] > 0.0
    assert cpu["roles"]["harness"]["ms_per_task"] > 0.0
    servers = sum(f["cpu_s"] for r, f in cpu["roles"].items() if r != "harness")
    assert cpu["servers"]["cpu_s"] == pytest.approx(servers, abs=0.01)
    split = result.extra["latency_split"]
    assert list(split) == [name for name, _ in HOPS]
    assert sum(h["share_pct"] for h in split.values()) == pytest.approx(100.0, abs=0.5)
    # every task is written twice (created with its claim, then finished), each write in
    # one of the leader's transactions; the warm-up task adds its own two
    commits = result.extra["commits"]
    assert commits["coordinators_read"] == 1
    assert commits["writes"] >= 2 * result.completed
    assert 1 <= commits["transactions"] <= commits["writes"]
    assert 0.0 < commits["busy_pct"] <= 100.0
    assert commits["round_trip"]["mean_ms"] > 0.0
    assert commits["wait"]["mean_ms"] is not None
