"""What one reconcile pass and one takeover load cost at N open tasks, against a real etcd.

    .venv/bin/python benchmarks/reconcile_cost.py --open 1000,10000,50000 --retained 20000

For each N: a cluster prefix of its own in a private etcd (started here, in a temp
dir, and stopped on the way out), N open tasks created through the coordinator's own
store (fenced group commit, so each has its record and its open-index key), plus
`--retained` terminal records that the reconcile pass and the load must not read.
Then the leader's takeover `load()` is timed once and `reconcile()` `--passes` times
on a core that holds every task (so each pass finds nothing to repair): wall time,
the process's CPU time, and the bytes etcd sent, per pass. Bounded: at most a few
hundred thousand small writes; prints a table and one JSON line per N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protos.agentmesh.v1 import task_pb2 as tpb  # noqa: E402
from registry.election import Election  # noqa: E402
from registry.etcd import Etcd  # noqa: E402
from registry.etcd_server import EtcdServer  # noqa: E402
from services._common.clock import SystemClock  # noqa: E402
from services._common.latency import LatencyRecorder  # noqa: E402
from services.coordinator.config import CoordinatorConfig  # noqa: E402
from services.coordinator.core import CoordinatorCore  # noqa: E402
from services.coordinator.port import Write  # noqa: E402
from services.coordinator.store import EtcdTaskStore  # noqa: E402

PAYLOAD = b"x" * 200


def _task(task_id: str, state: int) -> tpb.Task:
    spec = tpb.TaskSpec(task_id=task_id, kind="echo", payload=PAYLOAD, max_attempts=3)
    return tpb.Task(task_id=task_id, spec=spec, state=state, term=1)  # type: ignore[arg-type]


async def _fill(store: EtcdTaskStore, prefix: str, n: int, state: int) -> None:
    for first in range(0, n, 2000):
        writes = [
            Write(_task(f"{prefix}-{i:07d}", state), 0) for i in range(first, min(n, first + 2000))
        ]
        results = await store.commit(writes)
        assert all(r.ok for r in results)


async def measure(endpoint: str, n_open: int, retained: int, passes: int) -> dict[str, object]:
    etcd = Etcd(endpoint, prefix=f"/agentmesh/bench-{n_open}-{time.monotonic_ns()}/")
    lease = await etcd.grant(60)
    election = Election(etcd, "coordinator", lease, b"bench 127.0.0.1:1")
    try:
        term = await election.campaign()
        store = EtcdTaskStore(etcd, election, SystemClock(), retention_s=0)
        await store.load()  # a new cluster's first leader marks the (empty) index complete
        t0 = time.perf_counter()
        await _fill(store, "open", n_open, tpb.TASK_STATE_QUEUED)
        await _fill(store, "done", retained, tpb.TASK_STATE_SUCCEEDED)
        fill_s = time.perf_counter() - t0

        t0, c0 = time.perf_counter(), time.process_time()
        records, claims, _ = await store.load()
        load_s, load_cpu = time.perf_counter() - t0, time.process_time() - c0
        assert len(records) == n_open
        core = CoordinatorCore(store, SystemClock(), CoordinatorConfig(), term=term, node_id="b")
        core.load(records, claims)

        walls, cpus = LatencyRecorder("reconcile"), LatencyRecorder("reconcile_cpu")
        sizes = []
        for _ in range(passes):
            t0, c0 = time.perf_counter(), time.process_time()
            stats = await core.reconcile()
            walls.record_s(time.perf_counter() - t0)
            cpus.record_s(time.process_time() - c0)
            sizes.append(stats.bytes_read)
            assert stats.open_tasks == n_open, stats
            assert stats.repairs() == 0, stats
        await core.close()
        return {
            "open_tasks": n_open,
            "retained_terminal": retained,
            "fill_s": round(fill_s, 2),
            "load_ms": round(load_s * 1000, 1),
            "load_cpu_ms": round(load_cpu * 1000, 1),
            "reconcile_passes": passes,
            "reconcile_ms_p50": round(walls.percentile_ms(50), 2),
            "reconcile_ms_max": round(walls.max_ms(), 2),
            "reconcile_cpu_ms_p50": round(cpus.percentile_ms(50), 2),
            "reconcile_bytes": max(sizes),
            "bytes_per_open_task": round(max(sizes) / max(1, n_open), 1),
        }
    finally:
        await etcd.revoke(lease)
        await etcd.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--open", default="1000,10000", help="comma-separated N of open tasks")
    parser.add_argument("--retained", type=int, default=10000, help="terminal records per N")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--etcd", default="", help="an etcd to use (default: start one)")
    args = parser.parse_args()
    sizes = [int(v) for v in args.open.split(",") if v.strip()]
    server = None
    endpoint = args.etcd
    tmp = tempfile.TemporaryDirectory(prefix="reconcile-cost-")
    try:
        if not endpoint:
            server = EtcdServer(Path(tmp.name) / "etcd")
            server.start()
            endpoint = server.endpoint
        print(
            f"{'open':>8} {'retained':>9} {'load ms':>8} {'pass ms P50':>12} {'max':>7} "
            f"{'CPU ms':>7} {'bytes':>10} {'B/task':>7}"
        )
        for n in sizes:
            row = await measure(endpoint, n, args.retained, args.passes)
            print(
                f"{row['open_tasks']:>8} {row['retained_terminal']:>9} {row['load_ms']:>8} "
                f"{row['reconcile_ms_p50']:>12} {row['reconcile_ms_max']:>7} "
                f"{row['reconcile_cpu_ms_p50']:>7} {row['reconcile_bytes']:>10} "
                f"{row['bytes_per_open_task']:>7}"
            )
            print(json.dumps(row))
    finally:
        if server is not None:
            server.stop()
        tmp.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
