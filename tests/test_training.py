"""Unit tests of the training core: tiny model, batches, LoRA adapter state, local training."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cloudfed.federation import LoraSettings, TrainingSettings
from cloudfed.training.batches import IGNORE_INDEX, PROMPT_TEMPLATE, encode_pairs
from cloudfed.training.local import evaluate, initial_adapter, train_local
from cloudfed.training.lora import adapter_state, add, load_adapter_state, wrap_with_lora
from cloudfed.training.model import build_tiny_llama

LORA = LoraSettings(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
TRAINING = TrainingSettings(
    local_steps=15, batch_size=8, learning_rate=0.003, max_seq_len=128, eval_batch_size=16
)
COLOURS = ["red", "blue", "green", "gold"]
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "instruction": [f"Colour of item {i}?" for i in range(40)],
            "response": [f"Item {i} is {COLOURS[i % 4]}." for i in range(40)],
        }
    )


# --- model and tokenizer ---------------------------------------------------------------------


def test_tiny_model_loads_through_auto_classes(tiny_model_path: str) -> None:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    model, tokenizer = _load(tiny_model_path)
    assert isinstance(model, LlamaForCausalLM)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert model.config.vocab_size == len(tokenizer) == 4 + 256
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "</s>"
    ids = torch.tensor([tokenizer("hello", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 5, len(tokenizer))


def test_tokenizer_round_trips_non_ascii_bytes(tokenizer) -> None:
    text = "Grüße, Zoë — 東京 naïve café 🚀 tab\tnewline\n  two spaces"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one token per UTF-8 byte
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids


def test_building_twice_gives_identical_weights(tmp_path: Path, tiny_model_path: str) -> None:
    a = build_tiny_llama(tmp_path / "a", seed=0)
    b = build_tiny_llama(tmp_path / "b", seed=0)
    other = build_tiny_llama(tmp_path / "c", seed=1)
    sha_a = _sha(a / "model.safetensors")
    assert sha_a == _sha(b / "model.safetensors")
    assert sha_a == _sha(Path(tiny_model_path) / "model.safetensors")
    assert sha_a != _sha(other / "model.safetensors")
    assert _sha(a / "tokenizer.json") == _sha(b / "tokenizer.json")


# --- encode_pairs ----------------------------------------------------------------------------


def test_encode_pairs_masks_prompt_and_appends_eos(tokenizer) -> None:
    (enc,) = encode_pairs(tokenizer, ["Say hi"], ["Hi ñ!"], max_len=128)
    prompt = [tokenizer.bos_token_id] + tokenizer(
        PROMPT_TEMPLATE.format(instruction="Say hi"), add_special_tokens=False
    )["input_ids"]
    response = tokenizer("Hi ñ!", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == prompt + response + [tokenizer.eos_token_id]
    assert enc.labels == [IGNORE_INDEX] * len(prompt) + response + [tokenizer.eos_token_id]
    assert tokenizer.decode(response) == "Hi ñ!"


@pytest.mark.parametrize(
    ("instruction", "response", "max_len"),
    [
        ("x" * 500, "short", 32),
        ("q", "y" * 500, 32),
        ("é" * 300, "ü" * 300, 48),
        ("", "", 16),
    ],
)
def test_encode_pairs_respects_max_len_and_keeps_response(
    tokenizer, instruction: str, response: str, max_len: int
) -> None:
    (enc,) = encode_pairs(tokenizer, [instruction], [response], max_len=max_len)
    assert len(enc.input_ids) == len(enc.labels) <= max_len
    n_prompt = sum(label == IGNORE_INDEX for label in enc.labels)
    assert n_prompt <= max_len // 2
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    tail = enc.labels[n_prompt:]
    assert len(tail) >= 1
    assert tail == enc.input_ids[n_prompt:]
    assert IGNORE_INDEX not in tail


def test_encode_pairs_batch_lengths_match(tokenizer) -> None:
    out = encode_pairs(tokenizer, ["a", "bb" * 40], ["c" * 3, "d"], max_len=40)
    assert len(out) == 2
    assert out[0].labels[-1] == tokenizer.eos_token_id
    assert out[1].labels[-1] == tokenizer.eos_token_id
    assert len(out[1].input_ids) <= 40
    with pytest.raises(ValueError):
        encode_pairs(tokenizer, ["a", "b"], ["c"], max_len=40)


# --- adapter state through peft --------------------------------------------------------------


def test_adapter_state_round_trip_is_exact(tiny_model_path: str) -> None:
    m1 = wrap_with_lora(_load(tiny_model_path)[0], LORA, seed=1)
    state = adapter_state(m1)
    assert state and all("lora_A" in k or "lora_B" in k for k in state)
    assert not any(".default." in k for k in state)  # portable names, no adapter suffix
    # 2 layers x 2 target modules x (A, B)
    assert len(state) == 2 * 2 * 2
    rng = np.random.default_rng(0)
    new = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in state.items()}

    m2 = wrap_with_lora(_load(tiny_model_path)[0], LORA, seed=2)
    load_adapter_state(m2, new)
    back = adapter_state(m2)
    assert sorted(back) == sorted(new)
    for k in new:
        np.testing.assert_array_equal(back[k], new[k])


def test_load_adapter_state_rejects_missing_and_extra_keys(tiny_model_path: str) -> None:
    model = wrap_with_lora(_load(tiny_model_path)[0], LORA, seed=1)
    state = adapter_state(model)
    missing = dict(state)
    dropped = sorted(missing)[0]
    del missing[dropped]
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state(model, missing)
    extra = dict(state, **{"base_model.model.extra.lora_A.weight": np.zeros((1, 1), np.float32)})
    with pytest.raises(ValueError, match="unexpected"):
        load_adapter_state(model, extra)


def test_initial_adapter_is_seeded_and_b_is_zero(tiny_model_path: str) -> None:
    a = initial_adapter(tiny_model_path, LORA, seed=5)
    b = initial_adapter(tiny_model_path, LORA, seed=5)
    c = initial_adapter(tiny_model_path, LORA, seed=6)
    assert sorted(a) == sorted(b) == sorted(c)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert a[k].dtype == np.float32
    lora_b = [k for k in a if "lora_B" in k]
    lora_a = [k for k in a if "lora_A" in k]
    assert lora_b and lora_a
    for k in lora_b:
        assert not np.any(a[k])
    assert all(np.any(a[k]) for k in lora_a)
    assert any(not np.array_equal(a[k], c[k]) for k in lora_a)


def _independent_base_loss(model_path: str, rows: pd.DataFrame) -> float:
    """Response-token NLL of the bare base model, one example at a time, no encode_pairs."""
    model, tok = _load(model_path)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ins, resp in zip(rows["instruction"], rows["response"], strict=True):
            prompt = [tok.bos_token_id] + tok.encode(
                f"### Instruction:\n{ins}\n\n### Response:\n", add_special_tokens=False
            )
            answer = tok.encode(resp, add_special_tokens=False) + [tok.eos_token_id]
            ids = torch.tensor([prompt + answer])
            labels = torch.tensor([[-100] * len(prompt) + answer])
            n = len(answer)
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count


def test_round_zero_equals_base_model(tiny_model_path: str, rows: pd.DataFrame) -> None:
    subset = rows.iloc[:12]
    state = initial_adapter(tiny_model_path, LORA, seed=3)
    m = evaluate(tiny_model_path, state, subset, training=TRAINING, lora=LORA, seed=3)
    expected = _independent_base_loss(tiny_model_path, subset)
    assert m.loss == pytest.approx(expected, rel=1e-5)
    assert m.examples == 12
    assert m.tokens == sum(len(r.encode("utf-8")) + 1 for r in subset["response"])
    assert m.perplexity == pytest.approx(np.exp(m.loss))


# --- local training --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_model_path: str, rows: pd.DataFrame):
    state = initial_adapter(tiny_model_path, LORA, seed=11)
    first = train_local(tiny_model_path, state, rows, training=TRAINING, lora=LORA, seed=42)
    second = train_local(tiny_model_path, state, rows, training=TRAINING, lora=LORA, seed=42)
    return state, first, second


def test_train_local_returns_delta_shaped_like_global(trained) -> None:
    state, (delta, _), _ = trained
    assert sorted(delta) == sorted(state)
    for k in state:
        assert delta[k].shape == state[k].shape
        assert delta[k].dtype == np.float32
        assert np.all(np.isfinite(delta[k]))
    assert any(np.any(delta[k]) for k in delta if "lora_B" in k)
    assert sum(float(np.abs(v).sum()) for v in delta.values()) > 0.0


def test_train_local_metrics_are_consistent(trained, rows: pd.DataFrame) -> None:
    _, (_, metrics), _ = trained
    assert metrics.steps == TRAINING.local_steps
    assert metrics.examples == len(rows)
    assert metrics.samples_seen == TRAINING.local_steps * TRAINING.batch_size
    assert 0 < metrics.tokens <= metrics.samples_seen * TRAINING.max_seq_len
    assert np.isfinite(metrics.loss_first) and np.isfinite(metrics.loss_last)
    assert np.isfinite(metrics.loss_mean) and metrics.loss_mean > 0
    assert metrics.loss_last < metrics.loss_first
    assert metrics.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert metrics.tokens_per_s == pytest.approx(metrics.tokens / metrics.seconds)
    d = metrics.as_dict()
    assert d["steps"] == metrics.steps and d["tokens"] == metrics.tokens


def test_train_local_same_seed_is_bitwise_identical(trained) -> None:
    _, (d1, m1), (d2, m2) = trained
    if torch.cuda.is_available():
        pytest.skip("bitwise determinism is only promised on CPU")
    assert sorted(d1) == sorted(d2)
    for k in d1:
        assert d1[k].tobytes() == d2[k].tobytes()
    assert m1.loss_first == m2.loss_first and m1.loss_last == m2.loss_last
    assert m1.tokens == m2.tokens


def test_train_local_lowers_eval_loss(tiny_model_path: str, trained, rows: pd.DataFrame) -> None:
    state, (delta, _), _ = trained
    before = evaluate(tiny_model_path, state, rows, training=TRAINING, lora=LORA, seed=0)
    after = evaluate(tiny_model_path, add(state, delta), rows, training=TRAINING, lora=LORA, seed=0)
    assert after.tokens == before.tokens > 0
    assert after.loss < before.loss - 0.05


def test_empty_rows_are_refused_with_a_clear_error(tiny_model_path: str) -> None:
    state = initial_adapter(tiny_model_path, LORA, seed=11)
    empty = pd.DataFrame({"instruction": [], "response": []})
    with pytest.raises(ValueError, match="no training rows"):
        train_local(tiny_model_path, state, empty, training=TRAINING, lora=LORA, seed=1)
    with pytest.raises(ValueError, match="no held-out rows"):
        evaluate(tiny_model_path, state, empty, training=TRAINING, lora=LORA, seed=1)


def test_adapter_stays_fp32_and_exact_over_a_bf16_base(tiny_model_path: str) -> None:
    """The CUDA path loads the base in bf16; the federated state must not lose precision."""
    from cloudfed.training.model import Device, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(tiny_model_path, Device("cpu", torch.bfloat16))
    peft_model = wrap_with_lora(model, LORA, seed=3)
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {torch.float32}
    rng = np.random.default_rng(0)
    state = {
        k: rng.standard_normal(v.shape).astype(np.float32)
        for k, v in adapter_state(peft_model).items()
    }
    load_adapter_state(peft_model, state)
    back = adapter_state(peft_model)
    assert all(np.array_equal(back[k], state[k]) for k in state)
