"""`agentmesh status` against a live cluster: the live view in a terminal (a pty) ends
cleanly on Ctrl-C, `--json` carries what the events stream showed, `--once` keeps the
lines scripts parse; and the collector behind both follows a leader change."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.clock import SystemClock
from services.client import MeshClient
from services.observe.collector import Collector, Intervals, MeshReader
from services.observe.model import SwarmModel

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HANG_S = 30.0
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *args]


async def submit(client: MeshClient, prefix: str, n: int, kind: str = "echo") -> list[str]:
    specs = [tpb.TaskSpec(task_id=f"{prefix}-{i}", kind=kind, payload=b"x") for i in range(n)]
    await client.submit_batch(specs)
    return [s.task_id for s in specs]


async def wait_until(what: str, check: Any, timeout_s: float = HANG_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s} s"
        await asyncio.sleep(0.1)


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, env=env, timeout=30, check=False)


def in_terminal(argv: list[str], env: dict[str, str]) -> tuple[int, subprocess.Popen[bytes]]:
    """Start `argv` on a new pseudo-terminal; returns (our side's fd, the process)."""
    main, child = pty.openpty()
    proc = subprocess.Popen(
        argv, stdin=child, stdout=child, stderr=child, env=env, start_new_session=True
    )
    os.close(child)
    return main, proc


def read_pty(fd: int, until: Any, timeout_s: float) -> str:
    """Read what the program drew until `until(text)` holds (ANSI codes removed)."""
    out = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the program exited and closed its side
                break
            if not chunk:
                break
            out += chunk
            if until(ANSI.sub("", out.decode(errors="replace"))):
                break
    return ANSI.sub("", out.decode(errors="replace"))


@pytest.mark.timeout(120)
async def test_status_forms_against_a_live_cluster(cluster: Any) -> None:
    c = await cluster(agents=4, pools=1, sleep_ms="fixed:20")
    env = {**os.environ, "AGENTMESH_ETCD": c.etcd_endpoint, "PYTHONUNBUFFERED": "1"}
    async with MeshClient(etcd=c.etcd_endpoint) as client:
        leader = (await client.status()).leader_endpoint

        # --once: the plain lines (also what a run without a terminal prints)
        once = await asyncio.to_thread(run, cli("status", "--once"), env)
        assert once.returncode == 0, once.stderr
        lines = once.stdout.decode().splitlines()
        assert lines[0].startswith("leader     coordinator-1 at " + leader)
        assert lines[1].startswith("agents     4 connected")
        piped = await asyncio.to_thread(run, cli("status"), env)
        assert piped.stdout.decode().splitlines()[:2] == lines[:2]

        # --json: the snapshot, with what the stream saw while it watched
        proc = await asyncio.create_subprocess_exec(
            *cli("status", "--json", "--watch-s", "6"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        # work all through the window: when the stream opens depends on the machine's load
        batch = 0
        while proc.returncode is None:
            await submit(client, f"json-{batch}", 5)
            batch += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.3)
        out, err = await asyncio.wait_for(proc.communicate(), HANG_S)
        assert proc.returncode == 0, err
        snap = json.loads(out)
        assert snap["leader"]["endpoint"] == leader
        assert snap["agents"]["total"] == 4
        succeeded = snap["counts"]["seen"]["by_state"].get("SUCCEEDED", 0)
        assert 0 < succeeded <= 5 * batch
        assert sum(b["finished"] for b in snap["throughput"]["series"]) == succeeded
        assert snap["latency"]["recent"]["e2e"]["n"] == succeeded
        assert {s["health"] for s in snap["services"]} == {"SERVING"}

        # the live view in a terminal, ended by Ctrl-C
        main, live = in_terminal(
            cli("status", "--refresh-s", "0.2"),
            {**env, "COLUMNS": "160", "LINES": "50", "TERM": "xterm"},
        )
        try:
            seen = await asyncio.to_thread(
                read_pty,
                main,
                lambda t: "agents: 4 connected" in t and "events connected" in t,
                HANG_S,
            )
            assert leader in seen
            assert "events connected" in seen  # from here on, every change is seen
            await submit(client, "live", 20)
            drawn = await asyncio.to_thread(
                read_pty, main, lambda t: re.search(r"seen \(.*SUCCEEDED 20\b", t), HANG_S
            )
            assert re.search(r"seen \(.*SUCCEEDED 20\b", drawn), drawn[-2000:]
            live.send_signal(signal.SIGINT)
            code = await asyncio.to_thread(live.wait, 15)
            rest = await asyncio.to_thread(read_pty, main, lambda t: False, 1.0)
        finally:
            if live.poll() is None:
                live.kill()
                live.wait(5)
            os.close(main)
        assert code == 0
        assert "Traceback" not in rest
        assert "KeyboardInterrupt" not in rest


@pytest.mark.timeout(120)
async def test_the_collector_follows_a_leader_change(cluster: Any) -> None:
    c = await cluster(agents=4, pools=1, coordinators=2, sleep_ms="fixed:20")
    clock = SystemClock()
    reader = MeshReader(etcd=c.etcd_endpoint)
    model = SwarmModel(clock)
    collector = Collector(
        reader, model, clock, intervals=Intervals(status_s=0.2, backoff_max_s=1.0)
    )
    follow = asyncio.ensure_future(collector.run())
    try:
        async with MeshClient(etcd=c.etcd_endpoint) as client:
            await wait_until("the stream is up", lambda: model.stream == "connected")
            first = model.term
            old = model.status.leader_id if model.status else ""
            await submit(client, "before", 10)
            await wait_until("10 seen", lambda: model.seen["SUCCEEDED"] == 10)

            c.kill(old)  # SIGKILL: no resignation, the lease has to expire
            await wait_until("a new term", lambda: model.term != first)
            await wait_until("the stream is back", lambda: model.stream == "connected")
            assert model.status is not None
            assert model.status.leader_id != old
            await wait_until("agents back", lambda: len(model.agents) == 4)
            await submit(client, "after", 10)
            await wait_until("10 more seen", lambda: model.seen["SUCCEEDED"] == 20)
            snap = model.snapshot()
            (change,) = snap["leader"]["changes"]
            assert (change["previous_term"], change["term"]) == (first, model.term)
            assert snap["source"]["gaps"] >= 1
            assert snap["leader"]["endpoint"] == model.status.leader_endpoint
    finally:
        follow.cancel()
        with contextlib.suppress(BaseException):
            await follow
        await collector.close()
        await reader.close()
