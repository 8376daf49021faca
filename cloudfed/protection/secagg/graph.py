"""Who masks with whom: the complete graph for few parties, a random Harary graph for many.

SecAgg+ (Bell et al. 2020) masks each party with k = O(log n) neighbours only, so a party's work
grows with log n instead of n. Like the paper we take a Harary graph (a ring where each party links
to its k/2 nearest on each side) over a random relabelling; the relabelling comes from public,
round-specific bytes so every party and the coordinator derive the same graph with no extra round.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence


def default_neighbours(parties: int, complete_up_to: int) -> int:
    """k: everyone for small federations, else the smallest even number >= 2 * log2(n)."""
    if parties <= complete_up_to:
        return parties - 1
    k = 2 * math.ceil(math.log2(parties))
    return min(parties - 1, k + (k % 2))


def check_neighbours(k: int, parties: int) -> None:
    if parties < 2:
        raise ValueError("secure aggregation needs at least 2 parties")
    low = min(parties - 1, math.ceil(math.log2(parties)))
    if not low <= k <= parties - 1:
        raise ValueError(
            f"neighbours k={k} is outside [{low}, {parties - 1}] for {parties} parties: below "
            "log2(n) the graph falls apart under dropouts, above n-1 there is nobody to add"
        )
    if k < parties - 1 and k % 2:
        raise ValueError(f"neighbours k={k} must be even unless it is n-1 (the complete graph)")


def build(parties: Sequence[str], k: int, seed: bytes) -> dict[str, tuple[str, ...]]:
    """Neighbours of each party (symmetric, no self-loops)."""
    names = sorted(set(parties))
    n = len(names)
    check_neighbours(k, n)
    if k == n - 1:
        return {p: tuple(q for q in names if q != p) for p in names}
    order = sorted(names, key=lambda p: hashlib.sha256(seed + p.encode()).digest())
    out: dict[str, set[str]] = {p: set() for p in names}
    for i, p in enumerate(order):
        for step in range(1, k // 2 + 1):
            q = order[(i + step) % n]
            out[p].add(q)
            out[q].add(p)
    return {p: tuple(sorted(v)) for p, v in out.items()}


def components(graph: Mapping[str, Iterable[str]], members: Iterable[str]) -> list[list[str]]:
    """Connected components of the graph restricted to `members`.

    What the coordinator can unmask is exactly the sum over each component of the survivors, so a
    component of one party would expose that party's update.
    """
    keep = set(members)
    seen: set[str] = set()
    out: list[list[str]] = []
    for start in sorted(keep):
        if start in seen:
            continue
        stack, comp = [start], []
        seen.add(start)
        while stack:
            p = stack.pop()
            comp.append(p)
            for q in graph.get(p, ()):
                if q in keep and q not in seen:
                    seen.add(q)
                    stack.append(q)
        out.append(sorted(comp))
    return out
