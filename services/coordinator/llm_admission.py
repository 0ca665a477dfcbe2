"""The leader's side of `llm` tasks: rate-limit admission, budgets and cost totals.

Pure: no grpc, no etcd. The core asks `LlmGate` three things:
- `admit(task)` before it assigns a task (plan and the submit fast path): an `llm` task
  is assigned only once the model's RPM/ITPM/OTPM buckets (services/_common/ratelimit.py)
  hold its estimate: input tokens estimated from the payload, output tokens at its
  max_tokens. Otherwise it stays QUEUED in its place; `next_try_s` says when to look
  again, and `waiting` says why, for `agentmesh status`.
- `check_budgets(specs)` before it accepts new tasks: FAILED_PRECONDITION once a cluster
  or project budget is spent. Tasks already accepted still run.
- `reported(task, agent, msg)` with each result or failure: the estimate is corrected by
  the usage, the buckets follow the headers the agent saw (and pause on retry-after),
  and the cost is added to the totals and the budgets.

Per model, admission is first come, first served: once a task does not fit, later tasks
of the same model wait too until it does, so a large request is not starved by small
ones, and a queue of thousands costs a dictionary lookup per task while it waits.

Cost totals (per agent, role, model and project) live in etcd under
`costs/<dimension>/<key>` as `CostTotal` records, written by the leader a second or so
after they change (`dirty`), read back when a term begins: budgets survive a leader
change, give or take the spend of the last second before a crash.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.clock import Clock
from services._common.llm_cost import CLUSTER, BudgetBook, CostLedger, PriceTable, Totals
from services._common.ratelimit import Admission, AdmissionControl
from services.agent_pool.llm_config import LlmConfig
from services.agent_pool.llm_payload import PayloadError, estimate_input_tokens, parse_payload

log = logging.getLogger(__name__)

PROJECT_KEY = "project"
"""The task metadata key that names a task's project (its budget and cost totals)."""
COSTS = "costs"
"""etcd key segment: costs/<dimension>/<key> → CostTotal."""

LLM_CALLS = Counter(
    "agentmesh_llm_calls_total", "llm task attempts reported", ["model", "role", "project"]
)
LLM_TOKENS = Counter(
    "agentmesh_llm_tokens_total",
    "Tokens of reported llm attempts",
    ["model", "role", "project", "direction"],
)
LLM_COST = Counter(
    "agentmesh_llm_cost_usd_total", "Dollars of reported llm attempts", ["model", "role", "project"]
)
LLM_AGENT_COST = Counter(
    "agentmesh_llm_agent_cost_usd_total", "Dollars of llm attempts per agent", ["agent"]
)
LLM_REFUSED = Counter(
    "agentmesh_llm_admission_refused_total",
    "Times an llm task was held QUEUED because its model's limits were used up",
    ["model"],
)
LLM_BUDGET_REFUSED = Counter(
    "agentmesh_llm_budget_refused_total", "Submissions refused because a budget was spent"
)
LLM_WAITING = Gauge(
    "agentmesh_llm_waiting_families", "Models whose llm tasks wait for their rate limits"
)


@dataclass(frozen=True)
class _Estimate:
    model: str
    key: str
    """The limits entry it counts against ('' when unlimited)."""
    input_tokens: int
    output_tokens: int


class LlmGate:
    """The leader's llm bookkeeping for one term (build one per term)."""

    def __init__(self, llm: LlmConfig, clock: Clock) -> None:
        self.cfg = llm
        self.clock = clock
        self.enabled = llm.admission
        self.roles = llm.roles()
        self.prices: PriceTable = llm.price_table()
        self.control = AdmissionControl(
            llm.limit_table(),
            clock,
            burst_s=llm.admission_burst_s,
            headroom=llm.admission_headroom,
        )
        self.budgets = BudgetBook(llm.budget_usd, llm.budgets())
        self.ledger = CostLedger()
        self.dirty: set[tuple[str, str]] = set()
        """(dimension, key) totals changed since the last flush to etcd."""
        self._estimates: dict[str, _Estimate | None] = {}
        self._tickets: dict[str, Admission] = {}
        self._blocked: dict[str, float] = {}
        """limits key → monotonic time before which its tasks are not tried again."""

    # ---- admission ----

    def admit(self, task: tpb.Task) -> bool:
        """Whether `task` may be assigned now (always, for other kinds). An admitted llm
        task has debited its model's buckets until `reported` settles it."""
        if task.spec.kind != "llm" or not self.enabled:
            return True
        est = self._estimate(task)
        if est is None or not est.key:
            return True  # unreadable (the agent fails it) or a model with no limits
        now = self.clock.monotonic()
        until = self._blocked.get(est.key)
        if until is not None:
            if until > now:
                return False
            del self._blocked[est.key]
        # admitted before and back in line without a report (a lost claim, a write that
        # did not apply): that admission stays spent, as if its call used the estimate
        self._tickets.pop(task.task_id, None)
        ticket = self.control.try_admit(est.model, est.input_tokens, est.output_tokens)
        if not ticket:
            # a refusal that says "never" (a request over a bucket's capacity with the
            # bucket not full) still gets looked at again each burst window
            wait = ticket.wait_s if math.isfinite(ticket.wait_s) else self.cfg.admission_burst_s
            self._blocked[est.key] = now + max(wait, 0.001)
            LLM_REFUSED.labels(est.key).inc()
            LLM_WAITING.set(len(self._blocked))
            return False
        LLM_WAITING.set(len(self._blocked))
        self._tickets[task.task_id] = ticket
        return True

    def held(self, task: tpb.Task) -> bool:
        """True while `task`'s model is held back: the dispatcher skips it without looking
        for an agent (a dictionary lookup per waiting task)."""
        if task.spec.kind != "llm" or not self.enabled or not self._blocked:
            return False
        est = self._estimate(task)
        if est is None:
            return False
        until = self._blocked.get(est.key)
        return until is not None and until > self.clock.monotonic()

    def next_try_s(self) -> float | None:
        """Seconds until a model held back may fit (None when none is)."""
        # call after plan(): a hold that has run out by now and was not renewed had no
        # task tried since (no free agent): an agent freeing wakes the dispatcher anyway
        now = self.clock.monotonic()
        for key in [k for k, until in self._blocked.items() if until <= now]:
            del self._blocked[key]
        LLM_WAITING.set(len(self._blocked))
        if not self._blocked:
            return None
        return min(self._blocked.values()) - now

    def waiting(self, queued: Iterable[tpb.Task] = ()) -> list[str]:
        """Why QUEUED llm tasks wait: one line per model held back, with how many wait."""
        per_key: dict[str, int] = {}
        for task in queued:
            if task.spec.kind == "llm":
                est = self._estimate(task)
                if est is not None and est.key in self._blocked:
                    per_key[est.key] = per_key.get(est.key, 0) + 1
        lines = []
        for line in self.control.why_waiting():
            key = line.partition(":")[0]
            if key not in self._blocked:
                continue  # it refused once, but nothing of it has waited since
            count = per_key.get(key)
            lines.append(f"{line} [{count} llm task(s) queued]" if count else line)
        return lines

    def _estimate(self, task: tpb.Task) -> _Estimate | None:
        if task.task_id in self._estimates:
            return self._estimates[task.task_id]
        try:
            req = parse_payload(task.spec.payload, self.cfg, task.spec.role, self.roles)
        except PayloadError:
            est = None
        else:
            est = _Estimate(
                req.model,
                self.control.key(req.model),
                estimate_input_tokens(req),
                req.max_tokens,
            )
        self._estimates[task.task_id] = est
        return est

    # ---- reports ----

    def reported(
        self, task: tpb.Task, agent_id: str, msg: cpb.TaskResult | cpb.TaskFailure
    ) -> None:
        """An llm attempt ended (accepted result or failure): settle, follow, charge."""
        if task.spec.kind != "llm":
            return
        est = self._estimate(task)
        usage = msg.usage
        ticket = self._tickets.pop(task.task_id, None)
        if ticket is not None:
            self.control.settle(ticket, usage.input_tokens, usage.output_tokens)
            # a refund may let the next one fit now: look again at the next plan
            self._blocked.pop(ticket.key, None)
        report = msg.ratelimit if msg.HasField("ratelimit") else None
        model = (report.model if report else "") or (est.model if est else "") or "unknown"
        if report is not None and report.headers:
            age_s = (
                max(0.0, (self.clock.wall_us() - report.seen_at_us) / 1e6)
                if report.seen_at_us
                else 0.0
            )
            headers = dict(report.headers)
            self.control.observe_headers(model, headers, age_s)
            if isinstance(msg, cpb.TaskFailure):
                retry_after = _retry_after_s(headers)
                if retry_after is not None:
                    self.control.observe_retry_after(model, retry_after - age_s)
        if isinstance(msg, cpb.TaskResult) or task.state != tpb.TASK_STATE_QUEUED:
            self._estimates.pop(task.task_id, None)
        if not (usage.input_tokens or usage.output_tokens or usage.cost_usd):
            return
        cost = usage.cost_usd or self.prices.cost(model, usage.input_tokens, usage.output_tokens)
        self.charge(
            agent=agent_id,
            role=task.spec.role,
            model=model,
            project=task.spec.metadata.get(PROJECT_KEY, ""),
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cost_usd=cost,
        )

    def forget(self, task_id: str) -> None:
        """The task ended without a report (cancelled, say): drop what is kept for it."""
        self._estimates.pop(task_id, None)
        self._tickets.pop(task_id, None)

    def charge(
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
        self.ledger.add(
            agent=agent,
            role=role,
            model=model,
            project=project,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=cost_usd,
        )
        self.budgets.add(project, cost_usd)
        self.dirty.update(
            {("agent", agent), ("role", role), ("model", model), ("project", project)}
        )
        LLM_CALLS.labels(model, role, project).inc()
        LLM_TOKENS.labels(model, role, project, "input").inc(input_tokens)
        LLM_TOKENS.labels(model, role, project, "output").inc(output_tokens)
        LLM_COST.labels(model, role, project).inc(cost_usd)
        LLM_AGENT_COST.labels(agent).inc(cost_usd)

    # ---- budgets ----

    def check_budgets(self, specs: Iterable[tpb.TaskSpec]) -> None:
        """Raise BudgetReachedError (FAILED_PRECONDITION) if any new llm task's cluster or
        project budget is spent: the whole batch is refused, nothing is written."""
        for spec in specs:
            if spec.kind == "llm":
                try:
                    self.budgets.check(spec.metadata.get(PROJECT_KEY, ""))
                except Exception:
                    LLM_BUDGET_REFUSED.inc()
                    raise

    def budget_status(self) -> list[cpb.BudgetStatus]:
        out = []
        if self.budgets.cluster_usd > 0:
            out.append(
                cpb.BudgetStatus(
                    name=CLUSTER,
                    cap_usd=self.budgets.cluster_usd,
                    spent_usd=self.budgets.spent[CLUSTER],
                )
            )
        for project, cap in sorted(self.budgets.projects.items()):
            out.append(
                cpb.BudgetStatus(name=project, cap_usd=cap, spent_usd=self.budgets.spent[project])
            )
        return out

    # ---- totals: status, ListAgents and etcd records ----

    def fill_status(self, status: cpb.ClusterStatus, queued: Iterable[tpb.Task]) -> None:
        """GetStatus: why llm tasks wait, the totals and the budgets."""
        status.llm_waiting.extend(self.waiting(queued))
        status.llm_costs.extend(self.totals())
        status.llm_budgets.extend(self.budget_status())

    def fill_agent(self, status: cpb.AgentStatus) -> None:
        """ListAgents: the agent's llm calls, tokens and dollars."""
        calls, usage = self.agent_usage(status.agent_id)
        if calls:
            status.llm_calls = calls
            status.llm_usage.CopyFrom(usage)

    def totals(self, dimensions: Iterable[str] = CostLedger.DIMENSIONS) -> list[cpb.CostTotal]:
        return [
            total_message(dim, key, t)
            for dim in dimensions
            for key, t in sorted(self.ledger.by[dim].items())
        ]

    def agent_usage(self, agent_id: str) -> tuple[int, tpb.TokenUsage]:
        t = self.ledger.by["agent"].get(agent_id)
        if t is None:
            return 0, tpb.TokenUsage()
        return t.calls, tpb.TokenUsage(
            input_tokens=t.input_tokens, output_tokens=t.output_tokens, cost_usd=t.cost_usd
        )

    def take_dirty(self) -> list[cpb.CostTotal]:
        """The totals changed since the last call (to write to etcd)."""
        dirty, self.dirty = self.dirty, set()
        return [total_message(dim, key, self.ledger.by[dim][key]) for dim, key in sorted(dirty)]

    def load(self, records: Iterable[cpb.CostTotal]) -> None:
        """Adopt the totals a previous term wrote (before this term charges anything)."""
        for rec in records:
            if rec.dimension not in self.ledger.by:
                continue
            t = self.ledger.by[rec.dimension][rec.key]
            t.calls = rec.calls
            t.input_tokens = rec.usage.input_tokens
            t.output_tokens = rec.usage.output_tokens
            t.cost_usd = rec.usage.cost_usd
            if rec.dimension == "project":
                self.budgets.spent[rec.key] = rec.usage.cost_usd
                self.budgets.spent[CLUSTER] += rec.usage.cost_usd


def total_message(dimension: str, key: str, t: Totals) -> cpb.CostTotal:
    return cpb.CostTotal(
        dimension=dimension,
        key=key,
        calls=t.calls,
        usage=tpb.TokenUsage(
            input_tokens=t.input_tokens, output_tokens=t.output_tokens, cost_usd=t.cost_usd
        ),
    )


def cost_key_parts(record: cpb.CostTotal) -> tuple[str, str, str]:
    """The etcd key segments of a total: costs/<dimension>/<key> (the key may be empty:
    tasks without a project or role; the record itself holds it, so nothing is parsed
    back from the key)."""
    return COSTS, record.dimension, record.key


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) * scale
        except ValueError:
            continue
        if math.isfinite(value) and value > 0:
            return value
    return None
