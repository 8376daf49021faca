"""Each canary's loss, and its reference secrets' losses, under a trained global adapter.

The loss is the summed token NLL of the sentence from the first token where the candidates
differ, given everything before it, tokenised exactly as training tokenised it (`encode_pairs`).
The shared prefix contributes the same to every candidate in a causal model, so this ranks the
candidates as the whole canary's log-perplexity does (Carlini et al.), without the cost: the
prefix runs once and its key/value cache is shared by every candidate, about ten times cheaper
than scoring 2000 full sequences per canary on a CPU.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from cloudfed.audit.canaries import Canary
from cloudfed.errors import ConfigError
from cloudfed.federation import LoraSettings
from cloudfed.training.batches import IGNORE_INDEX, encode_pairs
from cloudfed.training.model import pick_device


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    shortest = min(len(s) for s in seqs)
    n = 0
    while n < shortest and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def _cache_kwarg(model: torch.nn.Module) -> str:
    """Transformers 5 renamed `past_key_values` to `cache`; accept either spelling."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class CanaryScorer:
    """A global adapter loaded once, scoring any number of canaries."""

    def __init__(
        self,
        model_path: str,
        adapter: Mapping[str, np.ndarray],
        *,
        lora: LoraSettings,
        max_seq_len: int,
        seed: int,
        batch_size: int = 2048,
    ) -> None:
        from cloudfed.training.local import _peft_model

        self.device = pick_device()
        peft_model, self.tokenizer = _peft_model(
            model_path, lora, adapter, seed=seed, device=self.device
        )
        # Folding B @ A into the base weights gives the same function with a third of the
        # matrix products; scoring 2000 candidates per canary is most of the audit's CPU time.
        self.model = peft_model.merge_and_unload()
        self.model.eval()
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self._kwarg = _cache_kwarg(self.model)

    def _check_fits(self, canary: Canary, truncated: list[int]) -> None:
        """Training cuts rows to max_seq_len (the prompt to half): a cut canary ranks nothing."""
        (whole,) = encode_pairs(
            self.tokenizer, [canary.instruction], [canary.response()], max_len=10**9
        )
        if len(whole.input_ids) != len(truncated):
            raise ConfigError(
                f"training.max_seq_len={self.max_seq_len} cuts the canary "
                f"({len(whole.input_ids)} tokens with its prompt; the prompt may use at most "
                f"{self.max_seq_len // 2}). Fix: raise training.max_seq_len or shorten "
                "canaries.instruction and canaries.format."
            )

    @torch.no_grad()
    def losses(self, canary: Canary, references: Sequence[str]) -> np.ndarray:
        """Loss of the canary's own secret (index 0), then of each reference secret."""
        from transformers import DynamicCache

        secrets = [canary.secret, *references]
        encoded = encode_pairs(
            self.tokenizer,
            [canary.instruction] * len(secrets),
            [canary.response(s) for s in secrets],
            max_len=self.max_seq_len,
        )
        self._check_fits(canary, encoded[0].input_ids)
        ids = [e.input_ids for e in encoded]
        n = _common_prefix(ids)
        if n == 0 or len({tuple(i) for i in ids}) != len(ids):
            raise ValueError("candidate secrets do not tokenise to distinct continuations")
        if any(lab == IGNORE_INDEX for e in encoded for lab in e.labels[n:]):
            raise ValueError("candidate secrets differ inside the prompt, not the response")
        dev = self.device.name
        prefix = DynamicCache()
        out = self.model(
            input_ids=torch.tensor([ids[0][:n]], device=dev),
            use_cache=True,
            **{self._kwarg: prefix},
        )
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        result: list[torch.Tensor] = []
        for start in range(0, len(ids), self.batch_size):
            tails = [i[n:] for i in ids[start : start + self.batch_size]]
            width = max(len(t) for t in tails)
            pad = self.tokenizer.pad_token_id
            tokens = torch.tensor([t + [pad] * (width - len(t)) for t in tails], device=dev)
            mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tails], device=dev)
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(tails))
            full_mask = torch.cat(
                [torch.ones((len(tails), n), dtype=torch.long, device=dev), mask], 1
            )
            logits = self.model(
                input_ids=tokens, attention_mask=full_mask, use_cache=True, **{self._kwarg: cache}
            ).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            later = logp.gather(-1, tokens[:, 1:, None])[..., 0] * mask[:, 1:]
            result.append(-(first[tokens[:, 0]] + later.sum(dim=1)))
        return torch.cat(result).cpu().numpy().astype(np.float64)
