"""Component-test plumbing: the hostile-input suite's case count, shown in the summary."""

from __future__ import annotations

import collections

import pytest

HOSTILE_CASES = pytest.StashKey["collections.Counter[str]"]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[HOSTILE_CASES] = collections.Counter()


@pytest.fixture
def hostile_cases(request: pytest.FixtureRequest) -> collections.Counter[str]:
    """Counts generated cases per RPC (test_hostile_input.py adds to it)."""
    return request.config.stash[HOSTILE_CASES]


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    cases = config.stash.get(HOSTILE_CASES, None)
    if cases:
        per_rpc = ", ".join(f"{name} {n}" for name, n in sorted(cases.items()))
        terminalreporter.write_line(
            f"hostile-input suite: {sum(cases.values())} generated cases ({per_rpc})"
        )
