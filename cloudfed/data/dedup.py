"""Exact and near-exact de-duplication over a stream of chunks, with a small fixed cost per row.

Two 64-bit keys per accepted row: the *exact* key hashes the cleaned instruction and response;
the *near* key hashes them case-folded with everything but letters and digits removed, so that
"What is X?" and "what is x" collapse. Keys of earlier chunks are kept as sorted ``uint64``
arrays (8 bytes per accepted row each, the only state that grows with the file); a chunk is
checked with binary search and merged in. The hash is pandas' keyed SipHash, which is stable
across runs and processes (Python's ``hash()`` is not).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

_SEP = "\x1f"  # unit separator: cannot occur in cleaned text (control characters are removed)
# ASCII bytes that are neither letters nor digits (the separator excepted): deleted in C by
# bytes.translate. Non-ASCII punctuation survives, so near-exact is a little stricter there.
_NOT_ALNUM = bytes(c for c in range(128) if not chr(c).isalnum() and chr(c) != _SEP)


def _joined(instructions: Sequence[str], responses: Sequence[str]) -> list[str]:
    return [f"{i}{_SEP}{r}" for i, r in zip(instructions, responses, strict=True)]


def exact_keys(instructions: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """64-bit keys of the cleaned pairs."""
    joined = np.array(_joined(instructions, responses), dtype=object)
    return pd.util.hash_array(joined, categorize=False)


def near_form(text: str) -> bytes:
    """Case-folded, without ASCII punctuation and spaces: where look-alike rows are equal."""
    return text.casefold().encode("utf-8", "surrogatepass").translate(None, _NOT_ALNUM)


def near_keys(instructions: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """64-bit keys of the pairs in `near_form` (the separator survives it)."""
    joined = [near_form(j) for j in _joined(instructions, responses)]
    return pd.util.hash_array(np.array(joined, dtype=object), categorize=False)


def _seen(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if not len(sorted_keys):
        return np.zeros(len(keys), dtype=bool)
    pos = np.searchsorted(sorted_keys, keys)
    pos[pos == len(sorted_keys)] = 0
    return sorted_keys[pos] == keys


def _first_in_chunk(keys: np.ndarray) -> np.ndarray:
    first = np.zeros(len(keys), dtype=bool)
    first[np.unique(keys, return_index=True)[1]] = True
    return first


class DedupIndex:
    """Which rows repeat an earlier one, exactly or nearly, across all chunks seen so far."""

    def __init__(self, parent: DedupIndex | None = None) -> None:
        self._exact = np.empty(0, dtype=np.uint64)
        self._near = np.empty(0, dtype=np.uint64)
        self.parent = parent  # the train index when checking the held-out split

    @property
    def nbytes(self) -> int:
        """Memory the index holds (what grows with the number of accepted rows)."""
        return int(self._exact.nbytes + self._near.nbytes)

    def classify(self, instructions: Sequence[str], responses: Sequence[str]) -> list[str | None]:
        """None for a new row, else ``duplicate``, ``near_duplicate`` or ``duplicate_of_train``.

        The first occurrence is kept and later ones are quarantined; rows classified new are
        added to the index.
        """
        if not len(instructions):
            return []
        exact = exact_keys(instructions, responses)
        near = near_keys(instructions, responses)
        in_train = (
            _seen(self.parent._exact, exact) | _seen(self.parent._near, near)
            if self.parent is not None
            else np.zeros(len(exact), dtype=bool)
        )
        dup_exact = _seen(self._exact, exact) | ~_first_in_chunk(exact)
        dup_near = _seen(self._near, near) | ~_first_in_chunk(near)
        reasons = np.full(len(exact), None, dtype=object)
        reasons[dup_near] = "near_duplicate"
        reasons[dup_exact] = "duplicate"
        reasons[in_train] = "duplicate_of_train"
        new = ~(in_train | dup_exact | dup_near)
        self._exact = np.sort(np.concatenate([self._exact, exact[new]]), kind="stable")
        self._near = np.sort(np.concatenate([self._near, near[new]]), kind="stable")
        return reasons.tolist()
