"""The `llm` section: the Claude executor, its roles, model table, prices, limits and budgets.

Filled from `AGENTMESH_LLM_<FIELD>` variables (e.g. AGENTMESH_LLM_MAX_ATTEMPTS=6) by the
executor table (`executors.section_config("llm")`). The
credentials are the SDK's own: `ANTHROPIC_API_KEY`, and `ANTHROPIC_BASE_URL` to talk to
another server (the local one in `loadtest/fake_anthropic.py`, for instance).
The leader reads the same section for admission control and budgets (phase 2).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services._common.llm_cost import PriceTable, parse_budget_specs
from services._common.ratelimit import ModelLimits, parse_limit_specs

COMPLEXITIES = ("simple", "moderate", "complex")


@dataclass(frozen=True, kw_only=True)
class LlmConfig:
    models: tuple[str, ...] = (
        "simple=claude-haiku-5-5",
        "moderate=claude-sonnet-5-5",
        "complex=claude-opus-5-5",
    )
    """Complexity hint → model: a small, cheap model for simple work, a strong one for complex."""
    default_complexity: str = "moderate"
    """Used when a payload names neither a model nor a complexity, and its role has no model."""
    role_models: tuple[str, ...] = ()
    """ROLE=MODEL entries overriding a role's default model (see `ROLES`)."""
    roles_file: str = ""
    """JSON file {"role": {"system": "...", "model": "..."}} merged over the built-in roles."""
    default_max_tokens: int = 1024
    """max_tokens when the payload gives none."""
    max_tokens_limit: int = 128_000
    """The largest max_tokens a payload may ask for."""
    stream: bool = True
    """Stream responses (progress on the agent's stream, no long silent waits)."""
    max_attempts: int = 4
    """HTTP attempts per task attempt (the SDK's own retries are off, so each counts once)."""
    backoff_initial_s: float = 0.5
    """First retry's backoff ceiling; doubles per attempt, with full jitter."""
    backoff_max_s: float = 20.0
    """Largest backoff between attempts when the server gives no retry-after."""
    retry_after_max_s: float = 60.0
    """A retry-after longer than this fails the attempt (retryable) instead of holding the agent."""
    request_timeout_s: float = 600.0
    """Read timeout of one HTTP attempt (between stream events when streaming). The task's
    own deadline (timeout_s) cancels the whole call whatever this says."""
    connect_timeout_s: float = 5.0
    """TCP/TLS connect timeout of one HTTP attempt."""
    max_connections: int = 1000
    """HTTP connections the pool's shared client may open (one per concurrent call)."""
    progress_interval_s: float = 0.5
    """At most one progress message per task this often while a response streams."""
    max_context_bytes: int = 262_144
    """Largest total size of the context values a payload's context_keys may pull in."""
    prices: tuple[str, ...] = ()
    """MODEL=IN:OUT[:LONG_PROMPT_TOKENS:LONG_IN:LONG_OUT] $ per million tokens, over the defaults."""
    limits: tuple[str, ...] = ()
    """MODEL_OR_PREFIX=RPM/ITPM/OTPM account limits for admission control (leader, phase 2)."""
    admission_burst_s: float = 1.0
    """Seconds of refill the leader's buckets hold. Small on purpose: the service may enforce
    a per-minute limit over shorter intervals (60 RPM as 1 request per second), so
    admitting a whole minute's allowance at once could still meet 429s."""
    admission: bool = True
    """The leader holds llm tasks QUEUED until they fit the limits (False: agents call at
    once and meet the limits as 429s; for comparison runs)."""
    admission_headroom: float = 0.02
    """Fraction of every limit the leader leaves unused, so the jitter between its admission
    and the service's own count does not find the service's bucket empty."""
    budget_usd: float = 0.0
    """Cluster budget in $: new llm tasks are refused once it is spent (0: none)."""
    project_budgets: tuple[str, ...] = ()
    """PROJECT=USD budgets per `project` metadata key."""

    def __post_init__(self) -> None:
        # fail at start with the field's name, not at the first task
        self.model_table()
        self.price_table()
        self.limit_table()
        self.budgets()
        if self.default_complexity not in COMPLEXITIES:
            raise ValueError(
                f"AGENTMESH_LLM_DEFAULT_COMPLEXITY={self.default_complexity!r}: use one of {COMPLEXITIES}"
            )
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise ValueError("AGENTMESH_LLM_DEFAULT_MAX_TOKENS must be 1..max_tokens_limit")
        if not 0 <= self.admission_headroom < 1:
            raise ValueError("AGENTMESH_LLM_ADMISSION_HEADROOM must be from 0 to below 1")
        if self.max_attempts < 1:
            raise ValueError("AGENTMESH_LLM_MAX_ATTEMPTS must be at least 1")

    def model_table(self) -> dict[str, str]:
        table = _pairs(self.models, "AGENTMESH_LLM_MODELS", "COMPLEXITY=MODEL")
        missing = [c for c in COMPLEXITIES if c not in table]
        unknown = [c for c in table if c not in COMPLEXITIES]
        if missing or unknown:
            raise ValueError(
                f"AGENTMESH_LLM_MODELS must map exactly {COMPLEXITIES} to models "
                f"(missing {missing}, unknown {unknown})"
            )
        return table

    def price_table(self) -> PriceTable:
        return PriceTable.with_overrides(self.prices)

    def limit_table(self) -> dict[str, ModelLimits]:
        return parse_limit_specs(self.limits)

    def budgets(self) -> dict[str, float]:
        return parse_budget_specs(self.project_budgets)

    def roles(self) -> dict[str, Role]:
        """Built-in roles, then roles_file, then role_models."""
        roles = dict(ROLES)
        if self.roles_file:
            roles.update(load_roles_file(Path(self.roles_file), roles))
        for role, model in _pairs(
            self.role_models, "AGENTMESH_LLM_ROLE_MODELS", "ROLE=MODEL"
        ).items():
            base = roles.get(role, Role(system="", model=""))
            roles[role] = Role(system=base.system, model=model)
        return roles


@dataclass(frozen=True)
class Role:
    system: str
    """The system prompt a task of this role gets unless its payload brings its own."""
    model: str
    """The model a task of this role uses unless its payload names a model or a complexity."""


# Short on purpose: the task's own prompt carries the work; the role sets the stance.
ROLES: dict[str, Role] = {
    "researcher": Role(
        system=(
            "You are a researcher on a software team. Find and weigh the relevant facts, "
            "say where each comes from and how sure you are, and separate what is known "
            "from what is guessed. Answer with findings first, then open questions."
        ),
        model="claude-sonnet-5-5",
    ),
    "architect": Role(
        system=(
            "You are a software architect. Propose a design that fits the stated constraints: "
            "the components, their interfaces and data flow, the failure modes and how each "
            "is handled, and the trade-offs you chose. Prefer the simplest design that works."
        ),
        model="claude-opus-5-5",
    ),
    "coder": Role(
        system=(
            "You are a careful software engineer. Write correct, idiomatic, tested code for "
            "the task; keep changes small; explain only what the code cannot say itself."
        ),
        model="claude-opus-5-5",
    ),
    "tester": Role(
        system=(
            "You are a test engineer. Write tests that would fail if the behaviour were "
            "wrong: edge cases, error paths, concurrency and limits first. Say what each "
            "test catches."
        ),
        model="claude-sonnet-5-5",
    ),
    "reviewer": Role(
        system=(
            "You are a code reviewer. Point out bugs, races, security problems and unclear "
            "code, most important first, each with the line it concerns and a concrete fix. "
            "Do not restate what is fine."
        ),
        model="claude-sonnet-5-5",
    ),
    "documenter": Role(
        system=(
            "You are a technical writer. Write documentation a newcomer can act on: what it "
            "is for, how to use it, with a working example, and its limits. Plain words, "
            "short sentences."
        ),
        model="claude-haiku-5-5",
    ),
}


def load_roles_file(path: Path, base: Mapping[str, Role]) -> dict[str, Role]:
    try:
        doc: Any = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"AGENTMESH_LLM_ROLES_FILE={path}: {err}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"AGENTMESH_LLM_ROLES_FILE={path} must hold a JSON object of roles")
    out: dict[str, Role] = {}
    for name, spec in doc.items():
        if not isinstance(spec, dict) or not set(spec) <= {"system", "model"}:
            raise ValueError(
                f"AGENTMESH_LLM_ROLES_FILE={path}: role {name!r} must be "
                '{"system": "...", "model": "..."} (either key may be left out)'
            )
        old = base.get(name, Role(system="", model=""))
        system, model = spec.get("system", old.system), spec.get("model", old.model)
        if not isinstance(system, str) or not isinstance(model, str):
            raise ValueError(f"AGENTMESH_LLM_ROLES_FILE={path}: role {name!r}: strings only")
        out[str(name)] = Role(system=system, model=model)
    return out


def _pairs(items: tuple[str, ...], name: str, shape: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{name}: {item!r} must look like {shape}")
        out[key.strip()] = value.strip()
    return out
