"""A party's aggregation weight, computed by the party before protection.

The weight travels only inside the protected sum (see `strategy`), so the coordinator learns
sum_k w_k, never w_k. Weights lie in (0, 1]: the secure-sum encoder sizes its weight slot for
that range. Under any DP, only public inputs may move a weight (`auto` falls back to uniform).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from cloudfed.aggregation.strategy import PartyStats, RoundInfo
from cloudfed.errors import AggregationError

Preset = Literal["auto", "uniform", "examples"]


class WeightingSettings(BaseModel):
    """`aggregation.weighting`: which formula turns a party's stats into its weight."""

    model_config = ConfigDict(extra="forbid")

    # auto: example counts without DP, uniform under any DP (counts are data-dependent).
    preset: Preset = "auto"


def effective_preset(settings: WeightingSettings, private: bool) -> str:
    if settings.preset == "auto":
        return "uniform" if private else "examples"
    return settings.preset


def party_weight(
    settings: WeightingSettings, stats: PartyStats, info: RoundInfo, *, weight_cap: int
) -> float:
    """W in (0, 1]: min(examples, cap) / cap for `examples`, 1 for `uniform`."""
    preset = effective_preset(settings, info.private)
    if preset == "uniform":
        return 1.0
    if preset == "examples":
        if info.private:
            raise AggregationError(
                "aggregation.weighting.preset examples uses the example count, which is "
                "data-dependent; under differential privacy use uniform (or auto)"
            )
        if stats.examples <= 0:
            raise AggregationError(f"example count {stats.examples} must be positive")
        return min(stats.examples, weight_cap) / weight_cap
    raise AggregationError(f"unknown weighting preset {preset!r}")


def label(settings: WeightingSettings, private: bool, weight_cap: int) -> str:
    """How MLflow's plan names the weighting."""
    preset = effective_preset(settings, private)
    if preset == "examples":
        return f"min(examples, {weight_cap}) / {weight_cap}"
    return preset + (" (any DP)" if private and settings.preset == "auto" else "")
