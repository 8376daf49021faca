"""The `privacy` block of a federation config: party-level DP, DP-SGD per party, the budget.

Validated here, before anything runs, because a wrong privacy setting is worse than a crash: a
delta of 1 or an epsilon of 0 would make every later number meaningless, so they are refused with
a message naming the field and the fix.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PrivacyMode = Literal["off", "central", "distributed"]
AccountantName = Literal["rdp", "prv"]
# A party's record-level budget when its dp_sgd block names none: finite, never "unlimited".
DEFAULT_DP_SGD_MAX_EPSILON = 10.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _epsilon(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(
            "epsilon must be a positive finite number; epsilon <= 0 is a budget nothing can meet"
        )
    return value


def _delta(value: float) -> float:
    if not 0.0 < value < 1.0:
        raise ValueError("delta must lie strictly between 0 and 1; delta >= 1 promises nothing")
    return value


class DpSgdSettings(_Strict):
    """Record-level DP-SGD (Opacus) inside one party; its epsilon is the party's own."""

    # Exactly one of noise_multiplier and target_epsilon (the noise is then derived for the
    # federation's rounds x local_steps at sample rate batch_size / records).
    noise_multiplier: float | None = Field(None, gt=0.0)
    target_epsilon: float | None = None
    max_grad_norm: float = Field(1.0, gt=0.0)
    # Poisson sampling rate of the DP-SGD batches. Give it, and the party's epsilon depends on
    # public values only; left out, it is batch_size / records, and the epsilon a party reports
    # then reveals its record count.
    sample_rate: float | None = Field(None, gt=0.0, le=1.0)
    delta: float = 1e-5
    # The party refuses to train once its own record-level spend (over every run and federation
    # on its data) would pass this; the stricter of this and the party's own policy holds.
    max_epsilon: float = DEFAULT_DP_SGD_MAX_EPSILON

    _check_epsilon = field_validator("target_epsilon", "max_epsilon")(_epsilon)
    _check_delta = field_validator("delta")(_delta)

    @model_validator(mode="after")
    def _check(self) -> DpSgdSettings:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        if self.target_epsilon is not None and self.target_epsilon > self.max_epsilon:
            raise ValueError(
                f"target_epsilon {self.target_epsilon} exceeds max_epsilon {self.max_epsilon}"
            )
        return self


class PrivacySettings(_Strict):
    """Party-level DP on the aggregate, its budget, and which parties run DP-SGD."""

    # off: no party-level DP. central: the coordinator adds the noise after unmasking (trusted
    # with the un-noised sum). distributed: each party adds its share of discrete Gaussian noise
    # before secure aggregation, so nobody ever sees an un-noised sum.
    mode: PrivacyMode = "off"
    # L2 bound on each party's whole update, applied before protection.
    clip: float = Field(0.05, gt=0.0)
    # Exactly one of the two when mode is not off; a target is met over `rounds` rounds.
    noise_multiplier: float | None = Field(None, gt=0.0)
    target_epsilon: float | None = None
    delta: float = 1e-5
    # The federation's budget across every run: no round starts whose spend would pass it.
    max_epsilon: float | None = None
    accountant: AccountantName = "rdp"
    # Distributed mode: the fewest contributors the noise must still cover (worst case of
    # dropouts); null means the federation's min_parties.
    min_contributors: int | None = Field(None, ge=2)
    # Distributed mode: how many contributors may pool their own noise shares (a curious
    # co-contributor knows its own). Each party adds 1/(min_contributors - colluding) of the
    # variance, so the shares of the others still reach the calibrated noise.
    colluding: int = Field(1, ge=1)
    # Record-level DP-SGD per party name.
    dp_sgd: dict[str, DpSgdSettings] = Field(default_factory=dict)

    _check_epsilon = field_validator("target_epsilon", "max_epsilon")(_epsilon)
    _check_delta = field_validator("delta")(_delta)

    @model_validator(mode="after")
    def _check(self) -> PrivacySettings:
        if self.mode == "off":
            if self.noise_multiplier is not None or self.target_epsilon is not None:
                raise ValueError(
                    "noise_multiplier/target_epsilon are set but mode is off; set mode to "
                    "central or distributed, or remove them"
                )
            return self
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                f"mode {self.mode} needs exactly one of noise_multiplier and target_epsilon"
            )
        if self.max_epsilon is None:
            raise ValueError(f"mode {self.mode} needs a finite budget: set max_epsilon (e.g. 8.0)")
        if self.target_epsilon is not None and self.target_epsilon > self.max_epsilon:
            raise ValueError(
                f"target_epsilon {self.target_epsilon} exceeds max_epsilon {self.max_epsilon}"
            )
        return self

    @property
    def enabled(self) -> bool:
        """Party-level DP on the aggregate is on."""
        return self.mode != "off"

    @property
    def protects_records(self) -> bool:
        """Any DP at all (party-level or DP-SGD): per-party values fall under the release rules."""
        return self.enabled or bool(self.dp_sgd)
