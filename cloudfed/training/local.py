"""One party's local LoRA training and held-out evaluation.

Both start from the current global adapter and return only numbers and LoRA tensors: the rows are
read from the party's own storage inside the call and never returned.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cloudfed import console
from cloudfed.aggregation.ranks import pad, truncate
from cloudfed.federation import LoraSettings, TrainingSettings
from cloudfed.training.batches import encode_pairs, sampled_batches, sequential_batches
from cloudfed.training.lora import adapter_state, load_adapter_state, subtract, wrap_with_lora
from cloudfed.training.model import Device, load_model_and_tokenizer, pick_device
from cloudfed.training.proximal import add_proximal_gradient, anchors


@dataclass(frozen=True)
class TrainMetrics:
    loss_first: float
    loss_last: float
    loss_mean: float
    examples: int
    samples_seen: int
    tokens: int
    steps: int
    seconds: float
    tokens_per_s: float
    device: str

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


@dataclass(frozen=True)
class EvalMetrics:
    loss: float
    perplexity: float
    tokens: int
    examples: int


def _peft_model(
    model_path: str,
    lora: LoraSettings,
    global_state: Mapping[str, np.ndarray] | None,
    *,
    seed: int,
    device: Device,
    rank: int | None = None,
):
    model, tokenizer = load_model_and_tokenizer(model_path, device)
    peft_model = wrap_with_lora(model, lora, seed=seed, rank=rank)
    if global_state is not None:
        load_adapter_state(peft_model, global_state)
    return peft_model.to(device.name), tokenizer


def low_rank_start(
    global_state: Mapping[str, np.ndarray], lora: LoraSettings, rank: int | None
) -> Mapping[str, np.ndarray]:
    """Where a rank-r party starts: the global adapter's first r components (all of it at R)."""
    if rank is None or rank == lora.rank:
        return global_state
    if not 1 <= rank <= lora.rank:
        raise ValueError(f"party LoRA rank {rank} is outside [1, lora.rank={lora.rank}]")
    return truncate(global_state, rank)


def initial_adapter(model_path: str, lora: LoraSettings, *, seed: int) -> dict[str, np.ndarray]:
    """Round 0's global adapter: peft's own initialisation (B = 0), identical for every party."""
    model, _ = _peft_model(model_path, lora, None, seed=seed, device=Device("cpu", torch.float32))
    return adapter_state(model)


def train_local(
    model_path: str,
    global_state: Mapping[str, np.ndarray],
    rows: pd.DataFrame,
    *,
    training: TrainingSettings,
    lora: LoraSettings,
    seed: int,
    proximal_mu: float = 0.0,
    desc: str = "train",
    rank: int | None = None,
) -> tuple[dict[str, np.ndarray], TrainMetrics]:
    """Run `local_steps` optimiser steps; return the adapter delta and training metrics.

    With `rank` r below lora.rank R the party trains only the global adapter's first r
    components (see cloudfed.aggregation.ranks); its delta comes back padded to R with zeros.
    `proximal_mu` > 0 adds FedProx's mu/2 ||w - w_global||^2 to the objective (`proximal`).
    """
    if rows.empty:
        raise ValueError("no training rows")
    device = pick_device()
    torch.manual_seed(seed)
    start_state = low_rank_start(global_state, lora, rank)
    model, tokenizer = _peft_model(
        model_path, lora, start_state, seed=seed, device=device, rank=rank
    )
    examples = encode_pairs(
        tokenizer,
        rows["instruction"].tolist(),
        rows["response"].tolist(),
        max_len=training.max_seq_len,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = anchors(params) if proximal_mu > 0 else []
    optimizer = torch.optim.AdamW(
        params, lr=training.learning_rate, weight_decay=training.weight_decay
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    batches = sampled_batches(
        examples,
        batch_size=training.batch_size,
        steps=training.local_steps,
        pad_id=tokenizer.pad_token_id,
        generator=generator,
    )
    quiet = not console.progress_bars()
    for batch in tqdm(batches, total=training.local_steps, desc=desc, leave=False, disable=quiet):
        batch = {k: v.to(device.name) for k, v in batch.items()}
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if proximal_mu > 0:  # the objective's gradient, clipped as a whole below
            add_proximal_gradient(params, anchor, proximal_mu)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - start
    delta = pad(subtract(adapter_state(model), start_state), lora.rank)
    metrics = TrainMetrics(
        loss_first=losses[0],
        loss_last=losses[-1],
        loss_mean=float(np.mean(losses)),
        examples=len(examples),
        samples_seen=training.local_steps * training.batch_size,
        tokens=tokens,
        steps=len(losses),
        seconds=seconds,
        tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
        device=device.name,
    )
    return delta, metrics


@torch.no_grad()
def evaluate(
    model_path: str,
    adapter: Mapping[str, np.ndarray],
    rows: pd.DataFrame,
    *,
    training: TrainingSettings,
    lora: LoraSettings,
    seed: int,
) -> EvalMetrics:
    """Token-weighted mean loss over response tokens of the held-out rows."""
    if rows.empty:
        raise ValueError("no held-out rows to evaluate")
    device = pick_device()
    model, tokenizer = _peft_model(model_path, lora, adapter, seed=seed, device=device)
    model.eval()
    rows = rows.iloc[: training.max_eval_rows]
    examples = encode_pairs(
        tokenizer,
        rows["instruction"].tolist(),
        rows["response"].tolist(),
        max_len=training.max_seq_len,
    )
    total, count = 0.0, 0
    for batch in sequential_batches(
        examples, batch_size=training.eval_batch_size, pad_id=tokenizer.pad_token_id
    ):
        batch = {k: v.to(device.name) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(nll)
        count += int((shift_labels != -100).sum())
    loss = total / max(count, 1)
    return EvalMetrics(
        loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=count, examples=len(examples)
    )
