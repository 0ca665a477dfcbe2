"""What LLM calls cost, and the budgets that cap it (pure: no I/O).

Prices are US dollars per million tokens (MTok). The defaults are Anthropic's published
list prices for the Claude API, as stated on platform.claude.com on 2026-11-29:
- the model pages "Claude Haiku 5.5", "Claude Sonnet 5.5" and "Claude Opus 5.5"
  (models/<model>/overview): Haiku 5.5 $0.10 in / $0.50 out for prompts up to 100,000
  tokens and $0.50 / $2.50 for longer prompts; Sonnet 5.5 $2 / $10; Opus 5.5 $4 / $20;
- the pricing page (about-claude/pricing): Haiku 4.5 $1 / $5; Sonnet 4.6 and 4.5 $3 / $15;
  Opus 4.5 to 4.8 and Opus 5 $5 / $25.
Prompt caching, batch discounts, data-residency multipliers and fast modes are not modelled:
the executor does not use them. Override any entry with `AGENTMESH_LLM_PRICES`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from services._common.errors import FailedPreconditionError

MTOK = 1_000_000


@dataclass(frozen=True)
class ModelPrice:
    """$ per million input and output tokens; optionally a higher tier for long prompts."""

    input_per_mtok: float
    output_per_mtok: float
    long_prompt_tokens: int = 0
    """Prompts above this many input tokens pay the long rates on every token (0: no tier)."""
    long_input_per_mtok: float = 0.0
    long_output_per_mtok: float = 0.0

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        if self.long_prompt_tokens and input_tokens > self.long_prompt_tokens:
            return (
                input_tokens * self.long_input_per_mtok + output_tokens * self.long_output_per_mtok
            ) / MTOK
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / MTOK

    @classmethod
    def parse(cls, text: str) -> ModelPrice:
        """'IN:OUT' or 'IN:OUT:LONG_PROMPT_TOKENS:LONG_IN:LONG_OUT' ($ per MTok)."""
        try:
            nums = [float(p) for p in text.split(":")]
        except ValueError:
            nums = []
        if len(nums) not in (2, 5) or min(nums, default=-1) < 0:
            raise ValueError(
                f"price {text!r} must be IN:OUT or IN:OUT:LONG_PROMPT_TOKENS:LONG_IN:LONG_OUT "
                "in $ per million tokens"
            )
        if len(nums) == 2:
            return cls(nums[0], nums[1])
        return cls(nums[0], nums[1], int(nums[2]), nums[3], nums[4])


DEFAULT_PRICES: dict[str, ModelPrice] = {
    "claude-haiku-5-5": ModelPrice(0.10, 0.50, 100_000, 0.50, 2.50),
    "claude-sonnet-5-5": ModelPrice(2.0, 10.0),
    "claude-opus-5-5": ModelPrice(4.0, 20.0),
    "claude-opus-5": ModelPrice(5.0, 25.0),
    "claude-opus-4-8": ModelPrice(5.0, 25.0),
    "claude-opus-4-7": ModelPrice(5.0, 25.0),
    "claude-opus-4-6": ModelPrice(5.0, 25.0),
    "claude-opus-4-5": ModelPrice(5.0, 25.0),
    "claude-sonnet-4-6": ModelPrice(3.0, 15.0),
    "claude-sonnet-4-5": ModelPrice(3.0, 15.0),
    "claude-haiku-4-5": ModelPrice(1.0, 5.0),
}


class PriceTable:
    """Model id → price. An id matches its entry or the longest entry it starts with
    (`claude-haiku-4-5-20251001` → `claude-haiku-4-5`). An unknown model is charged the
    highest rates in the table, so a budget errs on the side of stopping early."""

    def __init__(self, prices: Mapping[str, ModelPrice]) -> None:
        if not prices:
            raise ValueError("a price table needs at least one model")
        self.prices = dict(prices)
        self.fallback = ModelPrice(
            max(p.input_per_mtok for p in self.prices.values()),
            max(p.output_per_mtok for p in self.prices.values()),
        )

    @classmethod
    def with_overrides(cls, specs: Iterable[str]) -> PriceTable:
        """Defaults, then 'MODEL=IN:OUT[:LONG_PROMPT_TOKENS:LONG_IN:LONG_OUT]' entries."""
        prices = dict(DEFAULT_PRICES)
        for spec in specs:
            model, sep, value = spec.partition("=")
            if not sep or not model.strip():
                raise ValueError(f"price {spec!r} must look like MODEL=IN:OUT ($ per MTok)")
            prices[model.strip()] = ModelPrice.parse(value.strip())
        return cls(prices)

    def price(self, model: str) -> tuple[ModelPrice, bool]:
        """(its price, whether the table knows the model)."""
        if model in self.prices:
            return self.prices[model], True
        best = ""
        for key in self.prices:
            if model.startswith(key) and len(key) > len(best):
                best = key
        if best:
            return self.prices[best], True
        return self.fallback, False

    def cost(self, model: str, input_tokens: int, output_tokens: int) -> float:
        return self.price(model)[0].cost(input_tokens, output_tokens)


# ---- budgets (checked by the leader before it accepts a new `llm` task) ----


class BudgetReachedError(FailedPreconditionError):
    """A cluster or project budget is spent: new `llm` tasks are refused until it is raised."""


CLUSTER = "cluster"


def parse_budget_specs(specs: Iterable[str]) -> dict[str, float]:
    """('PROJECT=USD', ...) -> {project: cap}."""
    out: dict[str, float] = {}
    for spec in specs:
        project, sep, value = spec.partition("=")
        try:
            cap = float(value)
        except ValueError:
            cap = -1.0
        if not sep or not project.strip() or cap < 0:
            raise ValueError(f"budget {spec!r} must look like PROJECT=USD (a number >= 0)")
        out[project.strip()] = cap
    return out


class BudgetBook:
    """Spend so far against a cluster cap and per-project caps (0 or absent: no cap).

    `refusal()` is checked when a task is submitted, so tasks already accepted finish
    and their cost is still added: spend may end above a cap by what was in flight.
    """

    def __init__(self, cluster_usd: float = 0.0, projects: Mapping[str, float] | None = None):
        self.cluster_usd = cluster_usd
        self.projects = dict(projects or {})
        self.spent: defaultdict[str, float] = defaultdict(float)
        """Spend per project ('' for tasks with no project) and in all under CLUSTER."""

    def add(self, project: str, cost_usd: float) -> None:
        self.spent[CLUSTER] += cost_usd
        self.spent[project] += cost_usd

    def refusal(self, project: str) -> str | None:
        """The message to refuse a new task with, or None when it may run."""
        if self.cluster_usd > 0 and self.spent[CLUSTER] >= self.cluster_usd:
            return _reached("cluster", self.spent[CLUSTER], self.cluster_usd)
        cap = self.projects.get(project, 0.0)
        if project and cap > 0 and self.spent[project] >= cap:
            return _reached(f"of project {project!r}", self.spent[project], cap)
        return None

    def check(self, project: str) -> None:
        """Raise BudgetReachedError (FAILED_PRECONDITION) when a budget is spent."""
        message = self.refusal(project)
        if message is not None:
            raise BudgetReachedError(message)


def _reached(which: str, spent: float, cap: float) -> str:
    return (
        f"budget {which} reached: ${spent:,.2f} of ${cap:,.2f} spent; "
        "new llm tasks are refused until the budget is raised"
    )


# ---- totals for status, ListAgents and metrics ----


@dataclass
class Totals:
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


class CostLedger:
    """Tokens and dollars per agent, role, model and project (keys of `by`)."""

    DIMENSIONS = ("agent", "role", "model", "project")

    def __init__(self) -> None:
        self.by: dict[str, defaultdict[str, Totals]] = {
            dim: defaultdict(Totals) for dim in self.DIMENSIONS
        }

    def add(
        self,
        *,
        agent: str,
        role: str,
        model: str,
        project: str,
        input_tokens: int,
        output_tokens: int,
        cost_usd: float,
    ) -> None:
        for dim, value in (
            ("agent", agent),
            ("role", role),
            ("model", model),
            ("project", project),
        ):
            t = self.by[dim][value]
            t.calls += 1
            t.input_tokens += input_tokens
            t.output_tokens += output_tokens
            t.cost_usd += cost_usd
