"""Client commands refuse a number they cannot send with a one-line usage error (exit 2)
before they connect: no traceback, no 15 s of retries, no memory filled first."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb
from registry.etcd_server import free_port
from services import cli
from services.cli import common as cli_common
from services.cli import tasks as cli_tasks


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["submit", "--kind", "echo", "--max-attempts", "-1"], "--max-attempts -1 is out of range"),
        (
            ["submit", "--kind", "echo", "--max-attempts", "101"],
            "--max-attempts 101 is out of range",
        ),
        (["submit", "--kind", "noop", "--count", "100001"], "--count 100001 is out of range"),
        (["tasks", "--limit", "-1"], "--limit -1 is out of range: use 1 to 1000"),
        (["tasks", "--limit", "0"], "--limit 0 is out of range: use 1 to 1000"),
        (["decisions", "--limit", "-1"], "--limit -1 is out of range: use 1 to 1000"),
        (["propose", "x", "--quorum", "-1"], "--quorum -1 is out of range"),
        (["propose", "x", "--max-faulty", "-1"], "--max-faulty -1 is out of range"),
        (["propose", "x", "--timeout-s", "nan"], "--timeout-s nan is out of range"),
        (["propose", "x", "--timeout-s", "inf"], "--timeout-s inf is out of range"),
        (["propose", "x", "--timeout-s", "1e10"], "--timeout-s 1e+10 is out of range"),
    ],
)
def test_a_number_out_of_range_is_a_usage_error(
    args: list[str], said: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nobody listens there: a command that got as far as connecting fails with exit 1
    monkeypatch.setattr(cli_common, "CLIENT_RETRY_S", 0.3)
    result = CliRunner().invoke(cli.app, [*args, "--etcd", f"127.0.0.1:{free_port()}"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert said in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


class FakeMesh:
    """A MeshClient with two connected echo/sleep agents, one of them a coder on a GPU."""

    def __init__(self) -> None:
        self.submitted: list[tpb.TaskSpec] = []

    async def __aenter__(self) -> FakeMesh:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def agents(self) -> cpb.ListAgentsResponse:
        return cpb.ListAgentsResponse(
            agents=[
                cpb.AgentStatus(agent_id="a1", kinds=["echo", "sleep"]),
                cpb.AgentStatus(
                    agent_id="a2", kinds=["echo"], roles=["coder"], labels={"gpu": "1"}
                ),
            ]
        )

    async def submit(self, spec: tpb.TaskSpec) -> cpb.SubmitResponse:
        self.submitted.append(spec)
        return cpb.SubmitResponse(task=tpb.Task(task_id="t-1", spec=spec), created=True)

    async def submit_batch(self, specs: list[tpb.TaskSpec]) -> cpb.SubmitBatchResponse:
        self.submitted.extend(specs)
        return cpb.SubmitBatchResponse(
            results=[
                cpb.SubmitResponse(task=tpb.Task(task_id=f"t-{i}"), created=True)
                for i, _ in enumerate(specs)
            ]
        )


@pytest.mark.parametrize(
    ("args", "note"),
    [
        (
            ["--kind", "llm", "--payload", '{"prompt": "hi"}'],
            "note: no connected agent runs kind 'llm': 1 task(s) stay QUEUED until one "
            "connects (an agent pool started with --kinds llm and ANTHROPIC_API_KEY)",
        ),
        (
            ["--kind", "sleep", "--role", "coder", "--count", "3"],
            "note: no connected agent runs kind 'sleep' with role 'coder': 3 task(s) stay "
            "QUEUED until one connects",
        ),
        (
            ["--kind", "echo", "--label", "gpu=2"],
            "note: no connected agent runs kind 'echo' and label gpu=2: 1 task(s) stay "
            "QUEUED until one connects",
        ),
        (["--kind", "echo", "--role", "coder", "--label", "gpu=1"], ""),
        (["--kind", "sleep", "--count", "2"], ""),
    ],
)
def test_submit_says_when_no_connected_agent_can_run_the_tasks(
    args: list[str], note: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task nobody can run stays QUEUED without a word: `submit --kind llm` on a
    cluster whose pools run no llm agent (no ANTHROPIC_API_KEY) printed 'created QUEUED',
    and `--wait` then waited for ever."""
    mesh = FakeMesh()
    monkeypatch.setattr(cli_tasks, "mesh_client", lambda *_: mesh)
    result = CliRunner().invoke(cli.app, ["submit", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    assert mesh.submitted, "the tasks are still submitted"
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert notes == ([note] if note else []), result.output
