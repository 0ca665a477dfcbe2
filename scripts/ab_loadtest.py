"""Interleaved A/B of two source trees under the same load-test command.

    .venv/bin/python scripts/ab_loadtest.py --a /tmp/before --b . --rounds 3 --out out/ab \\
        -- --agents 200 --duration 20 --rate 770 --executor noop

Runs the command from each tree in turn, in the order A B, B A, A B, ... (so a drift
of the machine's speed within the hour falls on both sides alike). Each run starts in
the tree's own directory with PYTHONPATH set to it: the cluster's processes start as
`python -m services.cli`, and Python puts the working directory ahead of PYTHONPATH, so
setting only one of the two runs the wrong services (BENCHMARKS.md, issue 13's third
session). Uses this interpreter, whose packages both trees share. Prints one row per
run as it ends, then each side's median per figure. The reports stay in
`OUT/<side>-<round>/`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

COLUMNS = (
    ("tasks/s", lambda r: r["throughput"]["steady_per_s"]),
    ("s2r P50", lambda r: r["latencies"]["submit_to_receive"]["p50_ms"]),
    ("s2r P99", lambda r: r["latencies"]["submit_to_receive"]["p99_ms"]),
    ("e2e P50", lambda r: r["latencies"]["end_to_end"]["p50_ms"]),
    ("e2e P99", lambda r: r["latencies"]["end_to_end"]["p99_ms"]),
    ("servers ms/task", lambda r: r["cpu"]["servers"]["ms_per_task"]),
    ("leader ms/task", lambda r: r["cpu"]["roles"]["coordinator"]["ms_per_task"]),
    ("etcd ms/task", lambda r: r["cpu"]["roles"]["etcd"]["ms_per_task"]),
    ("commit busy %", lambda r: r["extra"]["commits"]["busy_pct"]),
    ("commit wait ms", lambda r: r["extra"]["commits"]["wait"]["mean_ms"]),
)
"""What each row shows: a header, and how to read it from an agentmesh run's JSON."""
WIDTHS = [max(8, len(name)) for name, _ in COLUMNS]


def figures(report: dict[str, Any]) -> list[float | None]:
    """The COLUMNS of the report's agentmesh run; None where the report has no such figure."""
    run = next(r for r in report["runs"] if r["system"] == "agentmesh")
    out: list[float | None] = []
    for _, read in COLUMNS:
        try:
            out.append(float(read(run)))
        except (KeyError, TypeError, ValueError):
            out.append(None)
    return out


def row(label: str, values: list[float | None]) -> str:
    cells = ["—" if v is None else f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}" for v in values]
    return " | ".join([f"{label:10}", *(f"{c:>{w}}" for c, w in zip(cells, WIDTHS, strict=False))])


def medians(rows: list[list[float | None]]) -> list[float | None]:
    """Per column, the median of the runs that have the figure."""
    out: list[float | None] = []
    for column in zip(*rows, strict=True):
        present = [v for v in column if v is not None]
        out.append(statistics.median(present) if present else None)
    return out


def order(rounds: int) -> list[tuple[str, int]]:
    """A B, B A, A B, ...: (side, round) in the order they run."""
    runs = []
    for i in range(rounds):
        runs.extend((side, i + 1) for side in (("a", "b") if i % 2 == 0 else ("b", "a")))
    return runs


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="tree A (e.g. a worktree of main)")
    parser.add_argument("--b", type=Path, required=True, help="tree B (e.g. your change)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each tree")
    parser.add_argument("--out", type=Path, required=True, help="where the reports go")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not command:
        parser.error("give the load-test options after --, e.g. -- --rate 770 --duration 20")
    trees = {"a": args.a.resolve(), "b": args.b.resolve()}
    for side, tree in trees.items():
        if not (tree / "loadtest" / "__main__.py").is_file():
            parser.error(f"--{side} {tree}: not an agentmesh source tree")
    header = (f"{name:>{w}}" for (name, _), w in zip(COLUMNS, WIDTHS, strict=True))
    print(" | ".join([f"{'run':10}", *header]), flush=True)
    results: dict[str, list[list[float | None]]] = {"a": [], "b": []}
    for side, n in order(args.rounds):
        out = (args.out / f"{side}-{n}").resolve()
        out.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(trees[side]))
        cmd = [sys.executable, "-m", "loadtest", *command, "--no-progress", "--out", str(out)]
        with open(out / "loadtest.txt", "wb") as log:
            code = subprocess.run(cmd, cwd=trees[side], env=env, stdout=log, stderr=log).returncode
        report = out / "report.json"
        if not report.is_file():
            print(f"{side}-{n}: no report (exit {code}); see {out / 'loadtest.txt'}", flush=True)
            continue
        values = figures(json.loads(report.read_text(encoding="utf-8")))
        results[side].append(values)
        print(
            row(f"{side.upper()} {n}" + ("" if code == 0 else f" exit {code}"), values), flush=True
        )
    for side in ("a", "b"):
        if results[side]:
            print(row(f"{side.upper()} median", medians(results[side])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
