"""Scenario plumbing that needs no cluster: splitting agents, stopping, what a target offers."""

from __future__ import annotations

import pytest

from loadtest.scenarios import SCENARIOS, Stopper, agent_kill_action, split
from loadtest.target import Target, TargetError


def test_agents_are_split_evenly_over_pools() -> None:
    assert split(200, 2) == [100, 100]
    assert split(7, 3) == [3, 2, 2]
    assert split(1, 2) == [1, 0]
    assert sum(split(201, 4)) == 201


def test_stop_reaches_a_driver_attached_later() -> None:
    class FakeDriver:
        stopped = False

        def stop(self) -> None:
            self.stopped = True

    stopper = Stopper()
    stopper.stop()
    driver = FakeDriver()
    stopper.attach(driver)  # type: ignore[arg-type]
    assert driver.stopped


def test_kill_scenarios_need_a_kill_function() -> None:
    target = Target(coordinator_target="127.0.0.1:1")
    assert target.coordinator_targets == ("127.0.0.1:1",)
    with pytest.raises(TargetError, match="agent-kill"):
        agent_kill_action(client=None, target=target)  # type: ignore[arg-type]


def test_the_issue_scenarios_exist() -> None:
    assert {"steady", "burst", "spawn", "agent-kill"} <= set(SCENARIOS)
