"""The limits table: every field is bounded, the largest task fits etcd, messages stay short."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.errors import InvalidArgumentError
from services._common.grpcserver import MAX_MESSAGE_BYTES, STATUS_MESSAGE_CHARS
from services.coordinator import limits
from services.coordinator.config import CoordinatorConfig
from services.coordinator.port import Write
from services.coordinator.store import _Prepared

L = limits
CFG = CoordinatorConfig()
HUGE = 3 * 1024 * 1024


def largest_task(cfg: CoordinatorConfig = CFG) -> tpb.Task:
    """A SUCCEEDED task with every field at its limit (multi-byte characters where a
    string's bytes could exceed its characters)."""
    spec = tpb.TaskSpec(
        task_id="t" * L.ID_BYTES,
        idempotency_key="k" * L.IDEMPOTENCY_KEY_BYTES,
        kind="echo",
        payload=b"p" * cfg.max_payload_bytes,
        priority=9,
        role="r" * L.ROLE_BYTES,
        max_attempts=100,
        timeout_s=L.TIMEOUT_S_MAX,
        required_labels={
            f"{i:03d}".ljust(L.LABEL_KEY_BYTES, "k"): "v" * L.LABEL_VALUE_BYTES
            for i in range(L.LABELS_ENTRIES)
        },
        metadata={
            f"{i:03d}".ljust(L.METADATA_KEY_BYTES, "k"): "é" * (L.METADATA_VALUE_BYTES // 2)
            for i in range(L.METADATA_ENTRIES)
        },
    )
    return tpb.Task(
        task_id=spec.task_id,
        spec=spec,
        state=tpb.TASK_STATE_SUCCEEDED,
        attempts=100,
        agent_id="a" * L.ID_BYTES,
        claim_token=2**62,
        result=b"r" * cfg.max_result_bytes,
        last_error=L.clip("e" * 10_000, L.ERROR_BYTES),
        usage=tpb.TokenUsage(input_tokens=2**63, output_tokens=2**63, cost_usd=1e300),
        created_at_us=2**62,
        assigned_at_us=2**62,
        received_at_us=2**62,
        finished_at_us=2**62,
        not_before_us=2**62,
        term=2**62,
    )


def test_the_largest_task_fits_one_etcd_request_with_room() -> None:
    task = largest_task()
    limits.validate_spec(task.spec, CFG)  # it is a legal task
    assert task.ByteSize() <= L.RECORD_BUDGET_BYTES
    prepared = _Prepared(
        Write(task, expect_mod=7, expect_claim=9, delete_claim=True),
        b"/agentmesh/" + b"c" * 64 + b"/tasks/" + task.task_id.encode(),
        b"/agentmesh/" + b"c" * 64 + b"/claims/" + task.task_id.encode(),
        b"/agentmesh/" + b"c" * 64 + b"/open/" + task.task_id.encode(),
        retention=2**62,
    )
    assert prepared.size <= L.WRITE_MAX_BYTES < L.ETCD_REQUEST_BYTES
    assert L.RECORD_BUDGET_BYTES + 64 * 1024 <= L.WRITE_MAX_BYTES


def test_the_declared_field_budget_covers_the_fields() -> None:
    task = largest_task()
    task.spec.ClearField("payload")
    task.ClearField("result")
    assert task.spec.ByteSize() <= L.SPEC_FIELDS_MAX_BYTES
    assert task.ByteSize() - task.spec.ByteSize() <= L.TASK_FIELDS_MAX_BYTES


def test_a_configuration_whose_task_would_not_fit_is_refused() -> None:
    limits.check_config(CFG)
    with pytest.raises(ValueError, match="max_payload_bytes"):
        limits.check_config(CoordinatorConfig(max_payload_bytes=1024 * 1024))
    with pytest.raises(ValueError, match="max_watchers"):
        limits.check_config(CoordinatorConfig(max_watchers=0))


def test_the_server_message_limit_matches_the_table() -> None:
    assert MAX_MESSAGE_BYTES == L.MAX_REQUEST_BYTES


def spec(**fields: Any) -> tpb.TaskSpec:
    return tpb.TaskSpec(**{"kind": "echo", **fields})


@pytest.mark.parametrize(
    ("bad", "field", "limit"),
    [
        (spec(role="r" * HUGE), "spec.role", "128 bytes"),
        (spec(kind="k" * HUGE), "spec.kind", "unknown"),
        (spec(idempotency_key="i" * HUGE), "spec.idempotency_key", "256 bytes"),
        (spec(task_id="t" * HUGE), "spec.task_id", "1-128"),
        (spec(task_id="t-1\n"), "spec.task_id", "1-128"),  # `$` alone let a newline end it
        (spec(required_labels={"k": "v" * HUGE}), "spec.required_labels['k']", "256 bytes"),
        (spec(required_labels={"k" * HUGE: "v"}), "spec.required_labels key", "128 bytes"),
        (spec(metadata={"m": "v" * HUGE}), "spec.metadata['m']", "1024 bytes"),
        (spec(metadata={str(i): "" for i in range(65)}), "spec.metadata", "limit is 64"),
        (spec(role="é" * 100), "spec.role", "128 bytes"),  # 200 bytes in 100 characters
        (spec(timeout_s=float("inf")), "spec.timeout_s", "finite"),
        (spec(timeout_s=float("nan")), "spec.timeout_s", "finite"),
    ],
)
def test_an_oversized_spec_field_is_named_with_its_limit_and_never_echoed(
    bad: tpb.TaskSpec, field: str, limit: str
) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        limits.validate_spec(bad, CFG)
    message = str(err.value)
    assert message.startswith(field)
    assert limit in message
    assert len(message) < 300


@pytest.mark.parametrize(
    ("hello", "field"),
    [
        (dict(labels={f"l{i}": "v" * (1024 * 1024) for i in range(4)}), "hello.labels"),
        (dict(kinds=["echo"] * 100_000), "hello.kinds has 100000 items"),
        (dict(kinds=["e" * 1000]), "hello.kinds[0]"),
        (dict(roles=["r" * HUGE]), "hello.roles[0]"),
        (dict(pool_id="p" * HUGE), "hello.pool_id"),
        (dict(agent_id="a" * HUGE), "hello.agent_id"),
        (dict(agent_id="a-1\n"), "hello.agent_id"),
        (
            dict(held_claims=[cpb.ClaimRef(task_id="t")] * (L.HELD_CLAIMS_ITEMS + 1)),
            "hello.held_claims",
        ),
    ],
)
def test_an_oversized_hello_is_refused(hello: dict[str, Any], field: str) -> None:
    fields: dict[str, Any] = dict(agent_id="a-1", lease_id=1, kinds=["echo"], capacity=1)
    fields.update(hello)
    with pytest.raises(InvalidArgumentError) as err:
        limits.validate_hello(cpb.AgentHello(**fields))
    assert field in str(err.value)
    assert len(str(err.value)) < 300


@pytest.mark.parametrize("task_id", ["t-1\n", "\nt-1", "t-1\r", "t 1"])
def test_a_task_id_with_a_line_break_is_refused_by_every_read(task_id: str) -> None:
    # GetTask, WatchTask, CancelTask and ListTasks' page_token all check with check_id:
    # "t-1\n" once passed, so a task listed as "t-1" could be another than `task get t-1`
    with pytest.raises(InvalidArgumentError) as err:
        limits.check_id("task_id", task_id)
    assert "1-128 characters" in str(err.value)


def test_quote_shows_a_short_prefix_only() -> None:
    assert limits.quote("short") == "'short'"
    long = limits.quote("x" * 10_000)
    assert long.startswith("'" + "x" * L.QUOTE_CHARS + "'")
    assert len(long) < 50
    assert limits.quote(b"\xff" * 100).count("\ufffd") == L.QUOTE_CHARS


def test_clip_cuts_to_the_byte_limit_and_says_so() -> None:
    assert limits.clip("ok", 10) == "ok"
    cut = limits.clip("é" * 5000, L.ERROR_BYTES)
    assert len(cut.encode()) <= L.ERROR_BYTES
    assert cut.endswith("(cut from 10000 bytes)")


def test_status_messages_are_capped() -> None:
    assert STATUS_MESSAGE_CHARS <= 1024


def test_the_readme_lists_every_limit() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Limits", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    table = "\n".join(rows)
    for limit in L.LIMITS:
        assert f"| {limit.what} | {limit.default} |" in table, limit.what
        assert limit.past in table, limit.what
    assert len(rows) - 1 == len(L.LIMITS)  # and nothing else (the header row aside)
    assert not re.search(r"1 MiB payload|payload over 1 MiB", readme)


# ---- llm payloads are checked at submit


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (b"", "must be a JSON object"),
        (b"not json", "must be UTF-8 JSON"),
        (b'{"max_tokens": 10}', "exactly one of 'prompt'"),
        (b'{"prompt": "hi", "max_tokens": 0}', "'max_tokens' must be an integer from 1 to"),
        (b'{"prompt": "hi", "temperature": 3}', "'temperature' must be a number from 0 to 1"),
        (b'{"prompt": "hi", "colour": "red"}', "unknown fields ['colour']"),
        (b'{"prompt": "hi", "complexity": "huge"}', "'complexity' must be one of"),
    ],
)
def test_an_llm_payload_that_breaks_the_schema_is_refused_saying_what_to_fix(
    payload: bytes, says: str
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        L.validate_batch([tpb.TaskSpec(kind="llm", payload=payload)], CFG)
    assert str(info.value).startswith("spec.payload: llm payload")
    assert says in str(info.value)
    assert "llm_payload.schema.json" in str(info.value)


def test_a_valid_llm_payload_passes_and_other_kinds_are_not_parsed() -> None:
    L.validate_batch([tpb.TaskSpec(kind="llm", payload=b'{"prompt": "hi", "max_tokens": 5}')], CFG)
    L.validate_batch([tpb.TaskSpec(kind="echo", payload=b"not json")], CFG)
    # the batch index names the task to fix
    with pytest.raises(InvalidArgumentError, match=r"^specs\[1\]\.payload"):
        L.validate_batch(
            [tpb.TaskSpec(kind="llm", payload=b'{"prompt": "a"}'), tpb.TaskSpec(kind="llm")], CFG
        )


def test_the_other_services_refuse_an_id_ending_in_a_newline() -> None:
    """`^...$` with re.match lets `$` match before a trailing newline: every service's
    id check must refuse "x\\n" as the coordinator's does."""
    from protos.agentmesh.v1 import health_pb2 as hpb
    from services.agent_pool.config import check_pool_id
    from services.agent_pool.llm_config import LlmConfig
    from services.agent_pool.llm_payload import PayloadError, parse_payload
    from services.consensus import limits as consensus_limits
    from services.health.core import validate_heartbeat

    with pytest.raises(InvalidArgumentError):
        consensus_limits.check_id("p-1\n", "proposal_id")
    consensus_limits.check_id("p-1", "proposal_id")
    info = hpb.AgentInfo(pool_id="pool-1", capacity=1)
    with pytest.raises(InvalidArgumentError, match="agent_id"):
        validate_heartbeat(hpb.Heartbeat(agent_id="a-1\n", info=info, sent_at_us=1), first=True)
    replacing = hpb.AgentInfo(pool_id="pool-1", capacity=1, replaces="a-0\n")
    with pytest.raises(InvalidArgumentError, match="replaces"):
        validate_heartbeat(hpb.Heartbeat(agent_id="a-1", info=replacing, sent_at_us=1), first=True)
    validate_heartbeat(hpb.Heartbeat(agent_id="a-1", info=info, sent_at_us=1), first=True)
    with pytest.raises(ValueError, match="pool-id"):
        check_pool_id("pool-1\n")
    check_pool_id("pool-1")
    schema = {"type": "object"}
    for bad in (
        {"prompt": "hi", "tools": [{"name": "t\n", "input_schema": schema}]},
        {"prompt": "hi", "context_keys": ["k\n"]},
    ):
        with pytest.raises(PayloadError):
            parse_payload(json.dumps(bad).encode(), LlmConfig())
    good = {"prompt": "hi", "tools": [{"name": "t", "input_schema": schema}]}
    parse_payload(json.dumps({**good, "context_keys": ["k"]}).encode(), LlmConfig())
