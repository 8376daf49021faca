"""Token counts for the contract's length bounds, with the tokenizer the federation trains with.

The contract bounds text in tokens as well as characters because the model's context is counted
in tokens. The builtin demo model's tokenizer is byte-level (one token per UTF-8 byte), so its
count is the byte length, computed in one Arrow pass; a real model's tokenizer is loaded from its
local path (never downloaded here) and run in batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cloudfed.errors import ConfigError

TokenCounter = Callable[[Sequence[str | None]], np.ndarray]
BUILTIN_PREFIX = "builtin:"


def count_utf8_bytes(texts: Sequence[str | None]) -> np.ndarray:
    """Tokens under a byte-level tokenizer: UTF-8 bytes (a missing text counts 0)."""
    arr = pa.array(texts, type=pa.string())
    return pc.fill_null(pc.binary_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def tokenizer_counter(model_path: str) -> TokenCounter:
    """Count with a Hugging Face tokenizer from a local path, without special tokens."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"base_model {model_path!r}: its tokenizer is not available locally "
            f"({type(exc).__name__}), and the contract counts tokens with it. Fix: download the "
            "model into the Hugging Face cache or point base_model at a local model folder."
        ) from None

    def count(texts: Sequence[str | None]) -> np.ndarray:
        ids = tok([t or "" for t in texts], add_special_tokens=False)["input_ids"]
        return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))

    return count


def counter_for(base_model: str) -> TokenCounter:
    """The counter matching ``base_model`` as written in the run configuration."""
    if base_model.startswith(BUILTIN_PREFIX):
        return count_utf8_bytes
    return tokenizer_counter(base_model)
