"""Epsilon from a history of Gaussian mechanisms, by Opacus's accountants (never by hand).

Every spend in cloudfed is a sampled Gaussian mechanism: `steps` applications with noise
multiplier z (noise std / L2 sensitivity) at sampling rate q. Party-level DP on the aggregate is
q = 1 (every contributor is in the sum), DP-SGD is q = batch_size / records. A history of such
events goes to Opacus's RDP accountant (Mironov 2017) or its PRV accountant (Gopi et al. 2021),
which is tighter; both are what Opacus itself reports, so numbers here match its own tests.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from cloudfed.errors import ConfigError
from cloudfed.privacy.settings import AccountantName


@dataclass(frozen=True)
class GaussianEvent:
    """`steps` applications of a Gaussian mechanism with noise multiplier z at sampling rate q."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise multiplier must be positive, got {self.noise_multiplier}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample rate must lie in (0, 1], got {self.sample_rate}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")


def _accountant(name: AccountantName):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return {"rdp": RDPAccountant, "prv": PRVAccountant}[name]()


def epsilon(events: Iterable[GaussianEvent], delta: float, accountant: AccountantName) -> float:
    """Epsilon at `delta` of the composition of `events`; 0.0 for an empty history."""
    history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
    if not history:
        return 0.0
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    acc = _accountant(accountant)
    acc.history = history
    with warnings.catch_warnings():  # PRV at q = 1 takes log(0) on a branch it then discards
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=64)  # Opacus's search takes up to ~10 s at q = 1; steps reuse it
def noise_for_target(
    target_epsilon: float,
    delta: float,
    *,
    sample_rate: float,
    steps: int,
    accountant: AccountantName,
    what: str = "privacy.target_epsilon",
) -> float:
    """The smallest noise multiplier (to Opacus's tolerance) that meets the target."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                    epsilon_tolerance=0.01,
                )
            )
    except ValueError as exc:
        raise ConfigError(
            f"{what}={target_epsilon} at delta={delta} cannot be met over {steps} step(s) at "
            f"sample rate {sample_rate:.4g} ({exc}). Fix: raise the target, lower the rounds "
            "or give noise_multiplier instead."
        ) from None
