"""What may enter an aggregate: structure, finiteness, magnitude and norm of one update.

Under secure aggregation or CKKS nobody but the party can see its update, so the party runs these
checks on itself before protection; the coordinator runs them on what it can see (plaintext
tensors). A failed check is a logged reason and the round goes on without that update.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# A LoRA delta this large after a few local steps is a bug or an attack, not training.
MAX_ABS_UPDATE = 1e3

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


def clip_to_norm(
    update: Mapping[str, np.ndarray], max_norm: float | None
) -> tuple[dict[str, np.ndarray], bool]:
    """The update scaled down to L2 norm `max_norm` if it is longer; whether it was."""
    from cloudfed.aggregation.strategy import norm

    out = {k: np.asarray(v, dtype=np.float32) for k, v in update.items()}
    if max_norm is None:
        return out, False
    length = norm(out)
    if length <= max_norm:
        return out, False
    factor = max_norm / length
    return {k: (v.astype(np.float64) * factor).astype(np.float32) for k, v in out.items()}, True
