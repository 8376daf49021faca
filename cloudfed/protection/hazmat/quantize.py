"""Stochastic quantisation of real updates into words whose sum over n parties cannot wrap.

.. danger::
   Hazardous materials: do not use directly; use ``cloudfed.protection.secure_sum``. The sum only
   decodes correctly when every party used the same spec, sized for the round's party count, and
   the stochastic-rounding coins must not repeat across different values (see keyed_seed).

Masks live in Z_{2^32}; the unmasked sum is only meaningful when the true integer sum stayed below
2^32. Each party therefore clips to [-clip, clip] and maps onto `levels = 2**bits - 1` steps with
`bits = 32 - ceil(log2(n))`, so n words of at most `levels` sum to at most n * levels < 2^32.

Error bound (tested): stochastic rounding moves each value by less than one step
`delta = 2 * clip / levels`, and is unbiased, so for the sum over m <= n parties of values inside
the clipping range, |decoded - true| < m * delta per coordinate (and about sqrt(m) * delta / 2 in
standard deviation). Values outside the range are clipped first; the caller reports how many.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

MODULUS_BITS = 32
WORD = np.dtype("<u4")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class QuantSpec:
    """How one segment's reals map to words; every party and the coordinator use the same one."""

    clip: float
    bits: int
    parties: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive finite number, got {self.clip!r}")
        if self.parties < 1:
            raise ValueError("parties must be at least 1")
        headroom = headroom_bits(self.parties)
        if not 2 <= self.bits <= MODULUS_BITS - headroom:
            raise ValueError(
                f"bits={self.bits} lets the sum of {self.parties} parties wrap modulo 2^32; "
                f"use at most {MODULUS_BITS - headroom} bits (32 - ceil(log2 parties))"
            )

    @classmethod
    def for_parties(cls, clip: float, parties: int, bits: int | None = None) -> QuantSpec:
        """The widest bit width that cannot wrap, unless the config asks for fewer bits."""
        return cls(clip, MODULUS_BITS - headroom_bits(parties) if bits is None else bits, parties)

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def step(self) -> float:
        return 2.0 * self.clip / self.levels

    def sum_error_bound(self, summed: int) -> float:
        """Hard bound on |decoded sum - true sum| per coordinate for in-range values."""
        return summed * self.step


def headroom_bits(parties: int) -> int:
    return max(0, math.ceil(math.log2(parties))) if parties > 1 else 0


def dither_rng() -> np.random.Generator:
    """Rounding noise needs no secrecy, only fresh unbiased coins (masks never come from here)."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def quantize(
    values: np.ndarray, spec: QuantSpec, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, int]:
    """Words in [0, levels] and the number of clipped values; unbiased inside the range.

    Works through the vector in cache-sized chunks: the float64 temporaries stay at 8 MiB
    however large the update is.
    """
    x = np.asarray(values).ravel()
    rng = rng or dither_rng()
    out = np.empty(x.shape[0], dtype=WORD)
    scale = spec.levels / (2.0 * spec.clip)
    work = np.empty(min(x.shape[0], _CHUNK), dtype=np.float64)
    coins = np.empty_like(work)
    clipped = 0
    for start in range(0, x.shape[0], _CHUNK):
        part = x[start : start + _CHUNK]
        n = part.shape[0]
        y, u = work[:n], coins[:n]
        y[...] = part
        if not np.all(np.isfinite(y)):
            raise ValueError("cannot quantise non-finite values")
        clipped += int(np.count_nonzero(np.abs(y) > spec.clip))
        np.clip(y, -spec.clip, spec.clip, out=y)
        y += spec.clip
        y *= scale
        rng.random(out=u)
        y += u
        np.floor(y, out=y)
        np.minimum(y, spec.levels, out=y)  # x == clip with a coin of ~1 must not overflow
        out[start : start + n] = y
    return out, clipped


def dequantize_sum(words: np.ndarray, spec: QuantSpec, summed: int) -> np.ndarray:
    """Reals from the sum of `summed` parties' words (the offset is removed once per party).

    Decoded around the centre of the possible sums, so integer noise added by the parties
    (distributed DP) may push the sum below 0 or past 2^32 and still decode, provided the noisy
    sum stays within 2^31 of the centre; `noise_bits` sizes `bits` for that.
    """
    if not 1 <= summed <= spec.parties:
        raise ValueError(f"summed={summed} outside 1..{spec.parties} parties of this spec")
    centre = (summed * spec.levels) // 2
    offset = (np.asarray(words, dtype=np.int64) - centre) % (1 << MODULUS_BITS)
    offset[offset >= 1 << (MODULUS_BITS - 1)] -= 1 << MODULUS_BITS
    return (offset + centre).astype(np.float64) * spec.step - summed * spec.clip


def noise_bits(parties: int, noise_in_ranges: float, tails: float = 12.0) -> int:
    """Widest bits such that n words plus noise stay within 2^31 of the centre.

    `noise_in_ranges` is the standard deviation of the summed noise in units of the clipping
    range 2*clip; `tails` standard deviations are kept (beyond 12 sigma: p < 4e-33 a value).
    """
    for bits in range(MODULUS_BITS - headroom_bits(parties), 1, -1):
        levels = (1 << bits) - 1
        if parties * levels / 2 + tails * noise_in_ranges * levels < 1 << (MODULUS_BITS - 1):
            return bits
    raise ValueError(f"no bit width leaves room for noise of {noise_in_ranges} ranges")
