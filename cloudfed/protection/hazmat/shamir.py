"""t-of-m Shamir sharing of 32-byte secrets over GF(2^128), share-compatible with pycryptodome.

.. danger::
   Hazardous materials: do not use directly; use ``cloudfed.protection`` (the secure-aggregation
   protocol). Fewer than t shares reveal nothing only if each share goes to its own holder
   sealed, and a holder answers for one survivor set per round; only the protocol enforces that.

Parties split with pycryptodome (its random polynomial, as Flower's SecAgg+ also uses); a 32-byte
seed or X25519 key is shared as two independent 16-byte halves with the same holder indices, and
a share is the two halves side by side.

The coordinator rebuilds one seed per surviving party, and pycryptodome's `combine` recomputes
the Lagrange coefficients (t inverses in pure Python) for every secret: that per-party cost grew
with t and made unmasking superlinear in n. The coefficients depend only on which holder indices
answered, which is the same set for almost every owner of a round, so we compute them once per
index set (cached) and reuse them: a rebuild is then t multiplications by a fixed field element,
each a few table lookups. The field is pycryptodome's: x^128 + x^7 + x^2 + x + 1, a 16-byte share
read big-endian, bit i the coefficient of x^i; tests check both give the same secret.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from Crypto.Protocol.SecretSharing import Shamir

SECRET_SIZE = 32
SHARE_SIZE = 32
_HALF = 16
_BITS = 128
_LOW = (1 << _BITS) - 1
_MODULUS = (1 << _BITS) | 0x87  # x^128 + x^7 + x^2 + x + 1


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
    tables = _coefficient_tables(tuple(i for i, _ in chosen))
    lo = hi = 0
    for table, (_, share) in zip(tables, chosen, strict=True):
        lo ^= _times(table, int.from_bytes(share[:_HALF], "big"))
        hi ^= _times(table, int.from_bytes(share[_HALF:], "big"))
    return _reduce(lo).to_bytes(_HALF, "big") + _reduce(hi).to_bytes(_HALF, "big")


def interpolate(points: Sequence[tuple[int, int]], at: int) -> int:
    """The polynomial through `points` (field elements as ints), evaluated at `at`.

    Any t points define one polynomial of degree t-1; tests use it to show that t-1 shares fit
    every secret equally well.
    """
    xs = tuple(x for x, _ in points)
    if len(set(xs)) != len(xs):
        raise ValueError("points must have distinct x")
    out = 0
    for c, (_, y) in zip(lagrange(xs, at), points, strict=True):
        out ^= mul(c, y)
    return out


def lagrange(xs: tuple[int, ...], at: int = 0) -> tuple[int, ...]:
    """Lagrange basis values l_i(at) for nodes `xs` (in characteristic 2, minus is xor)."""
    out = []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if j != i:
                num = mul(num, xj ^ at)
                den = mul(den, xi ^ xj)
        out.append(mul(num, inverse(den)))
    return tuple(out)


@lru_cache(maxsize=256)
def _coefficient_tables(indices: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Per index set: for each coefficient c, the 256 unreduced products c * b (b one byte).

    Public values only (they depend on which indices answered, not on any share).
    """
    return tuple(_byte_table(c) for c in lagrange(indices))


def _byte_table(c: int) -> tuple[int, ...]:
    table = [0] * 256
    for b in range(1, 256):
        low = b & -b
        table[b] = table[b ^ low] ^ (c << (low.bit_length() - 1))
    return tuple(table)


def _times(table: tuple[int, ...], y: int) -> int:
    """The unreduced product c * y from c's byte table, one byte of y at a time (carry-less)."""
    z, shift = 0, 0
    while y:
        z ^= table[y & 0xFF] << shift
        y >>= 8
        shift += 8
    return z


def _clmul(a: int, b: int) -> int:
    z = 0
    while b:
        if b & 1:
            z ^= a
        a <<= 1
        b >>= 1
    return z


def _reduce(z: int) -> int:
    """Reduce mod x^128 + x^7 + x^2 + x + 1: fold the high bits down (x^128 = x^7 + x^2 + x + 1)."""
    while z >> _BITS:
        high = z >> _BITS
        z = (z & _LOW) ^ high ^ (high << 1) ^ (high << 2) ^ (high << 7)
    return z


def mul(a: int, b: int) -> int:
    """Product in GF(2^128)."""
    return _reduce(_clmul(a, b))


def inverse(a: int) -> int:
    """The inverse of a non-zero element: extended Euclid over GF(2)[x] against the modulus."""
    if not 0 < a <= _LOW:
        raise ValueError("no inverse of zero or of a value outside the field")
    r0, r1, s0, s1 = a, _MODULUS, 1, 0
    while r1:
        while r0.bit_length() >= r1.bit_length():  # r0 mod r1, tracking s0 alongside
            shift = r0.bit_length() - r1.bit_length()
            r0 ^= r1 << shift
            s0 ^= s1 << shift
        r0, r1, s0, s1 = r1, r0, s1, s0
    return _reduce(s0)
