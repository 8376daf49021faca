"""Calibrated Gaussian noise for party-level DP, sampled by OpenDP, and its calibration.

Sampling: OpenDP's exact discrete Gaussian (Canonne, Kamath, Steinke 2020) over integers, from the
OS's CSPRNG. Never numpy's or Python's Gaussian: floating-point samplers leak through their
low bits (Mironov 2012). Real-valued noise is a discrete Gaussian on a grid 2^-20 of its standard
deviation, which is how OpenDP itself samples reals, only faster through the integer sampler.

Calibration (sensitivity C = the L2 clip, noise multiplier z, add/remove one party):
- central: the coordinator adds N(0, (zC)^2) per coordinate to the sum once.
- distributed: each of the n contributors adds a discrete Gaussian of variance (zC)^2 / m with
  m = min_contributors. The sum of s >= m such shares has variance (zC)^2 * s / m >= (zC)^2, so
  any dropout pattern the round accepts still carries at least the calibrated noise; with every
  party present it carries more (effective multiplier z * sqrt(s / m), reported, not charged).
  The sum of discrete Gaussians is not exactly a discrete Gaussian; at the scales used here
  (standard deviations of millions of quantisation steps) the gap bound of Kairouz, Liu and
  Steinke 2021 (Theorem 1) is below 1e-100 and is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Integers from the sampler, scaled down by this much, make real-valued noise.
_REAL_GRID = 1 << 20
_BATCH = 1 << 16

IntSampler = Callable[[int, float], np.ndarray]


def opendp_discrete_gaussian(size: int, scale: float) -> np.ndarray:
    """`size` exact discrete Gaussian integers with parameter `scale` (OpenDP, CSPRNG-backed)."""
    import opendp.prelude as dp

    if size == 0:
        return np.zeros(0, dtype=np.int64)
    dp.enable_features("contrib")
    meas = dp.m.make_gaussian(
        dp.vector_domain(dp.atom_domain(T=int)), dp.l2_distance(T=int), scale=float(scale)
    )
    out = np.empty(size, dtype=np.int64)
    for start in range(0, size, _BATCH):
        n = min(_BATCH, size - start)
        out[start : start + n] = np.asarray(meas([0] * n), dtype=np.int64)
    return out


def seeded_sampler(seed: int) -> IntSampler:
    """Reproducible stand-in for tests and simulations only: rounded numpy normals, NOT secure."""
    rng = np.random.default_rng(seed)

    def sample(size: int, scale: float) -> np.ndarray:
        return np.rint(rng.normal(0.0, scale, size)).astype(np.int64)

    return sample


def real_gaussian(size: int, std: float, sampler: IntSampler | None = None) -> np.ndarray:
    """N(0, std^2) per value, as a discrete Gaussian on a grid of std / 2^20."""
    if std <= 0:
        raise ValueError(f"noise std must be positive, got {std}")
    ints = (sampler or opendp_discrete_gaussian)(size, float(_REAL_GRID))
    return ints.astype(np.float64) * (std / _REAL_GRID)


@dataclass(frozen=True)
class Calibration:
    """What one round's party-level noise is, in the units each side needs."""

    mode: str
    noise_multiplier: float
    clip: float
    min_contributors: int

    @property
    def sum_std(self) -> float:
        """Standard deviation of the noise on the sum that the accountant is charged for."""
        return self.noise_multiplier * self.clip

    @property
    def party_std(self) -> float:
        """Distributed mode: each party's share, so m of them reach `sum_std`."""
        return self.sum_std / math.sqrt(self.min_contributors)

    def effective_multiplier(self, contributors: int) -> float:
        """Noise multiplier the sum actually carried (distributed: more parties, more noise)."""
        if self.mode == "distributed":
            return self.noise_multiplier * math.sqrt(contributors / self.min_contributors)
        return self.noise_multiplier


def add_integer_noise(
    words: np.ndarray, scale: float, sampler: IntSampler | None = None
) -> np.ndarray:
    """Words plus discrete Gaussian noise, modulo 2^32 like the masks that follow."""
    noise = (sampler or opendp_discrete_gaussian)(words.shape[0], scale)
    return ((words.astype(np.int64) + noise) % (1 << 32)).astype(words.dtype)
