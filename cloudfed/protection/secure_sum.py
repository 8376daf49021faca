"""The hybrid policy's secure sum as one recipe: encode a contribution, decode the opened sums.

A contribution (see cloudfed.aggregation.strategy) is the party's already-weighted tensors and its
weight per slot; the weights travel appended to the protected vector, so the protected sum carries
both sum_k w_k x_k and sum_k w_k and the coordinator learns only the weighted mean, never w_k.
Roles call `encode` (party) and `decode` (coordinator); the masks, Shamir shares and quantisation
underneath are hazmat. Differential privacy hooks in through `Noise`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cloudfed.federation import FederationConfig
from cloudfed.privacy.noise import add_integer_noise, central_noise, noisy_on_grid
from cloudfed.protection.hazmat.quantize import WORD, QuantSpec, dequantize_sum, quantize
from cloudfed.protection.policy import Layout, Segment


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


@dataclass(frozen=True)
class Noise:
    """Where differential privacy puts its noise inside the secure sum (the DP wrapper's hooks).

    `party_std`: distributed DP, each party's share, added before protection (integers on the
    secagg words; exact multiples of `grid` for CKKS). `sum_std`: central DP, added by the
    coordinator to the opened sum before it is decoded (integers on the secagg words, the noise
    grid for real sums). Weight slots are never noised: they are public or exact.
    """

    party_std: float | None = None
    sum_std: float | None = None
    grid: float | None = None


NO_NOISE = Noise()
Masker = Callable[[np.ndarray], np.ndarray]
Encryptor = Callable[[np.ndarray], bytes]


def encode(
    layout: Layout,
    tensors: Mapping[str, np.ndarray],
    weights: Sequence[float],
    *,
    specs: tuple[QuantSpec, QuantSpec] | None = None,
    rng: np.random.Generator | None = None,
    mask: Masker | None = None,
    encrypt: Encryptor | None = None,
    noise: Noise = NO_NOISE,
) -> tuple[dict[str, bytes], int]:
    """A contribution as one section per protection mode, and how many values were clipped.

    `mask` turns secagg words into this party's masked input (the protocol's stage 3);
    `encrypt` turns a float vector into CKKS ciphertext blocks. The weights ride in the
    protected section(s); only when every tensor is public do they travel in plaintext.
    """
    sections: dict[str, bytes] = {}
    clipped = 0
    if (seg := layout.segment("secagg")) is not None:
        if mask is None or specs is None:
            raise ValueError("a secagg section needs the round's masks and quantisation specs")
        words, clipped = encode_secagg(seg, tensors, weights, specs, rng)
        if noise.party_std is not None:  # this party's share, before masking; weights exact
            words[: seg.size] = add_integer_noise(
                words[: seg.size], noise.party_std / specs[0].step
            )
        sections["secagg"] = mask(words).tobytes()
    if (seg := layout.segment("ckks")) is not None:
        if encrypt is None:
            raise ValueError("a ckks section needs the key party's public context")
        vector = flat_with_weights(seg, tensors, weights)
        if noise.party_std is not None:  # onto the shared grid first: exact multiples only
            if noise.grid is None:
                raise ValueError("distributed noise under CKKS needs its grid")
            vector[: seg.size] = noisy_on_grid(vector[: seg.size], noise.party_std, noise.grid)
        sections["ckks"] = encrypt(vector)
    if (seg := layout.segment("plaintext")) is not None:
        alone = len(layout.segments) == 1  # nothing protected carries the weights: they travel
        values = flat_with_weights(seg, tensors, weights) if alone else seg.flatten(tensors)
        sections["plaintext"] = values.astype("<f4").tobytes()
    return sections, clipped


@dataclass
class Decoded:
    sums: dict[str, np.ndarray]
    weight_sums: np.ndarray
    public_weights: dict[str, float]  # per party, only where weights travelled in plaintext


def decode(
    layout: Layout,
    slots: int,
    *,
    secagg_words: np.ndarray | None = None,
    specs: tuple[QuantSpec, QuantSpec] | None = None,
    summed: int = 0,
    ckks_vector: np.ndarray | None = None,
    plaintext: Mapping[str, bytes] | None = None,
    noise: Noise = NO_NOISE,
) -> Decoded:
    """The opened sums per tensor and the weight sums per slot, from each mode's section.

    `secagg_words`: the unmasked integer sum of `summed` parties; `ckks_vector`: the key party's
    decryption; `plaintext`: each party's public section. Central noise goes on before decoding.
    """
    sums: dict[str, np.ndarray] = {}
    weight_sums: np.ndarray | None = None
    public_weights: dict[str, float] = {}
    if (seg := layout.segment("secagg")) is not None:
        if secagg_words is None or specs is None:
            raise ValueError("the secagg sum is missing")
        words = secagg_words.copy()
        if noise.sum_std is not None:  # central: noise on the integer sum, before decoding
            words[: seg.size] = add_integer_noise(words[: seg.size], noise.sum_std / specs[0].step)
        tensors, weight_sums = decode_secagg(seg, words, specs, summed, slots)
        sums.update(tensors)
    if (seg := layout.segment("ckks")) is not None:
        if ckks_vector is None:
            raise ValueError("the decrypted CKKS sum is missing")
        tensors, w = split_weights(seg, ckks_vector, slots)
        sums.update(tensors)
        weight_sums = w if weight_sums is None else weight_sums
    if (seg := layout.segment("plaintext")) is not None:
        alone = len(layout.segments) == 1
        total = np.zeros(seg.size + (slots if alone else 0))
        for party, section in sorted((plaintext or {}).items()):
            values = np.frombuffer(section, dtype="<f4")
            total += values
            if alone:  # weights travelled in the clear: they may be reported
                public_weights[party] = float(values[seg.size])
        if alone:
            weight_sums = total[seg.size :].copy()
            total = total[: seg.size]
        public = seg.unflatten(total)
        if noise.sum_std is not None:  # the real sum onto the noise grid, then noised there
            public = _central_noise_on_real(public, noise.sum_std)
        sums.update(public)
    if weight_sums is None:
        raise ValueError("no section carried the weights")
    return Decoded(sums=sums, weight_sums=weight_sums, public_weights=public_weights)


def _central_noise_on_real(sums: Mapping[str, np.ndarray], std: float) -> dict[str, np.ndarray]:
    """Every real sum rounded onto the noise grid, then noised there (see privacy.noise)."""
    names = sorted(sums)
    flat = np.concatenate([np.asarray(sums[n], np.float64).ravel() for n in names])
    noisy, _ = central_noise(flat, std)
    out, at = {}, 0
    for name in names:
        size = sums[name].size
        out[name] = noisy[at : at + size].reshape(sums[name].shape)
        at += size
    return out
