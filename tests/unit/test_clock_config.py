"""FakeClock (time moves only when the test says so) and config loading from the environment."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from services._common.clock import FakeClock
from services._common.config import load
from services.consensus.config import ConsensusConfig

# ---- FakeClock ----


async def _sleepers(
    clock: FakeClock, delays: dict[str, float], woke: list[str]
) -> list[asyncio.Task[None]]:
    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    tasks = [asyncio.create_task(sleeper(name, s)) for name, s in delays.items()]
    await asyncio.sleep(0)  # let every sleeper register before time moves
    return tasks


async def test_fake_clock_wakes_nobody_before_their_time() -> None:
    clock = FakeClock(start=50.0)
    woke: list[str] = []
    tasks = await _sleepers(clock, {"a": 1.0, "b": 2.0}, woke)
    try:
        await clock.advance(0.999)
        assert woke == []
        assert clock.monotonic() == pytest.approx(50.999)
        await clock.advance(0.001)
        assert woke == ["a"]
        await clock.advance(0.5)
        assert woke == ["a"]
        await clock.advance(0.5)
        assert woke == ["a", "b"]
    finally:
        for task in tasks:
            task.cancel()


async def test_fake_clock_wakes_sleepers_in_order_of_deadline() -> None:
    clock = FakeClock()
    woke: list[str] = []
    # registered out of order; "c1" and "c2" share a deadline and keep their arrival order
    tasks = await _sleepers(clock, {"late": 3.0, "c1": 2.0, "early": 1.0, "c2": 2.0}, woke)
    await clock.advance(10.0)
    assert woke == ["early", "c1", "c2", "late"]
    assert all(task.done() for task in tasks)


async def test_fake_clock_time_seen_by_a_sleeper_is_its_deadline() -> None:
    # a loop that sleeps and reads the clock sees each step, even when one advance covers many
    clock = FakeClock(start=0.0)
    seen: list[float] = []

    async def ticker() -> None:
        for _ in range(3):
            await clock.sleep(1.0)
            seen.append(clock.monotonic())

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    await clock.advance(5.0)
    assert seen == [1.0, 2.0, 3.0]
    assert clock.monotonic() == 5.0
    assert task.done()


async def test_fake_clock_skips_cancelled_sleepers() -> None:
    clock = FakeClock()
    woke: list[str] = []
    tasks = await _sleepers(clock, {"cancelled": 1.0, "kept": 2.0}, woke)
    tasks[0].cancel()
    await clock.advance(3.0)
    assert woke == ["kept"]


# ---- config.load ----


@dataclass(frozen=True, kw_only=True)
class _Config:
    """A service config in the project's style: frozen, keyword-only, units in the names."""

    name: str = "node-1"
    port: int = 50051
    heartbeat_interval_s: float = 0.5
    tls: bool = False
    etcd_endpoints: tuple[str, ...] = ("127.0.0.1:2379",)


def test_defaults_without_environment() -> None:
    assert load(_Config, environ={}) == _Config()


def test_environment_fills_every_field_type() -> None:
    env = {
        "AGENTMESH_NAME": "coord-7",
        "AGENTMESH_PORT": "6000",
        "AGENTMESH_HEARTBEAT_INTERVAL_S": "0.25",
        "AGENTMESH_TLS": "yes",
        "AGENTMESH_ETCD_ENDPOINTS": "10.0.0.1:2379, 10.0.0.2:2379,",
        "AGENTMESH_UNRELATED": "ignored",
    }
    assert load(_Config, environ=env) == _Config(
        name="coord-7",
        port=6000,
        heartbeat_interval_s=0.25,
        tls=True,
        etcd_endpoints=("10.0.0.1:2379", "10.0.0.2:2379"),
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        (" ON ", True),
        ("Yes", True),
        ("0", False),
        ("false", False),
        ("off", False),
        ("NO", False),
    ],
)
def test_bool_spellings(raw: str, expected: bool) -> None:
    assert load(_Config, environ={"AGENTMESH_TLS": raw}).tls is expected


def test_overrides_win_over_environment_and_none_means_unset() -> None:
    env = {"AGENTMESH_PORT": "6000", "AGENTMESH_NAME": "from-env"}
    # a CLI flag left unset arrives as None and must not hide the environment
    cfg = load(_Config, overrides={"port": 7000, "name": None}, environ=env)
    assert cfg.port == 7000
    assert cfg.name == "from-env"


def test_reads_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTMESH_PORT", "6123")
    assert load(_Config).port == 6123


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("AGENTMESH_PORT", "fast"),
        ("AGENTMESH_PORT", "1.5"),
        ("AGENTMESH_HEARTBEAT_INTERVAL_S", "500ms"),
        ("AGENTMESH_TLS", "maybe"),
    ],
)
def test_bad_value_names_the_variable(variable: str, raw: str) -> None:
    with pytest.raises(ValueError, match=variable) as info:
        load(_Config, environ={variable: raw})
    assert repr(raw) in str(info.value)


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, 3600.5])
def test_consensus_config_refuses_a_default_timeout_out_of_range(timeout_s: float) -> None:
    # checked by the config itself, so AGENTMESH_DEFAULT_TIMEOUT_S is held to it as
    # well as the --default-timeout-s flag
    with pytest.raises(ValueError, match="default-timeout-s"):
        load(ConsensusConfig, environ={"AGENTMESH_DEFAULT_TIMEOUT_S": str(timeout_s)})
    assert load(ConsensusConfig, environ={"AGENTMESH_DEFAULT_TIMEOUT_S": "3600"})
