"""Attacks the privacy tests play, kept as code so that a regression shows up as a failing test.

Each function is what a named adversary would run against what it can see:
- `grid_distinguisher`: anyone who reads a released sum and knows every other party's
  contribution (the adversary of differential privacy) tells "P took part" from "P did not" by
  how close the release minus each hypothesis lies to the noise grid;
- `headers_on_exchange`: anyone with read access to the exchange reads every clear header;
- `peer_weight`: a co-contributor of a two-party round reads its peer's weight off the weight sum.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Mechanism = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def legacy_real_noise(std: float) -> Mechanism:
    """The mechanism before the fix: integer noise on a grid of std/2^20, added to a raw real."""
    grid = std / (1 << 20)

    def release(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ints = np.rint(rng.normal(0.0, 1 << 20, values.shape[0]))
        return values + ints * grid

    return release


def _grid_distance(x: np.ndarray, grid: float) -> float:
    t = x / grid
    return float(np.mean(np.abs(t - np.rint(t))))


def grid_distinguisher(
    release: Mechanism,
    *,
    std: float,
    grids: list[float],
    trials: int,
    dims: int,
    contribution_norm: float,
    seed: int,
) -> float:
    """Accuracy of guessing whether P's contribution is in the released sum.

    Per trial: the others' real-valued sum and P's contribution are drawn (both known to the
    adversary), a fair coin decides whether P took part, the mechanism releases the noisy sum.
    The adversary subtracts each hypothesis and picks the one whose residual lies closer to a
    noise grid, trying every grid in `grids` and keeping the most decisive. 0.5 is chance.
    """
    rng = np.random.default_rng(seed)
    right = 0
    for _ in range(trials):
        others = rng.uniform(-1.0, 1.0, dims) * std
        mine = rng.normal(size=dims)
        mine *= contribution_norm / np.linalg.norm(mine)
        took_part = bool(rng.integers(2))
        released = release(others + mine if took_part else others, rng)
        best_gap, guess = -1.0, False
        for grid in grids:
            d_in = _grid_distance(released - (others + mine), grid)
            d_out = _grid_distance(released - others, grid)
            if abs(d_in - d_out) > best_gap:
                best_gap, guess = abs(d_in - d_out), d_in < d_out
        right += guess == took_part
    return right / trials


def peer_weight(weight_sum: float, own_weight: float) -> float:
    """A co-contributor of a two-party round: the sum of weights minus its own."""
    return weight_sum - own_weight


_MAGICS = {b"CFSEAL": "sealed", b"CFSIGN": "signed"}


def read_header(blob: bytes) -> dict[str, Any] | None:
    """The clear JSON header of a sealed or signed message, as anyone reading the exchange can."""
    kind = _MAGICS.get(blob[:6])
    if kind is None:
        return None
    (size,) = struct.unpack_from(">I", blob, 7)
    return json.loads(blob[11 : 11 + size])


def headers_on_exchange(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every sealed or signed message under `root` with its clear header."""
    out = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            header = read_header(path.read_bytes())
            if header is not None:
                out.append((path, header))
    return out
