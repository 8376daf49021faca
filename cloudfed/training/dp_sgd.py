"""Record-level DP-SGD inside one party: Opacus per-sample clipping and noise on the LoRA weights.

Only the LoRA parameters train, so only they get per-sample gradients (Opacus's hooks on peft's
`lora_A`/`lora_B` linear layers); the frozen base model needs none. Batches are Poisson samples
at rate q = batch_size / records, as the accountant assumes, drawn, like the noise, from
generators seeded by the OS, because reproducible noise is noise anyone with the seed removes.
The loss is each example's own mean over its response tokens, averaged over the batch, so one
example's clipped gradient never depends on another's length.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cloudfed import console
from cloudfed.aggregation.ranks import pad
from cloudfed.errors import ConfigError
from cloudfed.federation import LoraSettings, TrainingSettings
from cloudfed.privacy.accountant import GaussianEvent
from cloudfed.training.batches import IGNORE_INDEX, collate, encode_pairs
from cloudfed.training.lora import adapter_state, subtract
from cloudfed.training.proximal import anchors, dp_step


@dataclass(frozen=True)
class DpSgdRun:
    """What one party's DP-SGD call spent, for its ledger."""

    event: GaussianEvent
    max_grad_norm: float
    empty_batches: int


def _os_generator(device: str = "cpu") -> torch.Generator:
    """Seeded from the OS, on the device its draws live on (CUDA noise needs a CUDA generator)."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def check_supported(model: torch.nn.Module, base_model: str) -> None:
    """Refuse, naming the layer, a trainable layer Opacus has no per-sample gradient for."""
    from opacus import GradSampleModule

    bad = [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
        and not GradSampleModule.is_supported(m)
    ]
    if bad:
        raise ConfigError(
            f"privacy.dp_sgd: Opacus cannot compute per-sample gradients for the trainable "
            f"layer(s) {bad[:5]} of {base_model}. Fix: point lora.target_modules at linear "
            "layers only, or remove this party from privacy.dp_sgd"
        )


def per_sample_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    mask = (shift_labels != IGNORE_INDEX).float()
    per_sample = (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return per_sample.mean()


def train_local_dp(
    model_path: str,
    global_state: Mapping[str, np.ndarray],
    rows: pd.DataFrame,
    *,
    training: TrainingSettings,
    lora: LoraSettings,
    seed: int,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float | None = None,
    proximal_mu: float = 0.0,
    desc: str = "train (DP-SGD)",
    rank: int | None = None,
):
    """`local_steps` DP-SGD steps; the adapter delta, metrics and the spend for the ledger.

    A party `rank` below lora.rank trains (and clips per-sample gradients of) only its first r
    components; the padded zeros add nothing to any norm, so the record-level guarantee is the
    same and a party-level clip of the padded delta clips exactly what was trained.
    FedProx's gradient (`proximal_mu` > 0) joins after Opacus' noise: `proximal.dp_step`.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    from cloudfed.training.local import TrainMetrics, _peft_model, low_rank_start
    from cloudfed.training.model import pick_device

    if rows.empty:
        raise ValueError("no training rows")
    device = pick_device()
    torch.manual_seed(seed)  # LoRA's initial A and dropout; not the privacy noise
    start_state = low_rank_start(global_state, lora, rank)
    model, tokenizer = _peft_model(
        model_path, lora, start_state, seed=seed, device=device, rank=rank
    )
    check_supported(model, model_path)
    examples = encode_pairs(
        tokenizer,
        rows["instruction"].tolist(),
        rows["response"].tolist(),
        max_len=training.max_seq_len,
    )
    records = len(examples)
    sample_rate = sample_rate or min(1.0, training.batch_size / records)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    params = [p for p in gsm.parameters() if p.requires_grad]
    anchor = anchors(params)
    optimizer = DPOptimizer(
        torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=max(1, round(sample_rate * records)),
        loss_reduction="mean",
        generator=_os_generator(device.name),
    )
    sampler = UniformWithReplacementSampler(
        num_samples=records, sample_rate=sample_rate, generator=_os_generator()
    )

    def batches():
        while True:
            yield from iter(sampler)

    gsm.train()
    losses: list[float] = []
    tokens = empty = 0
    start = time.perf_counter()
    stream = batches()
    quiet = not console.progress_bars()
    for _ in tqdm(range(training.local_steps), desc=desc, leave=False, disable=quiet):
        chosen = next(stream)
        optimizer.zero_grad(set_to_none=True)
        if len(chosen) == 0:  # an empty Poisson batch still takes a (pure-noise) step
            empty += 1
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            dp_step(optimizer, params, anchor, proximal_mu)
            continue
        batch = collate([examples[i] for i in chosen], tokenizer.pad_token_id)
        batch = {k: v.to(device.name) for k, v in batch.items()}
        logits = gsm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = per_sample_mean_loss(logits, batch["labels"])
        loss.backward()
        dp_step(optimizer, params, anchor, proximal_mu)
        losses.append(float(loss.detach()))
        tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - start
    gsm._close()  # removes Opacus's hooks so the peft state is read from a plain model
    delta = pad(subtract(adapter_state(model), start_state), lora.rank)
    metrics = TrainMetrics(
        loss_first=losses[0] if losses else float("nan"),
        loss_last=losses[-1] if losses else float("nan"),
        loss_mean=float(np.mean(losses)) if losses else float("nan"),
        examples=records,
        samples_seen=round(training.local_steps * sample_rate * records),
        tokens=tokens,
        steps=training.local_steps,
        seconds=seconds,
        tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
        device=device.name,
    )
    run = DpSgdRun(
        event=GaussianEvent(noise_multiplier, sample_rate, training.local_steps),
        max_grad_norm=max_grad_norm,
        empty_batches=empty,
    )
    return delta, metrics, run
