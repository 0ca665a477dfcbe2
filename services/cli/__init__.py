"""The `agentmesh` command: one module per command group, assembled here.

- serve.py: `serve <service>`, options generated from each service's config (options.py);
- up.py: `up`, a local cluster of real processes;
- tasks.py: `submit`, `tasks`, `task get|cancel`;
- agents.py: `agents`;
- status.py: `status` and `dashboard`;
- consensus.py: `propose` and `decisions`;
- health.py: `health check|agents`;
- common.py: consoles, exit codes, --etcd/--cluster/--coordinator, running a coroutine.
The load-test harness mounts as `loadtest`. `python -m services.cli` runs the same app.
"""

from __future__ import annotations

from services._common import grpcenv

grpcenv.prefer_legacy_io()  # before anything below imports grpc

import typer  # noqa: E402

from services.cli import agents, consensus, health, serve, status, tasks, up  # noqa: E402

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="agentmesh: a gRPC mesh that coordinates hundreds of AI agents.",
)
# the order of `agentmesh --help`: commands, then groups
app.command()(up.up)
app.command()(tasks.submit)
app.command()(tasks.tasks)
app.command()(agents.agents)
app.command()(status.status)
app.command()(status.dashboard)
app.command()(consensus.propose)
app.command()(consensus.decisions)
app.add_typer(serve.app, name="serve")
app.add_typer(tasks.task_app, name="task")
app.add_typer(health.app, name="health")


def _mount_loadtest() -> None:
    try:
        from loadtest.cli import app as loadtest_app
    except ImportError:  # pragma: no cover - the harness is part of the package
        return
    app.add_typer(loadtest_app, name="loadtest")


_mount_loadtest()


def main() -> None:
    app()
