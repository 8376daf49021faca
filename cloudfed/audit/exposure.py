"""Exposure in bits from a canary's rank among reference secrets (Carlini et al. 2019, sec. 4).

exposure = log2(|R|) - log2(rank), with R the candidate set (the references plus the canary
itself) and rank 1 the lowest loss. A canary the model ranks first gets the maximum,
log2(|R|); one the model has not learnt has a uniformly random rank, whose expected exposure is
the chance level below (about 1.44 bits for any large R). Ties count against the canary, so the
audit never reports more memorisation than the losses show.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def rank(canary_loss: float, reference_losses: Sequence[float] | np.ndarray) -> int:
    """1 + the number of references at least as likely (loss <= the canary's, NaN included)."""
    refs = np.asarray(reference_losses, dtype=np.float64)
    if math.isnan(canary_loss):
        return len(refs) + 1
    return 1 + int(np.count_nonzero(~(refs > canary_loss)))


def max_exposure(references: int) -> float:
    return math.log2(references + 1)


def exposure_bits(rank_: int, references: int) -> float:
    if not 1 <= rank_ <= references + 1:
        raise ValueError(f"rank {rank_} outside 1..{references + 1}")
    return max_exposure(references) - math.log2(rank_)


def chance_exposure(references: int) -> float:
    """Expected exposure of a secret the model knows nothing about (rank uniform on 1..|R|)."""
    n = references + 1
    return math.log2(n) - math.lgamma(n + 1) / math.log(2) / n


@dataclass(frozen=True)
class LevelSummary:
    repeats: int
    canaries: int
    mean: float
    max: float
    min: float
    extracted: int  # canaries ranked first: the model's likeliest secret is the planted one

    def as_dict(self) -> dict[str, float | int]:
        return {
            "repeats": self.repeats,
            "canaries": self.canaries,
            "mean": self.mean,
            "max": self.max,
            "min": self.min,
            "extracted": self.extracted,
        }


def summarise(
    repeats: Sequence[int], exposures: Sequence[float], ranks: Sequence[int]
) -> list[LevelSummary]:
    """Exposure per repeat level, lowest level first."""
    out: list[LevelSummary] = []
    for level in sorted(set(repeats)):
        idx = [i for i, r in enumerate(repeats) if r == level]
        bits = [exposures[i] for i in idx]
        out.append(
            LevelSummary(
                repeats=level,
                canaries=len(idx),
                mean=float(np.mean(bits)),
                max=float(np.max(bits)),
                min=float(np.min(bits)),
                extracted=sum(1 for i in idx if ranks[i] == 1),
            )
        )
    return out
