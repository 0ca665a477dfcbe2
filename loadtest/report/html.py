"""The report as one self-contained HTML file: inline CSS and SVG, no scripts, nothing
fetched, so it opens on an offline machine and survives being mailed around."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from loadtest.report.common import (
    COMPARISON_CLOSED_LOOP_NOTE,
    CPU_HEADERS,
    HTML_NAME,
    JSON_NAME,
    METRIC_TITLES,
    SUMMARY_COLUMNS,
    SUMMARY_HEADERS,
    color,
    cpu_caption,
    cpu_rows,
    detail_lines,
    fmt_ms,
    headline,
    metric_names,
    ratio_text,
    run_label,
)
from loadtest.report.svg import svg_histogram, svg_percentile_curve, svg_throughput

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
    for name in metric_names({"runs": [run]}):
        lat = run["latencies"][name]
        cells = [str(lat["count"])] + [fmt_ms(lat[c]) for c in SUMMARY_COLUMNS[1:]]
        rows.append(f"<tr><td>{_e(name)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<table class="latency"><tr>{head}</tr>{"".join(rows)}</table>'


def _cpu_table(run: dict[str, Any]) -> str:
    caption = f"<p class='sub'>{_e(cpu_caption(run))}</p>"
    rows = cpu_rows(run)
    if not rows:
        return caption
    head = "".join(f"<th>{_e(h)}</th>" for h in CPU_HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'{caption}<table class="cpu"><tr>{head}</tr>{body}</table>'


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
        col = color(run["system"], i)
        sent = run["latencies"].get("submit_to_receive", {})
        e2e = run["latencies"].get("end_to_end", {})
        cpu = run.get("cpu") or {}
        per = cpu.get("servers", {}).get("ms_per_task") if cpu.get("measured") else None
        cards = [
            ("throughput (steady)", f"{run['throughput']['steady_per_s']:,.0f}/s"),
            (
                "submit sent → received P99",
                f"{fmt_ms(sent.get('p99_ms', 0))} ms" if sent else "n/a",
            ),
            ("end-to-end P99", f"{fmt_ms(e2e.get('p99_ms', 0))} ms" if e2e else "n/a"),
            ("server CPU per task", f"{per:.3f} ms" if per is not None else "not measured"),
            ("completed", f"{run['completed']:,}"),
            ("lost / duplicated", f"{run['lost_count']} / {run['duplicated_count']}"),
        ]
        parts.append(f'<h3 style="color:{col}">{_e(run_label(run))}</h3><div class="cards">')
        parts += [
            f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>'
            for k, v in cards
        ]
        parts.append("</div>")
        parts.append(_latency_table(run))
        parts.append(f"<p><b>{_e(headline(run))}</b></p>")
        parts.append(_cpu_table(run))
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
            parts.append(f"<tr><td>{_e(k)}</td><td>{_e(ratio_text(comparison, k, v))}</td></tr>")
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

    names = metric_names(doc)
    parts.append('<h2 id="histograms">Latency histograms</h2>')
    for name in names:
        series = [
            (run_label(r), color(r["system"], i), r["latencies"][name]["histogram"])
            for i, r in enumerate(runs)
            if name in r["latencies"]
        ]
        parts.append(f"<h3>{_e(METRIC_TITLES.get(name, name))}</h3>")
        parts.append(svg_histogram(f"{name} histogram", series))

    parts.append('<h2 id="percentiles">Percentile curves</h2>')
    for name in names:
        series = [
            (run_label(r), color(r["system"], i), r["latencies"][name]["percentile_curve"])
            for i, r in enumerate(runs)
            if name in r["latencies"]
        ]
        parts.append(f"<h3>{_e(METRIC_TITLES.get(name, name))}</h3>")
        parts.append(svg_percentile_curve(f"{name} percentile distribution", series))

    parts.append('<h2 id="throughput">Throughput over time</h2>')
    tseries = [
        (
            run_label(r),
            color(r["system"], i),
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


def write_json(doc: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def write_html(doc: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(doc), encoding="utf-8")
    return path


def write_all(doc: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write report.json and report.html into `out_dir`; return their paths."""
    return write_json(doc, out_dir / JSON_NAME), write_html(doc, out_dir / HTML_NAME)
