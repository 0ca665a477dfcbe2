"""CPU per task: /proc parsing, the window arithmetic, and the split per role."""

from __future__ import annotations

import os

import pytest

from loadtest.cpu import (
    HARNESS,
    CpuSampler,
    ProcessCpu,
    cpu_seconds_from_stat,
    read_cpu_seconds,
    role_of,
    summarise,
    used,
)


def test_stat_fields_are_counted_from_the_last_parenthesis() -> None:
    # a command name with a space and parentheses; utime 250, stime 50 ticks
    stat = "4242 (python (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0"
    assert cpu_seconds_from_stat(stat, 100.0) == 3.0


def test_a_gone_process_reads_as_none_and_a_live_one_as_its_cpu() -> None:
    assert read_cpu_seconds(2**22 + 12345) is None
    assert (read_cpu_seconds(os.getpid()) or 0.0) > 0.0


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("coordinator-2", "coordinator"),
        ("pool-1", "pool"),
        ("etcd", "etcd"),
        ("celery-worker", "celery-worker"),
        ("redis", "redis"),
        ("x-", "x-"),
        ("-3", "-3"),
    ],
)
def test_role_is_the_name_without_its_instance_number(name: str, role: str) -> None:
    assert role_of(name) == role


def test_cpu_used_is_counted_from_the_window_start_to_its_end() -> None:
    samples = [
        {"etcd": (10, 100.0), "pool-1": (11, 5.0)},
        {"etcd": (10, 100.5), "pool-1": (11, 5.2)},
        {"etcd": (10, 101.0), "pool-1": (11, 6.0)},
    ]
    out = used(samples)
    assert out["etcd"] == ProcessCpu(pytest.approx(1.0), True)
    assert out["pool-1"] == ProcessCpu(pytest.approx(1.0), True)


def test_a_process_started_inside_the_window_counts_from_zero() -> None:
    samples = [{"etcd": (10, 100.0)}, {"etcd": (10, 101.0), "pool-3": (12, 0.7)}]
    assert used(samples)["pool-3"] == ProcessCpu(pytest.approx(0.7), True)


def test_a_process_killed_inside_the_window_is_a_lower_bound() -> None:
    samples = [
        {"coordinator-1": (20, 3.0)},
        {"coordinator-1": (20, 4.0)},
        {},  # SIGKILLed: gone before the window closed
    ]
    assert used(samples)["coordinator-1"] == ProcessCpu(pytest.approx(1.0), False)


def test_a_restarted_process_adds_both_pids_and_stays_a_lower_bound() -> None:
    samples = [
        {"etcd": (30, 50.0)},
        {"etcd": (30, 52.0)},
        {"etcd": (31, 0.5)},  # killed and started again: a new pid from 0
        {"etcd": (31, 1.5)},
    ]
    assert used(samples)["etcd"] == ProcessCpu(pytest.approx(3.5), False)


def test_no_samples_no_figures() -> None:
    assert used([]) == {}


def test_summary_divides_per_task_per_role_and_leaves_the_harness_out_of_the_servers() -> None:
    procs = {
        "coordinator-1": ProcessCpu(4.0, True),
        "pool-1": ProcessCpu(1.0, True),
        "pool-2": ProcessCpu(1.5, False),
        "etcd": ProcessCpu(2.0, True),
        HARNESS: ProcessCpu(3.0, True),
    }
    s = summarise(procs, completed=10_000, window_s=20.0)
    assert s["measured"] is True
    roles = s["roles"]
    assert roles["coordinator"] == {
        "processes": 1,
        "complete": True,
        "cpu_s": 4.0,
        "ms_per_task": 0.4,
        "cores": 0.2,
    }
    assert roles["pool"]["processes"] == 2
    assert roles["pool"]["ms_per_task"] == 0.25
    assert roles["pool"]["complete"] is False  # one of them is a lower bound
    assert roles[HARNESS]["ms_per_task"] == 0.3
    # coordinator 4 + pools 2.5 + etcd 2 = 8.5 s over 10,000 tasks
    assert s["servers"]["ms_per_task"] == 0.85
    assert s["processes"]["pool-2"]["complete"] is False


def test_no_completed_task_gives_no_per_task_figure() -> None:
    s = summarise({"etcd": ProcessCpu(1.0, True)}, completed=0, window_s=0.0)
    assert s["roles"]["etcd"]["ms_per_task"] is None
    assert s["roles"]["etcd"]["cores"] is None


def test_sampler_follows_live_processes_and_skips_gone_ones() -> None:
    pids = {"server-1": os.getpid(), "gone-1": 2**22 + 12345}
    sampler = CpuSampler(lambda: pids)
    assert sampler.summary(completed=1, window_s=1.0)["measured"] is False
    sampler.sample()
    start = sampler.samples[0]["server-1"][1]
    while (read_cpu_seconds(os.getpid()) or 0.0) < start + 0.05:
        sum(i * i for i in range(10_000))  # burn CPU inside the window
    sampler.sample()
    assert set(sampler.samples[0]) == {"server-1", HARNESS}
    s = sampler.summary(completed=100, window_s=1.0)
    assert s["measured"] is True
    assert set(s["roles"]) == {"server", HARNESS}
    server = s["roles"]["server"]
    assert server["cpu_s"] >= 0.05
    assert server["ms_per_task"] == pytest.approx(10.0 * server["cpu_s"], abs=1e-3)
