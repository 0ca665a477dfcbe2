"""The `up --executor llm` demo helpers: the one line without a key, the estimate, the cost."""

from __future__ import annotations

import json

from protos.agentmesh.v1 import task_pb2 as tpb
from services.agent_pool.llm_config import LlmConfig
from services.coordinator import limits
from services.coordinator.config import CoordinatorConfig
from services.llm_demo import (
    MAX_TOKENS,
    answer_line,
    estimate,
    llm_off_line,
    sample_specs,
    spent_line,
)


def test_without_a_key_one_line_says_the_executor_is_off_and_why() -> None:
    line = llm_off_line({})
    assert line is not None
    assert "\n" not in line
    assert "llm executor is off: ANTHROPIC_API_KEY is not set" in line
    assert llm_off_line({"ANTHROPIC_API_KEY": "sk-x"}) is None


def test_samples_are_valid_llm_tasks_over_every_role() -> None:
    specs = sample_specs(7, "r1")
    limits.validate_batch(specs, CoordinatorConfig())  # the coordinator accepts them
    assert {s.role for s in specs} == {
        "researcher",
        "architect",
        "coder",
        "tester",
        "reviewer",
        "documenter",
    }
    assert len({s.task_id for s in specs}) == 7


def test_the_estimate_is_an_upper_bound_priced_at_max_tokens() -> None:
    specs = sample_specs(6, "r1")
    est = estimate(specs, LlmConfig())
    assert est.calls == 6
    assert est.max_output_tokens == 6 * MAX_TOKENS
    assert est.models == ("claude-haiku-5-5",)
    # Haiku 5.5: $0.10 in / $0.50 out per MTok
    assert est.max_cost_usd == (est.input_tokens * 0.10 + est.max_output_tokens * 0.50) / 1e6
    assert "at most $0.0007" in est.line()


def test_the_cost_afterwards_sums_what_the_tasks_recorded() -> None:
    tasks = [
        tpb.Task(
            spec=tpb.TaskSpec(kind="llm"),
            usage=tpb.TokenUsage(input_tokens=100, output_tokens=50, cost_usd=0.25),
        ),
        tpb.Task(
            spec=tpb.TaskSpec(kind="llm"),
            usage=tpb.TokenUsage(input_tokens=10, output_tokens=5, cost_usd=0.5),
        ),
        tpb.Task(spec=tpb.TaskSpec(kind="sleep")),
    ]
    assert spent_line(tasks) == (
        "llm backlog cost: $0.7500 for 2 task(s) (110 input and 55 output tokens, as the API counted them)"
    )


def test_status_says_why_llm_tasks_wait_and_what_was_spent() -> None:
    from protos.agentmesh.v1 import coordinator_pb2 as cpb
    from services.cli.status import llm_lines

    status = cpb.ClusterStatus(
        llm_waiting=["claude-haiku-5-5: waiting for requests per minute (...)"],
        llm_budgets=[cpb.BudgetStatus(name="alpha", cap_usd=1.0, spent_usd=1.5)],
        llm_costs=[
            cpb.CostTotal(dimension="model", key="claude-haiku-5-5", calls=3),
            cpb.CostTotal(dimension="agent", key="pool-1-a0001", calls=3),
        ],
    )
    lines = llm_lines(status)
    assert lines[0] == "llm wait   claude-haiku-5-5: waiting for requests per minute (...)"
    assert "alpha: $1.5000 of $1.00 spent  (REACHED: new llm tasks refused)" in lines[1]
    assert lines[2].startswith("llm model  claude-haiku-5-5: 3 calls")
    assert len(lines) == 3  # per-agent totals are in `agentmesh agents`, not here
    assert llm_lines(cpb.ClusterStatus()) == []


def test_a_failed_sample_shows_its_state_and_whole_error() -> None:
    """The reason sits at the end of an llm error ('... last error: connection to the API
    failed or dropped: ConnectError: [Errno -2] Name or service not known'); the line cut
    it at 100 characters, in the middle of 'connection to the API fa'."""
    error = (
        "llm call to claude-haiku-5-5 failed (gave up after 4 attempts); last error: "
        "connection to the API failed or dropped: ConnectError: [Errno -2] Name or service "
        "not known"
    )
    task = tpb.Task(
        task_id="llm-sample-1-0000",
        spec=tpb.TaskSpec(kind="llm", role="researcher"),
        state=tpb.TASK_STATE_DEAD_LETTER,
        last_error=error,
    )
    assert answer_line(task) == f"  researcher llm-sample-1-0000: DEAD_LETTER: {error}"


def test_an_answered_sample_shows_its_first_words() -> None:
    text = "A token bucket " * 20
    task = tpb.Task(
        task_id="llm-sample-1-0001",
        spec=tpb.TaskSpec(kind="llm", role="coder"),
        state=tpb.TASK_STATE_SUCCEEDED,
        result=json.dumps({"text": text, "stop_reason": "end_turn"}).encode(),
    )
    assert answer_line(task) == "  coder      llm-sample-1-0001: " + " ".join(text.split())[:100]
