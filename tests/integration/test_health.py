"""The health monitor with real processes: the five cases of issue 11.

- an agent whose executor hangs while its streams stay open: its task finishes elsewhere;
- a pool frozen by a blocking executor: the same;
- a pool killed with SIGKILL: its agents are replaced;
- a pool stopped with SIGTERM: its agents say goodbye and are forgotten, not replaced;
- an agent that fails every task: ejected, then let back in (half-open);
- the active monitor killed with SIGKILL: the standby takes over and declares no agent
  FAILED for having been silent during the switch;
- the active monitor stopped (SIGSTOP) past the FAILED threshold and resumed: it counts
  its own pause against no agent.

The faults are the SIMULATED ones (`hang`, `block` executors, `flaky_agents`). Figures
printed here (run with -s) are observations; timing targets belong to the load test.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import pytest

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import health_pb2 as hpb
from protos.agentmesh.v1 import task_pb2 as tpb
from registry.errors import StoreUnavailableError
from services.client import MeshClient
from services.cluster import LocalCluster
from services.health.client import HealthClient, NoMonitorError
from tests.integration.test_cluster import GRPCURL, agentmesh_cmd, run_command

pytestmark = pytest.mark.integration

T = TypeVar("T")
S = tpb.TaskState
SUCCEEDED = S.TASK_STATE_SUCCEEDED
HELD = {S.TASK_STATE_ASSIGNED, S.TASK_STATE_RUNNING}
# Bounds that only catch a hang; what they wait for takes 0.1 to 10 s.
HANG_S = 30.0
FAULT_KINDS = {
    "AGENTMESH_TASK_KINDS": "echo,sleep,noop,fail,hang,block",
    "AGENTMESH_KINDS": "echo,sleep,noop,fail,hang,block",
}


async def eventually(
    check: Callable[[], Awaitable[T | None]], what: str, timeout_s: float = HANG_S
) -> T:
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        try:
            got = await check()
            if got:
                return got
        except (grpc.aio.AioRpcError, StoreUnavailableError, NoMonitorError, OSError) as err:
            last = err
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s (last error: {last!r})")
        await asyncio.sleep(0.1)


def health(c: LocalCluster) -> HealthClient:
    return HealthClient(etcd=c.etcd_endpoint, cluster=c.spec.cluster)


async def summary(c: LocalCluster) -> hpb.HealthSummary:
    async with health(c) as hc:
        return await hc.summary()


async def all_reporting(c: LocalCluster, agents: int) -> hpb.HealthSummary | None:
    s = await summary(c)
    return s if s.reporting >= agents and s.state_counts["HEALTHY"] >= agents else None


async def held_by(client: MeshClient, task_id: str) -> tpb.Task | None:
    t = await client.get(task_id)
    return t if t.state in HELD and t.agent_id else None


async def succeeded(client: MeshClient, task_id: str) -> tpb.Task | None:
    t = await client.get(task_id)
    return t if t.state == SUCCEEDED else None


@pytest.mark.timeout(90)
async def test_a_hung_executor_has_its_task_finished_on_another_agent(cluster: Any) -> None:
    c: LocalCluster = await cluster(
        agents=4, pools=2, env={**FAULT_KINDS, "AGENTMESH_STALL_LIMIT_S": "2"}
    )
    await eventually(lambda: all_reporting(c, 4), "every agent reporting")
    async with MeshClient(etcd=c.etcd_endpoint) as client:
        sub = await client.submit(
            tpb.TaskSpec(
                task_id="hung-1", kind="hang", payload=json.dumps({"attempts": 1}).encode()
            )
        )
        first = await eventually(lambda: held_by(client, sub.task.task_id), "first assignment")
        done = await eventually(lambda: succeeded(client, sub.task.task_id), "the task done")
    assert done.attempts == 2
    assert done.agent_id != first.agent_id, "it finished on the agent it hung on"
    assert "released by the health monitor: hung" in done.last_error
    assert b'"simulated": true' in done.result
    async with health(c) as hc:
        s = await hc.summary()
        assert s.hung_released == 1
        hung = await hc.get(first.agent_id)
        # the coordinator's cancel stopped the stuck coroutine: the agent is kept
        assert hung.state == hpb.HEALTH_STATE_HEALTHY
        assert hung.hung_tasks == 1
        assert not hung.replaced_by
    took = (done.assigned_at_us - first.assigned_at_us) / 1e6
    print(
        f"\nhang: first assignment → running on {done.agent_id} after {took:.3f} s (stall limit 2 s)"
    )


@pytest.mark.timeout(90)
async def test_a_pool_frozen_by_a_blocking_executor_has_its_tasks_finished_elsewhere(
    cluster: Any,
) -> None:
    c: LocalCluster = await cluster(agents=6, pools=2, env=FAULT_KINDS)
    await eventually(lambda: all_reporting(c, 6), "every agent reporting")
    async with MeshClient(etcd=c.etcd_endpoint) as client:
        sub = await client.submit(
            tpb.TaskSpec(
                task_id="freeze-1",
                kind="block",
                payload=json.dumps({"attempts": 1, "block_s": 6}).encode(),
            )
        )
        first = await eventually(lambda: held_by(client, sub.task.task_id), "first assignment")
        frozen_pool = first.agent_id.rsplit("-a", 1)[0]
        done = await eventually(lambda: succeeded(client, sub.task.task_id), "the task done")
        assert done.attempts == 2
        assert not done.agent_id.startswith(frozen_pool + "-"), "it finished in the frozen pool"
        took = (done.assigned_at_us - first.assigned_at_us) / 1e6
        print(f"\nfrozen pool {frozen_pool}: its task running elsewhere after {took:.3f} s")
        # the freeze (6 s) was shorter than failed_after_s (10 s): the frozen agents were
        # DEGRADED or CRITICAL for a while, none FAILED, and all take work again
        await eventually(lambda: all_reporting(c, 6), "every agent healthy again")
        s = await summary(c)
        assert s.failed_declared == 0
        specs = [tpb.TaskSpec(task_id=f"after-{i}", kind="echo") for i in range(30)]
        await client.submit_batch(specs)
        for spec in specs:
            await eventually(lambda t=spec.task_id: succeeded(client, t), "tasks after the thaw")


@pytest.mark.timeout(90)
async def test_a_pool_killed_with_sigkill_has_its_agents_replaced(cluster: Any) -> None:
    c: LocalCluster = await cluster(agents=6, pools=2, env={"AGENTMESH_RECONNECT_GRACE_S": "2"})
    await eventually(lambda: all_reporting(c, 6), "every agent reporting")
    async with MeshClient(etcd=c.etcd_endpoint) as client:
        before = {a.agent_id for a in (await client.agents()).agents}
        killed = {a for a in before if a.startswith("pool-1-")}
        t0 = time.monotonic()
        c.kill("pool-1", signal.SIGKILL)

        async def replaced() -> set[str] | None:
            now = {a.agent_id for a in (await client.agents()).agents}
            return now if len(now) == 6 and not now & killed else None

        after = await eventually(replaced, "six agents again, none of the killed pool's")
        took = time.monotonic() - t0
    assert all(a.startswith("pool-2-") for a in after)
    await eventually(lambda: all_reporting(c, 6), "the replacements reporting")
    async with health(c) as hc:
        failed = [a async for a in hc.agents([hpb.HEALTH_STATE_FAILED])]
        assert {a.agent_id for a in failed} == killed
        successors = {a.replaced_by for a in failed}
        assert successors == after - before
        assert all("stream closed" in a.reason for a in failed)
        for a in failed:
            assert (await hc.get(a.replaced_by)).replaces == a.agent_id
    # what an operator sees
    etcd = ["--etcd", c.etcd_endpoint]
    code, out, err = await run_command(
        *agentmesh_cmd(), "health", "agents", "--state", "failed", *etcd
    )
    assert code == 0, out + err
    assert "3 agents" in out, out
    for agent_id in killed:
        assert agent_id in out, out
    code, out, err = await run_command(*agentmesh_cmd(), "status", *etcd)
    assert code == 0, out + err
    assert "HEALTHY 6" in out, out
    assert "FAILED 3" in out, out
    assert "state" in out, out  # the open alerts: three FAILED agents
    print(f"\npool-1 killed: {len(killed)} agents replaced in pool-2 within {took:.2f} s")


@pytest.mark.timeout(90)
async def test_a_pool_stopped_with_sigterm_says_goodbye_and_is_not_replaced(
    cluster: Any,
) -> None:
    # the SIGKILL test's cluster, stopped on purpose instead: its agents leave, and
    # nothing of what a dead pool's agents get (FAILED, alerts, replacements) happens
    c: LocalCluster = await cluster(agents=4, pools=2, env={"AGENTMESH_RECONNECT_GRACE_S": "2"})
    await eventually(lambda: all_reporting(c, 4), "every agent reporting")
    async with MeshClient(etcd=c.etcd_endpoint) as client:
        stopped = {a.agent_id for a in (await client.agents()).agents if a.pool_id == "pool-1"}
    assert len(stopped) == 2
    events: list[hpb.HealthEvent] = []

    async def watch() -> None:
        async with health(c) as hc:
            async for event in hc.watch():
                events.append(event)

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.sleep(0.5)  # the watch open
        c.stop_process("pool-1")  # SIGTERM, and wait for it to exit
        assert c.procs["pool-1"].returncode == 0
        await asyncio.sleep(2 + 3)  # past reconnect_grace_s, and a replacement's start
    finally:
        watcher.cancel()
    changes = [e.change for e in events if e.WhichOneof("body") == "change"]
    left = {ch.agent_id for ch in changes if ch.removed and ch.reason == "the agent left"}
    assert left == stopped, changes
    failed = [ch.agent_id for ch in changes if ch.state == hpb.HEALTH_STATE_FAILED]
    assert not failed, f"declared FAILED after a clean stop: {failed}"
    assert not [e for e in events if e.WhichOneof("body") in ("alert", "recovery")], events
    s = await summary(c)
    assert (s.failed_declared, s.replacements, s.open_alert_count) == (0, 0, 0)
    assert s.reporting == 2
    assert s.state_counts["HEALTHY"] == 2
    async with MeshClient(etcd=c.etcd_endpoint) as client:
        now = {a.agent_id for a in (await client.agents()).agents}
    assert len(now) == 2
    assert not now & stopped


@pytest.mark.timeout(90)
async def test_an_agent_that_fails_every_task_is_ejected_and_let_back_in(cluster: Any) -> None:
    c: LocalCluster = await cluster(
        agents=4,
        pools=1,
        env={"AGENTMESH_FLAKY_AGENTS": "1", "AGENTMESH_EJECTION_BASE_S": "3"},
    )
    flaky = "pool-1-a0001"
    await eventually(lambda: all_reporting(c, 4), "every agent reporting")
    breaker: list[tuple[int, int]] = []  # (monitor wall clock µs, breaker state)
    assigned: list[tuple[int, str]] = []  # (coordinator wall clock µs, agent)

    async with MeshClient(etcd=c.etcd_endpoint) as client, health(c) as hc:

        async def watch_health() -> None:
            async for e in hc.watch([flaky]):
                if e.WhichOneof("body") == "change":
                    breaker.append((e.at_us, e.change.breaker))

        async def watch_tasks() -> None:
            async for e in client.watch_events([S.TASK_STATE_ASSIGNED]):
                assigned.append((e.task.assigned_at_us, e.task.agent_id))

        watchers = [asyncio.ensure_future(watch_health()), asyncio.ensure_future(watch_tasks())]
        try:
            await asyncio.sleep(0.3)  # both watches open
            payload = json.dumps({"ms": 100}).encode()
            specs = [
                tpb.TaskSpec(
                    task_id=f"flaky-{i:03d}", kind="sleep", payload=payload, max_attempts=10
                )
                for i in range(200)
            ]
            await client.submit_batch(specs)

            async def ejected_twice() -> hpb.AgentHealth | None:
                h = await hc.get(flaky)
                return h if h.ejections >= 2 and h.breaker == hpb.BREAKER_STATE_OPEN else None

            again = await eventually(ejected_twice, "ejected, let back in, ejected again")
            for spec in specs:
                await eventually(lambda t=spec.task_id: succeeded(client, t), "every task done")
        finally:
            for w in watchers:
                w.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
    states = [b for _, b in breaker]
    OPEN, HALF_OPEN = hpb.BREAKER_STATE_OPEN, hpb.BREAKER_STATE_HALF_OPEN
    assert states[:3] == [OPEN, HALF_OPEN, OPEN], states
    opened, let_in, reopened = (t for t, _ in breaker[:3])
    assert 2.9 < (let_in - opened) / 1e6 < 4.0  # the first ejection: 3 s
    # the second lasts twice as long (6 s), counted from when it began
    assert 5.9 < (again.ejected_until_us - reopened) / 1e6 < 6.1
    # while ejected the coordinator gave it nothing (a few ms for the record to arrive)
    during = [t for t, a in assigned if a == flaky and opened + 200_000 < t < let_in]
    assert not during, f"{len(during)} tasks assigned to the ejected agent"
    trial = [t for t, a in assigned if a == flaky and let_in <= t < reopened + 1]
    assert len(trial) == 1, "half-open: exactly one task on trial"
    before = [t for t, a in assigned if a == flaky and t <= opened + 200_000]
    print(f"\nflaky agent: {len(before)} tasks failed on it before its ejection (5 in a row eject)")


@pytest.mark.timeout(90)
async def test_the_standby_monitor_takes_over_and_declares_no_agent_failed(cluster: Any) -> None:
    # tight thresholds, so an agent wrongly judged during the switch would show at once
    env = {
        "AGENTMESH_CRITICAL_AFTER_S": "3",
        "AGENTMESH_FAILED_AFTER_S": "4",
        "AGENTMESH_RECONNECT_GRACE_S": "2",
        "AGENTMESH_TAKEOVER_GRACE_S": "2",
    }
    c: LocalCluster = await cluster(agents=20, pools=2, health_monitors=2, env=env)
    first = await eventually(lambda: all_reporting(c, 20), "every agent reporting")
    t0 = time.monotonic()
    c.kill(first.monitor_id, signal.SIGKILL)

    async def taken_over() -> hpb.HealthSummary | None:
        s = await summary(c)
        return s if s.monitor_id != first.monitor_id and s.reporting >= 20 else None

    second = await eventually(taken_over, "the standby active with every agent reporting")
    took = time.monotonic() - t0
    assert second.term > first.term
    # past the takeover grace and the FAILED threshold: still nobody FAILED
    await asyncio.sleep(2 + 4 + 1)
    s = await summary(c)
    assert s.failed_declared == 0
    assert s.state_counts["FAILED"] == 0
    assert s.state_counts["HEALTHY"] == 20
    async with MeshClient(etcd=c.etcd_endpoint) as client:
        agents = (await client.agents()).agents
        assert len(agents) == 20
        assert all(a.health_admission == "" for a in agents)
    # reflection and grpc.health.v1 on the monitor, as on every service
    async with health(c) as hc:
        endpoint = await hc.active()
    code, out, err = await run_command(GRPCURL, "-plaintext", endpoint, "list")
    assert code == 0, out + err
    assert {"agentmesh.v1.HealthMonitor", "grpc.health.v1.Health"} <= set(out.split()), out
    print(
        f"\nmonitor {first.monitor_id} killed: {second.monitor_id} active with all 20 agents reporting after {took:.2f} s"
    )


@pytest.mark.timeout(90)
async def test_a_monitor_stopped_and_resumed_replaces_no_healthy_agent(cluster: Any) -> None:
    # SIGSTOP past failed_after_s, then SIGCONT. A lease TTL longer than the stop keeps
    # its term, so whatever it decides on resuming is carried out. The agents kept
    # heartbeating all along: it must not count its own pause as their silence.
    env = {
        "AGENTMESH_CRITICAL_AFTER_S": "3",
        "AGENTMESH_FAILED_AFTER_S": "4",
        "AGENTMESH_RECONNECT_GRACE_S": "2",
        "AGENTMESH_LEASE_TTL_S": "15",
    }
    c: LocalCluster = await cluster(agents=4, pools=1, env=env)
    first = await eventually(lambda: all_reporting(c, 4), "every agent reporting")
    async with MeshClient(etcd=c.etcd_endpoint) as client:
        before = sorted(a.agent_id for a in (await client.agents()).agents)
    events: list[hpb.HealthEvent] = []

    async def watch() -> None:
        async with health(c) as hc:
            async for event in hc.watch():
                events.append(event)

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.sleep(0.5)
        c.kill(first.monitor_id, signal.SIGSTOP)
        try:
            await asyncio.sleep(6)
        finally:
            c.kill(first.monitor_id, signal.SIGCONT)
        await asyncio.sleep(4)  # past reconnect_grace_s and critical_after_s once resumed
    finally:
        watcher.cancel()
    failed = [
        e.change.agent_id
        for e in events
        if e.WhichOneof("body") == "change" and e.change.state == hpb.HEALTH_STATE_FAILED
    ]
    assert not failed, f"declared FAILED after the monitor's own pause: {failed}"
    s = await summary(c)
    assert s.term == first.term  # the same term: it kept leading
    assert s.failed_declared == 0
    assert s.replacements == 0
    assert s.state_counts["HEALTHY"] == 4
    async with MeshClient(etcd=c.etcd_endpoint) as client:
        after = sorted(a.agent_id for a in (await client.agents()).agents)
    assert after == before, "healthy agents were replaced"
    assert "did not run for a while" in (c.log_dir / f"{first.monitor_id}.log").read_text()


async def test_release_claims_from_a_stale_term_is_refused(cluster: Any) -> None:
    c: LocalCluster = await cluster(agents=1, pools=1)
    s = await eventually(lambda: all_reporting(c, 1), "the agent reporting")
    async with grpc.aio.insecure_channel(c.coordinator_endpoints[0]) as channel:
        from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc

        stub = cpb_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ReleaseClaims(
                cpb.ReleaseClaimsRequest(agent_id="pool-1-a0001", health_term=s.term + 1),
                timeout=5,
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
