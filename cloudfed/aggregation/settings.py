"""`aggregation:` in the run config: the server optimiser, its parameters, the weighting."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cloudfed.aggregation.fedbuff import BufferSettings
from cloudfed.aggregation.weights import WeightingSettings


class AggregationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The server optimiser over the round's mean delta: fedavg | fedavgm | fedadam | fedyogi
    # (cloudfed.aggregation.strategy.optimiser_names() lists what is installed).
    strategy: str = "fedavg"
    params: dict[str, Any] = Field(default_factory=dict)
    weighting: WeightingSettings = WeightingSettings()
    # L2 bound on one party's update (null: none beyond secure aggregation's per-value clip).
    # The party scales a longer update down before protection, since under secure aggregation
    # nobody else can see it; the coordinator checks it where it can (plaintext tensors).
    max_update_norm: float | None = Field(None, gt=0)
    # Buffered asynchronous rounds (FedBuff); null: synchronous rounds (see aggregation.fedbuff).
    buffer: BufferSettings | None = None
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
