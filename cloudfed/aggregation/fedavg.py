"""Federated averaging: the server takes the weighted mean delta as it is."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from cloudfed.aggregation.guard import shapes_of, structure_difference
from cloudfed.aggregation.strategy import (
    ServerState,
    mean_from_sums,
    register_optimiser,
    scale,
    single_slot,
)
from cloudfed.errors import AggregationError


def weighted_mean(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Sum_k w_k x_k / sum_k w_k by the seam's own arithmetic, without any protection.

    The reference the protected paths are tested against: `scale` on the party side, a float64
    sum, `mean_from_sums` on the coordinator side, exactly as a one-slot strategy does.
    """
    if not updates:
        raise AggregationError("no updates to aggregate")
    if len(weights) != len(updates):
        raise AggregationError(f"{len(weights)} weights for {len(updates)} updates")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise AggregationError("weights must be finite and non-negative")
    if float(w.sum()) <= 0.0:
        raise AggregationError("total weight must be positive")
    reference = shapes_of(updates[0])
    for k, update in enumerate(updates[1:], start=1):
        reason = structure_difference(update, reference)
        if reason is not None:
            raise AggregationError(f"update {k} does not match update 0: {reason}")
    slots = single_slot(reference)
    sums = {name: np.zeros(shape, dtype=np.float64) for name, shape in reference.items()}
    for wk, update in zip(w, updates, strict=True):
        for name, value in scale(update, slots, (float(wk),)).items():
            sums[name] += value
    return mean_from_sums(sums, (float(w.sum()),), slots)


class FedAvg:
    """The server takes the weighted mean delta as it is (server learning rate 1)."""

    name = "fedavg"

    def init(self, global_adapter: Mapping[str, np.ndarray]) -> ServerState:
        return ServerState(strategy=self.name)

    def step(
        self,
        state: ServerState,
        global_adapter: Mapping[str, np.ndarray],
        mean_delta: Mapping[str, np.ndarray],
    ) -> tuple[ServerState, dict[str, np.ndarray], dict[str, float]]:
        new = {
            name: (np.asarray(global_adapter[name], np.float32) + mean_delta[name]).astype(
                np.float32
            )
            for name in global_adapter
        }
        return replace(state, step=state.step + 1), new, {}


@register_optimiser("fedavg")
def _fedavg(params: Mapping[str, Any]) -> FedAvg:
    if params:
        raise AggregationError(f"fedavg takes no aggregation.params (got {sorted(params)})")
    return FedAvg()
