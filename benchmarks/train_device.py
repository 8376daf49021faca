"""Training speed on this machine's device: plain LoRA against record-level DP-SGD, tokens/s.

    .venv/bin/python benchmarks/train_device.py [--size tiny|small] [--steps N] [--batch B]
    .venv/bin/python benchmarks/train_device.py --tiny        # seconds, on any machine (a test)

Runs the same code the parties run (`train_local`, `train_local_dp`) on the device
`pick_device` chooses: CUDA in bf16 when there is a GPU (LoRA weights stay fp32), else the CPU
in fp32. `small` is a Llama of about 90M parameters built from a config (12 layers, hidden 768,
the byte-level tokenizer), big enough for a GPU to matter; nothing is downloaded. Reports, per
mode, the seconds of `steps` optimiser steps, tokens/s, the loss before and after, the dtype of
the base model and of the LoRA weights. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = {
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "max_position_embeddings": 512,
}


def _model(size: str, cache: Path) -> str:
    from cloudfed.training.model import build_llama, resolve_base_model

    if size == "tiny":
        return resolve_base_model("builtin:tiny-llama", cache_dir=cache, seed=0)
    return str(build_llama(cache / "small-llama", SMALL, seed=0))


def _rows(n: int):
    import pandas as pd

    words = "claim policy ward dose loan rate branch account patient premium cover".split()
    return pd.DataFrame(
        {
            "instruction": [
                " ".join(words[(i + k) % len(words)] for k in range(12)) for i in range(n)
            ],
            "response": [
                " ".join(words[(3 * i + k) % len(words)] for k in range(20)) for i in range(n)
            ],
        }
    )


def measure(size: str, steps: int, batch: int, rows: int) -> dict[str, Any]:
    import torch

    from cloudfed.federation import LoraSettings, TrainingSettings
    from cloudfed.training.dp_sgd import train_local_dp
    from cloudfed.training.local import evaluate, initial_adapter, train_local
    from cloudfed.training.model import pick_device

    device = pick_device()
    data = _rows(rows)
    lora = LoraSettings(rank=16, alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"])
    training = TrainingSettings(
        local_steps=steps, batch_size=batch, learning_rate=0.005, max_seq_len=128
    )
    out: dict[str, Any] = {
        "device": device.name,
        "gpu": torch.cuda.get_device_name(0) if device.name == "cuda" else None,
        "base_dtype": str(device.dtype),
        "torch": torch.__version__,
        "size": size,
        "steps": steps,
        "batch_size": batch,
    }
    with tempfile.TemporaryDirectory(prefix="cloudfed-train-device-") as tmp:
        model = _model(size, Path(tmp))
        state = initial_adapter(model, lora, seed=0)
        out["lora_values"] = int(sum(v.size for v in state.values()))
        before = evaluate(model, state, data, training=training, lora=lora, seed=0).loss
        for mode in ("plain", "dp_sgd"):
            if device.name == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            if mode == "plain":
                delta, metrics = train_local(
                    model, state, data, training=training, lora=lora, seed=1
                )
            else:
                delta, metrics, _ = train_local_dp(
                    model,
                    state,
                    data,
                    training=training,
                    lora=lora,
                    seed=1,
                    noise_multiplier=1.0,
                    max_grad_norm=0.1,
                )
            if device.name == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            trained = {k: state[k] + delta[k] for k in state}
            after = evaluate(model, trained, data, training=training, lora=lora, seed=0).loss
            out[mode] = {
                "seconds": round(seconds, 3),
                "train_seconds": round(metrics.seconds, 3),
                "tokens": metrics.tokens,
                "tokens_per_s": round(metrics.tokens_per_s, 1),
                "eval_loss_before": round(before, 4),
                "eval_loss_after": round(after, 4),
                "lora_dtype": str(next(iter(delta.values())).dtype),
                "finite": bool(all(map(lambda v: bool(abs(v).max() < 1e3), delta.values()))),
            }
    out["dp_sgd_over_plain_x"] = round(
        out["dp_sgd"]["train_seconds"] / max(out["plain"]["train_seconds"], 1e-9), 2
    )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "small"], default="small")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--tiny", action="store_true", help="seconds on any machine (a test)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.size, args.steps, args.batch, args.rows = "tiny", 3, 4, 16
    result = {"benchmark": "train_device", **measure(args.size, args.steps, args.batch, args.rows)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
