"""Federated averaging as pure functions over named tensors (Flower's `aggregate()` style).

No I/O and no state: strategies, DP wrappers and secure aggregation call these, and tests check
them against exact numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from cloudfed.aggregation.strategy import ServerState, register_optimiser
from cloudfed.errors import AggregationError

Shapes = Mapping[str, tuple[int, ...]]


def shapes_of(update: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Take the structure a round expects from the global adapter."""
    return {name: tuple(np.shape(t)) for name, t in update.items()}


def structure_difference(update: Mapping[str, np.ndarray], reference: Shapes) -> str | None:
    """First structural difference as a reason, so logs say which tensor is wrong."""
    missing = sorted(set(reference) - set(update))
    if missing:
        return f"missing tensor(s): {', '.join(missing[:3])}"
    extra = sorted(set(update) - set(reference))
    if extra:
        return f"unexpected tensor(s): {', '.join(extra[:3])}"
    for name in sorted(reference):
        shape = tuple(np.shape(update[name]))
        if shape != tuple(reference[name]):
            return f"shape mismatch for {name}: {shape} != {tuple(reference[name])}"
    return None


def weighted_mean(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Sum_k w_k x_k / sum_k w_k, accumulated in float64 so many small weights do not drift."""
    if not updates:
        raise AggregationError("no updates to aggregate")
    if len(weights) != len(updates):
        raise AggregationError(f"{len(weights)} weights for {len(updates)} updates")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise AggregationError("weights must be finite and non-negative")
    total = float(w.sum())
    if total <= 0.0:
        raise AggregationError("total weight must be positive")
    reference = shapes_of(updates[0])
    for k, update in enumerate(updates[1:], start=1):
        reason = structure_difference(update, reference)
        if reason is not None:
            raise AggregationError(f"update {k} does not match update 0: {reason}")
    out: dict[str, np.ndarray] = {}
    for name in reference:
        acc = np.zeros(reference[name], dtype=np.float64)
        for wk, update in zip(w, updates, strict=True):
            acc += wk * np.asarray(update[name], dtype=np.float64)
        out[name] = (acc / total).astype(np.float32)
    return out


def check_update(
    update: Mapping[str, np.ndarray], reference: Shapes, *, max_abs: float | None = None
) -> str | None:
    """Why a decrypted update must not enter the aggregate, or None when it may."""
    reason = structure_difference(update, reference)
    if reason is not None:
        return reason
    for name in sorted(reference):
        arr = np.asarray(update[name])
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            return f"non-numeric dtype {arr.dtype} for {name}"
        if arr.size == 0:
            continue
        if not np.all(np.isfinite(arr)):
            return f"non-finite values in {name}"
        peak = float(np.max(np.abs(arr)))
        if max_abs is not None and peak > max_abs:
            return f"magnitude {peak:.3g} exceeds {max_abs:.3g} in {name}"
    return None


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
