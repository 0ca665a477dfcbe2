"""Render a report document (see `result.build_doc`): terminal table, JSON, HTML.

The HTML is one self-contained file: inline CSS and SVG drawn here, no scripts
and nothing fetched, so it opens on an offline machine and survives being
mailed around.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

JSON_NAME = "report.json"
HTML_NAME = "report.html"

SYSTEM_COLORS = {"agentmesh": "#2563eb", "celery": "#ea580c"}
EXTRA_COLORS = ("#16a34a", "#9333ea", "#db2777", "#0891b2")

METRIC_TITLES = {
    "dispatch": "Dispatch latency (submit acknowledged → assignment received)",
    "submit_to_receive": "Submit sent → assignment received (upper bound of dispatch)",
    "end_to_end": "End-to-end latency (submit → terminal state)",
    "submit_ack": "Submit round trip (request sent → acknowledged), per RPC",
    "reassign": "Reassignment after an agent process was killed",
    "spawn": "Agent spawn (requested → welcomed)",
}
METRIC_ORDER = ("dispatch", "submit_to_receive", "end_to_end", "submit_ack", "reassign", "spawn")

SUMMARY_COLUMNS = ("count", "p50_ms", "p95_ms", "p99_ms", "p999_ms", "max_ms", "mean_ms")
SUMMARY_HEADERS = ("count", "P50 ms", "P95 ms", "P99 ms", "P99.9 ms", "max ms", "mean ms")


def _color(system: str, idx: int) -> str:
    return SYSTEM_COLORS.get(system, EXTRA_COLORS[idx % len(EXTRA_COLORS)])


def _metric_names(doc: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for run in doc["runs"]:
        for name in run["latencies"]:
            if name not in names:
                names.append(name)
    known = [n for n in METRIC_ORDER if n in names]
    return known + sorted(n for n in names if n not in METRIC_ORDER)


def _run_label(run: dict[str, Any]) -> str:
    label = f"{run['system']} · {run['scenario']}"
    if run.get("simulated"):
        label += " · simulated work"
    return label


def _fmt_ms(v: float) -> str:
    if v == 0:
        return "0"
    if v < 1:
        return f"{v:.3f}"
    if v < 100:
        return f"{v:.2f}"
    return f"{v:,.0f}"


# ---------------------------------------------------------------- terminal


def print_summary(doc: dict[str, Any], console: Console | None = None) -> None:
    """The end-of-run table: latencies, throughput, counters, exactly-once, ratios."""
    console = console or Console()
    if doc.get("simulated"):
        console.print(
            "[bold yellow]SIMULATED WORK[/]: the agents ran the `sleep` executor "
            "(no real work, no LLM); figures measure the mesh, not a model."
        )
    for run in doc["runs"]:
        table = Table(title=_run_label(run), title_justify="left", show_edge=False)
        table.add_column("latency")
        for header in SUMMARY_HEADERS:
            table.add_column(header, justify="right")
        for name in _metric_names({"runs": [run]}):
            lat = run["latencies"][name]
            cells = [str(lat["count"])] + [_fmt_ms(lat[c]) for c in SUMMARY_COLUMNS[1:]]
            table.add_row(name, *cells)
        console.print(table)
        tp = run["throughput"]
        console.print(
            f"  throughput: mean {tp['mean_per_s']:,.0f}/s, steady {tp['steady_per_s']:,.0f}/s, "
            f"peak {tp['peak_per_s']:,.0f}/s over {run['duration_s']:.1f} s"
        )
        counters = ", ".join(f"{k} {v}" for k, v in run["counters"].items())
        console.print(
            f"  tasks: submitted {run['submitted']}, acknowledged {run['acknowledged']}, "
            f"completed {run['completed']}; {counters}"
        )
        style = "green" if run["ok"] else "bold red"
        console.print(
            f"  [{style}]exactly-once: lost {run['lost_count']}, "
            f"unfinished {run.get('unfinished_count', 0)}, duplicated {run['duplicated_count']}[/]"
        )
        for line in detail_lines(run):
            console.print(f"  {line}")
        for key, values in run.get("samples", {}).items():
            if values:
                shown = ", ".join(f"{v:.3f}" for v in values[:10])
                more = f" (+{len(values) - 10} more)" if len(values) > 10 else ""
                console.print(f"  {key}: {shown}{more}")
        for note in run.get("notes", []):
            console.print(f"  [dim]note: {note}[/]")
    comparison = doc.get("comparison")
    if comparison:
        table = Table(
            title=f"{comparison['base']} vs {comparison['peer']} (above 1: {comparison['base']} better)",
            title_justify="left",
            show_edge=False,
        )
        table.add_column("figure")
        table.add_column("ratio", justify="right")
        for key, value in comparison["ratios"].items():
            table.add_row(key, _ratio_text(comparison, key, value))
        console.print(table)
        if doc.get("params", {}).get("mode") == "closed loop":
            console.print(f"  [dim]note: {COMPARISON_CLOSED_LOOP_NOTE}[/]")
    if doc.get("targets"):
        table = Table(title="targets (DESIGN.md)", title_justify="left", show_edge=False)
        for col in ("target", "goal", "measured", "result"):
            table.add_column(col)
        for t in doc["targets"]:
            verdict = {True: "[green]met[/]", False: "[red]missed[/]"}.get(t.get("met"), "n/a")
            table.add_row(t["name"], t["goal"], str(t.get("measured", "")), verdict)
        console.print(table)
    verdict = doc["verdict"]
    if verdict["ok"]:
        console.print(
            "[bold green]PASS[/]: every acknowledged task reached exactly one terminal state"
        )
    else:
        for failure in verdict["failures"]:
            console.print(f"[bold red]FAIL[/]: {failure}")


def _ratio_text(comparison: dict[str, Any], key: str, value: float | None) -> str:
    if value is not None:
        return f"{value:.2f}×"
    why = comparison.get("omitted", {}).get(key)
    return f"n/a ({why})" if why else "n/a"


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


COMPARISON_CLOSED_LOOP_NOTE = (
    "closed loop: each system runs at its own saturation, so its queue sets the latencies; "
    "compare latencies at one open-loop rate (--rate)"
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
    for action in extra.get("actions", []):
        facts = ", ".join(f"{k} {v}" for k, v in action.items() if k != "label")
        lines.append(f"{action.get('label', 'action')}: {facts}")
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


# ---------------------------------------------------------------- JSON


def write_json(doc: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- SVG

W, H = 760, 300
ML, MR, MT, MB = 70, 40, 30, 48


class _Axis:
    """Maps data values to pixels, linear or log10, and proposes tick marks."""

    def __init__(self, lo: float, hi: float, px_lo: float, px_hi: float, *, log: bool) -> None:
        self.log = log
        step = 1.0
        if log:
            lo = max(lo, 1e-9)
            hi = max(hi, lo * 10)
            self.lo = float(math.floor(math.log10(lo)))
            self.hi = float(math.ceil(math.log10(hi)))
            if self.hi == self.lo:
                self.hi += 1
        else:
            if hi <= lo:
                hi = lo + 1
            step = _nice_step((hi - lo) / 5)
            self.lo = math.floor(lo / step) * step
            self.hi = math.ceil(hi / step) * step
        self.step = 1.0 if log else step
        self.px_lo, self.px_hi = px_lo, px_hi

    def __call__(self, v: float) -> float:
        if self.log:
            v = math.log10(max(v, 1e-12))
        frac = (v - self.lo) / (self.hi - self.lo)
        return self.px_lo + frac * (self.px_hi - self.px_lo)

    def ticks(self) -> list[float]:
        if self.log:
            decades = list(range(int(self.lo), int(self.hi) + 1))
            out = [10.0**d for d in decades]
            if len(decades) <= 3:
                out += [m * 10.0**d for d in decades[:-1] for m in (2.0, 5.0)]
            return sorted(out)
        n = round((self.hi - self.lo) / self.step)
        return [self.lo + i * self.step for i in range(n + 1)]


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    exp = math.floor(math.log10(raw))
    base = raw / 10**exp
    for m in (1, 2, 2.5, 5, 10):
        if base <= m:
            return float(m * 10**exp)
    return float(10 ** (exp + 1))


def _num(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:g}"
    return f"{v:.3g}"


def _svg_open(title: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
        f'role="img" aria-label="{html.escape(title)}" class="chart">',
        f'<rect x="0" y="0" width="{W}" height="{H}" fill="#ffffff"/>',
    ]


def _frame(
    out: list[str],
    xa: _Axis,
    ya: _Axis,
    *,
    xlabel: str,
    ylabel: str,
    xfmt: Callable[[float], str] = _num,
    xticks: Sequence[float] | None = None,
) -> None:
    x0, x1, y0, y1 = ML, W - MR, H - MB, MT
    for t in ya.ticks():
        y = ya(t)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        out.append(
            f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_num(t)}</text>'
        )
    for t in xticks if xticks is not None else xa.ticks():
        x = xa(t)
        out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y1}" stroke="#f1f5f9"/>')
        out.append(
            f'<text x="{x:.1f}" y="{y0 + 16}" text-anchor="middle" class="tick">{html.escape(xfmt(t))}</text>'
        )
    out.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#334155"/>')
    out.append(f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#334155"/>')
    out.append(
        f'<text x="{(x0 + x1) / 2:.0f}" y="{H - 10}" text-anchor="middle" class="axis">{html.escape(xlabel)}</text>'
    )
    out.append(
        f'<text x="16" y="{(y0 + y1) / 2:.0f}" text-anchor="middle" class="axis" '
        f'transform="rotate(-90 16 {(y0 + y1) / 2:.0f})">{html.escape(ylabel)}</text>'
    )


def _legend(out: list[str], series: Sequence[tuple[str, str]]) -> None:
    x = ML + 8
    for label, color in series:
        out.append(f'<rect x="{x}" y="10" width="12" height="12" fill="{color}" rx="2"/>')
        out.append(f'<text x="{x + 16}" y="20" class="legend">{html.escape(label)}</text>')
        x += 24 + 7 * len(label)


def _empty_chart(title: str, why: str) -> str:
    out = _svg_open(title)
    out.append(
        f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="axis">{html.escape(why)}</text>'
    )
    out.append("</svg>")
    return "\n".join(out)


def svg_histogram(title: str, series: Sequence[tuple[str, str, list[list[float]]]]) -> str:
    """Latency histogram: log-binned ms on a log x axis, share of samples on y.

    `series`: (label, color, [[low_ms, high_ms, count], ...]). Shares, not counts,
    so systems with different sample counts can be compared on one plot.
    """
    series = [s for s in series if s[2]]
    if not series:
        return _empty_chart(title, "no samples")
    lo = min(b[0] for _, _, bs in series for b in bs)
    hi = max(b[1] for _, _, bs in series for b in bs)
    shares: list[tuple[str, str, list[tuple[float, float, float]]]] = []
    for label, color, bs in series:
        total = sum(b[2] for b in bs) or 1
        shares.append((label, color, [(b[0], b[1], 100.0 * b[2] / total) for b in bs]))
    ymax = max(s for _, _, bs in shares for _, _, s in bs)
    xa = _Axis(lo, hi, ML, W - MR, log=True)
    ya = _Axis(0, ymax * 1.05, H - MB, MT, log=False)
    out = _svg_open(title)
    _frame(out, xa, ya, xlabel="latency (ms, log scale)", ylabel="share of samples (%)")
    for _label, color, rows in shares:
        for low, high, share in rows:
            if share <= 0:
                continue
            x, x2, y = xa(low), xa(high), ya(share)
            out.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(x2 - x - 1, 1):.1f}" '
                f'height="{ya(0) - y:.1f}" fill="{color}" fill-opacity="0.35" stroke="{color}" '
                f'stroke-width="1"><title>{_num(low)}–{_num(high)} ms: {share:.2f} %</title></rect>'
            )
    _legend(out, [(label, color) for label, color, _ in shares])
    out.append("</svg>")
    return "\n".join(out)


PCT_TICK_LABELS = ("0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%")


def _pct_x(pct: float, cap: float) -> float:
    if pct >= 100.0:
        return cap
    return min(cap, math.log10(1.0 / (1.0 - pct / 100.0)))


def svg_percentile_curve(title: str, series: Sequence[tuple[str, str, list[list[float]]]]) -> str:
    """HdrHistogram percentile distribution: latency against 1/(1-percentile), log x.

    Each step right is one more nine (90 %, 99 %, 99.9 % ...), so the tail that
    a P99 alone hides is in plain view.
    """
    series = [s for s in series if s[2]]
    if not series:
        return _empty_chart(title, "no samples")
    finite = [p for _, _, pts in series for p, _ in pts if p < 100.0]
    cap = max((math.log10(1.0 / (1.0 - p / 100.0)) for p in finite), default=2.0)
    cap = float(min(6, max(2, math.ceil(cap))))
    vals = [v for _, _, pts in series for _, v in pts]
    vmin, vmax = max(min(vals), 1e-3), max(vals)
    log_y = vmax / vmin > 50
    xa = _Axis(0, cap, ML, W - MR, log=False)
    xa.lo, xa.hi, xa.step = 0.0, cap, 1.0
    ya = _Axis(vmin if log_y else 0.0, vmax * 1.05, H - MB, MT, log=log_y)
    out = _svg_open(title)
    _frame(
        out,
        xa,
        ya,
        xlabel="percentile",
        ylabel="latency (ms" + (", log scale)" if log_y else ")"),
        xfmt=lambda t: PCT_TICK_LABELS[int(t)] if int(t) < len(PCT_TICK_LABELS) else "",
        xticks=[float(i) for i in range(int(cap) + 1)],
    )
    for label, color, pts in series:
        coords = " ".join(f"{xa(_pct_x(p, cap)):.1f},{ya(max(v, vmin)):.1f}" for p, v in pts)
        out.append(
            f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2">'
            f"<title>{html.escape(label)}</title></polyline>"
        )
        for p, v in pts:
            if p in (50.0, 99.0) or p >= 100.0:
                x, y = xa(_pct_x(p, cap)), ya(max(v, vmin))
                out.append(
                    f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}">'
                    f"<title>P{p:g}: {v:g} ms</title></circle>"
                )
    _legend(out, [(label, color) for label, color, _ in series])
    out.append("</svg>")
    return "\n".join(out)


def svg_throughput(
    title: str,
    series: Sequence[tuple[str, str, list[int], float]],
    markers: Sequence[dict[str, Any]] = (),
) -> str:
    """Completions per second over the run; `markers` draw the faults injected."""
    series = [s for s in series if s[2]]
    if not series:
        return _empty_chart(title, "no completions")
    tmax = max(len(counts) * bucket for _, _, counts, bucket in series)
    ymax = max(c / bucket for _, _, counts, bucket in series for c in counts)
    xa = _Axis(0, max(tmax, 1.0), ML, W - MR, log=False)
    ya = _Axis(0, max(ymax * 1.1, 1.0), H - MB, MT, log=False)
    out = _svg_open(title)
    _frame(out, xa, ya, xlabel="time since start (s)", ylabel="completed tasks per second")
    for label, color, counts, bucket in series:
        pts = [(xa((i + 0.5) * bucket), ya(c / bucket)) for i, c in enumerate(counts)]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        area = f"{pts[0][0]:.1f},{ya(0):.1f} {coords} {pts[-1][0]:.1f},{ya(0):.1f}"
        out.append(f'<polygon points="{area}" fill="{color}" fill-opacity="0.12"/>')
        out.append(
            f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2">'
            f"<title>{html.escape(label)}</title></polyline>"
        )
    for mk in markers:
        x = xa(float(mk["t_s"]))
        out.append(
            f'<line x1="{x:.1f}" y1="{H - MB}" x2="{x:.1f}" y2="{MT}" stroke="#dc2626" '
            'stroke-dasharray="4 3"/>'
        )
        out.append(
            f'<text x="{x + 4:.1f}" y="{MT + 12}" class="marker">{html.escape(str(mk["label"]))}</text>'
        )
    _legend(out, [(label, color) for label, color, _, _ in series])
    out.append("</svg>")
    return "\n".join(out)


# ---------------------------------------------------------------- HTML

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#0f172a;
margin:0 auto;max-width:820px;padding:24px;background:#f8fafc}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #cbd5e1;
padding-bottom:4px}h3{font-size:14px;margin:18px 0 6px}
.sub{color:#475569;margin:0 0 12px}
.banner{background:#fef3c7;border:1px solid #f59e0b;padding:8px 12px;border-radius:6px;margin:12px 0}
.fail{background:#fee2e2;border:1px solid #dc2626;padding:8px 12px;border-radius:6px;margin:12px 0}
.pass{background:#dcfce7;border:1px solid #16a34a;padding:8px 12px;border-radius:6px;margin:12px 0}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:10px 14px;min-width:110px}
.card .v{font-size:20px;font-weight:600}.card .k{color:#64748b;font-size:12px}
table{border-collapse:collapse;background:#fff;margin:6px 0;font-size:13px}
th,td{border:1px solid #e2e8f0;padding:4px 8px;text-align:right}th:first-child,td:first-child{text-align:left}
th{background:#f1f5f9}
.chart{background:#fff;border:1px solid #e2e8f0;border-radius:8px;margin:6px 0;max-width:100%;height:auto}
.chart .tick{font-size:11px;fill:#475569}.chart .axis{font-size:12px;fill:#334155}
.chart .legend{font-size:12px;fill:#0f172a}.chart .marker{font-size:11px;fill:#dc2626}
.met{color:#15803d;font-weight:600}.missed{color:#b91c1c;font-weight:600}
code{background:#e2e8f0;padding:1px 4px;border-radius:3px}
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _kv_table(data: dict[str, Any]) -> str:
    rows = []
    for k, v in data.items():
        shown = json.dumps(v) if isinstance(v, dict | list) else v
        rows.append(f"<tr><td>{_e(k)}</td><td>{_e(shown)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _latency_table(run: dict[str, Any]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in ("latency", *SUMMARY_HEADERS))
    rows = []
    for name in _metric_names({"runs": [run]}):
        lat = run["latencies"][name]
        cells = [str(lat["count"])] + [_fmt_ms(lat[c]) for c in SUMMARY_COLUMNS[1:]]
        rows.append(f"<tr><td>{_e(name)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<table class="latency"><tr>{head}</tr>{"".join(rows)}</table>'


def render_html(doc: dict[str, Any]) -> str:
    """The whole report as one HTML string."""
    runs = doc["runs"]
    params = doc.get("params", {})
    title = f"agentmesh load test — {params.get('scenario', runs[0]['scenario'] if runs else '')}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">generated {_e(doc.get("generated_at", ""))} · '
        f"<code>{_e(doc.get('command', ''))}</code></p>",
    ]
    if doc.get("simulated"):
        parts.append(
            '<div class="banner" id="simulated"><b>Simulated work.</b> The agents ran the '
            "<code>sleep</code> executor: no model was called; the figures measure the mesh.</div>"
        )
    verdict = doc["verdict"]
    if verdict["ok"]:
        parts.append(
            '<div class="pass" id="verdict">PASS: every acknowledged task reached exactly one '
            "terminal state; none lost, none completed twice.</div>"
        )
    else:
        items = "".join(f"<li>{_e(f)}</li>" for f in verdict["failures"])
        parts.append(f'<div class="fail" id="verdict">FAIL<ul>{items}</ul></div>')

    parts.append('<h2 id="summary">Summary</h2>')
    for i, run in enumerate(runs):
        color = _color(run["system"], i)
        disp = run["latencies"].get("dispatch", {})
        e2e = run["latencies"].get("end_to_end", {})
        cards = [
            ("throughput (steady)", f"{run['throughput']['steady_per_s']:,.0f}/s"),
            ("dispatch P99", f"{_fmt_ms(disp.get('p99_ms', 0))} ms" if disp else "n/a"),
            ("end-to-end P99", f"{_fmt_ms(e2e.get('p99_ms', 0))} ms" if e2e else "n/a"),
            ("completed", f"{run['completed']:,}"),
            ("lost / duplicated", f"{run['lost_count']} / {run['duplicated_count']}"),
        ]
        parts.append(f'<h3 style="color:{color}">{_e(_run_label(run))}</h3><div class="cards">')
        parts += [
            f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>'
            for k, v in cards
        ]
        parts.append("</div>")
        parts.append(_latency_table(run))
        tp = run["throughput"]
        counters = ", ".join(f"{k}: {v}" for k, v in run["counters"].items())
        parts.append(
            f"<p>Throughput mean {tp['mean_per_s']:,.0f}/s, steady {tp['steady_per_s']:,.0f}/s, "
            f"peak {tp['peak_per_s']:,.0f}/s over {run['duration_s']:.1f} s. "
            f"Submitted {run['submitted']:,}, acknowledged {run['acknowledged']:,}, completed "
            f"{run['completed']:,}. {_e(counters)}.</p>"
        )
        for note in run.get("notes", []):
            parts.append(f"<p class='sub'>Note: {_e(note)}</p>")
        lines = detail_lines(run)
        if lines:
            parts.append("<ul>" + "".join(f"<li>{_e(line)}</li>" for line in lines) + "</ul>")

    comparison = doc.get("comparison")
    if comparison:
        parts.append(
            f'<h2 id="comparison">{_e(comparison["base"])} vs {_e(comparison["peer"])}</h2>'
        )
        parts.append(
            f"<p class='sub'>Above 1: {_e(comparison['base'])} is better (throughput: "
            f"{_e(comparison['base'])}/{_e(comparison['peer'])}; latency: "
            f"{_e(comparison['peer'])}/{_e(comparison['base'])}).</p><table><tr><th>figure</th><th>ratio</th></tr>"
        )
        for k, v in comparison["ratios"].items():
            parts.append(f"<tr><td>{_e(k)}</td><td>{_e(_ratio_text(comparison, k, v))}</td></tr>")
        parts.append("</table>")
        if params.get("mode") == "closed loop":
            parts.append(f"<p class='sub'>Note: {_e(COMPARISON_CLOSED_LOOP_NOTE)}.</p>")

    if doc.get("targets"):
        parts.append('<h2 id="targets">Targets (DESIGN.md)</h2><table>')
        parts.append("<tr><th>target</th><th>goal</th><th>measured</th><th>result</th></tr>")
        for t in doc["targets"]:
            met = t.get("met")
            cls, word = {True: ("met", "met"), False: ("missed", "missed")}.get(met, ("", "n/a"))
            parts.append(
                f"<tr><td>{_e(t['name'])}</td><td>{_e(t['goal'])}</td><td>{_e(t.get('measured', ''))}</td>"
                f"<td class='{cls}'>{word}</td></tr>"
            )
        parts.append("</table>")

    parts.append('<h2 id="exactly-once">Exactly-once check</h2><table>')
    parts.append(
        "<tr><th>system</th><th>acknowledged</th><th>terminal states</th><th>lost</th>"
        "<th>unfinished</th><th>duplicated</th></tr>"
    )
    for run in runs:
        states = ", ".join(f"{k} {v}" for k, v in run["terminal_states"].items()) or "—"
        parts.append(
            f"<tr><td>{_e(run['system'])}</td><td>{run['acknowledged']:,}</td><td>{_e(states)}</td>"
            f"<td>{run['lost_count']}</td><td>{run.get('unfinished_count', 0)}</td>"
            f"<td>{run['duplicated_count']}</td></tr>"
        )
    parts.append("</table>")
    for run in runs:
        for key in ("lost", "unfinished", "duplicated"):
            if run.get(key):
                ids = ", ".join(run[key][:20])
                parts.append(
                    f"<p>{_e(run['system'])} {key} (first ids): <code>{_e(ids)}</code></p>"
                )

    names = _metric_names(doc)
    parts.append('<h2 id="histograms">Latency histograms</h2>')
    for name in names:
        series = [
            (_run_label(r), _color(r["system"], i), r["latencies"][name]["histogram"])
            for i, r in enumerate(runs)
            if name in r["latencies"]
        ]
        parts.append(f"<h3>{_e(METRIC_TITLES.get(name, name))}</h3>")
        parts.append(svg_histogram(f"{name} histogram", series))

    parts.append('<h2 id="percentiles">Percentile curves</h2>')
    for name in names:
        series = [
            (_run_label(r), _color(r["system"], i), r["latencies"][name]["percentile_curve"])
            for i, r in enumerate(runs)
            if name in r["latencies"]
        ]
        parts.append(f"<h3>{_e(METRIC_TITLES.get(name, name))}</h3>")
        parts.append(svg_percentile_curve(f"{name} percentile distribution", series))

    parts.append('<h2 id="throughput">Throughput over time</h2>')
    tseries = [
        (
            _run_label(r),
            _color(r["system"], i),
            r["throughput"]["series"],
            r["throughput"]["bucket_s"],
        )
        for i, r in enumerate(runs)
    ]
    markers = [mk for r in runs for mk in r.get("markers", [])]
    parts.append(svg_throughput("throughput", tseries, markers))

    for run in runs:
        if run.get("samples") or run.get("extra"):
            parts.append(f"<h2>Scenario details: {_e(run['system'])}</h2>")
            if run.get("samples"):
                shown = {
                    k: ", ".join(f"{v:.4g}" for v in vs[:20]) + (" …" if len(vs) > 20 else "")
                    for k, vs in run["samples"].items()
                }
                parts.append(_kv_table(shown))
            if run.get("extra"):
                parts.append(_kv_table(run["extra"]))

    parts.append('<h2 id="parameters">Run parameters</h2>')
    parts.append(_kv_table(params))
    parts.append('<h2 id="machine">Machine</h2>')
    parts.append(_kv_table(doc.get("machine", {})))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(doc: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(doc), encoding="utf-8")
    return path


def write_all(doc: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write report.json and report.html into `out_dir`; return their paths."""
    return write_json(doc, out_dir / JSON_NAME), write_html(doc, out_dir / HTML_NAME)
