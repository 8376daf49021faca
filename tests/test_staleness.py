"""Staleness discounts s(tau): exact values at several tau, and what they refuse."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cloudfed.aggregation.staleness import StalenessSettings, constant, hinge, polynomial
from cloudfed.errors import AggregationError


@pytest.mark.parametrize("tau", [0, 1, 7, 1000])
def test_constant_never_discounts(tau: int) -> None:
    assert constant(tau) == 1.0


@pytest.mark.parametrize(
    ("tau", "a", "want"),
    [
        (0, 0.5, 1.0),
        (3, 0.5, 0.5),  # 4^-0.5
        (8, 0.5, 1 / 3),  # 9^-0.5
        (4, 1.0, 0.2),  # 5^-1
        (1, 2.0, 0.25),  # 2^-2
        (9, 0.0, 1.0),  # a = 0 is constant
    ],
)
def test_polynomial(tau: int, a: float, want: float) -> None:
    assert polynomial(tau, a=a) == pytest.approx(want, rel=1e-15)


@pytest.mark.parametrize(
    ("tau", "want"),
    [(0, 1.0), (3, 1.0), (4, 1.0), (5, 1 / 11), (6, 1 / 21), (14, 1 / 101)],
)
def test_hinge_is_flat_up_to_b_then_falls(tau: int, want: float) -> None:
    """FedAsync's hinge with a = 10, b = 4: 1 / (10 (tau - 4) + 1) after four rounds."""
    assert hinge(tau, a=10.0, b=4.0) == pytest.approx(want, rel=1e-15)


def test_settings_pick_the_function() -> None:
    assert StalenessSettings().discount(3) == 0.5  # default: polynomial, a = 0.5
    assert StalenessSettings(function="constant", a=3.0).discount(3) == 1.0
    assert StalenessSettings(function="hinge", a=1.0, b=2.0).discount(5) == 0.25
    assert StalenessSettings(function="hinge", a=1.0, b=2.0).formula() == "hinge(tau; a=1, b=2)"
    assert StalenessSettings().formula() == "(1+tau)^-0.5"


@pytest.mark.parametrize("tau", [-1, 1.5, True])
def test_a_staleness_that_is_not_a_round_count_is_refused(tau: object) -> None:
    for fn in (constant, lambda t: polynomial(t, a=0.5), lambda t: hinge(t, a=1.0, b=1.0)):
        with pytest.raises(AggregationError, match="whole number of rounds"):
            fn(tau)


def test_negative_parameters_are_refused() -> None:
    with pytest.raises(AggregationError, match="exponent"):
        polynomial(1, a=-0.5)
    with pytest.raises(AggregationError, match="hinge"):
        hinge(1, a=1.0, b=-1.0)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        StalenessSettings(a=-1.0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        StalenessSettings(function="hinge", c=1.0)
