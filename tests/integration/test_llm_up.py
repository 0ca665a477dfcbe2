"""`agentmesh up --backlog N [--executor llm]` as a user runs it: real processes, the
real SDK in the pool, the local Messages API server via ANTHROPIC_BASE_URL (in this
test's process). No key and no network."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from loadtest.fake_anthropic import FakeAnthropic, FakeConfig
from registry.etcd_server import free_port
from tests.integration.test_cluster import agentmesh_cmd

pytestmark = pytest.mark.integration

SMALL = ["--agents", "2", "--pools", "1", "--health-monitors", "0", "--consensus", "0"]


def up_args(tmp_path: Path, name: str) -> list[str]:
    return [
        *agentmesh_cmd(),
        "up",
        *SMALL,
        "--data-dir",
        str(tmp_path / name),
        "--etcd-port",
        str(free_port()),
        "--port",
        str(free_port()),
        "--exit",
    ]


async def run_command(*argv: str, env: dict[str, str], timeout_s: float) -> tuple[int, str, str]:
    """Run `agentmesh up`; on timeout SIGTERM it first, so it stops the cluster it started
    (its services run in their own sessions: killing the CLI alone would leave them)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **env},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        raise AssertionError(f"{' '.join(argv)} did not finish within {timeout_s}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    server = FakeAnthropic(FakeConfig(latency_ms="fixed:10", output_tokens="fixed:25", seed=2))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def without_key() -> dict[str, str]:
    return {k: "" for k in os.environ if k.startswith("ANTHROPIC_")}


@pytest.mark.timeout(150)
async def test_up_without_a_key_runs_the_simulated_backlog_and_says_why_in_one_line(
    tmp_path: Path, etcd_binary: str
) -> None:
    code, out, err = await run_command(
        *up_args(tmp_path, "nokey"),
        "--backlog",
        "3",
        "--executor",
        "llm",
        env={**without_key(), "AGENTMESH_ETCD_BIN": etcd_binary},
        timeout_s=100,
    )
    assert code == 0, out + err
    (line,) = [x for x in out.splitlines() if "llm executor is off" in x]
    assert "ANTHROPIC_API_KEY is not set" in line
    assert "the backlog runs simulated `sleep` tasks" in line
    assert "simulated `sleep` tasks" in out
    assert "cost estimate" not in out


@pytest.mark.timeout(150)
async def test_up_with_the_llm_executor_estimates_runs_and_prints_the_cost(
    tmp_path: Path, etcd_binary: str, fake: FakeAnthropic
) -> None:
    code, out, err = await run_command(
        *up_args(tmp_path, "llm"),
        "--backlog",
        "3",
        "--executor",
        "llm",
        "--yes",
        env={
            "ANTHROPIC_API_KEY": "sk-test-not-a-real-key",
            "ANTHROPIC_BASE_URL": fake.url,
            "AGENTMESH_ETCD_BIN": etcd_binary,
        },
        timeout_s=100,
    )
    assert code == 0, out + err
    assert "llm executor is off" not in out
    estimate = out.index("cost estimate: 3 llm call(s) on claude-haiku-5-5")
    assert estimate < out.index("cluster up"), out  # the estimate comes before anything starts
    assert fake.stats.requests == 3
    assert "[simulated]" in out  # each answer's first words
    (spent,) = [x for x in out.splitlines() if x.startswith("llm backlog cost: $")]
    assert "for 3 task(s)" in spent
    assert "75 output tokens" in spent  # 3 answers of 25 tokens, as the server counted them
