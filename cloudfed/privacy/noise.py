"""Calibrated Gaussian noise for party-level DP, sampled by OpenDP, and its calibration.

Sampling: OpenDP's exact discrete Gaussian (Canonne, Kamath, Steinke 2020) over integers, from the
OS's CSPRNG. Never numpy's or Python's Gaussian: floating-point samplers leak through their
low bits (Mironov 2012).

Noise only ever goes onto data that already lies on the sampler's grid. Secure-aggregation words
are integers, so distributed noise is added to them directly. A real-valued sum (central mode) or
a real-valued CKKS input (distributed mode) is first rounded onto a power-of-two grid `g`, the
integer noise is added in units of `g`, and the result is an exact multiple of `g`: what is
released depends on the data only through the rounded integers, never through a residue below the
grid (adding grid noise to an unrounded real would let that residue through un-noised, and an
adversary who knows the other parties' sum could tell whether a party took part from it). Rounding
moves each value by at most g/2, so it may lengthen one party's contribution by sqrt(d) * g in L2;
the ledger charges for that (see `party_level.charged_multiplier`). OpenDP's own `make_gaussian`
over floats does the same (rounds its input onto a power-of-two grid) at about 6x the cost.

Calibration (sensitivity C = the L2 clip, noise multiplier z, add/remove one party's whole
contribution):
- central: the coordinator adds N(0, (zC)^2) per coordinate to the sum once: to the summed
  secure-aggregation words as integers (before decoding; the quantiser leaves room for it), and
  to the sum of public tensors on its grid.
- distributed: each contributor adds a discrete Gaussian share of variance (zC)^2 / (m - c), with
  m = min_contributors and c = `privacy.colluding`, the number of contributors assumed to pool
  what they know. c curious co-contributors know their own shares and can subtract them; the
  shares of the other s - c >= m - c contributors still carry (s - c)(zC)^2 / (m - c) >= (zC)^2.
  So every dropout pattern the round accepts carries the charged noise against the coordinator
  and against any c co-contributors; with more survivors the sum carries more (the effective
  multipliers below, reported, not charged).
  The sum of discrete Gaussians is not exactly a discrete Gaussian; at the scales used here
  (standard deviations of millions of quantisation steps) the gap bound of Kairouz, Liu and
  Steinke 2021 (Theorem 1) is below 1e-100 and is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Grid for central noise on real sums: a power of two at most std / 2^30 (so fine that the
# rounding it adds to the sensitivity is about 1e-6 of the clip).
CENTRAL_GRID_BITS = 30
# Grid for CKKS noise shares: at most std / 2^20, but never finer than 2^(19 - scale bits) (2^-21
# at CKKS scale 2^40): CKKS's approximation error (about 4e-8 there) must stay far below half a
# step so the key party can round the decrypted sum back onto the grid.
CKKS_GRID_BITS = 20
CKKS_GRID_MARGIN_BITS = 19
_BATCH = 1 << 16
_EXACT = 1 << 52  # integers up to here convert to float64 and back exactly

IntSampler = Callable[[int, float], np.ndarray]


def opendp_discrete_gaussian(size: int, scale: float) -> np.ndarray:
    """`size` exact discrete Gaussian integers with parameter `scale` (OpenDP, CSPRNG-backed)."""
    import opendp.prelude as dp

    if size == 0:
        return np.zeros(0, dtype=np.int64)
    dp.enable_features("contrib")
    # 64-bit integers: OpenDP's `int` is i32, which saturates scales near 2^31 (a central grid
    # puts the noise at about 2^30 ticks).
    meas = dp.m.make_gaussian(
        dp.vector_domain(dp.atom_domain(T="i64")), dp.l2_distance(T="i64"), scale=float(scale)
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


def power_of_two_grid(std: float, bits: int) -> float:
    """The largest power of two at most std / 2^bits: multiples of it are exact in float64."""
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"noise std must be a positive finite number, got {std}")
    return math.ldexp(1.0, math.floor(math.log2(std)) - bits)


def to_grid(values: np.ndarray, grid: float) -> np.ndarray:
    """Nearest multiple of `grid`, as integers in units of it (deterministic)."""
    scaled = np.asarray(values, dtype=np.float64) / grid  # exact: grid is a power of two
    if not np.all(np.isfinite(scaled)) or (scaled.size and np.max(np.abs(scaled)) >= _EXACT):
        raise ValueError("values are non-finite or too large for the noise grid")
    return np.rint(scaled).astype(np.int64)


def noisy_on_grid(
    values: np.ndarray, std: float, grid: float, sampler: IntSampler | None = None
) -> np.ndarray:
    """Values rounded onto `grid`, plus discrete Gaussian noise of std `std`; exact multiples."""
    ticks = to_grid(values, grid)
    ticks += (sampler or opendp_discrete_gaussian)(ticks.shape[0], std / grid)
    return ticks.astype(np.float64) * grid


def central_noise(
    values: np.ndarray, std: float, sampler: IntSampler | None = None
) -> tuple[np.ndarray, float]:
    """Central mode: the real sum on a grid of std / 2^20 with N(0, std^2); (noisy, grid)."""
    grid = power_of_two_grid(std, CENTRAL_GRID_BITS)
    return noisy_on_grid(values, std, grid, sampler), grid


def add_integer_noise(
    words: np.ndarray, scale: float, sampler: IntSampler | None = None
) -> np.ndarray:
    """Words plus discrete Gaussian noise, modulo 2^32 like the masks that follow."""
    noise = (sampler or opendp_discrete_gaussian)(words.shape[0], scale)
    return ((words.astype(np.int64) + noise) % (1 << 32)).astype(words.dtype)


@dataclass(frozen=True)
class Calibration:
    """What one round's party-level noise is, in the units each side needs."""

    mode: str
    noise_multiplier: float
    clip: float
    min_contributors: int
    colluding: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.colluding < self.min_contributors:
            raise ValueError(
                f"colluding={self.colluding} must be below min_contributors="
                f"{self.min_contributors}: some honest contributor's noise must remain"
            )

    @property
    def sum_std(self) -> float:
        """Standard deviation of the noise on the sum that the accountant is charged for."""
        return self.noise_multiplier * self.clip

    @property
    def party_std(self) -> float:
        """Distributed mode: each party's share, so any m - c of them reach `sum_std`."""
        return self.sum_std / math.sqrt(self.min_contributors - self.colluding)

    def ckks_grid(self, scale_bits: int) -> float:
        """Distributed CKKS: the grid every party's real values and noise share lie on."""
        finest = math.ldexp(1.0, CKKS_GRID_MARGIN_BITS - scale_bits)
        return max(power_of_two_grid(self.party_std, CKKS_GRID_BITS), finest)

    def noise_std_excluding(self, contributors: int, excluded: int) -> float:
        """Noise left in a sum of `contributors` shares when `excluded` of them are known."""
        if self.mode != "distributed":
            return self.sum_std
        return self.party_std * math.sqrt(max(0, contributors - excluded))

    def effective_multiplier(self, contributors: int) -> float:
        """The z the sum carried against the worst adversary: `colluding` co-contributors."""
        return self.noise_std_excluding(contributors, self.colluding) / self.clip

    def effective_multiplier_vs_coordinator(self, contributors: int) -> float:
        """The z the sum carried against the coordinator alone (it knows no share).

        Zero in central mode: the coordinator unmasks the exact sum and is trusted with it; the
        epsilon then holds for the published model, not against the coordinator.
        """
        if self.mode == "central":
            return 0.0
        return self.noise_std_excluding(contributors, 0) / self.clip
