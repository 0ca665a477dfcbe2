"""The harness's open loop on SubmitStream, through a SIGKILLed leader: the stream
breaks with tasks unanswered (some written, some not), and they go again on a new
stream to the next leader; the exactly-once check must hold."""

from __future__ import annotations

import pytest

from loadtest.cluster import local_cluster
from loadtest.scenarios import ScenarioOptions, run_agentmesh
from loadtest.workload import Workload

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


async def test_a_submit_stream_through_a_killed_leader_loses_and_doubles_nothing(
    etcd_binary: str,
) -> None:
    workload = Workload(
        max_tasks=3000,
        duration_s=6.0,
        rate_per_s=300.0,
        stream=True,
        drain_timeout_s=40.0,
    )
    async with local_cluster(pools=2, coordinators=2) as target:
        result = await run_agentmesh(
            "leader-kill", target, workload, ScenarioOptions(agents=20, kill_at_s=2.0)
        )
    assert result.ok, (result.lost[:5], result.unfinished[:5], result.duplicated[:5])
    assert result.submitted == result.acknowledged == result.completed
    assert result.metrics.counters["errors"] == 0
    # the stream broke and was opened again at least once
    assert result.metrics.counters["rpc_retries"] >= 1
    assert any(m.label == "leader killed" for m in result.markers)
