"""Keyed digests of a party's own files: integrity for the party, nothing for anyone else.

A party checks that the harmonised split it trains on, or the update it uploads, is the file it
registered. A plain SHA-256 in the coordinator's artifacts would do that too, but it is a
deterministic function of the records: anyone who knows all records but one (the adversary DP
assumes) can hash both candidates and learn which one the party holds, and training seeded from
the config is deterministic on a CPU, so the same goes for an update's hash. An HMAC under a key
only the party can derive (from its own private key) checks integrity just as well and tells an
outsider nothing.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cloudfed.protection.keys import KeyPairs

_DOMAIN = b"cloudfed/party-commitment/v1"


def commitment_key(keys: KeyPairs) -> bytes:
    """The party's commitment key: drawn fresh at a rotation, else derived from its signing key."""
    if keys.commitment is not None:
        return keys.commitment
    raw = keys.ed25519.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_DOMAIN).derive(raw)


def keyed_digest(keys: KeyPairs, sha256_hex: str, purpose: str) -> str:
    """HMAC-SHA256 of a file's SHA-256 under the party's commitment key, per `purpose`."""
    return hmac.new(
        commitment_key(keys), f"{purpose}:{sha256_hex}".encode(), hashlib.sha256
    ).hexdigest()


def matches(keys: KeyPairs, data: bytes, purpose: str, digest: str) -> bool:
    """Whether `data` hashes to `digest` under this party's key, or a retired one of its own.

    A file registered before a rotation carries a digest under the commitment key of the time.
    """
    sha = hashlib.sha256(data).hexdigest()
    for key in (commitment_key(keys), *keys.retired):
        actual = hmac.new(key, f"{purpose}:{sha}".encode(), hashlib.sha256).hexdigest()
        if hmac.compare_digest(actual, digest):
            return True
    return False


def keyed_seed(keys: KeyPairs, purpose: str, context: str) -> int:
    """A 128-bit seed only this party can derive, fixed by `context`.

    For coins that need no secrecy from the party itself but must be the same on a retry: a round
    retried from the same global adapter rounds its update exactly as the first attempt did, so
    two attempts never give two independent roundings of one value (whose average is finer).
    """
    mac = hmac.new(
        commitment_key(keys), f"seed:{purpose}:{context}".encode(), hashlib.sha256
    ).digest()
    return int.from_bytes(mac[:16], "big")
