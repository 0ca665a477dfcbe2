"""`agentmesh up --backlog N --executor llm`: a small real backlog through Claude.

Pure helpers the CLI calls: whether the llm executor can run here (one line saying why
not), the sample prompts, a cost estimate before anything is sent (an upper bound: every
call priced at its max_tokens) and the cost afterwards (from the tasks' recorded usage).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from protos.agentmesh.v1 import task_pb2 as tpb
from services.agent_pool.llm import llm_unavailable
from services.agent_pool.llm_config import LlmConfig
from services.agent_pool.llm_payload import estimate_input_tokens, parse_payload

EXECUTORS = ("sleep", "llm")
MAX_TOKENS = 200
"""Each sample answer is short: the demo shows the path, not the model's prose."""
# (role, prompt): one per role, so the backlog shows roles routing their system prompts
PROMPTS: tuple[tuple[str, str], ...] = (
    ("researcher", "In three sentences: what is a token bucket rate limiter?"),
    ("architect", "In three sentences: why does a task queue need a lease per worker?"),
    ("coder", "Write a Python function that returns the n-th Fibonacci number iteratively."),
    ("tester", "List three edge cases for a function that parses ISO 8601 dates."),
    ("reviewer", "Review this line and say what is wrong: `if x = None: return`."),
    ("documenter", "Write a two-sentence README intro for a tool that retries HTTP calls."),
)
LLM_KINDS = "echo,sleep,noop,fail,propose,llm"
"""What the pools advertise with `--executor llm` (the defaults plus llm)."""
LLM_ROLES = ",".join(role for role, _ in PROMPTS)
"""...and every role: a task naming a role only goes to agents that advertise it."""


def llm_off_line(environ: Mapping[str, str] | None = None) -> str | None:
    """The one line `up` prints when the llm executor cannot run here (None when it can)."""
    return llm_unavailable(os.environ if environ is None else environ)


def sample_specs(count: int, run: str, complexity: str = "simple") -> list[tpb.TaskSpec]:
    """`count` short llm tasks cycling through the roles, on the cheap model by default."""
    specs = []
    for i in range(count):
        role, prompt = PROMPTS[i % len(PROMPTS)]
        payload = {"prompt": prompt, "complexity": complexity, "max_tokens": MAX_TOKENS}
        specs.append(
            tpb.TaskSpec(
                task_id=f"llm-sample-{run}-{i:04d}",
                kind="llm",
                role=role,
                payload=json.dumps(payload).encode(),
                metadata={"project": "demo"},
                timeout_s=120,
            )
        )
    return specs


@dataclass(frozen=True)
class Estimate:
    calls: int
    input_tokens: int
    max_output_tokens: int
    max_cost_usd: float
    models: tuple[str, ...]

    def line(self) -> str:
        return (
            f"{self.calls} llm call(s) on {', '.join(self.models)}: about "
            f"{self.input_tokens:,} input tokens and at most {self.max_output_tokens:,} output "
            f"tokens; at most ${self.max_cost_usd:.4f} (every answer priced at its max_tokens)"
        )


def estimate(specs: Iterable[tpb.TaskSpec], cfg: LlmConfig) -> Estimate:
    prices = cfg.price_table()
    roles = cfg.roles()
    calls = inp = out = 0
    cost = 0.0
    models: set[str] = set()
    for spec in specs:
        req = parse_payload(spec.payload, cfg, spec.role, roles)
        n_in = estimate_input_tokens(req)
        calls += 1
        inp += n_in
        out += req.max_tokens
        cost += prices.cost(req.model, n_in, req.max_tokens)
        models.add(req.model)
    return Estimate(calls, inp, out, cost, tuple(sorted(models)))


def spent_line(tasks: Iterable[tpb.Task]) -> str:
    """What the backlog cost, from the usage the tasks recorded."""
    n = inp = out = 0
    cost = 0.0
    for t in tasks:
        if t.spec.kind != "llm":
            continue
        n += 1
        inp += t.usage.input_tokens
        out += t.usage.output_tokens
        cost += t.usage.cost_usd
    return (
        f"llm backlog cost: ${cost:.4f} for {n} task(s) "
        f"({inp:,} input and {out:,} output tokens, as the API counted them)"
    )


def answer_line(task: tpb.Task) -> str:
    """One sample task's line: its answer's first words, or, when it has no answer, its
    state and its whole last error (the reason is at the error's end)."""
    text = task.result.decode(errors="replace")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("text"), str):
        text = doc["text"]
    head = f"  {task.spec.role:<10} {task.task_id}: "
    if words := " ".join(text.split())[:100]:
        return head + words
    state = tpb.TaskState.Name(task.state).removeprefix("TASK_STATE_")
    return head + state + (f": {' '.join(task.last_error.split())}" if task.last_error else "")
