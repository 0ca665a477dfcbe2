"""`agentmesh dashboard` against a live cluster running a backlog, read in headless
Chromium: the test checks what the page SHOWS once its script has run (leader, agents,
throughput, the dead-letter queue, a task's page with its result), and keeps a
screenshot at artifacts/dashboard.png for CI to keep.

Skipped without Chromium (failed under CI, where scripts/setup.sh installs it).
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from protos.agentmesh.v1 import task_pb2 as tpb
from registry.etcd_server import free_port
from services.client import MeshClient

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "artifacts" / "dashboard.png"
S = tpb.TaskState
TERMINAL = {S.TASK_STATE_SUCCEEDED, S.TASK_STATE_CANCELLED, S.TASK_STATE_DEAD_LETTER}
AGENTS = 8
SLEEPS = 480  # at 100 ms on 8 agents: about 6 s of work, long enough to look at it mid-run
ECHOES = 10
DEAD = 4
# Only catch a hang: each wait normally takes well under a second.
HANG_S = 30.0
# As the machine notes give them: without the background-networking flags Chromium
# keeps trying (and failing) to reach Google's hosts from this closed network.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--lang=en-US",
]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    message = "Chromium is not installed (bash scripts/setup.sh system installs it)"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {message}", pytrace=False)
    pytest.skip(message)


def browse(binary: str, profile: Path, url: str, *extra: str) -> str:
    """Load `url` in a fresh headless Chromium and let its script run (virtual time:
    Chromium waits for the page's fetches within the budget); returns its stdout."""
    profile.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [
            binary,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--virtual-time-budget=2500",
            "--enable-logging=stderr",
            "--v=0",
            *extra,
            url,
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    log = done.stderr.decode(errors="replace")
    assert done.returncode == 0, log[-2000:]
    # the page's own script must not fail (Chromium logs console errors as CONSOLE lines)
    errors = [line for line in log.splitlines() if ":CONSOLE" in line and "Uncaught" in line]
    assert not errors, "\n".join(errors)
    return done.stdout.decode(errors="replace")


def text_of(dom: str, element_id: str) -> str:
    """The text inside the element with this id (no nested tags expected)."""
    found = re.search(rf'id="{re.escape(element_id)}"[^>]*>([^<]*)<', dom)
    assert found, f"no #{element_id} in the page"
    return html.unescape(found.group(1))


def table_body(dom: str, table_id: str) -> str:
    found = re.search(rf'<table[^>]*id="{re.escape(table_id)}".*?</table>', dom, re.S)
    assert found, f"no table #{table_id} in the page"
    return found.group(0)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


async def wait_for(what: str, check: Any, timeout_s: float = HANG_S) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await asyncio.to_thread(check)
        except (OSError, urllib.error.URLError, ValueError) as err:
            last = err
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what}: not after {timeout_s} s (last: {last!r})")


async def wait_terminal(client: MeshClient, ids: list[str]) -> list[tpb.Task]:
    deadline = time.monotonic() + HANG_S
    while True:
        tasks = [await client.get(i) for i in ids]
        if all(t.state in TERMINAL for t in tasks):
            return tasks
        assert time.monotonic() < deadline, "tasks not terminal in time"
        await asyncio.sleep(0.2)


def start_dashboard(port: int, etcd: str, log_path: Path) -> subprocess.Popen[bytes]:
    """`agentmesh dashboard` as its own process, as an operator starts it."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "dashboard",
                "--port",
                str(port),
                "--etcd",
                etcd,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=ROOT,
        )


@pytest.mark.timeout(150)
async def test_dashboard_shows_the_live_cluster(cluster: Any, tmp_path: Path) -> None:
    binary = chromium()
    c = await cluster(agents=AGENTS, pools=2, sleep_ms="fixed:100")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "dashboard.log"
    proc = start_dashboard(port, c.etcd_endpoint, log_path)
    try:
        # the dashboard follows the events stream before any work starts
        await wait_for(
            "the dashboard connected to the events stream",
            lambda: (
                get_json(f"{base}/api/snapshot?points=0")["source"]["event_stream"] == "connected"
            ),
        )
        run = f"{int(time.time())}"
        async with MeshClient(etcd=c.etcd_endpoint) as client:
            leader = (await client.status()).leader_endpoint
            dead = [
                tpb.TaskSpec(task_id=f"dlq-{run}-{i}", kind="fail", payload=b'{"retryable": false}')
                for i in range(DEAD)
            ]
            await client.submit_batch(dead)
            for t in await wait_terminal(client, [s.task_id for s in dead]):
                assert t.state == S.TASK_STATE_DEAD_LETTER
            echoes = [
                tpb.TaskSpec(
                    task_id=f"echo-{run}-{i}", kind="echo", payload=f"hello {i} <b>".encode()
                )
                for i in range(ECHOES)
            ]
            sleeps = [
                tpb.TaskSpec(task_id=f"sleep-{run}-{i:04d}", kind="sleep", priority=i % 3)
                for i in range(SLEEPS)
            ]
            await client.submit_batch(echoes + sleeps)
            # mid-run: the page should show work being done, not only that it loads
            await wait_for(
                "throughput shows on the dashboard",
                lambda: get_json(f"{base}/api/snapshot?points=0")["throughput"]["now_per_s"] > 0,
            )
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            SCREENSHOT.unlink(missing_ok=True)
            # both at once, so the picture and the checked page show the same moment
            dom, _ = await asyncio.gather(
                asyncio.to_thread(browse, binary, tmp_path / "profile-1", f"{base}/", "--dump-dom"),
                asyncio.to_thread(
                    browse,
                    binary,
                    tmp_path / "profile-2",
                    f"{base}/",
                    f"--screenshot={SCREENSHOT}",
                    "--window-size=1400,1500",
                ),
            )
            print(f"\ndashboard screenshot: {SCREENSHOT}")
            await wait_terminal(client, [s.task_id for s in echoes + sleeps[-5:]])

        assert text_of(dom, "leader-endpoint") == leader
        assert text_of(dom, "agent-count") == str(AGENTS)
        assert text_of(dom, "stream") == "connected"
        throughput = re.search(r'id="throughput-now"[^>]*data-value="([0-9.]+)"', dom)
        assert throughput, "no throughput figure on the page"
        assert float(throughput.group(1)) > 0
        assert int(text_of(dom, "seen-DEAD_LETTER").replace(",", "")) == DEAD
        assert int(text_of(dom, "seen-SUCCEEDED").replace(",", "")) > 0
        agents = table_body(dom, "agents")
        assert agents.count("data-agent=") == AGENTS
        dlq = table_body(dom, "dlq")
        for spec in dead:
            assert f'data-task="{spec.task_id}"' in dlq
        assert "failed on purpose" in dlq
        chart = re.search(r'<svg[^>]*id="chart-throughput".*?</svg>', dom, re.S)
        assert chart
        assert 'data-series="finished"' in chart.group(0)
        assert SCREENSHOT.stat().st_size > 20_000  # a drawn page, not a blank one

        # a task's page: its record, with the result as text (escaped)
        page = await asyncio.to_thread(
            browse, binary, tmp_path / "profile-3", f"{base}/task?id=echo-{run}-3", "--dump-dom"
        )
        assert text_of(page, "task-state") == "SUCCEEDED"
        assert text_of(page, "task-result") == "hello 3 <b>"
        assert "<b>\n" not in page  # the payload's tag is text, not markup
        assert "history seen by this dashboard" in page

        # the search: a list by state links to every dead task's page
        listing = await asyncio.to_thread(
            browse,
            binary,
            tmp_path / "profile-4",
            f"{base}/tasks?state=DEAD_LETTER&kind=fail",
            "--dump-dom",
        )
        for spec in dead:
            assert f'href="/task?id={spec.task_id}"' in listing
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            code = None
        print(log_path.read_text(errors="replace")[-3000:])
    assert code == 0, "the dashboard did not stop cleanly on SIGTERM"
