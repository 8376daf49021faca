"""A strategy in two halves, because under secure aggregation the coordinator only sees sums.

- Party side, before protection: `contribution(update, stats, info)` scales the update by the
  party's weight(s) and returns the weight slots, so the protected sum carries
  sum_k w_k x_k and sum_k w_k and nobody but the party learns its own w_k.
- Coordinator side, after decoding: `init(global)` gives a `ServerState`; `apply(state, global,
  sums, weight_sums)` turns the opened sums into the next global adapter (FedJAX's init/apply).

Weight slots: most strategies have one (every element divides by sum_k w_k). Mixed LoRA ranks
need one per rank band, so that rows only some parties trained are divided by those parties'
weights, not diluted by zeros from parties that did not train them. `SlotMap` says which slot
each element of each tensor divides by; it is derived from public configuration only.

A new server optimiser is one module in this package that calls `register_optimiser`; the
`aggregation.strategy` config field names it and `aggregation.params` holds its parameters.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from cloudfed.errors import AggregationError

Tensors = Mapping[str, np.ndarray]
# Per tensor: one slot index for the whole tensor, or an integer array that broadcasts to it.
SlotMap = Mapping[str, int | np.ndarray]


@dataclass(frozen=True)
class PartyStats:
    """What a party knows about its own update; it leaves only inside the protected sum.

    `examples` and `loss` are data-dependent (never used for weights under DP); `bandwidth_mbps`
    and `rank` come from the party's public configuration; `staleness` from public round numbers.
    """

    examples: int
    loss: float | None = None
    bandwidth_mbps: float | None = None
    staleness: int = 0
    rank: int | None = None


@dataclass(frozen=True)
class RoundInfo:
    round: int
    private: bool = False  # any DP on: weights may only use public inputs


@dataclass(frozen=True)
class Contribution:
    """What a party feeds the protected sum: weighted tensors and its weight per slot."""

    tensors: dict[str, np.ndarray]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class ServerState:
    """The coordinator's state between rounds (moments, momentum); stored beside the adapter."""

    strategy: str
    version: int = 1
    step: int = 0
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict)
    scalars: Mapping[str, float] = field(default_factory=dict)


class ServerOptimiser(Protocol):
    """Coordinator-side update from the round's mean delta (the pseudo-gradient's negative)."""

    name: str

    def init(self, global_adapter: Tensors) -> ServerState: ...

    def step(
        self, state: ServerState, global_adapter: Tensors, mean_delta: Tensors
    ) -> tuple[ServerState, dict[str, np.ndarray], dict[str, float]]: ...


OptimiserFactory = Callable[[Mapping[str, Any]], ServerOptimiser]
_OPTIMISERS: dict[str, OptimiserFactory] = {}


def register_optimiser(name: str) -> Callable[[OptimiserFactory], OptimiserFactory]:
    """Make `aggregation.strategy: <name>` build this optimiser from `aggregation.params`."""

    def wrap(factory: OptimiserFactory) -> OptimiserFactory:
        if name in _OPTIMISERS and _OPTIMISERS[name] is not factory:
            raise AggregationError(f"two server optimisers are registered as {name!r}")
        _OPTIMISERS[name] = factory
        return factory

    return wrap


@functools.cache
def _load_modules() -> None:
    """Every module of this package registers what it defines; import them all once.

    Cached: every config validation, every party's contribution and every opened upload builds a
    strategy, and listing the package's folder each time is work for nothing.
    """
    import cloudfed.aggregation as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def optimiser_names() -> list[str]:
    _load_modules()
    return sorted(_OPTIMISERS)


def make_optimiser(name: str, params: Mapping[str, Any] | None = None) -> ServerOptimiser:
    _load_modules()
    if name not in _OPTIMISERS:
        raise AggregationError(
            f"unknown aggregation.strategy {name!r}; known: {', '.join(sorted(_OPTIMISERS))}"
        )
    return _OPTIMISERS[name](dict(params or {}))


def single_slot(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int | np.ndarray]:
    return {name: 0 for name in shapes}


def scale(update: Tensors, slots: SlotMap, weights: tuple[float, ...]) -> dict[str, np.ndarray]:
    """Each element times the weight of its slot (float64, so small weights do not drift)."""
    w = np.asarray(weights, dtype=np.float64)
    return {
        name: np.asarray(t, dtype=np.float64) * w[np.asarray(slots[name])]
        for name, t in update.items()
    }


def mean_from_sums(
    sums: Tensors, weight_sums: tuple[float, ...] | np.ndarray, slots: SlotMap
) -> dict[str, np.ndarray]:
    """sum_k w_k x_k / sum_k w_k per element's slot; elements nobody weighted stay at 0."""
    ws = np.asarray(weight_sums, dtype=np.float64)
    if not np.all(np.isfinite(ws)) or np.any(ws < 0):
        raise AggregationError(f"aggregated weights {ws.tolist()} are not finite and >= 0")
    if not np.any(ws > 0):
        raise AggregationError(f"the aggregated weight is {ws.tolist()}, not > 0")
    out: dict[str, np.ndarray] = {}
    for name in sorted(sums):
        div = ws[np.asarray(slots[name])]
        total = np.asarray(sums[name], dtype=np.float64)
        safe = np.where(div > 0, div, 1.0)
        out[name] = np.where(div > 0, total / safe, 0.0).astype(np.float32)
    return out


def norm(tensors: Tensors) -> float:
    return float(
        np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in tensors.values()))
    )
