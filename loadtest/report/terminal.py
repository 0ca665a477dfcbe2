"""The end-of-run summary in the terminal (rich tables)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from loadtest.report.common import (
    COMPARISON_CLOSED_LOOP_NOTE,
    CPU_HEADERS,
    SUMMARY_COLUMNS,
    SUMMARY_HEADERS,
    cpu_caption,
    cpu_rows,
    detail_lines,
    fmt_ms,
    headline,
    metric_names,
    ratio_text,
    run_label,
)


def _print_cpu(run: dict[str, Any], console: Console) -> None:
    console.print(f"  {cpu_caption(run)}")
    rows = cpu_rows(run)
    if not rows:
        return
    table = Table(show_edge=False, box=None, padding=(0, 1, 0, 2))
    for i, header in enumerate(CPU_HEADERS):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def print_summary(doc: dict[str, Any], console: Console | None = None) -> None:
    """The end-of-run table: latencies, throughput, counters, exactly-once, ratios."""
    console = console or Console()
    if doc.get("simulated"):
        console.print(
            "[bold yellow]SIMULATED WORK[/]: the agents ran the `sleep` executor "
            "(no real work, no LLM); figures measure the mesh, not a model."
        )
    for run in doc["runs"]:
        table = Table(title=run_label(run), title_justify="left", show_edge=False)
        table.add_column("latency")
        for header in SUMMARY_HEADERS:
            table.add_column(header, justify="right")
        for name in metric_names({"runs": [run]}):
            lat = run["latencies"][name]
            cells = [str(lat["count"])] + [fmt_ms(lat[c]) for c in SUMMARY_COLUMNS[1:]]
            table.add_row(name, *cells)
        console.print(table)
        console.print(f"  [bold]{headline(run)}[/]")
        _print_cpu(run, console)
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
            table.add_row(key, ratio_text(comparison, key, value))
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
