"""The `consensus` load-test scenario: 100 voters, concurrent proposals under each
protocol, some byzantine and some dead voters.

It starts its own local cluster (etcd, a coordinator, the consensus service, agent
pools whose agents all vote "always approve" except the faulty ones), then, one
protocol after another, keeps `concurrency` proposals in flight until `proposals`
are decided, each opened with Propose(wait) and timed from the call to the
decision's arrival at the client. It reports P50/P95/P99/max per protocol, the
service's own latency (decided_at − created_at), outcomes, participation, the
exclusions, and the etcd revisions (= transactions) each proposal cost.

Every honest voter approves, so any outcome other than APPROVED is counted as
a miss and the run exits 1: TIMED_OUT here would be a hang the protocol should
not have.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loadtest.metrics import LatencyRecorder
from protos.agentmesh.v1 import consensus_pb2 as pb
from services.consensus.rules import PROTOCOLS

PROTOCOL_ORDER = (pb.PROTOCOL_QUORUM, pb.PROTOCOL_FAST, pb.PROTOCOL_BFT, pb.PROTOCOL_ORDERED)


@dataclass(frozen=True, kw_only=True)
class ConsensusLoad:
    voters: int = 100
    """Agents in all (every one votes), split across the pools."""
    pools: int = 2
    proposals: int = 200
    """Proposals per protocol."""
    concurrency: int = 4
    """Proposals in flight at once."""
    byzantine: str = "forge:1,equivocate:1,impersonate:1,unknown-proposal:1"
    """Faulty voters in each pool (MODE:COUNT,...)."""
    dead: int = 2
    """Voters in each pool that never answer (silent, like a hung agent)."""
    timeout_s: float = 10.0
    """Each proposal's timeout."""
    protocols: tuple[int, ...] = PROTOCOL_ORDER


@dataclass
class PhaseResult:
    protocol: str
    client: LatencyRecorder
    service: LatencyRecorder
    outcomes: Counter[str] = field(default_factory=Counter)
    participation: list[float] = field(default_factory=list)
    excluded: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0
    revisions: int = 0
    errors: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds each server process used during the phase (from /proc)."""

    def doc(self) -> dict[str, Any]:
        n = self.client.count
        return {
            "protocol": self.protocol,
            "proposals": n,
            "outcomes": dict(self.outcomes),
            "client_latency_ms": self.client.summary().__dict__,
            "service_latency_ms": self.service.summary().__dict__,
            "participation_mean": round(statistics.fmean(self.participation), 4)
            if self.participation
            else 0.0,
            "excluded": dict(self.excluded),
            "decisions_per_s": round(n / self.wall_s, 1) if self.wall_s else 0.0,
            "etcd_revisions_per_proposal": round(self.revisions / n, 2) if n else 0.0,
            "errors": self.errors,
            "cpu_ms_per_proposal": {k: round(v * 1000 / n, 2) for k, v in self.cpu_s.items()}
            if n
            else {},
        }


def _env(load: ConsensusLoad) -> dict[str, str]:
    faulty = [s for s in load.byzantine.split(",") if s.strip()]
    if load.dead:
        faulty.append(f"silent:{load.dead}")
    return {"AGENTMESH_BYZANTINE": ",".join(faulty)} if faulty else {}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _phase(
    client: Any,
    etcd: Any,
    load: ConsensusLoad,
    protocol: int,
    run: str,
    pids: dict[str, int] | None = None,
) -> PhaseResult:
    name = PROTOCOLS[protocol]
    result = PhaseResult(
        name, LatencyRecorder(f"{name} client"), LatencyRecorder(f"{name} service")
    )
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(load.proposals):
        queue.put_nowait(i)
    rev0 = int((await etcd.status()).header.revision)

    async def worker() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            req = pb.ProposeRequest(
                proposal_id=f"lt-{run}-{name.lower()}-{i}",
                topic=f"load test {name} #{i}",
                protocol=protocol,  # type: ignore[arg-type]
                timeout_s=load.timeout_s,
                wait=True,
                proposer="loadtest",
            )
            t0 = time.perf_counter()
            try:
                resp = await client.propose(req)
            except Exception:  # noqa: BLE001 - counted and reported
                result.errors += 1
                continue
            result.client.record_s(time.perf_counter() - t0)
            d = resp.decision
            result.service.record_ms(d.latency_ms)
            result.outcomes[pb.Outcome.Name(d.outcome).removeprefix("OUTCOME_")] += 1
            result.participation.append(d.participation)
            for e in d.excluded:
                result.excluded[pb.Fault.Name(e.fault).removeprefix("FAULT_")] += 1

    cpu0 = {name: cpu_seconds(pid) for name, pid in (pids or {}).items()}
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(load.concurrency)))
    result.wall_s = time.perf_counter() - t0
    result.cpu_s = {name: cpu_seconds(pid) - cpu0[name] for name, pid in (pids or {}).items()}
    result.revisions = int((await etcd.status()).header.revision) - rev0
    return result


async def run_consensus(
    load: ConsensusLoad, console: Console, keep: bool = False
) -> dict[str, Any]:
    """Start a cluster, run every protocol's phase, stop the cluster; return the report."""
    from services.cluster import ClusterSpec, LocalCluster
    from services.consensus.client import ConsensusClient

    root = Path(tempfile.mkdtemp(prefix="agentmesh-consensus-"))
    cluster = LocalCluster(
        ClusterSpec(data_dir=root, agents=load.voters, pools=load.pools, env=_env(load))
    )
    phases: list[PhaseResult] = []
    try:
        console.print(
            f"starting a local cluster: etcd, coordinator, consensus, {load.pools} pools, "
            f"{load.voters} voters (per pool: {load.byzantine or 'no byzantine'}, {load.dead} dead)"
        )
        await asyncio.to_thread(cluster.start)
        await cluster.wait_ready(timeout_s=90)
        await cluster.wait_voters(load.voters, timeout_s=60)
        run = f"{int(time.time())}"
        async with ConsensusClient(
            cluster.etcd_endpoint, timeout_s=load.timeout_s + 5, retry_s=10
        ) as client:
            await _phase(
                client,
                client.etcd,
                ConsensusLoad(proposals=20, concurrency=2),
                pb.PROTOCOL_QUORUM,
                run + "-warm",
            )
            pids = {name: proc.pid for name, proc in cluster.procs.items()}
            if cluster.etcd.proc is not None:
                pids["etcd"] = cluster.etcd.proc.pid
            for protocol in load.protocols:
                console.print(
                    f"  {PROTOCOLS[protocol]}: {load.proposals} proposals, "
                    f"{load.concurrency} in flight"
                )
                phases.append(await _phase(client, client.etcd, load, protocol, run, pids))
    finally:
        await asyncio.to_thread(cluster.stop)
        if keep:
            console.print(f"cluster data and logs: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    doc: dict[str, Any] = {
        "scenario": "consensus",
        "params": {
            "voters": load.voters,
            "pools": load.pools,
            "proposals_per_protocol": load.proposals,
            "concurrency": load.concurrency,
            "byzantine_per_pool": load.byzantine,
            "dead_per_pool": load.dead,
            "timeout_s": load.timeout_s,
        },
        "phases": [p.doc() for p in phases],
    }
    misses = sum(
        p.errors + sum(n for o, n in p.outcomes.items() if o != "APPROVED") for p in phases
    )
    doc["ok"] = misses == 0
    _print(doc, console)
    return doc


def write(doc: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "consensus.json"
    path.write_text(json.dumps(doc, indent=2))
    return path


def _print(doc: dict[str, Any], console: Console) -> None:
    table = Table(title=f"consensus: {doc['params']['voters']} voters, decision latency (ms)")
    for col in (
        "protocol",
        "proposals",
        "P50",
        "P95",
        "P99",
        "max",
        "service P50/P95/P99",
        "decisions/s",
        "etcd txns/proposal",
        "participation",
        "outcomes",
        "excluded",
    ):
        table.add_column(col, justify="right")
    for p in doc["phases"]:
        c, s = p["client_latency_ms"], p["service_latency_ms"]
        table.add_row(
            p["protocol"],
            str(p["proposals"]),
            f"{c['p50_ms']:.1f}",
            f"{c['p95_ms']:.1f}",
            f"{c['p99_ms']:.1f}",
            f"{c['max_ms']:.1f}",
            f"{s['p50_ms']:.1f}/{s['p95_ms']:.1f}/{s['p99_ms']:.1f}",
            f"{p['decisions_per_s']:.0f}",
            f"{p['etcd_revisions_per_proposal']:.1f}",
            f"{p['participation_mean']:.0%}",
            " ".join(f"{k} {v}" for k, v in p["outcomes"].items())
            + (f" errors {p['errors']}" if p["errors"] else ""),
            " ".join(f"{k} {v}" for k, v in p["excluded"].items()) or "-",
        )
    console.print(table)
    for p in doc["phases"]:
        cpu = p.get("cpu_ms_per_proposal") or {}
        if cpu:
            console.print(
                f"  {p['protocol']} CPU ms per proposal: "
                + ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items()) if v)
            )
    console.print(
        "[green]every proposal APPROVED[/]"
        if doc["ok"]
        else "[red]some proposals were not APPROVED[/]"
    )
