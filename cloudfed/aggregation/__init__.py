"""Aggregation strategies: pure functions first, algorithms built on them."""

from cloudfed.aggregation.fedavg import (
    check_update,
    shapes_of,
    structure_difference,
    weighted_mean,
)

__all__ = ["check_update", "shapes_of", "structure_difference", "weighted_mean"]
