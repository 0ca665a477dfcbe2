"""Fill a frozen config dataclass from AGENTMESH_<FIELD> variables and overrides.

A section (an executor's own settings, say) reads AGENTMESH_<SECTION>_<FIELD> instead.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def _parse(raw: str, hint: Any, variable: str) -> Any:
    try:
        if hint is bool:
            low = raw.strip().lower()
            if low not in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
                raise ValueError(raw)
            return low in {"1", "true", "yes", "on"}
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if typing.get_origin(hint) is tuple:
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        return raw
    except ValueError:
        raise ValueError(
            f"{variable}={raw!r} is not a valid {getattr(hint, '__name__', hint)}"
        ) from None


def load(
    cls: type[T],
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    section: str = "",
) -> T:
    """Build `cls` from defaults, then AGENTMESH_[<SECTION>_]<FIELD> variables, then
    non-None overrides."""
    env = os.environ if environ is None else environ
    prefix = f"AGENTMESH_{section.upper()}_" if section else "AGENTMESH_"
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        variable = prefix + field.name.upper()
        raw = env.get(variable)
        if raw is not None:
            values[field.name] = _parse(raw, hints[field.name], variable)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return cls(**values)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    """What every service process shares; each service's config extends it."""

    etcd: str = "127.0.0.1:2379"
    """etcd endpoints, comma-separated host:port."""
    cluster: str = "default"
    """Cluster name; every key lives under /agentmesh/<cluster>/."""
    listen: str = "127.0.0.1:0"
    """Address the gRPC server binds (port 0 picks a free one)."""
    advertise: str = ""
    """Address published in etcd (default: the bound listen address)."""
    node_id: str = ""
    """Unique id of this process (default: <service>-<pid>-<random>)."""
    lease_ttl_s: int = 2
    """Session lease TTL. Registrations, candidacies and claims die with it, so a dead
    process is noticed within this long; 2 s is etcd's minimum with default timings."""
    grace_s: float = 10.0
    """Shutdown grace: in-flight work and RPCs get this long to finish."""
    etcd_timeout_s: float = 3.0
    """Deadline of each etcd call."""
    metrics_port: int = 0
    """Prometheus /metrics port on 127.0.0.1 (0: off)."""
