"""A secure sum of a few numbers per party: metrics the coordinator may see only in aggregate.

Held-out loss, token counts and training loss are functions of a party's records. Under privacy
they are released only as a sum over every evaluating party: each party adds to its fixed-point
values one pairwise mask per other evaluator, derived from the two parties' long-term X25519 keys
(pinned in each party's policy) and bound to federation, run, round, model and the evaluator
list, so the masks cancel in the sum of exactly that list and in nothing else. There is no
dropout recovery: if one evaluator does not report, nothing is released for that round.

A party releases metrics about a given model at most once per evaluator list: evaluating the same
model again for a smaller list would let the difference of two sums reveal one party's values.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cloudfed.errors import ProtectionError
from cloudfed.protection.keys import KeyPairs, PublicKeyBundle

# Fixed point: 2^-24 resolution, |value| up to 5e11 before a 64-bit sum of 1000 parties wraps.
SCALE = float(1 << 24)
_DOMAIN = b"cloudfed/metrics-sum/v1/pair"
_WORD = np.dtype("<u8")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _pair_mask(secret: bytes, binding: Mapping[str, Any], a: str, b: str, n: int) -> np.ndarray:
    lo, hi = sorted((a, b))
    info = _DOMAIN + hashlib.sha256(_canonical({**binding, "pair": [lo, hi]})).digest()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)
    # One key per (pair, binding) expands one mask: AES-GCM's counter keystream over zeros.
    enc = Cipher(algorithms.AES(key), modes.GCM(bytes(12))).encryptor()
    return np.frombuffer(enc.update(bytes(8 * n)), dtype=_WORD).copy()


def encode(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(x)) or np.any(np.abs(x) * SCALE >= 2**62):
        raise ValueError("metrics must be finite and below 2^38 in magnitude")
    return np.rint(x * SCALE).astype(np.int64).view(_WORD)


def masked(
    values: Sequence[float],
    *,
    me: KeyPairs,
    evaluators: Mapping[str, PublicKeyBundle],
    binding: Mapping[str, Any],
) -> bytes:
    """The party's values under one pairwise mask per other evaluator (uint64, wrapping)."""
    if me.name not in evaluators:
        raise ValueError("the evaluator list must include this party")
    acc = encode(values)
    for name in sorted(evaluators):
        if name == me.name:
            continue
        try:
            secret = me.x25519.exchange(evaluators[name].x25519_key())
        except ValueError as exc:
            raise ProtectionError(f"metrics sum: {name}'s key is invalid") from exc
        mask = _pair_mask(secret, binding, me.name, name, acc.shape[0])
        if me.name < name:
            np.add(acc, mask, out=acc)
        else:
            np.subtract(acc, mask, out=acc)
    return acc.astype(_WORD).tobytes()


def unmasked_sum(vectors: Sequence[bytes], length: int) -> np.ndarray:
    """The sum of every evaluator's values; meaningless unless every evaluator is in it."""
    total = np.zeros(length, dtype=_WORD)
    for blob in vectors:
        if len(blob) != 8 * length:
            raise ProtectionError("metrics sum: a vector has the wrong length")
        np.add(total, np.frombuffer(blob, dtype=_WORD), out=total)
    return total.view(np.int64).astype(np.float64) / SCALE
