"""The llm payload: what is accepted, what is refused (and the message), how a model is chosen,
and the `llm` config section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loadtest.fake_anthropic import count_input_tokens
from services.agent_pool.executors import ExecutorContext, build_executors, section_config
from services.agent_pool.llm_config import COMPLEXITIES, ROLES, LlmConfig
from services.agent_pool.llm_payload import (
    FIELDS,
    PayloadError,
    estimate_input_tokens,
    parse_payload,
    with_context,
)

SCHEMA = Path(__file__).parents[2] / "services/agent_pool/llm_payload.schema.json"
CFG = LlmConfig()


def parse(doc: Any, role: str = "", cfg: LlmConfig = CFG) -> Any:
    return parse_payload(json.dumps(doc).encode(), cfg, role)


def test_prompt_shorthand_and_defaults() -> None:
    req = parse({"prompt": "hi"})
    assert req.messages == [{"role": "user", "content": "hi"}]
    assert req.max_tokens == CFG.default_max_tokens
    assert req.model == "claude-sonnet-5-5"
    assert req.model_source == "default:moderate"
    assert req.api_kwargs() == {
        "model": "claude-sonnet-5-5",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1024,
    }


def test_everything_passes_through_to_the_api() -> None:
    tool = {"name": "get_time", "description": "now", "input_schema": {"type": "object"}}
    req = parse(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "q"}]},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "q2"},
            ],
            "system": "be brief",
            "model": "claude-opus-5-5",
            "max_tokens": 50,
            "temperature": 0,
            "stop_sequences": ["END"],
            "tools": [tool],
        }
    )
    kwargs = req.api_kwargs()
    assert kwargs["system"] == "be brief"
    assert kwargs["temperature"] == 0.0
    assert kwargs["tools"] == [tool]
    assert kwargs["stop_sequences"] == ["END"]
    assert kwargs["max_tokens"] == 50


@pytest.mark.parametrize(
    ("doc", "role", "model", "source"),
    [
        ({"prompt": "x", "model": "m1", "complexity": "simple"}, "coder", "m1", "payload"),
        ({"prompt": "x", "complexity": "simple"}, "coder", "claude-haiku-5-5", "complexity:simple"),
        ({"prompt": "x", "complexity": "complex"}, "", "claude-opus-5-5", "complexity:complex"),
        ({"prompt": "x"}, "documenter", "claude-haiku-5-5", "role:documenter"),
        ({"prompt": "x"}, "no-such-role", "claude-sonnet-5-5", "default:moderate"),
    ],
)
def test_model_choice_order(doc: Any, role: str, model: str, source: str) -> None:
    req = parse(doc, role)
    assert (req.model, req.model_source) == (model, source)


def test_role_gives_the_system_prompt_unless_the_payload_has_one() -> None:
    assert parse({"prompt": "x"}, "reviewer").system == ROLES["reviewer"].system
    assert parse({"prompt": "x", "system": "mine"}, "reviewer").system == "mine"
    assert parse({"prompt": "x", "system": ""}, "reviewer").system == ""


@pytest.mark.parametrize(
    ("raw", "fix"),
    [
        (b"\xff\xfe", "UTF-8 JSON"),
        (b"{not json", "UTF-8 JSON"),
        (b"", "JSON object"),
        (b"[1]", "JSON object"),
        (b'{"prompt": "x", "promt": 1}', "unknown fields \\['promt'\\]"),
        (b"{}", "exactly one of 'prompt'"),
        (b'{"prompt": "x", "messages": []}', "exactly one of 'prompt'"),
        (b'{"prompt": ""}', "'prompt' must be a non-empty string"),
        (b'{"messages": []}', "'messages' must be a list of 1 to"),
        (b'{"messages": [{"role": "assistant", "content": "x"}]}', "starting with 'user'"),
        (b'{"messages": [{"role": "system", "content": "x"}]}', "'user' or 'assistant'"),
        (b'{"messages": [{"role": "user", "content": "x", "name": "n"}]}', "nothing else"),
        (b'{"messages": [{"role": "user", "content": [1]}]}', "content\\[0\\] must be a content"),
        (b'{"messages": [{"role": "user", "content": ""}]}', "must not be empty"),
        (b'{"prompt": "x", "max_tokens": 0}', "'max_tokens' must be an integer from 1 to 128000"),
        (b'{"prompt": "x", "max_tokens": 128001}', "'max_tokens'"),
        (b'{"prompt": "x", "max_tokens": true}', "'max_tokens'"),
        (b'{"prompt": "x", "max_tokens": "10"}', "'max_tokens'"),
        (b'{"prompt": "x", "temperature": 1.5}', "'temperature' must be a number from 0 to 1"),
        (b'{"prompt": "x", "complexity": "hard"}', "'complexity' must be one of"),
        (b'{"prompt": "x", "model": ""}', "'model' must be a model id"),
        (b'{"prompt": "x", "system": 3}', "'system' must be a string"),
        (b'{"prompt": "x", "tools": [{"name": "a b"}]}', "'tools\\[0\\]' must be"),
        (b'{"prompt": "x", "tools": {}}', "'tools' must be a list"),
        (b'{"prompt": "x", "context_keys": ["a", "a"]}', "'context_keys' must be a list"),
        (b'{"prompt": "x", "context_keys": ["bad key"]}', "'context_keys'"),
        (b'{"prompt": "x", "stop_sequences": [""]}', "'stop_sequences'"),
    ],
)
def test_malformed_payloads_say_what_to_fix(raw: bytes, fix: str) -> None:
    with pytest.raises(PayloadError, match=fix):
        parse_payload(raw, CFG)


def test_the_schema_file_documents_what_the_parser_accepts() -> None:
    schema = json.loads(SCHEMA.read_text())
    props = schema["properties"]
    assert set(props) == FIELDS
    assert schema["additionalProperties"] is False
    assert props["complexity"]["enum"] == list(COMPLEXITIES)
    for example in schema["examples"]:
        parse(example)  # every documented example is valid


def test_estimate_errs_high_against_the_simulated_tokenizer() -> None:
    for text in ("hi", "word " * 1000, json.dumps({"k": list(range(300))})):
        req = parse({"prompt": text, "system": "be brief"})
        counted = count_input_tokens(req.api_kwargs())
        assert counted <= estimate_input_tokens(req) <= 2 * counted + 40


def test_context_goes_in_front_of_the_system_prompt() -> None:
    assert with_context("sys", {}) == "sys"
    assert with_context("sys", {"a/b": "v"}) == '<context key="a/b">\nv\n</context>\n\nsys'
    assert with_context("", {"k": "v"}) == '<context key="k">\nv\n</context>'


# ---- the config section ----


def test_config_from_agentmesh_llm_variables_only() -> None:
    cfg = section_config(
        "llm",
        {
            "AGENTMESH_LLM_MAX_ATTEMPTS": "6",
            "AGENTMESH_LLM_STREAM": "false",
            "AGENTMESH_LLM_MODELS": "simple=a,moderate=b,complex=c",
            "AGENTMESH_LLM_LIMITS": "a=1/2/3",
            "AGENTMESH_MAX_ATTEMPTS": "99",  # another section's: not ours
        },
    )
    assert cfg.max_attempts == 6
    assert cfg.stream is False
    assert cfg.model_table() == {"simple": "a", "moderate": "b", "complex": "c"}
    assert parse({"prompt": "x", "complexity": "simple"}, cfg=cfg).model == "a"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AGENTMESH_LLM_MODELS": "simple=a"}, "AGENTMESH_LLM_MODELS must map"),
        ({"AGENTMESH_LLM_PRICES": "m=1"}, "IN:OUT"),
        ({"AGENTMESH_LLM_LIMITS": "m=1/2"}, "RPM/ITPM/OTPM"),
        ({"AGENTMESH_LLM_PROJECT_BUDGETS": "p"}, "PROJECT=USD"),
        ({"AGENTMESH_LLM_DEFAULT_COMPLEXITY": "hard"}, "DEFAULT_COMPLEXITY"),
        ({"AGENTMESH_LLM_MAX_ATTEMPTS": "x"}, "AGENTMESH_LLM_MAX_ATTEMPTS=.x. is not a valid int"),
        ({"AGENTMESH_LLM_ROLE_MODELS": "coder"}, "ROLE=MODEL"),
    ],
)
def test_config_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        section_config("llm", env).roles()


def test_roles_are_overridable(tmp_path: Path) -> None:
    path = tmp_path / "roles.json"
    path.write_text(
        json.dumps({"coder": {"system": "write Rust"}, "pm": {"system": "plan", "model": "m"}})
    )
    cfg = LlmConfig(roles_file=str(path), role_models=("tester=claude-haiku-5-5",))
    roles = cfg.roles()
    assert set(ROLES) <= set(roles)
    assert roles["coder"].system == "write Rust"
    assert roles["coder"].model == ROLES["coder"].model
    assert roles["pm"].model == "m"
    assert roles["tester"].model == "claude-haiku-5-5"
    assert roles["tester"].system == ROLES["tester"].system
    path.write_text('{"coder": {"prompt": "x"}}')
    with pytest.raises(ValueError, match="must be"):
        cfg.roles()


def test_every_issue_role_exists() -> None:
    assert set(ROLES) == {"researcher", "architect", "coder", "tester", "reviewer", "documenter"}
    assert all(r.system and r.model for r in ROLES.values())


def test_pool_without_a_key_says_why_llm_is_off() -> None:
    nothing = ExecutorContext(environ={})
    with pytest.raises(ValueError, match="ANTHROPIC_API_KEY is not set"):
        build_executors(("echo", "llm"), nothing)
    assert set(build_executors(("echo",), nothing)) == {"echo"}
    with pytest.raises(ValueError, match="available: echo, noop, sleep, fail, hang, block, llm"):
        build_executors(("gpu",), nothing)
