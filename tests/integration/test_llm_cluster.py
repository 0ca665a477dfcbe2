"""`llm` tasks end to end: real etcd, a real coordinator and agent pool process, the real
`anthropic` SDK in the pool, and the local Messages API server (in this test's process).
No key and no network."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from loadtest.fake_anthropic import FakeAnthropic, FakeConfig
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.llm_cost import DEFAULT_PRICES
from services.client import MeshClient
from tests.integration.conftest import ClusterFactory

pytestmark = pytest.mark.integration

S = tpb.TaskState
TERMINAL = {S.TASK_STATE_SUCCEEDED, S.TASK_STATE_CANCELLED, S.TASK_STATE_DEAD_LETTER}
HANG_S = 30.0


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    server = FakeAnthropic(FakeConfig(latency_ms="fixed:20", output_tokens="fixed:30", seed=3))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def until_terminal(client: MeshClient, task_id: str) -> tpb.Task:
    async for event in client.watch_task(task_id):
        if event.task.state in TERMINAL:
            return event.task
    raise AssertionError(f"the watch of {task_id} ended before a terminal state")


@pytest.mark.timeout(90)
async def test_llm_tasks_run_on_a_pool_against_the_local_server(
    cluster: ClusterFactory, fake: FakeAnthropic
) -> None:
    local = await cluster(
        agents=2,
        pools=1,
        env={
            "AGENTMESH_KINDS": "echo,llm",
            "AGENTMESH_ROLES": "documenter",  # a task naming a role only goes to agents with it
            "ANTHROPIC_API_KEY": "sk-test-not-a-real-key",
            "ANTHROPIC_BASE_URL": fake.url,
            "AGENTMESH_LLM_BACKOFF_INITIAL_S": "0.05",
        },
    )
    async with MeshClient(
        etcd=local.etcd_endpoint, cluster=local.spec.cluster, timeout_s=5.0
    ) as client:
        fake.script("529")  # the first call is overloaded once: retried inside the attempt
        ok = tpb.TaskSpec(
            task_id="llm-ok",
            kind="llm",
            role="documenter",
            timeout_s=HANG_S,
            payload=json.dumps(
                {"prompt": "Describe agentmesh in one line.", "max_tokens": 64}
            ).encode(),
        )
        await client.submit(ok)
        done = await until_terminal(client, "llm-ok")

        fake.script("400")  # a request the API refuses: not retried, dead-lettered at once
        bad = tpb.TaskSpec(
            task_id="llm-400",
            kind="llm",
            max_attempts=3,
            timeout_s=HANG_S,
            payload=json.dumps({"prompt": "x"}).encode(),
        )
        await client.submit(bad)
        refused = await until_terminal(client, "llm-400")

    assert done.state == S.TASK_STATE_SUCCEEDED, done.last_error
    doc = json.loads(done.result)
    assert doc["text"].startswith("[simulated]")
    assert doc["model"] == "claude-haiku-5-5"  # the documenter role's default model
    assert doc["attempts"] == 2
    assert done.usage.output_tokens == 30
    assert done.usage.input_tokens > 0
    expected = DEFAULT_PRICES["claude-haiku-5-5"].cost(done.usage.input_tokens, 30)
    assert done.usage.cost_usd == pytest.approx(expected)

    assert refused.state == S.TASK_STATE_DEAD_LETTER
    assert refused.attempts == 1
    assert "400 invalid_request_error" in refused.last_error
    assert fake.stats.requests == 3
