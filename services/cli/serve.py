"""`agentmesh serve <service>`: one service process, its options generated from its config.

A service is one row of `SERVICES`: its config dataclass (every field a flag, see
options.py), where its `serve(cfg)` coroutine lives (imported only when it runs, so
`--help` stays fast), the checks its config needs beyond the dataclass's own, and the
errors that end it with a message instead of a traceback. A bad value exits 2, like
click's own usage errors; a failure to start exits 1.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import typer

from services._common import config as configlib
from services._common.errors import AlreadyExistsError
from services.agent_pool.config import PoolConfig
from services.cli import options
from services.cli.common import EXIT_USAGE, fail, run
from services.consensus.config import ConsensusConfig
from services.coordinator.config import CoordinatorConfig
from services.health.config import HealthConfig

app = typer.Typer(no_args_is_help=True, help="Run one service process.")


# ---------------------------------------------------------------- checks
# What a config needs beyond its fields' types, with the messages the commands always
# gave. Each raises ValueError; they belong in the configs' __post_init__ once those
# files move onto ServiceConfig (then these rows drop their check), as the health
# monitor's and consensus's already are.


def check_coordinator(cfg: CoordinatorConfig) -> None:
    from services.coordinator.limits import check_config
    from services.coordinator.sessions import STRATEGIES

    check_config(cfg)
    if cfg.strategy not in STRATEGIES:
        raise ValueError(
            f"--strategy {cfg.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}"
        )


def check_pool(cfg: PoolConfig) -> None:
    from services.agent_pool.config import check_pool_id
    from services.agent_pool.executors import parse_latency
    from services.agent_pool.voter import Policy, parse_byzantine

    if cfg.pool_id or cfg.node_id:
        check_pool_id(cfg.pool_id or cfg.node_id)
    cfg.label_map()
    parse_latency(cfg.sleep_ms)
    Policy.parse(cfg.vote_policy)
    parse_byzantine(cfg.byzantine)
    parse_latency(cfg.vote_delay_ms)
    if not 1 <= cfg.capacity <= 1000:
        raise ValueError("--capacity must be 1-1000")


def _no_check(cfg: Any) -> None:
    """The config's own __post_init__ checks everything."""


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Service:
    """One `serve` command."""

    name: str
    """The command, and the service name in logs."""
    config: type[Any]
    serve: str
    """module:function of `async def serve(cfg)`."""
    help: str
    check: Callable[[Any], None] = _no_check
    id_field: str = "node_id"
    """The config field that names this process in logs (its pid when empty)."""
    errors: tuple[type[Exception], ...] = ()
    """Errors that end the process with their message (exit 1), besides OSError (a port
    in use, etcd unreachable)."""


SERVICES = (
    Service(
        "coordinator",
        CoordinatorConfig,
        "services.coordinator.server:serve",
        "The coordinator: campaigns for root; the leader serves the API and dispatches.",
        check_coordinator,
    ),
    Service(
        "agent-pool",
        PoolConfig,
        "services.agent_pool.server:serve",
        "An agent pool: hosts many agents, each with its own stream to the root coordinator.",
        check_pool,
        id_field="pool_id",
        errors=(ValueError, AlreadyExistsError),
    ),
    Service(
        "health",
        HealthConfig,
        "services.health.server:serve",
        "A health monitor: replicas elect one active monitor; the others stand by.\n"
        "Every threshold is an AGENTMESH_<FIELD> variable (see services/health/config.py).",
    ),
    Service(
        "consensus",
        ConsensusConfig,
        "services.consensus.server:serve",
        "The consensus service: one elected active instance collects votes and commits decisions.",
    ),
)


def _load(dotted: str) -> Any:
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def start(service: Service, flags: dict[str, Any]) -> None:
    """Build the config (flags over AGENTMESH_<FIELD> over defaults), check it, serve."""
    from services._common import logs

    try:
        cfg = configlib.load(service.config, options.overrides(service.config, flags))
        service.check(cfg)
    except (ValueError, TypeError) as err:
        fail(str(err), EXIT_USAGE)
    logs.setup(service.name, getattr(cfg, service.id_field, "") or str(os.getpid()))
    serve: Callable[[Any], Coroutine[Any, Any, None]] = _load(service.serve)
    ends: tuple[type[Exception], ...] = (OSError, *service.errors)
    try:
        run(serve(cfg))
    except ends as err:
        fail(str(err))


def command(service: Service) -> Callable[..., None]:
    """A typer command taking one option per field of the service's config."""

    def serve_command(**flags: Any) -> None:
        start(service, flags)

    serve_command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        options.parameters(service.config)
    )
    serve_command.__doc__ = service.help
    return serve_command


for _service in SERVICES:
    app.command(_service.name)(command(_service))
