"""How much a stale update counts: s(tau) multiplies a party's weight, party-side.

tau = (r - 1) - base_version: how many global versions were published between the adapter the
party trained from and the one its update is applied to. FedBuff (Nguyen et al. 2022) and
FedAsync (Xie et al. 2019) discount stale updates because they point away from where the model
now is. tau comes from public round numbers, so a discount may move a weight under any DP.
Every function lies in (0, 1] for tau >= 0, as the secure-sum weight slot requires.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cloudfed.errors import AggregationError

StalenessFunction = Literal["constant", "polynomial", "hinge"]


class StalenessSettings(BaseModel):
    """`aggregation.buffer.staleness`: 1, (1 + tau)^-a, or 1 up to b then 1/(a(tau - b) + 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    function: StalenessFunction = "polynomial"
    a: float = Field(0.5, ge=0.0, le=100.0)
    b: float = Field(4.0, ge=0.0)

    @model_validator(mode="after")
    def _finite(self) -> StalenessSettings:
        if self.function == "hinge" and self.a == 0.0:
            raise ValueError("hinge with a = 0 never discounts: use function constant instead")
        return self


def constant(tau: int) -> float:
    return 1.0


def polynomial(tau: int, a: float) -> float:
    return float((1.0 + tau) ** -a)


def hinge(tau: int, a: float, b: float) -> float:
    return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)


def discount(settings: StalenessSettings, tau: int) -> float:
    """s(tau) in (0, 1]; a negative tau is an update from the future: a bug, never a discount."""
    if tau < 0:
        raise AggregationError(f"staleness {tau} is negative: the base is newer than the round")
    if settings.function == "constant":
        return constant(tau)
    if settings.function == "polynomial":
        return polynomial(tau, settings.a)
    return hinge(tau, settings.a, settings.b)
