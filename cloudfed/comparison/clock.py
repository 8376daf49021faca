"""The simulated clock of the comparison: loss against virtual time, and time to reach a loss.

Two cores cannot show parallel clouds, so every federated round carries the virtual time of
`cloudfed.aggregation.fedbuff` (training tokens x compute_scale / tokens_per_second): a buffered
event at its `.at`, a synchronous round when its slowest party is done. Both modes share that
clock, so "how long until the loss reached L" compares them. Simulated, never measured.

Time to reach a loss is read off the seed-mean curve with linear interpolation in virtual time
between the two rounds around the crossing: if round i-1 at t0 had loss l0 > L and round i at t1
has l1 <= L, the curve reaches L at t0 + (l0 - L) / (l0 - l1) x (t1 - t0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cloudfed.comparison.runs import RunResult

Curve = list[tuple[float, float]]  # (virtual seconds, mean eval loss), one point per round


def time_curves(results: Sequence[RunResult]) -> dict[tuple[str, str], Curve]:
    """Seed-mean (virtual time, eval loss) per round, per (arm, split) with a virtual clock."""
    by: dict[tuple[str, str], dict[int, list[tuple[float, float]]]] = {}
    for r in results:
        for rr in r.rounds:
            if rr.virtual_seconds is not None:
                points = by.setdefault((r.arm, r.split), {}).setdefault(rr.round, [])
                points.append((rr.virtual_seconds, rr.eval_loss))
    return {
        key: [
            (float(np.mean([p[0] for p in pts])), float(np.mean([p[1] for p in pts])))
            for _, pts in sorted(rounds.items())
        ]
        for key, rounds in by.items()
    }


def time_to_loss(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """First virtual time the curve reaches `target` (loss <= target), interpolated; None if never.

    `curve` is (time, loss) in round order, round 0 (time 0) first.
    """
    for i, (t1, l1) in enumerate(curve):
        if l1 <= target:
            if i == 0:
                return t1
            t0, l0 = curve[i - 1]
            return t0 + (l0 - target) / (l0 - l1) * (t1 - t0)
    return None


def closest_loss(curve: Sequence[tuple[float, float]]) -> float:
    return min(loss for _, loss in curve)
