"""Prices, cost per call, budgets and cost totals (pure)."""

from __future__ import annotations

import grpc
import pytest

from services._common.grpcserver import status_of
from services._common.llm_cost import (
    DEFAULT_PRICES,
    BudgetBook,
    BudgetReachedError,
    CostLedger,
    ModelPrice,
    PriceTable,
    parse_budget_specs,
)


def test_cost_per_call_from_the_default_table() -> None:
    table = PriceTable(DEFAULT_PRICES)
    # Sonnet 5.5: $2 in, $10 out per million tokens
    assert table.cost("claude-sonnet-5-5", 1_000_000, 0) == pytest.approx(2.0)
    assert table.cost("claude-sonnet-5-5", 1000, 500) == pytest.approx(0.002 + 0.005)
    assert table.cost("claude-opus-5-5", 1000, 1000) == pytest.approx(0.004 + 0.020)


def test_haiku_5_5_long_prompts_pay_the_higher_tier_on_every_token() -> None:
    table = PriceTable(DEFAULT_PRICES)
    assert table.cost("claude-haiku-5-5", 100_000, 1000) == pytest.approx(0.01 + 0.0005)
    assert table.cost("claude-haiku-5-5", 100_001, 1000) == pytest.approx(
        100_001 * 0.5 / 1e6 + 1000 * 2.5 / 1e6
    )


def test_dated_ids_match_their_entry_and_unknown_models_pay_the_most() -> None:
    table = PriceTable(DEFAULT_PRICES)
    assert table.price("claude-haiku-4-5-20251001") == (DEFAULT_PRICES["claude-haiku-4-5"], True)
    price, known = table.price("some-future-model")
    assert not known
    assert price.input_per_mtok == max(p.input_per_mtok for p in DEFAULT_PRICES.values())
    assert price.output_per_mtok == max(p.output_per_mtok for p in DEFAULT_PRICES.values())


def test_overrides_replace_or_add_entries() -> None:
    table = PriceTable.with_overrides(["claude-sonnet-5-5=1:2", "mine=0.5:1:1000:1:4"])
    assert table.cost("claude-sonnet-5-5", 10**6, 10**6) == pytest.approx(3.0)
    assert table.cost("mine", 2000, 0) == pytest.approx(2000 / 1e6)
    assert table.cost("claude-opus-5-5", 10**6, 0) == pytest.approx(4.0)  # defaults kept


@pytest.mark.parametrize("spec", ["x", "x=1", "x=1:2:3", "x=a:b", "=1:2", "x=-1:2"])
def test_bad_prices_are_refused_with_the_shape(spec: str) -> None:
    with pytest.raises(ValueError, match="IN:OUT"):
        PriceTable.with_overrides([spec])


def test_price_parse_long_tier() -> None:
    assert ModelPrice.parse("0.1:0.5:100000:0.5:2.5") == ModelPrice(0.1, 0.5, 100_000, 0.5, 2.5)


# ---- budgets ----


def test_no_budget_never_refuses() -> None:
    book = BudgetBook()
    book.add("p", 10**6)
    assert book.refusal("p") is None
    assert book.refusal("") is None


def test_cluster_budget_refuses_at_and_after_the_cap_not_before() -> None:
    book = BudgetBook(cluster_usd=10.0)
    book.add("a", 6.0)
    book.add("", 3.99)
    assert book.refusal("a") is None
    book.add("b", 0.01)  # exactly 10.00 spent
    assert book.refusal("anything") == (
        "budget cluster reached: $10.00 of $10.00 spent; "
        "new llm tasks are refused until the budget is raised"
    )


def test_project_budget_refuses_only_that_project() -> None:
    book = BudgetBook(projects={"alpha": 2.5})
    book.add("alpha", 2.0)
    assert book.refusal("alpha") is None
    book.add("alpha", 0.75)
    assert book.refusal("alpha") == (
        "budget of project 'alpha' reached: $2.75 of $2.50 spent; "
        "new llm tasks are refused until the budget is raised"
    )
    assert book.refusal("beta") is None
    assert book.refusal("") is None


def test_check_raises_failed_precondition() -> None:
    book = BudgetBook(cluster_usd=1.0)
    book.add("", 1.5)
    with pytest.raises(BudgetReachedError, match=r"\$1.50 of \$1.00") as info:
        book.check("")
    assert status_of(info.value) == grpc.StatusCode.FAILED_PRECONDITION


def test_budget_specs() -> None:
    assert parse_budget_specs(["alpha=2.5", " beta = 0 "]) == {"alpha": 2.5, "beta": 0.0}
    for bad in ("alpha", "alpha=x", "=1", "alpha=-1"):
        with pytest.raises(ValueError, match="PROJECT=USD"):
            parse_budget_specs([bad])


def test_ledger_totals_per_dimension() -> None:
    ledger = CostLedger()
    for agent, role in (("a1", "coder"), ("a2", "coder"), ("a1", "tester")):
        ledger.add(
            agent=agent,
            role=role,
            model="m",
            project="p",
            input_tokens=10,
            output_tokens=20,
            cost_usd=0.5,
        )
    assert ledger.by["agent"]["a1"].calls == 2
    assert ledger.by["role"]["coder"].cost_usd == pytest.approx(1.0)
    assert ledger.by["model"]["m"].output_tokens == 60
    assert ledger.by["project"]["p"].input_tokens == 30
