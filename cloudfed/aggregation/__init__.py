"""Aggregation strategies: the party-side contribution and the coordinator-side init/apply."""

from cloudfed.aggregation.fedavg import weighted_mean
from cloudfed.aggregation.guard import check_update, shapes_of, structure_difference

__all__ = ["check_update", "shapes_of", "structure_difference", "weighted_mean"]
