"""The round's strategy as the run config composes it: weighting, slots, server optimiser.

Both roles build the same `Strategy` from the same config: the party calls `contribution`,
the coordinator `init` and `apply`. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cloudfed.aggregation.ranks import band_weights, federation_edges, slot_map
from cloudfed.aggregation.settings import AggregationSettings
from cloudfed.aggregation.strategy import (
    Contribution,
    PartyStats,
    RoundInfo,
    ServerOptimiser,
    ServerState,
    SlotMap,
    Tensors,
    make_optimiser,
    mean_from_sums,
    norm,
    scale,
)
from cloudfed.aggregation.weights import formula, label, party_weight, weight_floor
from cloudfed.errors import AggregationError

if TYPE_CHECKING:
    from cloudfed.federation import FederationConfig


@dataclass(frozen=True)
class Strategy:
    settings: AggregationSettings
    weight_cap: int
    optimiser: ServerOptimiser
    slots: SlotMap
    n_slots: int
    edges: tuple[int, ...] = ()  # LoRA rank bands (see ranks); () for one slot

    @property
    def name(self) -> str:
        return self.optimiser.name

    def contribution(self, update: Tensors, stats: PartyStats, info: RoundInfo) -> Contribution:
        """The party's weighted update and its weight per slot (it alone knows them)."""
        w = party_weight(self.settings.weighting, stats, info, weight_cap=self.weight_cap)
        _, discounted = formula(self.settings.weighting, info.private)
        if self.settings.buffer is not None and not discounted:
            # Buffered rounds discount stale updates once: by the weighting's own s(tau) when the
            # preset has one (staleness, custom), else by the buffer's. Public round numbers only.
            w *= self.settings.buffer.staleness.discount(stats.staleness)
        # No discount takes a weight below the public floor (see weights.weight_floor).
        w = max(w, weight_floor(self.settings.weighting, self.weight_cap))
        if not (0.0 < w <= 1.0) or not np.isfinite(w):
            raise AggregationError(f"weight {w!r} is outside (0, 1]")
        if self.edges:  # one slot per rank band: weight only the bands this party trained
            weights = band_weights(self.edges, stats.rank or self.edges[-1], w)
        else:
            weights = (w,) * self.n_slots
        return Contribution(tensors=scale(update, self.slots, weights), weights=weights)

    def init(self, global_adapter: Tensors) -> ServerState:
        return self.optimiser.init(global_adapter)

    def apply(
        self,
        state: ServerState,
        global_adapter: Tensors,
        sums: Tensors,
        weight_sums: tuple[float, ...] | np.ndarray,
    ) -> tuple[ServerState, dict[str, np.ndarray], dict[str, float]]:
        """Opened sums -> mean delta per slot -> the server optimiser's step."""
        if state.strategy != self.name:
            raise AggregationError(
                f"the server state was made by {state.strategy!r}, not {self.name!r}"
            )
        mean = mean_from_sums(sums, weight_sums, self.slots)
        new_state, new_global, diagnostics = self.optimiser.step(state, global_adapter, mean)
        return new_state, new_global, {"mean_delta_norm": norm(mean), **diagnostics}

    def label(self, private: bool) -> str:
        return f"{self.name}(weights: {label(self.settings.weighting, private, self.weight_cap)})"


def strategy_for(cfg: FederationConfig, shapes: Mapping[str, tuple[int, ...]]) -> Strategy:
    settings = cfg.aggregation
    edges = federation_edges(cfg)
    return Strategy(
        settings=settings,
        weight_cap=cfg.protection.weight_cap,
        optimiser=make_optimiser(settings.strategy, settings.params),
        slots=slot_map(shapes, edges),
        n_slots=len(edges) - 1,
        edges=edges,
    )
