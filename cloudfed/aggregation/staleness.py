"""Staleness discounts s(tau) for updates trained from an older global adapter.

tau is the update's staleness: the number of rounds between the global adapter a party trained
from and the round its update enters (0 in synchronous rounds). An asynchronous server (FedAsync,
Xie et al. 2019; FedBuff, Nguyen et al. 2022) multiplies a stale update by s(tau) <= 1, so that
a party that trained on an old model pulls the current one less:

- constant:   s(tau) = 1
- polynomial: s(tau) = (1 + tau)^-a                      (FedBuff uses a = 0.5)
- hinge:      s(tau) = 1 if tau <= b else 1 / (a (tau - b) + 1)

Every s lies in (0, 1] and s(0) = 1, so a synchronous round is never discounted. tau comes from
public round numbers, so a discount never makes a weight data-dependent.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cloudfed.errors import AggregationError

StalenessFunction = Literal["constant", "polynomial", "hinge"]


def _check_tau(tau: int) -> None:
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 0:
        raise AggregationError(f"staleness {tau!r} must be a whole number of rounds >= 0")


def constant(tau: int) -> float:
    """No discount: every update counts fully however old its base adapter."""
    _check_tau(tau)
    return 1.0


def polynomial(tau: int, *, a: float) -> float:
    """(1 + tau)^-a: a smooth discount; a = 0 is constant, larger a forgets stale updates faster."""
    _check_tau(tau)
    if not (math.isfinite(a) and a >= 0):
        raise AggregationError(f"polynomial staleness exponent a={a!r} must be finite and >= 0")
    return float((1.0 + tau) ** -a)


def hinge(tau: int, *, a: float, b: float) -> float:
    """Full weight up to b rounds late, then 1 / (a (tau - b) + 1): tolerates a known lag."""
    _check_tau(tau)
    if not (math.isfinite(a) and a >= 0 and math.isfinite(b) and b >= 0):
        raise AggregationError(f"hinge staleness needs finite a >= 0 and b >= 0, got {a!r}, {b!r}")
    return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)


class StalenessSettings(BaseModel):
    """Which s(tau) discounts stale updates; `a` and `b` as in FedAsync's definitions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    function: StalenessFunction = "polynomial"
    # polynomial: the exponent; hinge: the slope after b rounds. 0.5 is FedBuff's choice.
    a: float = Field(0.5, ge=0.0, allow_inf_nan=False)
    # hinge only: rounds of lateness that are not discounted at all.
    b: float = Field(4.0, ge=0.0, allow_inf_nan=False)

    def discount(self, tau: int) -> float:
        """s(tau) in (0, 1] for this function and its parameters."""
        if self.function == "polynomial":
            return polynomial(tau, a=self.a)
        if self.function == "hinge":
            return hinge(tau, a=self.a, b=self.b)
        return constant(tau)

    def formula(self) -> str:
        """The discount as the MLflow plan label writes it."""
        if self.function == "polynomial":
            return f"(1+tau)^-{self.a:g}"
        if self.function == "hinge":
            return f"hinge(tau; a={self.a:g}, b={self.b:g})"
        return "1"
