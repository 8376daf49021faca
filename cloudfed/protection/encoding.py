"""Turn a party's update into the vectors each protection mode aggregates, and back.

Weighted aggregation under protection: a party scales its update by its weight
w = min(examples, weight_cap) / weight_cap <= 1 and appends w itself, so the protected sum carries
both sum_k w_k x_k and sum_k w_k and the coordinator learns only the weighted mean, never w_k.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cloudfed.federation import FederationConfig
from cloudfed.protection.policy import Segment
from cloudfed.protection.secagg.quantize import WORD, QuantSpec, dequantize_sum, quantize


def party_weight(examples: int, weight_cap: int) -> float:
    if examples <= 0:
        raise ValueError(f"example count {examples} must be positive")
    return min(examples, weight_cap) / weight_cap


def secagg_specs(cfg: FederationConfig, parties: int) -> tuple[QuantSpec, QuantSpec]:
    """Specs for the values and for the weight slot, sized for this round's party count.

    Under party-level DP the values' range is the L2 clip (no value of a clipped update lies
    outside it) and distributed noise takes bits from the top so that it cannot wrap.
    """
    sa = cfg.protection.secagg
    weight = QuantSpec.for_parties(1.0, parties, sa.bits)
    if cfg.privacy.enabled:
        from cloudfed.privacy.party_level import dp_value_spec

        return dp_value_spec(cfg, parties), weight
    return QuantSpec.for_parties(sa.clip, parties, sa.bits), weight


def encode_secagg(
    segment: Segment,
    update: Mapping[str, np.ndarray],
    weight: float,
    specs: tuple[QuantSpec, QuantSpec],
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, int]:
    """Words for the masked vector (values, then the weight) and the number of clipped values."""
    values, clipped = quantize(segment.flatten(update, weight), specs[0], rng)
    w_word, _ = quantize(np.array([weight]), specs[1], rng)
    return np.concatenate([values, w_word]).astype(WORD, copy=False), clipped


def decode_secagg(
    segment: Segment, words: np.ndarray, specs: tuple[QuantSpec, QuantSpec], summed: int
) -> tuple[dict[str, np.ndarray], float]:
    """Sum of w_k x_k per tensor and sum of w_k, from the unmasked words of `summed` parties."""
    if words.shape[0] != segment.size + 1:
        raise ValueError(f"secagg sum has {words.shape[0]} words, not {segment.size + 1}")
    values = dequantize_sum(words[:-1], specs[0], summed)
    weight = float(dequantize_sum(words[-1:], specs[1], summed)[0])
    return segment.unflatten(values), weight


def flat_with_weight(
    segment: Segment, update: Mapping[str, np.ndarray], weight: float
) -> np.ndarray:
    """For CKKS: w x flattened with w appended, as float64."""
    return np.concatenate([segment.flatten(update, weight), [weight]])


def split_weight(segment: Segment, vector: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
    if vector.shape[0] != segment.size + 1:
        raise ValueError(f"{segment.mode} sum has {vector.shape[0]} values, not {segment.size + 1}")
    return segment.unflatten(vector[:-1]), float(vector[-1])
