"""FedYogi: Yogi's additive second moment on the server (see `adaptive` for the rule).

Flower's defaults: eta 0.01, beta_1 0.9, beta_2 0.99, tau 1e-3; no bias correction (Flower and
Reddi et al. use eta as it is).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from cloudfed.aggregation.adaptive import AdaptiveOptimiser, AdaptiveParams, yogi_second_moment
from cloudfed.aggregation.params import parse_params
from cloudfed.aggregation.strategy import register_optimiser


class FedYogiParams(AdaptiveParams):
    eta: float = Field(0.01, gt=0, allow_inf_nan=False)
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, allow_inf_nan=False)


@register_optimiser("fedyogi")
def fedyogi(params: Mapping[str, Any]) -> AdaptiveOptimiser:
    return AdaptiveOptimiser(
        name="fedyogi",
        params=parse_params(FedYogiParams, "fedyogi", params),
        second_moment=yogi_second_moment,
        bias_corrected=False,
    )
