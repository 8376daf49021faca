"""The hybrid protection policy: which adapter tensor is aggregated under which protection.

The paper's hybrid encrypted/plaintext aggregation is one config: rules map tensor-name patterns
to `secagg` (pairwise masks), `ckks` (homomorphic encryption) or `plaintext`. Plaintext is only
allowed for tensors the federation lists as public, because the coordinator then sees each party's
values. Every participant derives the same `Layout` from the settings and the adapter's shapes,
and the layout's hash is bound into each upload so a party on another policy is rejected.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloudfed.errors import ConfigError
from cloudfed.federation import ProtectionMode, ProtectionSettings

MODES: tuple[ProtectionMode, ...] = ("secagg", "ckks", "plaintext")


@dataclass(frozen=True)
class Segment:
    """Tensors of one mode, flattened in name order into one vector."""

    mode: ProtectionMode
    tensors: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(shape)) for _, shape in self.tensors))

    def flatten(self, update: Mapping[str, np.ndarray], scale: float = 1.0) -> np.ndarray:
        parts = [np.asarray(update[name], dtype=np.float64).ravel() for name, _ in self.tensors]
        return np.concatenate(parts) * scale if parts else np.zeros(0)

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        if vector.shape[0] != self.size:
            raise ValueError(f"{self.mode} vector has {vector.shape[0]} values, not {self.size}")
        out, pos = {}, 0
        for name, shape in self.tensors:
            n = int(np.prod(shape))
            out[name] = vector[pos : pos + n].reshape(shape).astype(np.float32)
            pos += n
        return out


@dataclass(frozen=True)
class Layout:
    segments: tuple[Segment, ...]
    policy_sha256: str

    def segment(self, mode: str) -> Segment | None:
        return next((s for s in self.segments if s.mode == mode), None)

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(s.mode for s in self.segments)

    @property
    def label(self) -> str:
        """`secagg` for one mode, `hybrid(secagg=12,plaintext=2)` (tensor counts) for several."""
        if len(self.segments) == 1:
            return self.segments[0].mode
        return "hybrid(" + ",".join(f"{s.mode}={len(s.tensors)}" for s in self.segments) + ")"

    def routes(self) -> dict[str, str]:
        return {name: s.mode for s in self.segments for name, _ in s.tensors}

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.label,
            "policy_sha256": self.policy_sha256,
            "tensors": {s.mode: len(s.tensors) for s in self.segments},
            "values": {s.mode: s.size for s in self.segments},
        }


def route(
    settings: ProtectionSettings,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    field: str = "protection",
) -> Layout:
    """Assign each tensor a mode; a rule that matches nothing or an unlisted plaintext fails."""
    routes: dict[str, ProtectionMode] = {}
    for name in sorted(shapes):
        mode = next(
            (r.mode for r in settings.rules if fnmatch.fnmatchcase(name, r.pattern)),
            settings.default,
        )
        if mode == "plaintext" and not any(
            fnmatch.fnmatchcase(name, p) for p in settings.public_tensors
        ):
            raise ConfigError(
                f"{field}: tensor {name} would travel as plaintext, but no pattern in "
                f"{field}.public_tensors lists it. Fix: route it to secagg or ckks, or add a "
                f"pattern to {field}.public_tensors if every party agrees to reveal it"
            )
        routes[name] = mode
    for i, rule in enumerate(settings.rules):
        if not any(fnmatch.fnmatchcase(n, rule.pattern) for n in shapes):
            raise ConfigError(
                f"{field}.rules[{i}].pattern {rule.pattern!r} matches no adapter tensor. Fix: "
                f"correct the pattern (tensor names look like {sorted(shapes)[0]!r})"
            )
    segments = tuple(
        Segment(m, tuple((n, tuple(shapes[n])) for n in sorted(routes) if routes[n] == m))
        for m in MODES
        if any(v == m for v in routes.values())
    )
    canonical = json.dumps(
        {"settings": settings.model_dump(mode="json"), "routes": routes},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return Layout(segments, hashlib.sha256(canonical).hexdigest())
