"""The leader's side of `llm` tasks end to end: real etcd, a real coordinator and agent
pool process, the real `anthropic` SDK in the pool, and the local Messages API server
(in this test's process) enforcing an account's limits. No key and no network.

- a bounded burst through admission control stays inside the server's limits (429s
  counted by the server), and `GetStatus` says why tasks wait while they do;
- a spent budget refuses new llm tasks with FAILED_PRECONDITION naming the budget and
  the spend, over gRPC; totals reach GetStatus, ListAgents and etcd;
- a payload that breaks the schema is refused at submit with INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest

from loadtest.fake_anthropic import FakeAnthropic, FakeConfig
from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb
from registry.etcd import Etcd
from services._common.ratelimit import ModelLimits
from services.client import MeshClient
from tests.integration.conftest import ClusterFactory

pytestmark = pytest.mark.integration

S = tpb.TaskState
TERMINAL = {S.TASK_STATE_SUCCEEDED, S.TASK_STATE_CANCELLED, S.TASK_STATE_DEAD_LETTER}
MODEL = "claude-haiku-5-5"
KEY = {"ANTHROPIC_API_KEY": "sk-test-not-a-real-key", "AGENTMESH_KINDS": "echo,llm"}


def llm_spec(task_id: str, project: str = "", max_tokens: int = 100) -> tpb.TaskSpec:
    return tpb.TaskSpec(
        task_id=task_id,
        kind="llm",
        timeout_s=30,
        max_attempts=3,
        metadata={"project": project} if project else {},
        payload=json.dumps({"prompt": "hello", "model": MODEL, "max_tokens": max_tokens}).encode(),
    )


async def wait_terminal(client: MeshClient, ids: set[str], timeout_s: float) -> list[tpb.Task]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        tasks = [await client.get(i) for i in sorted(ids)]
        if all(t.state in TERMINAL for t in tasks):
            return tasks
        if asyncio.get_running_loop().time() > deadline:
            states = sorted({S.Name(t.state) for t in tasks})
            raise AssertionError(
                f"not terminal after {timeout_s} s: {states}; {await client.status()}"
            )
        await asyncio.sleep(0.5)


@pytest.fixture
async def limited() -> AsyncIterator[FakeAnthropic]:
    # 240 requests a minute, enforced over 1 s windows: 4 per second. 12 agents whose
    # calls take 250 ms could make 48 a second: 12 times the limit
    server = FakeAnthropic(
        FakeConfig(
            latency_ms="fixed:250",
            output_tokens="fixed:20",
            limits={"*": ModelLimits(240, 0, 0)},
            burst_s=1.0,
            seed=5,
        )
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.mark.timeout(120)
async def test_a_burst_through_admission_stays_inside_the_limits_and_status_says_why(
    cluster: ClusterFactory, limited: FakeAnthropic
) -> None:
    local = await cluster(
        agents=12,
        pools=1,
        env={
            **KEY,
            "ANTHROPIC_BASE_URL": limited.url,
            "AGENTMESH_LLM_LIMITS": f"{MODEL}=240/0/0",
            # half the server's 1 s burst: calls admitted apart but delayed on their way
            # (a busy machine) can reach the server up to 0.5 s closer together
            "AGENTMESH_LLM_ADMISSION_BURST_S": "0.5",
        },
    )
    tasks = 40  # about 10 s at 4 a second
    async with MeshClient(
        etcd=local.etcd_endpoint, cluster=local.spec.cluster, timeout_s=5.0
    ) as client:
        await client.submit_batch([llm_spec(f"burst-{i:03d}") for i in range(tasks)])
        reasons: list[str] = []
        for _ in range(20):
            status = await client.status()
            reasons.extend(status.llm_waiting)
            if reasons:
                break
            await asyncio.sleep(0.1)
        try:
            done = await wait_terminal(client, {f"burst-{i:03d}" for i in range(tasks)}, 60)
        except AssertionError as err:
            raise AssertionError(f"{limited.stats}") from err
        status = await client.status()

    assert [t.state for t in done] == [S.TASK_STATE_SUCCEEDED] * tasks
    # the server counted every call; admission kept them inside its buckets
    # without admission this burst meets about two 429s per task (12 agents, 12 times the
    # limit); with it, only the first second's jitter can (an agent's first call starts
    # its HTTP client, so calls admitted apart can reach the server together)
    assert limited.stats.rate_limited <= tasks // 10, limited.stats
    assert limited.stats.requests == tasks + limited.stats.rate_limited
    # while they waited, status said why (the model, the limit, how many wait)
    assert any(r.startswith(f"{MODEL}: waiting for requests per minute") for r in reasons), reasons
    assert any("llm task(s) queued" in r for r in reasons), reasons
    models = {(c.dimension, c.key): c for c in status.llm_costs}
    assert models["model", MODEL].calls == tasks


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    server = FakeAnthropic(FakeConfig(latency_ms="fixed:10", output_tokens="fixed:30", seed=3))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.mark.timeout(90)
async def test_a_spent_budget_refuses_new_llm_tasks_with_failed_precondition(
    cluster: ClusterFactory, fake: FakeAnthropic
) -> None:
    local = await cluster(
        agents=2,
        pools=1,
        env={
            **KEY,
            "ANTHROPIC_BASE_URL": fake.url,
            # $1,000 per million tokens in and out: one small call costs a few cents
            "AGENTMESH_LLM_PRICES": f"{MODEL}=1000:1000",
            "AGENTMESH_LLM_PROJECT_BUDGETS": "alpha=0.01",
        },
    )
    async with MeshClient(
        etcd=local.etcd_endpoint, cluster=local.spec.cluster, timeout_s=5.0
    ) as client:
        # a payload that breaks the schema never becomes a task
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await client.submit(
                tpb.TaskSpec(
                    task_id="bad-1", kind="llm", payload=b'{"prompt": "x", "max_tokens": 0}'
                )
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'max_tokens' must be an integer from 1 to" in (bad.value.details() or "")

        await client.submit(llm_spec("alpha-1", project="alpha"))
        (first,) = await wait_terminal(client, {"alpha-1"}, 30)
        assert first.state == S.TASK_STATE_SUCCEEDED, first.last_error
        spent = first.usage.cost_usd
        assert spent > 0.01

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.submit(llm_spec("alpha-2", project="alpha"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"budget of project 'alpha' reached: ${spent:,.2f} of $0.01 spent" in (
            refused.value.details() or ""
        )
        # other projects and other kinds still run
        await client.submit(llm_spec("beta-1", project="beta"))
        await client.submit(tpb.TaskSpec(task_id="echo-1", kind="echo", payload=b"hi"))
        beta, echo = await wait_terminal(client, {"beta-1", "echo-1"}, 30)
        assert beta.state == echo.state == S.TASK_STATE_SUCCEEDED

        status = await client.status()
        agents = await client.agents()

    budgets = {b.name: b for b in status.llm_budgets}
    assert budgets["alpha"].spent_usd == pytest.approx(spent)
    assert budgets["alpha"].cap_usd == 0.01
    totals = {(c.dimension, c.key): c for c in status.llm_costs}
    assert totals["project", "alpha"].calls == 1
    assert totals["project", "beta"].calls == 1
    assert totals["model", MODEL].usage.cost_usd == pytest.approx(spent + beta.usage.cost_usd)
    assert sum(a.llm_calls for a in agents.agents) == 2
    assert sum(a.llm_usage.cost_usd for a in agents.agents) == pytest.approx(
        spent + beta.usage.cost_usd
    )

    # the totals are in etcd, for the next leader
    etcd = Etcd(local.etcd_endpoint, prefix=f"/agentmesh/{local.spec.cluster}/")
    try:
        for _ in range(30):
            kv = await etcd.get(etcd.key("costs", "project", "alpha"))
            if kv is not None:
                break
            await asyncio.sleep(0.1)
        assert kv is not None
        assert cpb.CostTotal.FromString(kv.value).usage.cost_usd == pytest.approx(spent)
    finally:
        await etcd.close()
