"""FedAdam: Adam on the server over the round's mean delta (see `adaptive` for the rule).

Flower's defaults: eta 0.1, beta_1 0.9, beta_2 0.99, tau 1e-9, and its bias-corrected rate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from cloudfed.aggregation.adaptive import AdaptiveOptimiser, AdaptiveParams, adam_second_moment
from cloudfed.aggregation.params import parse_params
from cloudfed.aggregation.strategy import register_optimiser


class FedAdamParams(AdaptiveParams):
    eta: float = Field(0.1, gt=0, allow_inf_nan=False)
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-9, gt=0, allow_inf_nan=False)


@register_optimiser("fedadam")
def fedadam(params: Mapping[str, Any]) -> AdaptiveOptimiser:
    return AdaptiveOptimiser(
        name="fedadam",
        params=parse_params(FedAdamParams, "fedadam", params),
        second_moment=adam_second_moment,
        bias_corrected=True,
    )
