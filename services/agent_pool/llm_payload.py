"""The `llm` task payload: validation, model choice and a token estimate (pure, no SDK).

The shape is documented in `llm_payload.schema.json` beside this file. The leader uses
`parse_payload` and `estimate_input_tokens` for admission control before any agent runs
the task, so both stay free of I/O.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from services.agent_pool.llm_config import COMPLEXITIES, LlmConfig, Role

FIELDS = frozenset(
    {
        "prompt",
        "messages",
        "system",
        "model",
        "complexity",
        "max_tokens",
        "temperature",
        "stop_sequences",
        "tools",
        "context_keys",
    }
)
CONTEXT_KEY = re.compile(r"^[A-Za-z0-9._/-]{1,128}$")
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
MAX_MESSAGES = 1000
MAX_TOOLS = 128
MAX_CONTEXT_KEYS = 16
MAX_STOP_SEQUENCES = 16

# Tokens per byte of text, for estimates made before the call. Anthropic's newer tokenizer
# (Claude 4.7 and later) counts about 30% more tokens than the one before; English runs at
# roughly 3.5-4 bytes per token on it. Erring high only holds a call back until the real
# usage corrects the buckets; erring low risks a 429.
BYTES_PER_TOKEN = 3.0
TOKENS_PER_MESSAGE = 8
TOKENS_PER_REQUEST = 16


class PayloadError(ValueError):
    """The payload breaks the documented shape; the message says what to fix."""


@dataclass(frozen=True)
class LlmRequest:
    """A validated payload, with the model and system prompt resolved."""

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int
    system: str = ""
    temperature: float | None = None
    stop_sequences: list[str] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    context_keys: list[str] = field(default_factory=list)
    model_source: str = ""
    """Why this model: 'payload', 'complexity:<hint>', 'role:<role>' or 'default:<hint>'."""

    def api_kwargs(self, system: str | None = None) -> dict[str, Any]:
        """Keyword arguments for `messages.create` / `messages.stream`."""
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": self.messages,
            "max_tokens": self.max_tokens,
        }
        text = self.system if system is None else system
        if text:
            kwargs["system"] = text
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.stop_sequences:
            kwargs["stop_sequences"] = self.stop_sequences
        if self.tools:
            kwargs["tools"] = self.tools
        return kwargs


def parse_payload(
    raw: bytes, cfg: LlmConfig, role: str = "", roles: dict[str, Role] | None = None
) -> LlmRequest:
    """Validate `raw` (TaskSpec.payload) and resolve its model and system prompt.

    Raises PayloadError naming the field to fix.
    """
    try:
        doc = json.loads(raw.decode("utf-8")) if raw else None
    except (UnicodeDecodeError, ValueError) as err:
        raise PayloadError(f"llm payload must be UTF-8 JSON: {err}") from None
    if not isinstance(doc, dict):
        raise PayloadError(
            'llm payload must be a JSON object such as {"prompt": "...", "max_tokens": 500}'
        )
    unknown = sorted(set(doc) - FIELDS)
    if unknown:
        raise PayloadError(f"llm payload has unknown fields {unknown}; known: {sorted(FIELDS)}")

    messages = _messages(doc)
    roles = cfg.roles() if roles is None else roles
    role_spec = roles.get(role) if role else None

    system = doc.get("system")
    if system is not None and not isinstance(system, str):
        raise PayloadError("llm payload 'system' must be a string")
    if system is None:
        system = role_spec.system if role_spec else ""

    model, source = _model(doc, cfg, role, role_spec)

    max_tokens = doc.get("max_tokens", cfg.default_max_tokens)
    if (
        isinstance(max_tokens, bool)
        or not isinstance(max_tokens, int)
        or not 1 <= max_tokens <= cfg.max_tokens_limit
    ):
        raise PayloadError(
            f"llm payload 'max_tokens' must be an integer from 1 to {cfg.max_tokens_limit}, "
            f"got {max_tokens!r}"
        )

    temperature = doc.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0 <= temperature <= 1
    ):
        raise PayloadError(
            f"llm payload 'temperature' must be a number from 0 to 1, got {temperature!r}"
        )

    stops = doc.get("stop_sequences", [])
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise PayloadError(
            f"llm payload 'stop_sequences' must be a list of at most {MAX_STOP_SEQUENCES} non-empty strings"
        )

    return LlmRequest(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        system=system,
        temperature=None if temperature is None else float(temperature),
        stop_sequences=list(stops),
        tools=_tools(doc.get("tools", [])),
        context_keys=_context_keys(doc.get("context_keys", [])),
        model_source=source,
    )


def _messages(doc: dict[str, Any]) -> list[dict[str, Any]]:
    has_prompt, has_messages = "prompt" in doc, "messages" in doc
    if has_prompt == has_messages:
        raise PayloadError(
            "llm payload needs exactly one of 'prompt' (a string) or 'messages' (a list of "
            '{"role": "user"|"assistant", "content": ...})'
        )
    if has_prompt:
        prompt = doc["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise PayloadError("llm payload 'prompt' must be a non-empty string")
        return [{"role": "user", "content": prompt}]
    messages = doc["messages"]
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise PayloadError(f"llm payload 'messages' must be a list of 1 to {MAX_MESSAGES} turns")
    out = []
    for i, msg in enumerate(messages):
        where = f"llm payload 'messages[{i}]'"
        if not isinstance(msg, dict) or set(msg) != {"role", "content"}:
            raise PayloadError(f'{where} must be {{"role": ..., "content": ...}} and nothing else')
        if msg["role"] not in ("user", "assistant"):
            raise PayloadError(f"{where}.role must be 'user' or 'assistant', got {msg['role']!r}")
        want = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != want:
            raise PayloadError(
                f"{where}.role must be {want!r}: turns alternate, starting with 'user'"
            )
        content = msg["content"]
        if isinstance(content, str):
            if not content:
                raise PayloadError(f"{where}.content must not be empty")
        elif isinstance(content, list) and content:
            for j, block in enumerate(content):
                if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                    raise PayloadError(
                        f'{where}.content[{j}] must be a content block like {{"type": "text", "text": "..."}}'
                    )
        else:
            raise PayloadError(f"{where}.content must be a non-empty string or list of blocks")
        out.append({"role": msg["role"], "content": content})
    return out


def _model(
    doc: dict[str, Any], cfg: LlmConfig, role: str, role_spec: Role | None
) -> tuple[str, str]:
    table = cfg.model_table()
    model = doc.get("model")
    complexity = doc.get("complexity")
    if complexity is not None and complexity not in COMPLEXITIES:
        raise PayloadError(
            f"llm payload 'complexity' must be one of {list(COMPLEXITIES)}, got {complexity!r}"
        )
    if model is not None:
        if not isinstance(model, str) or not 1 <= len(model) <= 128:
            raise PayloadError("llm payload 'model' must be a model id string (1-128 characters)")
        return model, "payload"
    if complexity is not None:
        return table[complexity], f"complexity:{complexity}"
    if role_spec and role_spec.model:
        return role_spec.model, f"role:{role}"
    return table[cfg.default_complexity], f"default:{cfg.default_complexity}"


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise PayloadError(f"llm payload 'tools' must be a list of at most {MAX_TOOLS} tools")
    for i, tool in enumerate(tools):
        if (
            not isinstance(tool, dict)
            or not isinstance(tool.get("name"), str)
            or not TOOL_NAME.fullmatch(tool["name"])
            or not isinstance(tool.get("input_schema"), dict)
        ):
            raise PayloadError(
                f"llm payload 'tools[{i}]' must be {{\"name\": [a-zA-Z0-9_-]{{1,128}}, "
                '"description": "...", "input_schema": {...JSON Schema...}}'
            )
    return list(tools)


def _context_keys(keys: Any) -> list[str]:
    if (
        not isinstance(keys, list)
        or len(keys) > MAX_CONTEXT_KEYS
        or not all(isinstance(k, str) and CONTEXT_KEY.fullmatch(k) for k in keys)
        or len(set(keys)) != len(keys)
    ):
        raise PayloadError(
            f"llm payload 'context_keys' must be a list of at most {MAX_CONTEXT_KEYS} distinct "
            "keys matching [A-Za-z0-9._/-]{1,128}"
        )
    return list(keys)


def estimate_input_tokens(request: LlmRequest, system: str | None = None) -> int:
    """Input tokens the call will probably count, before it is made (errs high)."""
    size = len((request.system if system is None else system).encode())
    for msg in request.messages:
        content = msg["content"]
        size += len(content.encode()) if isinstance(content, str) else len(json.dumps(content))
    if request.tools:
        size += len(json.dumps(request.tools))
    return (
        math.ceil(size / BYTES_PER_TOKEN)
        + TOKENS_PER_MESSAGE * len(request.messages)
        + TOKENS_PER_REQUEST
    )


def with_context(system: str, context: dict[str, str]) -> str:
    """The system prompt with the context values in front, one tagged block per key."""
    if not context:
        return system
    blocks = [f'<context key="{key}">\n{value}\n</context>' for key, value in context.items()]
    return "\n".join(blocks) + ("\n\n" + system if system else "")
