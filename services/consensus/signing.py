"""Ed25519 signatures over votes (BFT), shared by the service and the agents.

The signed bytes are a canonical, length-prefixed encoding of (domain, proposal
id, agent id, round, choice, option, SHA-256 of the reason): nothing else, so
protobuf's encoding choices never matter, and a signed vote cannot be replayed
on another proposal, in another round, or as another agent's.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protos.agentmesh.v1 import consensus_pb2 as pb

DOMAIN = b"agentmesh.v1.vote"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def canonical(vote: pb.Vote) -> bytes:
    """The bytes a vote's signature covers."""
    parts = (
        DOMAIN,
        vote.proposal_id.encode(),
        vote.agent_id.encode(),
        int(vote.round).to_bytes(4, "big"),
        int(vote.choice).to_bytes(4, "big"),
        vote.option.encode(),
        hashlib.sha256(vote.reason.encode()).digest(),
    )
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key (what agents register under keys/<agent id>)."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign(key: Ed25519PrivateKey, vote: pb.Vote) -> bytes:
    return key.sign(canonical(vote))


def load_public(raw: bytes) -> Ed25519PublicKey | None:
    """A public key from its raw bytes; None when they are not one."""
    if len(raw) != PUBLIC_KEY_BYTES:
        return None
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        return None


def verify(key: Ed25519PublicKey, vote: pb.Vote) -> bool:
    if len(vote.signature) != SIGNATURE_BYTES:
        return False
    try:
        key.verify(vote.signature, canonical(vote))
    except InvalidSignature:
        return False
    return True
