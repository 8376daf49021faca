"""LoRA adapter state as safetensors bytes: the payload that gets sealed and aggregated.

safetensors rather than pickle, because an adapter crosses trust boundaries (party to
coordinator and back) and loading one must never execute code. Everything is float32 numpy so
aggregation sees one dtype whatever precision training used.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load, save

State = Mapping[str, "torch.Tensor | np.ndarray"]


def _as_float32(name: str, value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"adapter tensor {name} has non-float dtype {value.dtype}")
        return value.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"adapter tensor {name} has non-float dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def to_numpy_state(state: State) -> dict[str, np.ndarray]:
    """One canonical in-memory form (sorted names, float32, C-contiguous) for hashing and math."""
    return {name: _as_float32(name, state[name]) for name in sorted(state)}


def state_to_bytes(state: State, metadata: dict[str, str] | None = None) -> bytes:
    """Deterministic bytes for the same tensors and metadata, so hashes are comparable."""
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TypeError("safetensors metadata must map str to str")
    return save(to_numpy_state(state), metadata=metadata)


def state_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(t, dtype=np.float32) for name, t in load(data).items()}


def metadata_from_bytes(data: bytes) -> dict[str, str]:
    """Read the string metadata safetensors keeps in its header (e.g. round, base model)."""
    (size,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(bytes(data[8 : 8 + size]))
    return dict(header.get("__metadata__", {}))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_state(path: str | Path, state: State, metadata: dict[str, str] | None = None) -> str:
    """Write atomically so a crashed step never leaves half an adapter; return the hash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = state_to_bytes(state, metadata)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return sha256_bytes(data)


def load_state(path: str | Path) -> dict[str, np.ndarray]:
    return state_from_bytes(Path(path).read_bytes())
