from pathlib import Path

import numpy as np
import pytest
import torch

from cloudfed.training.adapter_io import (
    load_state,
    metadata_from_bytes,
    save_state,
    sha256_bytes,
    state_from_bytes,
    state_to_bytes,
)


def state() -> dict[str, torch.Tensor | np.ndarray]:
    g = torch.Generator().manual_seed(0)
    return {
        "layers.0.q_proj.lora_A.weight": torch.randn(8, 64, generator=g),
        "layers.0.q_proj.lora_B.weight": torch.randn(64, 8, generator=g).to(torch.bfloat16),
        "layers.0.v_proj.lora_A.weight": np.linspace(-1, 1, 32, dtype=np.float64).reshape(4, 8),
        "transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T,
    }


def test_round_trip_is_exact() -> None:
    src = state()
    out = state_from_bytes(state_to_bytes(src))
    assert sorted(out) == sorted(src)
    for name, value in src.items():
        expected = (
            value.float().numpy()
            if isinstance(value, torch.Tensor)
            else np.asarray(value, dtype=np.float32)
        )
        assert out[name].dtype == np.float32
        assert out[name].flags.c_contiguous
        np.testing.assert_array_equal(out[name], expected)
    np.testing.assert_array_equal(out["transposed"], [[0, 3], [1, 4], [2, 5]])


def test_bytes_are_deterministic_and_hashable() -> None:
    a, b = state_to_bytes(state(), {"round": "3"}), state_to_bytes(state(), {"round": "3"})
    assert a == b
    assert sha256_bytes(a) == sha256_bytes(b)
    assert len(sha256_bytes(a)) == 64
    assert sha256_bytes(a) != sha256_bytes(state_to_bytes(state(), {"round": "4"}))


def test_metadata_round_trip() -> None:
    data = state_to_bytes(state(), {"round": "3", "base_model": "builtin:tiny-llama"})
    assert metadata_from_bytes(data) == {"round": "3", "base_model": "builtin:tiny-llama"}
    assert metadata_from_bytes(state_to_bytes(state())) == {}


def test_rejects_non_float_and_bad_metadata() -> None:
    with pytest.raises(TypeError, match="non-float"):
        state_to_bytes({"x": torch.arange(3)})
    with pytest.raises(TypeError, match="non-float"):
        state_to_bytes({"x": np.arange(3)})
    with pytest.raises(TypeError, match="str to str"):
        state_to_bytes(state(), {"round": 3})  # type: ignore[dict-item]


def test_save_and_load_file(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "adapter.safetensors"
    digest = save_state(path, state())
    assert digest == sha256_bytes(path.read_bytes())
    loaded = load_state(path)
    np.testing.assert_array_equal(
        loaded["layers.0.q_proj.lora_A.weight"], state()["layers.0.q_proj.lora_A.weight"].numpy()
    )
    assert [p.name for p in path.parent.iterdir()] == ["adapter.safetensors"]
