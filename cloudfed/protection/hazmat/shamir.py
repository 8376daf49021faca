"""t-of-m Shamir sharing of 32-byte secrets over pycryptodome's GF(2^128) implementation.

.. danger::
   Hazardous materials: do not use directly; use ``cloudfed.protection`` (the secure-aggregation
   protocol). Fewer than t shares reveal nothing only if each share goes to its own holder
   sealed, and a holder answers for one survivor set per round; only the protocol enforces that.

pycryptodome shares 16-byte secrets (as Flower's SecAgg+ also uses it); a 32-byte seed or X25519
key is shared as two independent halves with the same holder indices, and a share is the two
16-byte halves side by side.
"""

from __future__ import annotations

from collections.abc import Sequence

from Crypto.Protocol.SecretSharing import Shamir

SECRET_SIZE = 32
SHARE_SIZE = 32
_HALF = 16


def split(secret: bytes, threshold: int, holders: int) -> list[tuple[int, bytes]]:
    """Shares for holder indices 1..holders; any `threshold` of them rebuild the secret."""
    if len(secret) != SECRET_SIZE:
        raise ValueError("only 32-byte secrets are shared")
    if not 1 <= threshold <= holders:
        raise ValueError(f"threshold {threshold} must be between 1 and holders ({holders})")
    if holders > 255:
        raise ValueError("at most 255 share holders per secret")
    if threshold == 1:  # pycryptodome needs k > 1; one-of-m is a copy by definition
        return [(i, secret) for i in range(1, holders + 1)]
    lo = Shamir.split(threshold, holders, secret[:_HALF])
    hi = Shamir.split(threshold, holders, secret[_HALF:])
    return [(i, a + b) for (i, a), (j, b) in zip(lo, hi, strict=True) if i == j]


def combine(shares: Sequence[tuple[int, bytes]], threshold: int) -> bytes:
    """The secret from exactly `threshold` distinct shares (extra shares are ignored)."""
    distinct = {i: s for i, s in shares}
    if len(distinct) < threshold:
        raise ValueError(f"{len(distinct)} distinct shares, {threshold} needed")
    chosen = sorted(distinct.items())[:threshold]
    if any(len(s) != SHARE_SIZE or not 1 <= i <= 255 for i, s in chosen):
        raise ValueError("malformed share")
    if threshold == 1:
        return chosen[0][1]
    lo = Shamir.combine([(i, s[:_HALF]) for i, s in chosen])
    hi = Shamir.combine([(i, s[_HALF:]) for i, s in chosen])
    return lo + hi
