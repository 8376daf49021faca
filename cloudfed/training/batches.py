"""Turning harmonised rows into padded token batches for supervised fine-tuning.

Loss is taken on response tokens only (the prompt is masked with -100), the usual choice for
instruction tuning; the instruction is cut to half the sequence so a response always remains.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


def encode_pairs(
    tokenizer, instructions: Sequence[str], responses: Sequence[str], *, max_len: int
) -> list[Encoded]:
    prompts = [PROMPT_TEMPLATE.format(instruction=i) for i in instructions]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    out: list[Encoded] = []
    for prompt, response in zip(p_ids, r_ids, strict=True):
        prompt = (bos + prompt)[: max_len // 2]
        response = (response + eos)[: max_len - len(prompt)]
        out.append(Encoded(prompt + response, [IGNORE_INDEX] * len(prompt) + response))
    return out


def collate(examples: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def sampled_batches(
    examples: Sequence[Encoded],
    *,
    batch_size: int,
    steps: int,
    pad_id: int,
    generator: torch.Generator,
) -> Iterator[dict[str, torch.Tensor]]:
    """`steps` batches drawn as successive shuffled epochs, reproducible from the generator."""
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order.extend(torch.randperm(len(examples), generator=generator).tolist())
        chosen, order = order[:batch_size], order[batch_size:]
        yield collate([examples[i] for i in chosen], pad_id)


def sequential_batches(
    examples: Sequence[Encoded], *, batch_size: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size], pad_id)
