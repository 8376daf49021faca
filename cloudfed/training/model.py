"""Base model and tokenizer loading.

A real model and the embedded tiny model go through the same `from_pretrained` calls: the tiny
Llama-style model is built once from a config, saved to a local cache folder and then loaded from
that folder, so the default run exercises the code path a hub model uses, without a download.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cloudfed.errors import ConfigError
from cloudfed.federation import BUILTIN_TINY_LLAMA

# Small enough for a 2-core CPU, large enough that LoRA learns something measurable.
TINY_LLAMA_CONFIG: dict[str, int | float] = {
    "hidden_size": 96,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
}
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


@dataclass(frozen=True)
class Device:
    """Where training runs and in which precision: bf16 on CUDA, fp32 on CPU."""

    name: str
    dtype: torch.dtype


def pick_device() -> Device:
    if torch.cuda.is_available():
        return Device("cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return Device("cpu", torch.float32)


def _byte_level_tokenizer():  # -> PreTrainedTokenizerFast
    """A 256-symbol byte-level tokenizer with no merges: every UTF-8 byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def build_tiny_llama(out_dir: Path, *, seed: int = 0) -> Path:
    """Write a randomly initialised tiny Llama and its tokenizer to `out_dir` (idempotent)."""
    return build_llama(out_dir, TINY_LLAMA_CONFIG, seed=seed)


def build_llama(out_dir: Path, sizes: dict[str, int], *, seed: int = 0) -> Path:
    """A randomly initialised Llama of `sizes` with the byte-level tokenizer (idempotent)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    marker = out_dir / "config.json"
    if marker.is_file() and (out_dir / "tokenizer.json").is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **sizes,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for item in tmp.iterdir():
        item.replace(out_dir / item.name)
    tmp.rmdir()
    return out_dir


def resolve_base_model(base_model: str, *, cache_dir: Path, seed: int = 0) -> str:
    """Turn the config's `base_model` into something `from_pretrained` accepts."""
    if base_model == BUILTIN_TINY_LLAMA:
        digest = hashlib.sha256(
            json.dumps([TINY_LLAMA_CONFIG, SPECIAL_TOKENS, seed], sort_keys=True).encode()
        ).hexdigest()[:12]
        return str(build_tiny_llama(cache_dir / f"tiny-llama-{digest}", seed=seed))
    if base_model.startswith("builtin:"):
        raise ConfigError(
            f"base_model {base_model!r} is not a built-in model. Fix: use "
            f"{BUILTIN_TINY_LLAMA!r}, a Hugging Face hub id or a local model folder."
        )
    return base_model


_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """Read at call time: `huggingface_hub.constants` freezes the variable at import."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def base_model_problem(base_model: str, *, root: Path) -> str | None:
    """Why `from_pretrained` would fail on `base_model`, found without loading or downloading it.

    A run that cannot load its model fails in the first step that needs it, after the launcher
    has waited for the pipeline to start; this says so before anything runs. None: loadable (a
    hub id is taken on trust when downloads are allowed, since checking it needs the network).
    """
    if base_model == BUILTIN_TINY_LLAMA:
        return None
    if base_model.startswith("builtin:"):
        return (
            f"{base_model!r} is not a built-in model. Fix: use {BUILTIN_TINY_LLAMA!r}, a Hugging "
            "Face hub id or a local model folder"
        )
    folder = Path(base_model).expanduser()
    folder = folder if folder.is_absolute() else root / folder
    if folder.is_dir():
        if (folder / "config.json").is_file():
            return None
        return (
            f"{folder} is a folder without config.json, so it is not a saved model. Fix: point "
            "base_model at the folder `save_pretrained` wrote (config.json, weights, tokenizer)"
        )
    if base_model.startswith(("/", ".", "~")) or folder.exists():
        return (
            f"local model folder {folder} not found. Fix: correct the path, or use a Hugging "
            f"Face hub id or {BUILTIN_TINY_LLAMA!r}"
        )
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(base_model)
    except HFValidationError:
        return (
            f"{base_model!r} is neither an existing local folder nor a valid Hugging Face hub id "
            f"(owner/name). Fix: correct it, or use {BUILTIN_TINY_LLAMA!r}"
        )
    if not hub_offline() or isinstance(try_to_load_from_cache(base_model, "config.json"), str):
        return None
    return (
        f"hub model {base_model!r} is not in the Hugging Face cache ({HF_HUB_CACHE}) and "
        "HF_HUB_OFFLINE=1 is set (the Makefile sets it, so a run never downloads), so it cannot "
        f"be loaded. Fix: download it once with `HF_HUB_OFFLINE=0 .venv/bin/hf download "
        f"{base_model}` (set HF_TOKEN first for a gated model), or point base_model at a local "
        f"model folder, or use {BUILTIN_TINY_LLAMA!r}"
    )


def _quiet_transformers() -> None:
    """Keep step logs readable: no per-load progress bars or peft/transformers deprecation noise."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )


def load_model_and_tokenizer(model_path: str, device: Device):  # -> (PreTrainedModel, tokenizer)
    """Load through the Auto classes, exactly as for a hub model or a local checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=device.dtype)
    except OSError as exc:
        raise ConfigError(
            f"base_model {model_path!r} could not be loaded ({exc.__class__.__name__}). "
            "Fix: give a "
            "local model folder, a hub id available offline, or builtin:tiny-llama."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device.name), tokenizer
