"""What a run produces: one `RunResult` per system, turned into the report document.

The document (a plain dict, written as JSON) is the single input of every
renderer in `report.py`, so a report can be re-rendered from a saved JSON file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import sys
from dataclasses import dataclass, field
from typing import Any

from loadtest.cpu import not_measured
from loadtest.metrics import RunMetrics

SCHEMA = "agentmesh.loadtest/1"
MAX_LISTED_IDS = 100
"""Lost and duplicated ids listed in the JSON; the counts are always exact."""

TERMINAL_NAMES = ("SUCCEEDED", "CANCELLED", "DEAD_LETTER")


@dataclass(frozen=True, kw_only=True)
class Marker:
    """A moment worth a vertical line on the throughput plot (a kill, a restart)."""

    t_s: float
    """Seconds since the run's start."""
    label: str


@dataclass(kw_only=True)
class RunResult:
    """Everything one system's run measured."""

    system: str
    """`agentmesh` or `celery`."""
    scenario: str
    metrics: RunMetrics
    duration_s: float
    """Wall time from the first submit to the end of the drain."""
    submitted: int = 0
    """Tasks the client tried to submit."""
    acknowledged: int = 0
    """Tasks whose submit was acknowledged (these must each reach one terminal state)."""
    completed: int = 0
    """Tasks seen reaching a terminal state."""
    terminal_states: dict[str, int] = field(default_factory=dict)
    """Final scan: count per terminal state name."""
    lost: list[str] = field(default_factory=list)
    """Acknowledged ids the final scan did not find at all."""
    unfinished: list[str] = field(default_factory=list)
    """Acknowledged ids found, but not in a terminal state when the drain time ran out."""
    duplicated: list[str] = field(default_factory=list)
    """Ids completed more than once (two terminal records under different claims)."""
    markers: list[Marker] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cpu: dict[str, Any] = field(default_factory=dict)
    """CPU per task per process role over the measured window (`loadtest.cpu.summarise`);
    empty or `measured: False` when the harness could not see the server processes."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Scenario-specific figures (spawn times, recovery times, memory per agent)."""

    @property
    def ok(self) -> bool:
        return not self.lost and not self.duplicated and not self.unfinished


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, OS, Python and gRPC's I/O engine: what a figure depends on."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        # what the cluster's processes inherit (services/_common/grpcenv.py)
        "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS"),
    }
    with contextlib.suppress(AttributeError, OSError):
        info["cores_usable"] = len(os.sched_getaffinity(0))
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    info["mem_total_mb"] = int(line.split()[1]) // 1024
                    break
    except OSError:
        pass
    return info


def run_to_doc(result: RunResult, *, simulated: bool) -> dict[str, Any]:
    m = result.metrics
    latencies: dict[str, Any] = {}
    for name, rec in m.latencies.items():
        doc = rec.summary().as_dict()
        doc["percentile_curve"] = [list(p) for p in rec.percentile_curve()]
        doc["histogram"] = [list(b) for b in rec.log_buckets()]
        doc["hdr_base64"] = rec.encode() if rec.count else ""
        latencies[name] = doc
    tp = m.throughput
    return {
        "system": result.system,
        "scenario": result.scenario,
        "simulated": simulated,
        "ok": result.ok,
        "duration_s": round(result.duration_s, 3),
        "submitted": result.submitted,
        "acknowledged": result.acknowledged,
        "completed": result.completed,
        "terminal_states": dict(result.terminal_states),
        "lost_count": len(result.lost),
        "lost": sorted(result.lost)[:MAX_LISTED_IDS],
        "unfinished_count": len(result.unfinished),
        "unfinished": sorted(result.unfinished)[:MAX_LISTED_IDS],
        "duplicated_count": len(result.duplicated),
        "duplicated": sorted(result.duplicated)[:MAX_LISTED_IDS],
        "throughput": {
            "bucket_s": tp.bucket_s,
            "series": tp.series(),
            "mean_per_s": round(tp.rate_per_s(), 1),
            "steady_per_s": round(tp.steady_rate_per_s(), 1),
            "peak_per_s": round(tp.peak_per_s(), 1),
            "total": tp.total,
        },
        "latencies": latencies,
        "cpu": result.cpu or not_measured("not sampled"),
        "counters": m.counters.as_dict(),
        "samples": {k: [round(v, 6) for v in vs] for k, vs in m.samples.items()},
        "markers": [{"t_s": round(mk.t_s, 3), "label": mk.label} for mk in result.markers],
        "notes": list(result.notes),
        "extra": result.extra,
    }


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 2) if num > 0 and den > 0 else None


def compare(base: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    """Ratios of `base` (agentmesh) to `peer` (celery); above 1 means base is better.

    Throughput: base / peer. Latencies: peer / base (how many times lower base is).
    """
    out: dict[str, Any] = {"base": base["system"], "peer": peer["system"], "ratios": {}}
    ratios = out["ratios"]
    ratios["throughput_steady"] = _ratio(
        base["throughput"]["steady_per_s"], peer["throughput"]["steady_per_s"]
    )
    ratios["throughput_mean"] = _ratio(
        base["throughput"]["mean_per_s"], peer["throughput"]["mean_per_s"]
    )
    bc, pc = base.get("cpu") or {}, peer.get("cpu") or {}
    if bc.get("measured") and pc.get("measured"):
        # CPU is a cost: how many times less CPU per task base's servers spend
        b_ms, p_ms = bc["servers"]["ms_per_task"], pc["servers"]["ms_per_task"]
        ratios["cpu_per_task_servers"] = _ratio(p_ms or 0.0, b_ms or 0.0)
    for name in ("submit_to_receive", "dispatch", "end_to_end"):
        b, p = base["latencies"].get(name), peer["latencies"].get(name)
        if not b or not p:
            continue
        for q, level in (("p50_ms", 50.0), ("p95_ms", 95.0), ("p99_ms", 99.0)):
            key = f"{name}_{q[:-3]}"
            if _clamped_share(b) >= level or _clamped_share(p) >= level:
                # that percentile sits on the 1 µs floor: the ratio would be meaningless
                ratios[key] = None
                out.setdefault("omitted", {})[key] = "at least that share of samples were ≤ 0"
                continue
            ratios[key] = _ratio(p[q], b[q])
    return out


def _clamped_share(lat: dict[str, Any]) -> float:
    return 100.0 * lat.get("clamped_low", 0) / lat["count"] if lat.get("count") else 0.0


def build_doc(
    results: list[RunResult],
    *,
    params: dict[str, Any],
    simulated: bool,
    targets: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The report document: parameters, machine, one entry per run, comparison, verdict."""
    runs = [run_to_doc(r, simulated=simulated) for r in results]
    comparison = None
    if len(runs) >= 2:
        comparison = compare(runs[0], runs[1])
    failures = []
    for r in runs:
        if r["lost_count"]:
            failures.append(f"{r['system']}: {r['lost_count']} acknowledged task(s) lost")
        if r["unfinished_count"]:
            failures.append(
                f"{r['system']}: {r['unfinished_count']} acknowledged task(s) not terminal at the end"
            )
        if r["duplicated_count"]:
            failures.append(f"{r['system']}: {r['duplicated_count']} task(s) completed twice")
    return {
        "schema": SCHEMA,
        "generated_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "simulated": simulated,
        "params": params,
        "machine": machine_info(),
        "runs": runs,
        "comparison": comparison,
        "targets": targets or [],
        "verdict": {"ok": not failures, "failures": failures},
    }
