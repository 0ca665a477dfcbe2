"""What the report's renderers share: metric names and titles, colours, number formats."""

from __future__ import annotations

import json
from typing import Any

from loadtest.commits import describe as describe_commits

JSON_NAME = "report.json"
HTML_NAME = "report.html"

SYSTEM_COLORS = {"agentmesh": "#2563eb", "celery": "#ea580c"}
EXTRA_COLORS = ("#16a34a", "#9333ea", "#db2777", "#0891b2")

METRIC_TITLES = {
    "submit_to_receive": "Dispatch: submit sent → assignment received (never negative)",
    "dispatch": "Detail: submit acknowledged → assignment received (≤ 0 on the submit fast path)",
    "end_to_end": "End-to-end latency (submit → terminal state)",
    "submit_ack": "Submit round trip (request sent → acknowledged), per RPC",
    "reassign": "Reassignment after an agent process was killed",
    "spawn": "Agent spawn (requested → welcomed)",
}
# the headline dispatch figure first: submit sent → received is never negative, where
# "acknowledged → received" is ≤ 0 whenever the agent has the task before the client
# has its acknowledgement (the submit fast path), so its percentiles flatter
METRIC_ORDER = ("submit_to_receive", "end_to_end", "dispatch", "submit_ack", "reassign", "spawn")

SUMMARY_COLUMNS = ("count", "p50_ms", "p95_ms", "p99_ms", "p999_ms", "max_ms", "mean_ms")
SUMMARY_HEADERS = ("count", "P50 ms", "P95 ms", "P99 ms", "P99.9 ms", "max ms", "mean ms")


def color(system: str, idx: int) -> str:
    return SYSTEM_COLORS.get(system, EXTRA_COLORS[idx % len(EXTRA_COLORS)])


def metric_names(doc: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for run in doc["runs"]:
        for name in run["latencies"]:
            if name not in names:
                names.append(name)
    known = [n for n in METRIC_ORDER if n in names]
    return known + sorted(n for n in names if n not in METRIC_ORDER)


def run_label(run: dict[str, Any]) -> str:
    label = f"{run['system']} · {run['scenario']}"
    if run.get("simulated"):
        label += " · simulated work"
    return label


def fmt_ms(v: float) -> str:
    if v == 0:
        return "0"
    if v < 1:
        return f"{v:.3f}"
    if v < 100:
        return f"{v:.2f}"
    return f"{v:,.0f}"


def ratio_text(comparison: dict[str, Any], key: str, value: float | None) -> str:
    if value is not None:
        return f"{value:.2f}×"
    why = comparison.get("omitted", {}).get(key)
    return f"n/a ({why})" if why else "n/a"


COMPARISON_CLOSED_LOOP_NOTE = (
    "closed loop: each system runs at its own saturation, so its queue sets the latencies; "
    "compare latencies at one open-loop rate (--rate)"
)


def headline(run: dict[str, Any]) -> str:
    """The figures a reader compares first: submit sent → assignment received (the
    dispatch figure that is never negative), end to end, and server CPU per task."""
    parts = []
    for name, label in (
        ("submit_to_receive", "submit sent → received"),
        ("end_to_end", "end to end"),
    ):
        lat = run["latencies"].get(name)
        if lat and lat.get("count"):
            parts.append(f"{label} P50 {fmt_ms(lat['p50_ms'])} / P99 {fmt_ms(lat['p99_ms'])} ms")
    cpu = run.get("cpu") or {}
    per = cpu.get("servers", {}).get("ms_per_task") if cpu.get("measured") else None
    parts.append(
        f"server CPU {per:.3f} ms per task" if per is not None else "server CPU not measured"
    )
    return "; ".join(parts)


CPU_HEADERS = ("process role", "processes", "CPU s", "CPU ms per task", "cores busy")


def cpu_rows(run: dict[str, Any]) -> list[tuple[str, ...]]:
    """The run's CPU per task, one row per role, then the servers' total (no harness).

    A role whose process died or was replaced in the window is marked: its figure is a
    lower bound (CPU after its last sample is unknown)."""
    cpu = run.get("cpu") or {}
    if not cpu.get("measured"):
        return []

    def row(label: str, procs: str, f: dict[str, Any]) -> tuple[str, ...]:
        per = f.get("ms_per_task")
        cores = f.get("cores")
        return (
            label,
            procs,
            f"{f['cpu_s']:.2f}",
            f"{per:.3f}" if per is not None else "n/a",
            f"{cores:.2f}" if cores is not None else "n/a",
        )

    rows = []
    for role, f in cpu["roles"].items():
        label = role if f.get("complete", True) else f"{role} (≥: a process exited)"
        rows.append(row(label, str(f["processes"]), f))
    servers = sum(f["processes"] for r, f in cpu["roles"].items() if r != "harness")
    rows.append(row("servers (all but harness)", str(servers), cpu["servers"]))
    return rows


def cpu_caption(run: dict[str, Any]) -> str:
    """One line on what the CPU table measured, or why it was not measured."""
    cpu = run.get("cpu") or {}
    if not cpu.get("measured"):
        why = cpu.get("why", "this report predates the measurement")
        return f"CPU per task: not measured ({why})"
    return (
        f"CPU per task: utime+stime from /proc over the measured window "
        f"({cpu['window_s']:.1f} s, {cpu['completed']:,} tasks completed)"
    )


def detail_lines(run: dict[str, Any]) -> list[str]:
    """Scenario figures worth a line: agents ready, spawn phases, faults and recovery."""
    extra = run.get("extra", {})
    lines: list[str] = clamp_notes(run)
    spawn = extra.get("spawn")
    if isinstance(spawn, dict) and "all_ready_s" in spawn:
        lines.append(
            f"agents: {spawn['agents']} spawned and connected in {spawn['all_ready_s']:.3f} s"
            + _memory_text(spawn)
        )
    for name, phase in (extra.get("spawn_phases") or {}).items():
        if isinstance(phase, dict) and "all_ready_s" in phase:
            warm = f", {phase['from_warm']} from the warm pool" if phase.get("from_warm") else ""
            lines.append(
                f"spawn {name}: {phase['agents']} agents ready in {phase['all_ready_s']:.3f} s"
                f"{warm}{_memory_text(phase)}"
            )
    split = extra.get("latency_split")
    if isinstance(split, dict) and split:
        hops = ", ".join(
            f"{name} {fmt_ms(h['mean_ms'])} ms ({h['share_pct']:g} %)"
            for name, h in split.items()
            if h.get("share_pct") is not None
        )
        lines.append(f"latency split, mean per hop (share): {hops}")
        tails = ", ".join(
            f"{name} {fmt_ms(h['p99_ms'])} ms" for name, h in split.items() if "p99_ms" in h
        )
        lines.append(f"latency split, P99 per hop: {tails}")
    disk = extra.get("etcd_disk")
    if isinstance(disk, dict) and disk:
        lines.append(
            "etcd's disk over the run: "
            + ", ".join(
                f"{name} {d['count']:,}x mean {d['mean_ms']} ms, P50 ≤ {d['p50_le_ms']} ms, "
                f"P99 ≤ {d['p99_le_ms']} ms"
                for name, d in disk.items()
                if d.get("count")
            )
        )
    if isinstance(commits := extra.get("commits"), dict) and commits:
        lines.append(describe_commits(commits))
    for action in extra.get("actions", []):
        facts = ", ".join(f"{k} {v}" for k, v in action.items() if k != "label")
        lines.append(f"{action.get('label', 'action')}: {facts}")
    kills = extra.get("etcd_kills")
    if isinstance(kills, dict):
        lines.append(
            f"etcd SIGKILLed {kills['kills']}x: acknowledged tasks terminal "
            f"{kills['acknowledged_terminal']}; last task in flight at a kill finished "
            f"P50 {kills['last_stranded_after_back_p50_s']} s, max "
            f"{kills['last_stranded_after_back_max_s']} s after etcd answered again "
            f"({kills['never_finished']} never); coordinator CPU while etcd was down "
            f"P50 {kills['coordinator_cpu_down_p50_pct']} %, max "
            f"{kills['coordinator_cpu_down_max_pct']} % of one core"
        )
        for k in kills.get("per_kill", []):
            lines.append("  " + ", ".join(f"{key} {value}" for key, value in k.items()))
    for key in sorted(k for k in extra if k.startswith("kill_")):
        facts = ", ".join(f"{k} {v}" for k, v in extra[key].items())
        lines.append(f"{key}: {facts}")
    for name, value in (extra.get("health") or {}).items():
        text = ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else value
        lines.append(f"health {name}: {text}")
    for example in extra.get("unfinished_examples", [])[:3]:
        lines.append(f"unfinished: {json.dumps(example)}")
    return lines


def _memory_text(info: dict[str, Any]) -> str:
    if "pool_rss_per_agent_kb" not in info:
        return ""
    return (
        f" (memory per agent: pools {info['pool_rss_per_agent_kb']} kB, "
        f"coordinator {info['coordinator_rss_per_agent_kb']} kB)"
    )


def clamp_notes(run: dict[str, Any]) -> list[str]:
    """Say how many samples sat outside the histogram's range (never silently)."""
    out = []
    for name, lat in run["latencies"].items():
        low, high, count = lat.get("clamped_low", 0), lat.get("clamped_high", 0), lat["count"]
        if low and count:
            why = (
                " (the agent had the task before the client had the acknowledgement; "
                "see submit_to_receive for a bound that is never negative)"
                if name == "dispatch"
                else ""
            )
            out.append(
                f"{name}: {low} of {count} samples ({100 * low / count:.1f} %) were ≤ 0 "
                f"and count as 1 µs{why}"
            )
        if high and count:
            out.append(f"{name}: {high} samples above 60 s count as 60 s")
    return out
