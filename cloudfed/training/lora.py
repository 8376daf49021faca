"""LoRA wrapping and the adapter state that travels between parties and coordinator.

Only LoRA tensors ever leave a party, keyed by a stable name without peft's adapter-name suffix,
so that a global adapter written by the coordinator loads into any party's model.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from cloudfed.federation import LoraSettings


def wrap_with_lora(
    model: torch.nn.Module, settings: LoraSettings, *, seed: int, rank: int | None = None
):
    """Attach LoRA adapters; the seed makes A's initialisation identical across parties.

    `rank` below `settings.rank` (a party with less compute) keeps peft's scale alpha / r at the
    federation's alpha / R, so its first r components act exactly as they do in the global model.
    """
    from peft import LoraConfig, get_peft_model

    r = rank or settings.rank
    config = LoraConfig(
        r=r,
        # peft scales by lora_alpha / r; a float alpha is what keeps that ratio for r < R.
        lora_alpha=settings.alpha if r == settings.rank else settings.alpha * r / settings.rank,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, config)
        except ValueError as exc:
            from cloudfed.errors import ConfigError

            raise ConfigError(
                f"lora.target_modules {settings.target_modules} do not match the base model "
                f"({exc}). Fix: name linear layers of this model, e.g. q_proj, v_proj."
            ) from None


def adapter_state(peft_model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The LoRA tensors as float32 numpy, under peft's portable key names."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    return {k: v.detach().to(torch.float32).cpu().numpy().copy() for k, v in state.items()}


def load_adapter_state(peft_model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Overwrite the model's LoRA tensors; any missing or unexpected key is an error."""
    from peft import set_peft_model_state_dict

    expected = set(adapter_state(peft_model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"adapter keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
    # No cast here: peft keeps adapter weights in fp32 even over a bf16 base
    # (autocast_adapter_dtype), and load_state_dict converts to each parameter's own dtype.
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    set_peft_model_state_dict(peft_model, tensors)


def subtract(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (a[k] - b[k]).astype(np.float32) for k in a}


def add(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (a[k] + b[k]).astype(np.float32) for k in a}
