"""Domain errors: plain Python, raised by cores and adapters alike.

Each says in its message what the caller should do. The one table that maps them
(and the registry's errors) to gRPC status codes is `STATUS` in
`services/_common/grpcserver.py`; nothing here knows about gRPC.
"""

from __future__ import annotations

from registry.errors import (
    NotLeaderError as NotLeaderError,
)
from registry.errors import (
    RegistryError as RegistryError,
)
from registry.errors import (
    StoreRefusedError as StoreRefusedError,
)
from registry.errors import (
    StoreUnavailableError as StoreUnavailableError,
)


class AgentMeshError(Exception):
    """Base of every service-level error a caller can act on."""


class InvalidArgumentError(AgentMeshError):
    """The request is malformed or out of range; the message names the field to fix."""


class MalformedRequestError(InvalidArgumentError):
    """The request's bytes are not a valid message of the method's request type."""


class RecordTooLargeError(InvalidArgumentError):
    """A write would not fit one etcd request (the store refuses it before sending)."""


class NotFoundError(AgentMeshError):
    """The named thing does not exist (or expired)."""


class AlreadyExistsError(AgentMeshError):
    """The named thing exists and belongs to someone else (e.g. an agent id in use)."""


class FailedPreconditionError(AgentMeshError):
    """The system is not in a state that allows the call (a budget spent, say)."""


class ResourceExhaustedError(AgentMeshError):
    """A per-caller limit was reached (a watcher too far behind, too many watchers)."""


DomainError = (AgentMeshError, RegistryError)
"""Every error the error table knows; anything else is a bug (INTERNAL, logged)."""

LEADER_METADATA_KEY = "agentmesh-leader"
