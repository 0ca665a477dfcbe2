"""compose.yaml and the Dockerfile agree with the real `agentmesh` CLI.

An operator runs `docker compose up`; these checks catch, without Docker, the
mistakes that would only show up there: a flag the CLI no longer accepts, a service
that never reports healthy, a container killed before its graceful stop ends, an
entrypoint that pyproject.toml does not install.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SERVE_KINDS = {"coordinator", "agent-pool", "health", "consensus"}
ETCD = "etcd"
# The services stop their gRPC servers with this grace after SIGTERM.
SERVICE_GRACE_S = 10.0
BASE_IMAGE = "python:3.11-slim-bookworm"


def _load_compose() -> dict[str, Any]:
    with (REPO / "compose.yaml").open(encoding="utf-8") as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict), "compose.yaml must be a mapping"
    return data


COMPOSE = _load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
# profile "tracing" adds third-party services (a collector and a trace viewer)
TRACING = {name for name, spec in SERVICES.items() if "tracing" in spec.get("profiles", [])}
AGENTMESH_SERVICES = sorted(name for name in SERVICES if name != ETCD and name not in TRACING)


def _pyproject() -> dict[str, Any]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    if pending:
        logical.append(pending)
    pairs = []
    for entry in logical:
        keyword, _, args = entry.partition(" ")
        pairs.append((keyword.upper(), args.strip()))
    return pairs


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from:]


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"expected the exec (JSON array) form, got {args!r}"
    return [str(v) for v in value]


def _image_entrypoint() -> list[str]:
    entrypoints = [args for kw, args in _final_stage() if kw == "ENTRYPOINT"]
    assert entrypoints, "the Dockerfile's final stage has no ENTRYPOINT"
    return _exec_form(entrypoints[-1])


def _as_argv(value: str | list[Any]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _invocation(service: dict[str, Any]) -> list[str]:
    """The argv a container of `service` runs: entrypoint, then command."""
    entrypoint = _as_argv(service["entrypoint"]) if "entrypoint" in service else None
    if entrypoint is None:
        entrypoint = _image_entrypoint()
    return entrypoint + _as_argv(service.get("command", []))


def _serve_kind(name: str) -> str:
    argv = _invocation(SERVICES[name])
    assert argv[:2] == ["agentmesh", "serve"], (
        f"{name} runs {shlex.join(argv)!r}, not `agentmesh serve <service>` "
        "(the image's ENTRYPOINT is already `agentmesh`; `command` holds only its arguments)"
    )
    assert len(argv) > 2, f"{name} runs `agentmesh serve` without naming a service"
    return argv[2]


def _flags(argv: list[str]) -> dict[str, str | None]:
    """`--name[=value]` / `--name value` pairs in argv."""
    flags: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if eq:
                flags[name] = value
            elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                flags[name] = argv[i + 1]
                i += 1
            else:
                flags[name] = None
        i += 1
    return flags


def _service_flags(name: str) -> dict[str, str | None]:
    return _flags(_invocation(SERVICES[name])[3:])


def _environment(name: str) -> dict[str, str]:
    env = SERVICES[name].get("environment") or {}
    if isinstance(env, list):
        return dict(entry.partition("=")[::2] for entry in env)
    return {key: str(value) for key, value in env.items()}


@functools.cache
def _cli_help(*args: str) -> str:
    """`agentmesh <args> --help`, run through the entry point pyproject.toml installs.

    Calling the [project.scripts] target (rather than whatever `agentmesh` is on
    PATH) tests this checkout's CLI and the exact entry point the image uses.
    """
    target = _pyproject()["project"]["scripts"]["agentmesh"]
    module, _, func = target.partition(":")
    code = (
        f"import sys; from {module} import {func} as main; "
        "sys.argv[0] = 'agentmesh'; sys.exit(main())"
    )
    # A wide, plain terminal, so that rich does not wrap or elide option names.
    env = {**os.environ, "COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args, "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, (
        f"`agentmesh {' '.join(args)} --help` exited {proc.returncode}:\n"
        f"{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout


def _accepted_flags(*args: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", _cli_help(*args)))


def _depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return {name: {} for name in deps}
    return {name: (cond or {}) for name, cond in deps.items()}


def _duration_s(value: str | int | float) -> float:
    """A compose duration ("20s", "1m30s", "1.5h") in seconds."""
    if isinstance(value, int | float):
        return float(value)
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", value)
    assert parts, f"cannot parse the duration {value!r}"
    assert "".join(n + u for n, u in parts) == value.strip(), f"bad duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore drops `path` (top-level name): the last matching rule wins."""
    ignore = REPO / ".dockerignore"
    if not ignore.exists():
        return False
    excluded = False
    for raw in ignore.read_text(encoding="utf-8").splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negated = rule.startswith("!")
        pattern = rule.lstrip("!").strip("/")
        if fnmatch.fnmatchcase(path, pattern):
            excluded = not negated
    return excluded


def _copy_sources() -> Iterator[str]:
    for kw, args in _dockerfile_instructions():
        if kw != "COPY" or "--from=" in args:
            continue
        words = [w for w in args.split() if not w.startswith("--")]
        yield from words[:-1]


# --- compose.yaml -----------------------------------------------------------------


def test_compose_has_etcd_and_agentmesh_services() -> None:
    assert ETCD in SERVICES
    kinds = {_serve_kind(name) for name in AGENTMESH_SERVICES}
    assert {"coordinator", "agent-pool", "health"} <= kinds


@pytest.mark.parametrize("name", AGENTMESH_SERVICES)
def test_service_runs_agentmesh_serve(name: str) -> None:
    assert _serve_kind(name) in SERVE_KINDS


@pytest.mark.parametrize("name", AGENTMESH_SERVICES)
def test_service_flags_are_accepted_by_the_cli(name: str) -> None:
    kind = _serve_kind(name)
    accepted = _accepted_flags("serve", kind)
    used = set(_service_flags(name))
    unknown = used - accepted
    assert not unknown, (
        f"{name}: `agentmesh serve {kind}` does not accept {sorted(unknown)} "
        f"(it accepts {sorted(accepted)})"
    )


@pytest.mark.parametrize("name", AGENTMESH_SERVICES)
def test_service_finds_etcd_by_its_compose_name(name: str) -> None:
    etcd = _service_flags(name).get("--etcd") or _environment(name).get("AGENTMESH_ETCD")
    assert etcd, f"{name} is not told where etcd is (--etcd or AGENTMESH_ETCD)"
    for endpoint in etcd.split(","):
        host = endpoint.split("://")[-1].rsplit(":", 1)[0]
        assert host in SERVICES, f"{name}: etcd endpoint {endpoint!r} is not a compose service"


# the tracing profile's images have no shell or client to probe with; nothing waits on them
@pytest.mark.parametrize("name", sorted(set(SERVICES) - TRACING))
def test_service_has_a_healthcheck(name: str) -> None:
    check = SERVICES[name].get("healthcheck")
    assert check, f"{name} has no healthcheck"
    assert not check.get("disable", False), f"{name} disables its healthcheck"
    test = _as_argv(check["test"])
    assert test[0] in {"CMD", "CMD-SHELL"}, f"{name}: healthcheck test {test!r}"
    if name == ETCD:
        assert test[1].endswith("etcdctl"), f"etcd healthcheck {test!r}"
        assert test[-2:] == ["endpoint", "health"], f"etcd healthcheck {test!r}"
        return
    # `agentmesh health check HOST:PORT` asks grpc.health.v1 on the port the service listens on.
    assert test[1:4] == ["agentmesh", "health", "check"], f"{name}: healthcheck {test!r}"
    assert len(test) == 5, f"{name}: healthcheck {test!r} should name one HOST:PORT"
    listen = _service_flags(name).get("--listen")
    assert listen, f"{name} does not say where it listens (--listen)"
    assert test[4].rsplit(":", 1)[1] == listen.rsplit(":", 1)[1], (
        f"{name} listens on {listen} but its healthcheck asks {test[4]}"
    )


def test_cli_has_the_health_command_healthchecks_use() -> None:
    assert "Usage" in _cli_help("health", "check")


@pytest.mark.parametrize("name", AGENTMESH_SERVICES)
def test_stop_grace_period_outlasts_the_service_grace(name: str) -> None:
    # Docker's default is 10 s: SIGKILL would land exactly when the server's own
    # grace ends, before it has deregistered from etcd.
    value = SERVICES[name].get("stop_grace_period")
    assert value is not None, f"{name} has no stop_grace_period"
    assert _duration_s(value) > SERVICE_GRACE_S


@pytest.mark.parametrize("name", AGENTMESH_SERVICES)
def test_service_has_a_restart_policy(name: str) -> None:
    assert SERVICES[name].get("restart", "no") != "no"


@pytest.mark.parametrize("name", AGENTMESH_SERVICES)
def test_depends_on_reaches_etcd_through_healthy_services(name: str) -> None:
    seen: set[str] = set()
    frontier = [name]
    while frontier:
        current = frontier.pop()
        for dep, spec in _depends_on(SERVICES[current]).items():
            assert dep in SERVICES, f"{current} depends on an unknown service {dep!r}"
            assert dep != name, f"depends_on cycle through {name}"
            assert spec.get("condition") == "service_healthy", (
                f"{current} should wait for {dep} to be healthy, not {spec.get('condition')!r}"
            )
            if dep not in seen:
                seen.add(dep)
                frontier.append(dep)
    assert ETCD in seen, f"{name}'s depends_on chain never reaches {ETCD}"


def test_coordinator_can_be_scaled() -> None:
    # `docker compose up --scale coordinator=3` fails on a fixed container name or
    # a single published host port.
    for name in AGENTMESH_SERVICES:
        assert "container_name" not in SERVICES[name], f"{name} has a fixed container_name"
    coordinators = [n for n in AGENTMESH_SERVICES if _serve_kind(n) == "coordinator"]
    assert coordinators
    for name in coordinators:
        for port in SERVICES[name].get("ports", []):
            if isinstance(port, dict):
                host = str(port.get("published", ""))
            else:
                parts = str(port).split(":")
                host = parts[-2] if len(parts) >= 2 else ""
            assert host == "" or "-" in host, (
                f"{name} publishes the single host port {port!r}; use a range or none"
            )


def test_etcd_keeps_its_data_in_a_named_volume_and_compacts() -> None:
    etcd = SERVICES[ETCD]
    named = set(COMPOSE.get("volumes") or {})
    sources = [str(v).split(":")[0] for v in etcd.get("volumes", [])]
    assert any(src in named for src in sources), f"etcd volumes {sources} use no named volume"
    flags = _flags(_as_argv(etcd.get("command", [])))
    assert flags.get("--auto-compaction-retention"), "etcd runs without auto-compaction"


# --- Dockerfile -------------------------------------------------------------------


def test_dockerfile_builds_on_the_slim_python_image() -> None:
    stages = [args.split() for kw, args in _dockerfile_instructions() if kw == "FROM"]
    assert stages
    for words in stages:
        image = next(w for w in words if not w.startswith("--"))
        assert image.split("@")[0] == BASE_IMAGE, f"FROM {' '.join(words)}"


def test_dockerfile_copies_pyproject_and_what_it_needs() -> None:
    sources = list(_copy_sources())
    assert "pyproject.toml" in sources
    readme = _pyproject()["project"].get("readme")
    if isinstance(readme, str):
        # setuptools reads the readme while building; without it `pip install .` fails.
        assert readme in sources
    for src in sources:
        assert (REPO / src).exists(), f"the Dockerfile copies {src}, which does not exist"
        assert not _dockerignore_excludes(src), f".dockerignore excludes {src}, which COPY needs"


def test_dockerfile_entrypoint_is_the_installed_console_script() -> None:
    entrypoint = _image_entrypoint()
    assert entrypoint[0] == "agentmesh"
    assert "agentmesh" in _pyproject()["project"]["scripts"]
    cmds = [args for kw, args in _final_stage() if kw == "CMD"]
    assert cmds
    assert _exec_form(cmds[-1]) == ["--help"]


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [args for kw, args in _final_stage() if kw == "USER"]
    assert users, "the image runs as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}


# --- profile "tracing" ------------------------------------------------------------


def test_tracing_profile_adds_a_collector_and_a_viewer_only_when_asked() -> None:
    assert {"otel-collector", "jaeger"} == TRACING
    for name in AGENTMESH_SERVICES + [ETCD]:
        assert "profiles" not in SERVICES[name], f"{name} must start without a profile"


def test_collector_receives_otlp_grpc_and_forwards_to_the_viewer() -> None:
    collector = SERVICES["otel-collector"]
    (mounted,) = collector["configs"]
    target = mounted["target"]
    assert f"--config={target}" in collector["command"]
    config = yaml.safe_load(COMPOSE["configs"][mounted["source"]]["content"])
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    (pipeline,) = config["service"]["pipelines"].values()
    assert pipeline["receivers"] == ["otlp"]
    for exporter in pipeline["exporters"]:
        host = config["exporters"][exporter]["endpoint"].split(":")[0]
        assert host in SERVICES, f"the collector exports to an unknown service {host!r}"
        assert SERVICES[host].get("environment", {}).get("COLLECTOR_OTLP_ENABLED") == "true"


@pytest.mark.parametrize("name", AGENTMESH_SERVICES)
def test_service_passes_the_otlp_endpoint_through(name: str) -> None:
    # the services trace only when the variable names a collector, and the compose
    # file's hint points at the one the profile starts
    env = SERVICES[name].get("environment", {})
    assert env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == "${OTEL_EXPORTER_OTLP_ENDPOINT:-}"
    header = (REPO / "compose.yaml").read_text(encoding="utf-8")
    assert "OTEL_EXPORTER_OTLP_ENDPOINT=http://otel-collector:4317" in header
    assert "4317:4317" in SERVICES["otel-collector"]["ports"]
