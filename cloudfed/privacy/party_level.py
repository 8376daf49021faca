"""Party-level DP on the aggregate: L2 clipping, the round's noise, and what the ledger charges.

The neighbouring relation is adding or removing one party's whole update (DP-FedAvg, McMahan et
al. 2018). Each party clips its update to L2 norm C before protection; under DP every party has
weight 1, because example-count weights would make one party's influence data-dependent, and the
denominator is the number of contributors, which the coordinator sees anyway. The sum then has
sensitivity C and Gaussian noise of standard deviation z*C makes each round one Gaussian
mechanism at sampling rate 1, which the accountant composes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from cloudfed.federation import FederationConfig
from cloudfed.privacy.accountant import noise_for_target
from cloudfed.privacy.noise import Calibration
from cloudfed.protection.hazmat.quantize import QuantSpec, noise_bits


def round_noise_multiplier(cfg: FederationConfig) -> float:
    """The z as configured, or the smallest z meeting `target_epsilon` over the planned rounds."""
    p = cfg.privacy
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    if p.target_epsilon is None:
        raise ValueError("privacy is off: there is no noise multiplier")
    return noise_for_target(
        p.target_epsilon, p.delta, sample_rate=1.0, steps=cfg.rounds, accountant=p.accountant
    )


def calibration(cfg: FederationConfig) -> Calibration:
    return Calibration(
        mode=cfg.privacy.mode,
        noise_multiplier=round_noise_multiplier(cfg),
        clip=cfg.privacy.clip,
        min_contributors=cfg.min_contributors,
        colluding=cfg.privacy.colluding if cfg.privacy.mode == "distributed" else 0,
    )


def l2_norm(update: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values()))


def _scaled(update: Mapping[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    return {k: (np.asarray(v, np.float64) * factor).astype(np.float32) for k, v in update.items()}


def clip_update(
    update: Mapping[str, np.ndarray], clip: float
) -> tuple[dict[str, np.ndarray], float, bool]:
    """Scale the whole update down to L2 norm `clip` if it is longer; (update, norm, clipped)."""
    norm = l2_norm(update)
    if not math.isfinite(norm):
        raise ValueError("cannot clip an update with non-finite values")
    factor = 1.0 if norm <= clip else clip / norm
    out = _scaled(update, factor)
    # float32 rounding may leave the scaled norm a hair above the clip: shrink until it is not.
    while factor < 1.0 and l2_norm(out) > clip:
        factor *= 1 - 1e-6
        out = _scaled(update, factor)
    return out, norm, factor < 1.0


def dp_value_spec(cfg: FederationConfig, parties: int) -> QuantSpec:
    """Quantisation of DP values: range +-C, fewer bits so that the noise cannot wrap.

    No value of an update clipped to L2 norm C lies outside +-C, so nothing is clipped twice.
    """
    cal = calibration(cfg)
    if cfg.privacy.mode == "central":  # the coordinator's noise goes onto the summed words
        noise_std = cal.sum_std
    else:  # every advertised party adds its share
        noise_std = cal.party_std * math.sqrt(parties)
    bits = noise_bits(parties, noise_std / (2 * cal.clip))
    if cfg.protection.secagg.bits is not None:
        bits = min(bits, cfg.protection.secagg.bits)
    return QuantSpec(cal.clip, bits, parties)


def rounding_slack(cfg: FederationConfig, parties: int, values: Mapping[str, int]) -> float:
    """How much rounding may lengthen one party's contribution in L2, on top of the clip.

    - secagg: stochastic rounding moves each value by less than one quantisation step;
    - CKKS (distributed): each party rounds its values onto the noise grid (half a grid step);
    - central: the coordinator rounds every real sum onto its noise grid (half a step), and the
      difference of two rounded sums may differ from the difference of the sums by a full step.
    """
    from cloudfed.privacy.noise import CENTRAL_GRID_BITS, power_of_two_grid

    cal = calibration(cfg)
    slack = 0.0
    if (n := values.get("secagg", 0)) > 0:
        slack += math.sqrt(n) * dp_value_spec(cfg, parties).step
    if cal.mode == "distributed" and (n := values.get("ckks", 0)) > 0:
        slack += math.sqrt(n) * ckks_grid(cfg)
    if cal.mode == "central" and (n := values.get("plaintext", 0)) > 0:
        slack += math.sqrt(n) * power_of_two_grid(cal.sum_std, CENTRAL_GRID_BITS)
    return slack


def ckks_grid(cfg: FederationConfig) -> float:
    """The grid of distributed CKKS noise shares, for this config's CKKS scale."""
    return calibration(cfg).ckks_grid(cfg.protection.ckks.global_scale_bits)


def charged_multiplier(cfg: FederationConfig, parties: int, values: Mapping[str, int]) -> float:
    """The z the ledger charges, allowing for what rounding adds to the sensitivity.

    The noise is fixed at z*C; rounding may lengthen a clipped contribution to C + slack, so the
    charged multiplier is z*C / (C + slack), a hair below z (about 1e-4 relative in the demo).
    """
    cal = calibration(cfg)
    return cal.sum_std / (cal.clip + rounding_slack(cfg, parties, values))
