"""Mask expansion: a 32-byte seed becomes a uniform stream of 32-bit words via AES-256 in CTR.

.. danger::
   Hazardous materials: do not use directly; use ``cloudfed.protection`` (the secure-sum recipe
   and the secure-aggregation protocol). A seed must expand exactly one mask, and masks only
   cancel when every pair agrees on the seed and the sign; only the protocol guarantees that.

The keystream of AES in counter mode under a fresh key is a standard PRG. We drive it through
OpenSSL's GCM encryptor (via `cryptography`): GCM encrypts with exactly that counter keystream
(blocks nonce||2, nonce||3, ...), and OpenSSL's stitched AES-GCM kernel produces it about 1.8x
faster than its plain CTR path on AES-NI/VAES CPUs (measured: 64 MiB in 5.4 ms against 9.9 ms).
The GHASH tag is never finalised or used; each key expands exactly one mask, so the fixed nonce
is never reused under a key. Words are added or subtracted in place, chunk by chunk,
so expanding a 16M-parameter mask needs one 4 MiB buffer, not a second full-size vector. Never
`random` or `numpy.random`: those generators are predictable from a few outputs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cloudfed.protection.hazmat.quantize import WORD

SEED_SIZE = 32
CHUNK_WORDS = 1 << 20
_ZERO_NONCE = bytes(12)
_ZEROS = bytes(CHUNK_WORDS * 4)
_PAIR = b"cloudfed/secagg/v1/pair-mask"
_SELF = b"cloudfed/secagg/v1/self-mask"


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _derive(secret: bytes, domain: bytes, binding: dict[str, Any]) -> bytes:
    """One key per (secret, purpose, federation, run, round, pair): no mask is ever reused."""
    info = domain + hashlib.sha256(_canonical(binding)).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def pair_key(shared_secret: bytes, binding: dict[str, Any], a: str, b: str) -> bytes:
    """Symmetric in (a, b): both ends of a pair derive the same key from their X25519 secret."""
    lo, hi = sorted((a, b))
    return _derive(shared_secret, _PAIR, {**binding, "pair": [lo, hi]})


def self_key(seed: bytes, binding: dict[str, Any], party: str) -> bytes:
    if len(seed) != SEED_SIZE:
        raise ValueError("self-mask seed must be 32 bytes")
    return _derive(seed, _SELF, {**binding, "party": party})


def apply_mask(acc: np.ndarray, key: bytes, *, subtract: bool = False) -> None:
    """Add (or subtract) the key's stream into `acc` mod 2^32, in place (uint32 wraps by design)."""
    if acc.dtype != WORD or acc.ndim != 1:
        raise TypeError("masks apply to 1-D little-endian uint32 vectors")
    encryptor = Cipher(algorithms.AES(key), modes.GCM(_ZERO_NONCE)).encryptor()
    buf = bytearray(min(CHUNK_WORDS, acc.shape[0]) * 4 + 15)  # a small vector, a small buffer
    n = acc.shape[0]
    for start in range(0, n, CHUNK_WORDS):
        count = min(CHUNK_WORDS, n - start)
        written = encryptor.update_into(memoryview(_ZEROS)[: count * 4], buf)
        stream = np.frombuffer(buf, dtype=WORD, count=written // 4)
        view = acc[start : start + count]
        if subtract:
            np.subtract(view, stream, out=view)
        else:
            np.add(view, stream, out=view)


def expand(key: bytes, words: int) -> np.ndarray:
    """The mask itself, for tests and for the independence check."""
    out = np.zeros(words, dtype=WORD)
    apply_mask(out, key)
    return out
