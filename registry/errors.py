"""What can go wrong talking to etcd, as plain exceptions.

The services map these to gRPC status codes in their one error table
(`services/_common/grpcserver.py`); the registry itself knows nothing of gRPC
servers.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base of the registry's errors; the message says what to do."""


class StoreUnavailableError(RegistryError):
    """etcd cannot be reached; the call is safe to retry once it is back."""


class StoreRefusedError(RegistryError):
    """etcd rejected a request as malformed: a bug, not an outage; retrying will not help."""


class LeaseNotFoundError(StoreUnavailableError):
    """A put named a lease that has expired or was revoked."""


class NotLeaderError(RegistryError):
    """This replica is not (or no longer) the leader of its role."""

    def __init__(self, message: str, leader_endpoint: str = "") -> None:
        super().__init__(message)
        self.leader_endpoint = leader_endpoint
