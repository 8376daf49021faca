"""A party's aggregation weight, computed by the party before protection.

The weight travels only inside the protected sum (see `strategy`), so the coordinator learns
sum_k w_k, never w_k. Every preset is one formula with a named set of exponents:

    raw_k = (L_k / L0)^a_loss * (|D_k| / D0)^a_examples * (B_k / B0)^a_bandwidth * s(tau_k)
    w_k   = clip(raw_k, min_weight, 1)

Inputs, and who knows them:
- L_k: the party's mean training loss this round (`loss_mean` of its training record). Only the
  party knows it; data-dependent. Missing or not a positive finite number (DP-SGD's Poisson
  batches can all come out empty, leaving NaN) counts as L0, a neutral factor of 1.
- |D_k|: the party's training example count. Only the party knows it; data-dependent.
- B_k: the party's `bandwidth_mbps` in the run config. Public: every party and the launcher read it.
- tau_k: the update's staleness in rounds (0 in synchronous rounds), from public round numbers.
- L0, D0, B0, min_weight, the exponents and s: public, in `aggregation.weighting`.

Why the bound: the secure-sum encoder sizes its weight slot for (0, 1], so a weight above 1
would wrap and one at 0 would drop the party while its (zero) update still counted. Clipping at
1 flattens every party whose raw weight exceeds 1 to the same weight, so the references should
keep raw_k <= 1 (L0 above every loss for a positive loss exponent, below for a negative one;
D0 and B0 likewise); clipping at min_weight keeps a party's influence above the weight slot's
quantisation step. Only the ratios of the weights matter: the mean divides by sum_k w_k.

Under any DP (`privacy.protects_records`) nothing data-dependent may move a weight: a co-contributor
of a two-party round reads its peer's weight off the weight sum. So presets that read L_k or |D_k|
are refused at config time (`check_federation`) and again here; `auto` falls back to uniform and
`staleness` drops its example count.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cloudfed.aggregation.staleness import StalenessSettings
from cloudfed.aggregation.strategy import PartyStats, RoundInfo
from cloudfed.errors import AggregationError

if TYPE_CHECKING:
    from cloudfed.federation import FederationConfig

Preset = Literal[
    "auto", "uniform", "examples", "paper", "inverse_loss", "bandwidth", "staleness", "custom"
]
PUBLIC_PRESETS = ("uniform", "bandwidth", "staleness")  # what DP leaves (besides auto)


class Exponents(BaseModel):
    """a_loss, a_examples, a_bandwidth of the formula; 0 leaves that input out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    loss: float = Field(0.0, allow_inf_nan=False)
    examples: float = Field(0.0, allow_inf_nan=False)
    bandwidth: float = Field(0.0, allow_inf_nan=False)


class WeightingSettings(BaseModel):
    """`aggregation.weighting`: which formula turns a party's stats into its weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # auto: examples without DP, uniform under any DP. See README "Weighting presets".
    preset: Preset = "auto"
    # paper only: w ~ L / (|D| B^alpha), the bandwidth exponent of arXiv 2503.12226.
    alpha: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    # custom only: the three exponents (custom also applies the staleness discount).
    exponents: Exponents | None = None
    # L0: needed by every preset that reads the loss.
    reference_loss: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    # D0; null: protection.weight_cap (must be given when the examples exponent is negative).
    reference_examples: int | None = Field(None, ge=1)
    # B0 in Mbit/s: needed by every preset that reads the bandwidth.
    reference_bandwidth_mbps: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    # Lower bound of a weight; null: 1 / protection.weight_cap (one example's worth).
    min_weight: float | None = Field(None, gt=0.0, le=1.0)
    # s(tau) of the staleness and custom presets.
    staleness: StalenessSettings = StalenessSettings()

    @model_validator(mode="after")
    def _consistent(self) -> WeightingSettings:
        where = "aggregation.weighting"
        if self.preset == "custom" and self.exponents is None:
            raise ValueError(
                f"{where}.preset custom needs {where}.exponents; set e.g. "
                "exponents: {loss: 0, examples: 1, bandwidth: 0}, or pick a named preset"
            )
        if self.preset != "custom" and self.exponents is not None:
            raise ValueError(
                f"{where}.exponents is read only by preset custom (preset is {self.preset}); "
                "remove exponents or set preset: custom"
            )
        # A changed alpha under another preset is a mistake; the default is what a dumped and
        # re-read config carries, so it passes.
        if self.preset != "paper" and self.alpha != 1.0:
            raise ValueError(
                f"{where}.alpha is read only by preset paper (preset is {self.preset}); "
                "remove alpha, or use preset custom with exponents.bandwidth"
            )
        for private in (False, True):
            exps, _ = formula(self, private)
            if exps.loss and self.reference_loss is None:
                raise ValueError(
                    f"{where}.preset {self.preset} reads the training loss: set "
                    f"{where}.reference_loss (L0), above every party's loss for a positive "
                    "exponent, below it for a negative one, so that weights stay <= 1"
                )
            if exps.bandwidth and self.reference_bandwidth_mbps is None:
                raise ValueError(
                    f"{where}.preset {self.preset} reads the bandwidth: set "
                    f"{where}.reference_bandwidth_mbps (B0), e.g. the fastest party's "
                    "bandwidth_mbps for a positive exponent, the slowest for a negative one"
                )
            if exps.examples < 0 and self.reference_examples is None:
                raise ValueError(
                    f"{where}.preset {self.preset} weights small parties up (examples exponent "
                    f"{exps.examples:g}): set {where}.reference_examples (D0) to about the "
                    "smallest party's example count; the default (protection.weight_cap) would "
                    "clip every party below it to weight 1"
                )
        return self


def effective_preset(settings: WeightingSettings, private: bool) -> str:
    if settings.preset == "auto":
        return "uniform" if private else "examples"
    return settings.preset


def formula(settings: WeightingSettings, private: bool) -> tuple[Exponents, bool]:
    """The preset's exponents, and whether s(tau) multiplies the weight."""
    preset = effective_preset(settings, private)
    if preset == "custom":
        assert settings.exponents is not None  # the validator requires them
        return settings.exponents, True
    loss, examples, bandwidth, stale = {
        "uniform": (0.0, 0.0, 0.0, False),
        "examples": (0.0, 1.0, 0.0, False),
        "paper": (1.0, -1.0, -settings.alpha, False),
        "inverse_loss": (-1.0, 0.0, 0.0, False),
        "bandwidth": (0.0, 0.0, 1.0, False),
        # The example count is data-dependent: under DP only the discount remains.
        "staleness": (0.0, 0.0 if private else 1.0, 0.0, True),
    }[preset]
    return Exponents(loss=loss, examples=examples, bandwidth=bandwidth), stale


def data_dependent(settings: WeightingSettings, private: bool) -> bool:
    """Whether the weight reads the loss or the example count, which only the party knows."""
    exps, _ = formula(settings, private)
    return bool(exps.loss or exps.examples)


def check_federation(cfg: FederationConfig) -> None:
    """Config-time refusals that need the whole federation: DP and per-party bandwidths."""
    settings = cfg.aggregation.weighting
    where = "aggregation.weighting.preset"
    if cfg.privacy.protects_records and data_dependent(settings, private=True):
        raise ValueError(
            f"{where} {settings.preset} reads each party's training loss or example count, "
            "which are data-dependent: under differential privacy (privacy.mode or "
            "privacy.dp_sgd) a co-contributor of a two-party round would read its peer's "
            f"weight off the weight sum. Use {', '.join(PUBLIC_PRESETS)} or auto, which use "
            "public values only"
        )
    exps, _ = formula(settings, cfg.privacy.protects_records)
    if exps.bandwidth:
        missing = [
            f"parties[{i}].bandwidth_mbps ({p.name})"
            for i, p in enumerate(cfg.parties)
            if p.bandwidth_mbps is None and p in cfg.active_parties
        ]
        if missing:
            raise ValueError(
                f"{where} {settings.preset} weights by bandwidth, but {', '.join(missing)} "
                "is not set; give every participating party its link speed in Mbit/s"
            )


def _min_weight(settings: WeightingSettings, weight_cap: int) -> float:
    return settings.min_weight if settings.min_weight is not None else 1.0 / weight_cap


def weight_floor(settings: WeightingSettings, weight_cap: int) -> float:
    """The least weight any contributor can have, after every discount: public, from the config.

    Every weight lies in [floor, 1], so no contributor outweighs another by more than 1/floor;
    a party's policy bounds that ratio (max_weight_ratio), or a launcher could shrink every peer
    until the aggregate is one party's update.
    """
    return _min_weight(settings, weight_cap)


def _loss(stats: PartyStats, reference: float) -> float:
    """L_k, or L0 when no usable loss exists (NaN from empty DP-SGD batches, missing, <= 0)."""
    loss = stats.loss
    if loss is None or not math.isfinite(loss) or loss <= 0:
        return reference
    return loss


def _factors(
    settings: WeightingSettings, exps: Exponents, stats: PartyStats, weight_cap: int
) -> list[tuple[float, float]]:
    """(ratio, exponent) pairs of the formula's inputs that this preset reads."""
    out: list[tuple[float, float]] = []
    if exps.loss:
        assert settings.reference_loss is not None  # the validator requires it
        out.append((_loss(stats, settings.reference_loss) / settings.reference_loss, exps.loss))
    if exps.examples:
        if stats.examples <= 0:
            raise AggregationError(f"example count {stats.examples} must be positive")
        d0 = settings.reference_examples or weight_cap
        out.append((stats.examples / d0, exps.examples))
    if exps.bandwidth:
        assert settings.reference_bandwidth_mbps is not None  # the validator requires it
        if stats.bandwidth_mbps is None or not stats.bandwidth_mbps > 0:
            raise AggregationError(
                f"weighting preset {settings.preset} reads the bandwidth, but this party has "
                f"bandwidth_mbps {stats.bandwidth_mbps!r}; set parties[].bandwidth_mbps"
            )
        out.append((stats.bandwidth_mbps / settings.reference_bandwidth_mbps, exps.bandwidth))
    return out


def party_weight(
    settings: WeightingSettings, stats: PartyStats, info: RoundInfo, *, weight_cap: int
) -> float:
    """W in [min_weight, 1] from the preset's formula; `examples` is min(examples, cap) / cap."""
    if info.private and data_dependent(settings, private=True):
        raise AggregationError(
            f"aggregation.weighting.preset {settings.preset} uses the training loss or example "
            "count, which are data-dependent; under differential privacy use "
            f"{', '.join(PUBLIC_PRESETS)} or auto"
        )
    exps, stale = formula(settings, info.private)
    factors = _factors(settings, exps, stats, weight_cap)
    if stale:
        factors.append((settings.staleness.discount(stats.staleness), 1.0))
    low = _min_weight(settings, weight_cap)
    # Decide the clipping in log space (no overflow), compute the value directly (exact ratios).
    log_raw = sum(a * math.log(r) for r, a in factors)
    if log_raw >= 0.0:
        return 1.0
    if log_raw <= math.log(low):
        return low
    raw = 1.0
    try:
        for r, a in factors:
            raw *= r**a
    except OverflowError:
        raw = math.exp(log_raw)
    return min(1.0, max(low, raw))


def _expression(settings: WeightingSettings, private: bool, weight_cap: int) -> str:
    exps, stale = formula(settings, private)
    terms = []
    if exps.loss:
        terms.append(f"(loss/{settings.reference_loss:g})^{exps.loss:g}")
    if exps.examples:
        terms.append(f"(examples/{settings.reference_examples or weight_cap})^{exps.examples:g}")
    if exps.bandwidth:
        terms.append(f"(bandwidth_mbps/{settings.reference_bandwidth_mbps:g})^{exps.bandwidth:g}")
    if stale:
        terms.append("s(tau)")
    return " * ".join(terms) or "1"


def label(settings: WeightingSettings, private: bool, weight_cap: int) -> str:
    """How MLflow's plan names the weighting: the preset and its formula with its constants."""
    preset = effective_preset(settings, private)
    if preset == "examples":
        return f"min(examples, {weight_cap}) / {weight_cap}"
    if preset == "uniform":
        return preset + (" (any DP)" if private and settings.preset == "auto" else "")
    body = _expression(settings, private, weight_cap)
    _, stale = formula(settings, private)
    discount = f", s(tau) = {settings.staleness.formula()}" if stale else ""
    return f"{preset}: clip({body}, {_min_weight(settings, weight_cap):g}, 1){discount}"
