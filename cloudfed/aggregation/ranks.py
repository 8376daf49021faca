"""Heterogeneous LoRA ranks: rank bands, their weight slots, and truncation / padding.

A party with less compute trains a rank r_k <= R LoRA: it starts from the global adapter's first
r_k rank components (rows of lora_A, shape (r, in); columns of lora_B, shape (out, r)) and pads
its delta back to R with zeros. Averaged naively, those zeros would drag the components above r_k
towards 0 by the share of low-rank parties. Instead the rank axis is cut into bands at the
distinct configured ranks (public), each band gets its own weight slot, and a party weights only
the bands it trained: every element is divided by the weight of the parties that trained it.

A band summed over a single trainer is that party's update in the clear (the other parties add
exact zeros there, which no mask or ciphertext hides), so a band trained by anyone must be trained
by at least the round's minimum number of contributors: the config is refused otherwise, and at
round time parties refuse to reveal or decrypt a sum with a thinner band (`thin_bands`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from cloudfed.errors import AggregationError

if TYPE_CHECKING:
    from cloudfed.federation import FederationConfig

Tensors = Mapping[str, np.ndarray]
Edges = tuple[int, ...]  # 0 = e_0 < e_1 < ... < e_m = R; band i is [e_i, e_{i+1})


def rank_axis(name: str) -> int | None:
    """Which axis of a tensor is the LoRA rank: rows of A, columns of B (peft's layout)."""
    parts = name.split(".")
    if "lora_A" in parts or "lora_embedding_A" in parts:
        return 0
    if "lora_B" in parts or "lora_embedding_B" in parts:
        return 1
    return None


def edges_for(ranks: Iterable[int], full: int) -> Edges:
    """Band edges from the configured ranks; the full rank R always closes the last band."""
    rs = sorted(set(ranks) | {full})
    if rs[0] < 1 or rs[-1] > full:
        raise AggregationError(f"LoRA ranks {rs} must lie in [1, {full}]")
    return (0, *rs)


def band_weights(edges: Edges, rank: int, weight: float) -> tuple[float, ...]:
    """The party's weight in every band below its rank, 0 in the bands it did not train."""
    return tuple(weight if hi <= rank else 0.0 for hi in edges[1:])


def slot_map(shapes: Mapping[str, tuple[int, ...]], edges: Edges) -> dict[str, int | np.ndarray]:
    """Per tensor, the band (slot) of each element: by rank index for LoRA, band 0 otherwise.

    Non-LoRA tensors are trained by every party, and every party trains band 0.
    """
    full = edges[-1]
    band_of = np.repeat(np.arange(len(edges) - 1), np.diff(edges))
    out: dict[str, int | np.ndarray] = {}
    for name, shape in shapes.items():
        axis = rank_axis(name)
        if axis is None or len(edges) == 2:
            out[name] = 0
            continue
        if len(shape) <= axis or shape[axis] != full:
            raise AggregationError(
                f"{name} has shape {tuple(shape)}; its axis {axis} should be the LoRA rank {full}"
            )
        view = [1] * len(shape)
        view[axis] = full
        out[name] = band_of.reshape(view)
    return out


def truncate(state: Tensors, rank: int) -> dict[str, np.ndarray]:
    """The first `rank` components of every LoRA tensor; other tensors unchanged."""
    out: dict[str, np.ndarray] = {}
    for name, t in state.items():
        axis = rank_axis(name)
        arr = np.asarray(t)
        if axis is not None:
            if arr.shape[axis] < rank:
                raise AggregationError(f"{name} has rank {arr.shape[axis]}, below {rank}")
            arr = np.take(arr, np.arange(rank), axis=axis)
        out[name] = np.ascontiguousarray(arr, dtype=np.float32)
    return out


def pad(state: Tensors, full: int) -> dict[str, np.ndarray]:
    """Zeros in the components above a tensor's rank, up to `full`: a delta that leaves them."""
    out: dict[str, np.ndarray] = {}
    for name, t in state.items():
        axis = rank_axis(name)
        arr = np.asarray(t, dtype=np.float32)
        if axis is not None:
            missing = full - arr.shape[axis]
            if missing < 0:
                raise AggregationError(f"{name} has rank {arr.shape[axis]}, above {full}")
            widths = [(0, 0)] * arr.ndim
            widths[axis] = (0, missing)
            arr = np.pad(arr, widths)
        out[name] = np.ascontiguousarray(arr, dtype=np.float32)
    return out


def party_rank(cfg: FederationConfig, party: str) -> int:
    return cfg.party(party).lora_rank or cfg.lora.rank


def federation_edges(cfg: FederationConfig) -> Edges:
    """Edges from the participating parties' public ranks: both roles derive the same ones."""
    return edges_for((p.lora_rank or cfg.lora.rank for p in cfg.active_parties), cfg.lora.rank)


def trainers(edges: Edges, ranks: Sequence[int]) -> list[int]:
    """How many of `ranks` train each band."""
    return [sum(1 for r in ranks if r >= hi) for hi in edges[1:]]


def thin_bands(edges: Edges, ranks: Sequence[int], need: int) -> list[str]:
    """Bands that some but fewer than `need` of `ranks` trained: their sum is too few updates."""
    return [
        f"[{lo}, {hi}) with {n} trainer(s)"
        for lo, hi, n in zip(edges[:-1], edges[1:], trainers(edges, ranks), strict=True)
        if 0 < n < need
    ]


def band_shortfall(cfg: FederationConfig, parties: Iterable[str], need: int) -> str | None:
    """Why a sum over `parties` must not be opened (a rank band too thinly trained), or None."""
    names = sorted(parties)
    thin = thin_bands(federation_edges(cfg), [party_rank(cfg, p) for p in names], need)
    if not thin:
        return None
    return (
        f"in the sum over {names}, LoRA rank band(s) {'; '.join(thin)} have fewer than {need} "
        "trainers, so that band of the sum holds too few updates to hide one"
    )
