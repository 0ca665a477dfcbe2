"""A `Target` backed by `services.cluster.LocalCluster`: real processes on 127.0.0.1.

The cluster starts with no agents: the harness spawns them through the
AgentPool API so that spawn time and time-to-ready are measured in every run.
It is stopped on the way out whatever happens (Ctrl-C included).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from loadtest.target import Target, read_cpu_seconds, read_rss_bytes

READY_TIMEOUT_S = 90.0


@asynccontextmanager
async def local_cluster(
    *,
    pools: int = 2,
    coordinators: int = 1,
    capacity: int = 1,
    warm_per_pool: int = 0,
    data_dir: Path | None = None,
    keep_data: bool = False,
    health_monitors: int = 1,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Target]:
    """Start etcd, coordinators and agent pools (0 agents each); yield their `Target`.

    Args:
        pools: agent-pool processes (several, so both cores are used).
        coordinators: coordinator replicas (one leads).
        capacity: tasks each agent runs at once.
        warm_per_pool: agents each pool keeps pre-started (for the spawn scenario).
        data_dir: etcd data and logs (default: a temporary directory).
        keep_data: keep the directory afterwards (logs for a post-mortem).
        health_monitors: health monitor replicas (one active).
        env: extra environment for every process (a scenario's SIMULATED faults).
    """
    from services.cluster import ClusterSpec, LocalCluster

    owned = data_dir is None
    root = data_dir or Path(tempfile.mkdtemp(prefix="agentmesh-loadtest-"))
    env = dict(env or {})
    if warm_per_pool:
        env["AGENTMESH_WARM"] = str(warm_per_pool)
    # the task scenarios measure the coordinator path: no consensus process competes
    # for the CPU (the `consensus` scenario starts its own cluster, loadtest/consensus.py)
    spec = ClusterSpec(
        data_dir=root,
        agents=0,
        pools=pools,
        coordinators=coordinators,
        health_monitors=health_monitors,
        consensus=0,
        capacity=capacity,
        env=env,
        coordinator_metrics=True,  # the report reads the leader's group commit from them
    )
    cluster = LocalCluster(spec)
    loop = asyncio.get_running_loop()
    try:
        t0 = loop.time()
        await asyncio.to_thread(cluster.start)
        await cluster.wait_ready(timeout_s=READY_TIMEOUT_S, agents=0)
        started_s = loop.time() - t0

        async def kill(instance_id: str) -> None:
            _known(cluster, instance_id)
            await asyncio.to_thread(cluster.kill, instance_id)

        async def restart(instance_id: str) -> None:
            _known(cluster, instance_id)
            await asyncio.to_thread(cluster.restart, instance_id)

        async def restart_etcd(down_s: float) -> None:
            await asyncio.to_thread(cluster.etcd.stop)
            await asyncio.sleep(down_s)
            await asyncio.to_thread(cluster.etcd.start)

        async def kill_etcd() -> None:
            await asyncio.to_thread(cluster.etcd.kill)

        async def start_etcd() -> None:
            await asyncio.to_thread(cluster.etcd.start)

        def cpu() -> dict[str, float]:
            return {
                name: read_cpu_seconds(proc.pid)
                for name, proc in cluster.procs.items()
                if proc.poll() is None
            }

        def pids() -> dict[str, int]:
            live = {name: proc.pid for name, proc in cluster.procs.items() if proc.poll() is None}
            etcd = cluster.etcd.proc
            if etcd is not None and etcd.poll() is None:
                live["etcd"] = etcd.pid
            return live

        def rss() -> dict[str, int]:
            return {
                name: read_rss_bytes(proc.pid)
                for name, proc in cluster.procs.items()
                if proc.poll() is None
            }

        yield Target(
            coordinator_target=cluster.coordinator_endpoints[0],
            standby_targets=tuple(cluster.coordinator_endpoints[1:]),
            pools=pools,
            kill=kill,
            restart=restart,
            restart_etcd=restart_etcd,
            kill_etcd=kill_etcd,
            start_etcd=start_etcd,
            process_rss=rss,
            process_cpu=cpu,
            process_pids=pids,
            description=(
                f"local cluster: etcd, {coordinators} coordinator(s), "
                f"{health_monitors} health monitor(s), {pools} agent pool(s), "
                f"agents of capacity {capacity}"
            ),
            info={
                "etcd": cluster.etcd_endpoint,
                "coordinators": list(cluster.coordinator_endpoints),
                "coordinator_metrics": list(cluster.coordinator_metrics),
                "pools": pools,
                "processes_started_s": round(started_s, 3),
                "data_dir": str(root) if keep_data or not owned else "",
            },
        )
    finally:
        await asyncio.to_thread(cluster.stop)
        if owned and not keep_data:
            shutil.rmtree(root, ignore_errors=True)


def _known(cluster: Any, instance_id: str) -> None:
    # LocalCluster names its processes after the ids they register (pool-1, coordinator-1)
    if instance_id not in cluster.procs:
        raise KeyError(f"no process {instance_id!r} in this cluster: {sorted(cluster.procs)}")
