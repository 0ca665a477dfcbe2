"""What every command group shares: the consoles, failing with an exit code, running a
coroutine, and where the cluster is (--etcd and --cluster, generated from
`ServiceConfig` and read through `config.load` like a service's, and --coordinator)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from typing import Annotated, Any, NoReturn, Protocol, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from services._common import config as configlib
from services._common.config import ServiceConfig
from services.cli.options import field_option

T = TypeVar("T")

console = Console()
err_console = Console(stderr=True)

EXIT_USAGE = 2
"""A bad flag, value or environment variable (click's own code for usage errors)."""

Etcd = Annotated[str | None, field_option(ServiceConfig, "etcd")]
Cluster = Annotated[str | None, field_option(ServiceConfig, "cluster")]
Coordinator = Annotated[
    str | None,
    typer.Option(help="a coordinator host:port (instead of finding the leader in etcd)"),
]


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def id_column(table: Any, name: str, ids: Iterable[str]) -> None:
    """A table's id column, never cut to '…': rich shrinks a table to the terminal (80
    columns in a pipe), and a cut id is one the next command (`task get`) cannot use."""
    width = max((len(i) for i in ids), default=0)
    table.add_column(name, no_wrap=True, min_width=max(width, len(name)))


def parse_labels(items: list[str]) -> dict[str, str]:
    """`--label key=value` options as a map (exit 2 on one without `=`)."""
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--label {item!r} must be key=value", EXIT_USAGE)
        labels[key] = value
    return labels


def run(coro: Coroutine[Any, Any, T]) -> T:
    from services._common.grpcserver import install_uvloop

    install_uvloop()
    return asyncio.run(coro)


def call(coro: Coroutine[Any, Any, T]) -> T:
    """`run`, with an RPC error reported as the status and its message (exit 1)."""
    import grpc

    try:
        return run(coro)
    except grpc.aio.AioRpcError as err:
        fail(f"{err.code().name}: {err.details()}")


def where(etcd: str | None, cluster: str | None) -> ServiceConfig:
    """The etcd endpoints and cluster name: the flags, else AGENTMESH_ETCD and
    AGENTMESH_CLUSTER, else the defaults, exactly as a service reads them."""
    try:
        return configlib.load(ServiceConfig, {"etcd": etcd, "cluster": cluster})
    except (ValueError, TypeError) as err:
        fail(str(err), EXIT_USAGE)


CLIENT_RETRY_S = 15.0
"""How long a command retries while no leader answers (a failover takes about 2 s)."""


def mesh_client(etcd: str | None, coordinator: str | None, cluster: str | None) -> Any:
    """A MeshClient of the leader found in etcd, or of `coordinator` when given. A call
    that has to retry says so once on stderr, so a wait is never silent."""
    from services.client import MeshClient

    at = where(etcd, cluster)
    client = MeshClient(
        etcd=None if coordinator else at.etcd,
        coordinator=coordinator,
        cluster=at.cluster,
        retry_s=CLIENT_RETRY_S,
    )
    return telling_retries(client)


class Retrying(Protocol):
    """A client that retries while no leader answers (MeshClient, ConsensusClient)."""

    retry_s: float
    on_retry: Callable[[str], None] | None


R = TypeVar("R", bound=Retrying)


def telling_retries(client: R) -> R:
    """`client` with an `on_retry` that prints one line on stderr at a call's first
    retry, so a wait for a leader is never silent."""

    def retrying(why: str) -> None:
        err_console.print(
            f"[yellow]retrying:[/yellow] {escape(why)} (for up to {client.retry_s:g} s)"
        )

    client.on_retry = retrying
    return client
