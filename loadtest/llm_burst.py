"""The LLM burst experiment: N agents, M `llm` tasks, one account's limits (SIMULATED server).

Starts the local Messages API server (`loadtest.fake_anthropic`, a separate process) with
account limits set to a fraction of what the agents could use, a local cluster whose
pools run the real `llm` executor against it, submits every task at once, waits until each
is terminal and reports: calls and 429s (from the server's counters), throughput as a
fraction of each configured limit, end-to-end P50/P99 (task created → finished, from the
records) and the task outcomes. Bounded by --timeout-s; stops everything it started.

    python -m loadtest.llm_burst --agents 200 --tasks 2000 --out out/llm-burst.json

With admission control (the default) the leader holds each `llm` task QUEUED until the
model's buckets, set to the same limits as the server's, hold its estimate
(services/coordinator/llm_admission.py). With `--no-admission` every agent calls the
server as soon as it gets a task and retries on its own (honouring retry-after).
`--compare` runs both, one after the other, and reports them side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from loadtest.fake_anthropic import count_input_tokens
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.latency import HOUR_US, LatencyRecorder
from services.client import MeshClient
from services.cluster import ClusterSpec, LocalCluster

S = tpb.TaskState
TERMINAL = {S.TASK_STATE_SUCCEEDED, S.TASK_STATE_CANCELLED, S.TASK_STATE_DEAD_LETTER}


@dataclass
class Plan:
    agents: int
    tasks: int
    pools: int
    latency_ms: str
    output_tokens: str
    max_tokens: int
    prompt_bytes: int
    limit_fraction: float
    burst_s: float
    max_attempts: int
    model: str
    admission: bool = True
    input_tokens: int = 0
    potential_rpm: float = 0.0
    rpm: int = 0
    itpm: int = 0
    otpm: int = 0


def mean_ms(dist: str) -> float:
    kind, _, rest = dist.partition(":")
    a, _, b = rest.partition(":")
    if kind == "fixed":
        return float(a)
    if kind == "uniform":
        return (float(a) + float(b)) / 2
    if kind == "lognormal":
        return float(a) * math.exp(float(b) ** 2 / 2)
    raise ValueError(f"latency {dist!r}: fixed:MS, uniform:LO:HI or lognormal:MEDIAN:SIGMA")


def plan_limits(plan: Plan) -> Plan:
    """What the agents could use if nothing held them back, and the limits as a fraction of it.

    Each agent runs one call at a time, so together they could make agents / mean latency
    calls per second; each call counts its input tokens and, while it runs, max_tokens of
    output (the service's up-front estimate)."""
    prompt = "x" * plan.prompt_bytes
    plan.input_tokens = count_input_tokens(
        {"model": plan.model, "messages": [{"role": "user", "content": prompt}]}
    )
    plan.potential_rpm = plan.agents / (mean_ms(plan.latency_ms) / 1000) * 60
    plan.rpm = round(plan.potential_rpm * plan.limit_fraction)
    plan.itpm = round(plan.potential_rpm * plan.input_tokens * plan.limit_fraction)
    plan.otpm = round(plan.potential_rpm * plan.max_tokens * plan.limit_fraction)
    return plan


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile of `values` (ms) from an HdrHistogram (exact to 0.1 %, up to an
    hour); NaN when there are none."""
    if not values:
        return float("nan")
    return LatencyRecorder.of_seconds(
        "", (v / 1000 for v in values), highest_us=HOUR_US
    ).percentile_ms(p)


async def list_all(client: MeshClient) -> dict[str, tpb.Task]:
    out: dict[str, tpb.Task] = {}
    token = ""
    while True:
        page = await client.list(page_size=1000, page_token=token)
        out.update({t.task_id: t for t in page.tasks})
        token = page.next_page_token
        if not token:
            return out


def start_fake(plan: Plan, port: int, stats_file: Path, log: Path) -> subprocess.Popen[bytes]:
    args = [
        sys.executable,
        "-m",
        "loadtest.fake_anthropic",
        "--port",
        str(port),
        "--latency-ms",
        plan.latency_ms,
        "--output-tokens",
        plan.output_tokens,
        "--limits",
        f"*={plan.rpm}/{plan.itpm}/{plan.otpm}",
        "--burst-s",
        str(plan.burst_s),
        "--seed",
        "1",
        "--stats-file",
        str(stats_file),
    ]
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


async def run(plan: Plan, timeout_s: float, data_dir: Path) -> dict[str, Any]:
    from registry.etcd_server import free_port

    port = free_port()
    stats_file = data_dir / "fake-stats.json"
    fake = start_fake(plan, port, stats_file, data_dir / "fake.log")
    cluster = LocalCluster(
        ClusterSpec(
            data_dir=data_dir / "cluster",
            agents=plan.agents,
            pools=plan.pools,
            env={
                "AGENTMESH_KINDS": "llm",
                # the leader's buckets: the server's limits and burst window
                "AGENTMESH_LLM_ADMISSION": "true" if plan.admission else "false",
                "AGENTMESH_LLM_LIMITS": f"{plan.model}={plan.rpm}/{plan.itpm}/{plan.otpm}",
                "AGENTMESH_LLM_ADMISSION_BURST_S": str(plan.burst_s),
                "ANTHROPIC_API_KEY": "sk-simulated-not-a-real-key",
                "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}",
            },
        )
    )
    t_start = time.monotonic()
    load_start = os.getloadavg()
    try:
        cluster.start()
        await cluster.wait_ready(timeout_s=90, agents=plan.agents)
        payload = json.dumps(
            {"prompt": "x" * plan.prompt_bytes, "model": plan.model, "max_tokens": plan.max_tokens}
        ).encode()
        specs = [
            tpb.TaskSpec(
                task_id=f"burst-{i:05d}",
                kind="llm",
                payload=payload,
                max_attempts=plan.max_attempts,
                timeout_s=120,
            )
            for i in range(plan.tasks)
        ]
        async with MeshClient(
            etcd=cluster.etcd_endpoint, cluster="default", timeout_s=30
        ) as client:
            t_submit = time.monotonic()
            for i in range(0, len(specs), 500):
                await client.submit_batch(specs[i : i + 500])
            deadline = t_submit + timeout_s
            while True:
                tasks = await list_all(client)
                done = [t for t in tasks.values() if t.state in TERMINAL]
                if len(done) >= plan.tasks or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1.0)
            wall_s = time.monotonic() - t_submit
    finally:
        cluster.stop()
        if fake.poll() is None:
            fake.send_signal(signal.SIGTERM)
            try:
                fake.wait(15)
            except subprocess.TimeoutExpired:
                fake.kill()
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    doc = report(plan, tasks, stats, wall_s, time.monotonic() - t_start)
    # the machine is shared: say how busy it was (1-minute load average, 2 cores)
    doc["loadavg_1m"] = {"start": load_start[0], "end": os.getloadavg()[0]}
    return doc


def report(
    plan: Plan, tasks: dict[str, tpb.Task], stats: dict[str, Any], wall_s: float, total_s: float
) -> dict[str, Any]:
    outcomes: dict[str, int] = {}
    for t in tasks.values():
        name = S.Name(t.state).removeprefix("TASK_STATE_")
        outcomes[name] = outcomes.get(name, 0) + 1
    errors: dict[str, int] = {}
    for t in tasks.values():
        if t.state == S.TASK_STATE_DEAD_LETTER:
            key = t.last_error[:120]
            errors[key] = errors.get(key, 0) + 1
    finished = [t for t in tasks.values() if t.state == S.TASK_STATE_SUCCEEDED]
    attempts = sum(t.attempts for t in tasks.values())
    e2e_ms = [(t.finished_at_us - t.created_at_us) / 1000 for t in finished]
    calls = stats.get("requests", 0)
    r429 = stats.get("status", {}).get("429", 0)
    window = max(1e-9, stats.get("last_reply_wall_s", 0) - stats.get("first_request_wall_s", 0))
    ok = stats.get("succeeded", 0)
    return {
        "simulated": True,
        "what": "llm burst against the SIMULATED Messages API (loadtest.fake_anthropic)",
        "admission_control": plan.admission,
        "plan": asdict(plan),
        "calls": calls,
        "calls_429": r429,
        "calls_429_fraction": r429 / calls if calls else 0.0,
        "rate_limited_by_buckets": stats.get("rate_limited", 0),
        "tasks": outcomes,
        "task_attempts": attempts,
        "dead_letter_errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        "tasks_not_terminal": plan.tasks
        - sum(outcomes.get(k, 0) for k in ("SUCCEEDED", "CANCELLED", "DEAD_LETTER")),
        "server_window_s": round(window, 2),
        "throughput": {
            "calls_ok_per_min": round(ok / window * 60, 1),
            "rpm_fraction_of_limit": round(ok / window * 60 / plan.rpm, 3) if plan.rpm else None,
            "itpm_fraction_of_limit": round(
                stats.get("input_tokens", 0) / window * 60 / plan.itpm, 3
            )
            if plan.itpm
            else None,
            "otpm_fraction_of_limit": round(
                stats.get("output_tokens", 0) / window * 60 / plan.otpm, 3
            )
            if plan.otpm and "output_tokens" in stats
            else None,
        },
        # the middle 80 % of completions: leaves out the start (agents' first calls) and
        # the tail (a few tasks retried after the rest finished)
        "steady": steady(finished, plan.rpm),
        "end_to_end_ms": {
            "p50": round(percentile(e2e_ms, 50), 1),
            "p99": round(percentile(e2e_ms, 99), 1),
            "max": round(percentile(e2e_ms, 100), 1) if e2e_ms else None,
        },
        "submit_to_all_terminal_s": round(wall_s, 2),
        "run_s": round(total_s, 2),
        "server": stats,
    }


def one_run(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    if args.keep:
        where = Path(args.keep) / ("admission" if plan.admission else "no-admission")
        where.mkdir(parents=True, exist_ok=True)
        return asyncio.run(run(plan, args.timeout_s, where))
    with tempfile.TemporaryDirectory(prefix="llm-burst-") as tmp:
        return asyncio.run(run(plan, args.timeout_s, Path(tmp)))


def steady(finished: list[tpb.Task], rpm: int) -> dict[str, Any]:
    """Tasks finished per minute between the 10th and 90th percentile of finish times, and
    that as a fraction of the RPM limit (each task is at least one call)."""
    ends = sorted(t.finished_at_us for t in finished)
    if len(ends) < 10:
        return {}
    lo, hi = ends[len(ends) // 10], ends[len(ends) * 9 // 10]
    count = len(ends) * 9 // 10 - len(ends) // 10
    per_min = count / max(1e-9, (hi - lo) / 1e6) * 60
    return {
        "tasks_per_min": round(per_min, 1),
        "rpm_fraction_of_limit": round(per_min / rpm, 3) if rpm else None,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.llm_burst", description=__doc__.split("\n")[0]
    )
    p.add_argument("--agents", type=int, default=200)
    p.add_argument("--tasks", type=int, default=2000)
    p.add_argument("--pools", type=int, default=2)
    p.add_argument("--latency-ms", default="lognormal:2000:0.3", help="server time to first byte")
    p.add_argument("--output-tokens", default="uniform:50:150")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--prompt-bytes", type=int, default=400)
    p.add_argument(
        "--limit-fraction",
        type=float,
        default=0.5,
        help="limits as a fraction of what the agents could use",
    )
    p.add_argument(
        "--burst-s", type=float, default=1.0, help="seconds of refill the server's buckets hold"
    )
    p.add_argument("--max-attempts", type=int, default=5, help="task attempts before DEAD_LETTER")
    p.add_argument("--model", default="claude-haiku-5-5")
    p.add_argument(
        "--timeout-s", type=float, default=240.0, help="stop waiting for tasks after this long"
    )
    p.add_argument(
        "--admission",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the leader admits llm tasks through the limits (--no-admission: agents alone)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="run without admission, then with it, and report both",
    )
    p.add_argument("--out", default="", help="write the JSON report here too")
    p.add_argument("--keep", default="", help="keep logs and data in this directory")
    args = p.parse_args(argv)
    plan = plan_limits(
        Plan(
            agents=args.agents,
            tasks=args.tasks,
            pools=args.pools,
            latency_ms=args.latency_ms,
            output_tokens=args.output_tokens,
            max_tokens=args.max_tokens,
            prompt_bytes=args.prompt_bytes,
            limit_fraction=args.limit_fraction,
            burst_s=args.burst_s,
            max_attempts=args.max_attempts,
            model=args.model,
        )
    )
    result: dict[str, Any]
    if args.compare:
        result = {
            "command": "python -m loadtest.llm_burst " + " ".join(argv or sys.argv[1:]),
            "without_admission": one_run(replace(plan, admission=False), args),
            "with_admission": one_run(replace(plan, admission=True), args),
        }
    else:
        result = one_run(replace(plan, admission=args.admission), args)
        result["command"] = "python -m loadtest.llm_burst " + " ".join(argv or sys.argv[1:])
    text = json.dumps(result, indent=2)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
