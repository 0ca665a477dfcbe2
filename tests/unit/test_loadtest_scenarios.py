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


def test_etcd_kill_needs_a_cluster_it_can_kill_etcd_in() -> None:
    from loadtest.scenarios import ScenarioOptions, etcd_kill_action

    target = Target(coordinator_target="127.0.0.1:1")
    with pytest.raises(TargetError, match="etcd-kill"):
        etcd_kill_action(None, target, ScenarioOptions(), 5.0, [])  # type: ignore[arg-type]
    assert "etcd-kill" in SCENARIOS


def test_etcd_kill_summary_times_the_last_task_stranded_by_each_kill() -> None:
    from loadtest.scenarios import EtcdKill, summarise_etcd_kills

    kills = [
        EtcdKill(1, 5.0, ["a", "b"], 1.0, back_mono=100.0, coordinator_cpu_pct=2.0),
        EtcdKill(2, 9.0, ["c"], 1.0, back_mono=200.0, coordinator_cpu_pct=4.0),
        EtcdKill(3, 13.0, [], 1.0, back_mono=300.0, coordinator_cpu_pct=3.0),
        EtcdKill(4, 17.0, ["d", "e"], 1.0, back_mono=400.0, coordinator_cpu_pct=50.0),
    ]
    # b finished 0.5 s after etcd came back, c 2 s after; a's event came in before (0);
    # e never finished
    done = {"a": 99.9, "b": 100.5, "c": 202.0, "d": 400.1}
    out = summarise_etcd_kills(kills, done, acknowledged=10, terminal=9)
    per = {k["kill"]: k for k in out["per_kill"]}
    assert per[1]["last_finished_after_back_s"] == 0.5
    assert per[2]["last_finished_after_back_s"] == 2.0
    assert per[3]["last_finished_after_back_s"] == 0.0  # nothing was in flight
    assert per[4]["last_finished_after_back_s"] is None
    assert per[4]["never_finished"] == 1
    assert out["never_finished"] == 1
    assert out["acknowledged_terminal"] == "9/10"
    assert out["last_stranded_after_back_max_s"] == pytest.approx(2.0, abs=0.01)  # hdrhistogram
    assert 0.4 <= out["last_stranded_after_back_p50_s"] <= 0.6
    assert out["coordinator_cpu_down_p50_pct"] == 3.5
    assert out["coordinator_cpu_down_max_pct"] == 50.0


def test_cpu_seconds_come_from_proc_stat_whatever_the_command_name() -> None:
    from loadtest.target import cpu_seconds_from_stat, read_cpu_seconds

    # the name holds a space and a parenthesis; utime 250 and stime 50 ticks
    stat = "4242 (python (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0"
    assert cpu_seconds_from_stat(stat, 100.0) == 3.0
    assert read_cpu_seconds(-1) == 0.0  # gone: no figure rather than an error
    import os

    assert read_cpu_seconds(os.getpid()) > 0.0
