"""Benchmarks in their tiny modes, so none can rot unnoticed (their numbers are not asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_device_tiny_mode_trains_both_ways_on_this_machine() -> None:
    result = _load("train_device").main(["--tiny"])
    assert result["device"] in {"cpu", "cuda"}
    for mode in ("plain", "dp_sgd"):
        run = result[mode]
        assert run["tokens"] > 0 and run["tokens_per_s"] > 0 and run["finite"]
        assert run["lora_dtype"] == "float32"  # adapters stay fp32 over a bf16 base on CUDA
    assert result["plain"]["eval_loss_after"] < result["plain"]["eval_loss_before"]
    assert result["dp_sgd_over_plain_x"] > 0
