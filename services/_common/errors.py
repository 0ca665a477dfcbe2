"""Domain errors and the one table that maps them to gRPC status codes."""

from __future__ import annotations

import grpc


class AgentMeshError(Exception):
    """Base of every error a caller can act on. The message says what to do."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgumentError(AgentMeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(AgentMeshError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(AgentMeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class NotLeaderError(AgentMeshError):
    """This replica is not (or no longer) the root coordinator."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, leader_endpoint: str = "") -> None:
        super().__init__(message)
        self.leader_endpoint = leader_endpoint


class StoreUnavailableError(AgentMeshError):
    """etcd cannot be reached; the call is safe to retry once it is back."""

    code = grpc.StatusCode.UNAVAILABLE


class StoreRefusedError(AgentMeshError):
    """etcd rejected a request as malformed: a bug, not an outage; retrying will not help."""

    code = grpc.StatusCode.INTERNAL


class StaleClaimError(AgentMeshError):
    """A result carried a claim token that is not the task's current claim."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UnknownAgentError(AgentMeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(AgentMeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


LEADER_METADATA_KEY = "agentmesh-leader"
