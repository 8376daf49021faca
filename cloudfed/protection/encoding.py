"""Turn a party's contribution into the vectors each protection mode aggregates, and back.

A contribution (see cloudfed.aggregation.strategy) is the party's already-weighted tensors and its
weight per slot; the weights travel appended to the protected vector, so the protected sum carries
both sum_k w_k x_k and sum_k w_k and the coordinator learns only the weighted mean, never w_k.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cloudfed.federation import FederationConfig
from cloudfed.protection.policy import Segment
from cloudfed.protection.secagg.quantize import WORD, QuantSpec, dequantize_sum, quantize


def secagg_specs(cfg: FederationConfig, parties: int) -> tuple[QuantSpec, QuantSpec]:
    """Specs for the values and for the weight slots, sized for this round's party count.

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
    tensors: Mapping[str, np.ndarray],
    weights: Sequence[float],
    specs: tuple[QuantSpec, QuantSpec],
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, int]:
    """Words for the masked vector (values, then the weight slots) and the clipped count."""
    values, clipped = quantize(segment.flatten(tensors), specs[0], rng)
    w_words, _ = quantize(np.asarray(weights, dtype=np.float64), specs[1], rng)
    return np.concatenate([values, w_words]).astype(WORD, copy=False), clipped


def decode_secagg(
    segment: Segment,
    words: np.ndarray,
    specs: tuple[QuantSpec, QuantSpec],
    summed: int,
    slots: int,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Sum of w_k x_k per tensor and sum of w_k per slot, from `summed` parties' unmasked words."""
    if words.shape[0] != segment.size + slots:
        raise ValueError(f"secagg sum has {words.shape[0]} words, not {segment.size + slots}")
    values = dequantize_sum(words[: segment.size], specs[0], summed)
    weights = dequantize_sum(words[segment.size :], specs[1], summed).astype(np.float64)
    return segment.unflatten(values), weights


def flat_with_weights(
    segment: Segment, tensors: Mapping[str, np.ndarray], weights: Sequence[float]
) -> np.ndarray:
    """For CKKS and plaintext: the weighted values flattened, the weight slots appended."""
    return np.concatenate([segment.flatten(tensors), np.asarray(weights, dtype=np.float64)])


def split_weights(
    segment: Segment, vector: np.ndarray, slots: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    if vector.shape[0] != segment.size + slots:
        raise ValueError(
            f"{segment.mode} sum has {vector.shape[0]} values, not {segment.size + slots}"
        )
    return segment.unflatten(vector[: segment.size]), np.asarray(vector[segment.size :], np.float64)
