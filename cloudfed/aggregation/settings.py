"""`aggregation:` in the run config: the server optimiser, its parameters, the weighting."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cloudfed.aggregation.weights import WeightingSettings


class AggregationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The server optimiser over the round's mean delta: fedavg | fedavgm | fedadam | fedyogi
    # (cloudfed.aggregation.strategy.optimiser_names() lists what is installed).
    strategy: str = "fedavg"
    params: dict[str, Any] = Field(default_factory=dict)
    weighting: WeightingSettings = WeightingSettings()
    # FedProx (Li et al. 2020): mu/2 ||w - w_global||^2 in every party's local objective; 0 is off.
    proximal_mu: float = Field(0.0, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _known(self) -> AggregationSettings:
        from cloudfed.aggregation.strategy import make_optimiser
        from cloudfed.errors import AggregationError

        try:
            make_optimiser(self.strategy, self.params)
        except (AggregationError, TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        return self
