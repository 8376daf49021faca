"""X25519 key agreement and HKDF-SHA256 key derivation.

.. danger::
   Hazardous materials: do not use directly; use ``cloudfed.protection``. A raw shared secret is
   not a key, and a derived key is only safe when `info` binds everything the key is meant for.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SALT_SIZE = 32


def random_bytes(size: int) -> bytes:
    """Draw from the OS CSPRNG: the only randomness here, never `random` or `numpy.random`."""
    return os.urandom(size)


def agree(private: X25519PrivateKey, peer: X25519PublicKey) -> bytes:
    """Shared secret; raises ValueError for low-order peer keys (all-zero result)."""
    return private.exchange(peer)


def derive_key(shared_secret: bytes, *, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """Turn a Diffie-Hellman output into a uniformly random key bound to `info`."""
    if len(salt) != SALT_SIZE:
        raise ValueError("salt must be 32 bytes")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(
        shared_secret
    )
