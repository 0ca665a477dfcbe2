"""The local executors an agent pool runs: echo, noop, simulated sleep, fail."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import pytest

from protos.agentmesh.v1 import task_pb2 as tpb
from registry.etcd import Etcd
from services.agent_pool.executors import (
    EXECUTORS,
    EchoExecutor,
    ExecutorContext,
    ExecutorError,
    ExecutorKind,
    FailExecutor,
    NoopExecutor,
    Outcome,
    SleepExecutor,
    build_executors,
    parse_latency,
    section_config,
)
from services.agent_pool.llm_config import LlmConfig


def task(kind: str, payload: bytes = b"", attempts: int = 1) -> tpb.Task:
    return tpb.Task(task_id="t1", spec=tpb.TaskSpec(kind=kind, payload=payload), attempts=attempts)


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("fixed:50", ("fixed", 50.0, 0.0)),
        ("25", ("fixed", 25.0, 0.0)),
        ("0.5", ("fixed", 0.5, 0.0)),
        ("uniform:10:100", ("uniform", 10.0, 100.0)),
        ("lognormal:50:0.5", ("lognormal", 50.0, 0.5)),
    ],
)
def test_parse_latency_accepts(spec: str, parsed: tuple[str, float, float]) -> None:
    assert parse_latency(spec) == parsed


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "fixed",
        "fixed:",
        "fixed:abc",
        "fixed:1:2",
        "uniform:10",
        "lognormal:a:b",
        "gauss:1:2",
        "ms",
    ],
)
def test_parse_latency_refuses_with_the_accepted_forms(spec: str) -> None:
    with pytest.raises(ValueError, match="fixed:MS, uniform:LO:HI or lognormal:MEDIAN:SIGMA"):
        parse_latency(spec)


@pytest.mark.parametrize("latency", ["fixed:3", "uniform:1:5", "lognormal:3:0.5"])
def test_sleep_draws_from_its_distribution(latency: str) -> None:
    ex = SleepExecutor(latency, random.Random(1))
    draws = [ex.draw_ms() for _ in range(500)]
    assert all(d > 0 for d in draws)
    if latency.startswith("fixed"):
        assert set(draws) == {3.0}
    elif latency.startswith("uniform"):
        assert all(1 <= d <= 5 for d in draws)
    else:
        assert 2 < sorted(draws)[250] < 4.5  # the median is about 3


async def test_sleep_output_says_it_is_simulated() -> None:
    out = await SleepExecutor("fixed:1").run(task("sleep"))
    doc = json.loads(out.output)
    assert doc["simulated"] is True
    assert doc["slept_ms"] == 1.0
    assert out.usage.input_tokens == 0


async def test_sleep_payload_sets_the_duration() -> None:
    out = await SleepExecutor("fixed:5000").run(task("sleep", b'{"ms": 2}'))
    assert json.loads(out.output) == {"simulated": True, "slept_ms": 2.0}


@pytest.mark.parametrize("payload", [b"not json", b'{"ms": "soon"}', b'{"ms": null}'])
async def test_sleep_refuses_a_bad_payload_for_good(payload: bytes) -> None:
    with pytest.raises(ExecutorError, match="ms") as err:
        await SleepExecutor("fixed:1").run(task("sleep", payload))
    assert err.value.retryable is False


async def test_fail_is_retryable_by_default_and_names_the_attempt() -> None:
    with pytest.raises(ExecutorError, match="attempt 2") as err:
        await FailExecutor().run(task("fail", attempts=2))
    assert err.value.retryable is True


@pytest.mark.parametrize(
    ("payload", "retryable"),
    [
        (b'{"retryable": false}', False),
        (b'{"retryable": true}', True),
        (b"{}", True),
        (b"not json", True),
        (b"[1, 2]", True),
    ],
)
async def test_fail_retryable_flag_comes_from_the_payload(payload: bytes, retryable: bool) -> None:
    with pytest.raises(ExecutorError) as err:
        await FailExecutor().run(task("fail", payload))
    assert err.value.retryable is retryable


async def test_echo_returns_the_payload_and_noop_nothing() -> None:
    assert (await EchoExecutor().run(task("echo", b"\x00hello"))).output == b"\x00hello"
    assert (await NoopExecutor().run(task("noop", b"ignored"))).output == b""


def test_build_executors_for_the_kinds_asked() -> None:
    executors = build_executors(("echo", "sleep"), ExecutorContext(sleep_ms="fixed:1"))
    assert sorted(executors) == ["echo", "sleep"]
    assert isinstance(executors["sleep"], SleepExecutor)


def test_build_executors_names_an_unknown_kind() -> None:
    with pytest.raises(
        ValueError, match=r"no executor for kinds \['llm-x'\]; available: echo, noop, sleep, fail"
    ):
        build_executors(("echo", "llm-x"), ExecutorContext())


def test_build_executors_refuses_a_bad_latency() -> None:
    with pytest.raises(ValueError, match="fixed:MS"):
        build_executors(("sleep",), ExecutorContext(sleep_ms="fast"))


# ---- the table ----


async def test_every_row_of_the_table_builds_with_what_a_pool_offers() -> None:
    # llm needs its credentials, propose the pool's etcd: each says so when missing
    etcd = Etcd("127.0.0.1:1", prefix="/agentmesh/t/")  # never called here
    try:
        offer = ExecutorContext(sleep_ms="fixed:1", environ={"ANTHROPIC_API_KEY": "k"}, etcd=etcd)
        built = build_executors(tuple(EXECUTORS), offer)
        assert list(built) == list(EXECUTORS)
    finally:
        await etcd.close()
    with pytest.raises(ValueError, match="needs the pool's etcd"):
        build_executors(("propose",), ExecutorContext())


def test_a_row_may_bring_its_own_config_section() -> None:
    assert section_config("echo", {}) is None
    cfg = section_config("llm", {"AGENTMESH_LLM_MAX_ATTEMPTS": "7", "AGENTMESH_MAX_ATTEMPTS": "1"})
    assert isinstance(cfg, LlmConfig)
    assert cfg.max_attempts == 7
    # a bad value names the section's variable, not the field's bare name
    with pytest.raises(ValueError, match=r"^AGENTMESH_LLM_STREAM='maybe' is not a valid bool"):
        section_config("llm", {"AGENTMESH_LLM_STREAM": "maybe"})


def test_adding_an_executor_is_one_row(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclass(frozen=True, kw_only=True)
    class ShoutConfig:
        suffix: str = "!"

    class Shout:
        def __init__(self, suffix: str) -> None:
            self.suffix = suffix

        async def run(self, task: tpb.Task, progress: Any = None) -> Outcome:
            return Outcome(task.spec.payload.upper() + self.suffix.encode())

    row = ExecutorKind(lambda ctx, cfg: Shout(cfg.suffix), ShoutConfig)
    monkeypatch.setitem(EXECUTORS, "shout", row)
    built = build_executors(("shout",), ExecutorContext(environ={"AGENTMESH_SHOUT_SUFFIX": "?!"}))
    assert isinstance(built["shout"], Shout)
    assert built["shout"].suffix == "?!"
