"""FedProx (`aggregation.proximal_mu`) in local training, plain and DP-SGD.

The DP-SGD runs that compare norms or bytes use sample_rate 1 (every record in every batch) and
noise_multiplier 1e-30 (noise below float32's resolution of any weight it touches), the only
setting in which DP-SGD is reproducible: its noise and Poisson batches come from the OS on purpose.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from cloudfed.errors import ConfigError
from cloudfed.federation import LoraSettings, TrainingSettings, parse_federation
from cloudfed.training.dp_sgd import train_local_dp
from cloudfed.training.local import initial_adapter, train_local
from tests.protected_support import federation_dict

LORA = LoraSettings(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
TRAINING = TrainingSettings(local_steps=6, batch_size=8, learning_rate=0.01, max_seq_len=64)
COLOURS = ["red", "blue", "green", "gold"]
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "instruction": [f"Colour of item {i}?" for i in range(16)],
            "response": [f"Item {i} is {COLOURS[i % 4]}." for i in range(16)],
        }
    )


@pytest.fixture(scope="module")
def start(tiny_model_path: str) -> dict[str, np.ndarray]:
    """A global adapter with B != 0, as after a few rounds, so every LoRA weight gets gradient."""
    state = initial_adapter(tiny_model_path, LORA, seed=3)
    rng = np.random.default_rng(0)
    return {k: v + rng.normal(0, 0.02, v.shape).astype(np.float32) for k, v in state.items()}


def norm(delta: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in delta.values())))


def digest(delta: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(delta):
        h.update(k.encode() + delta[k].tobytes())
    return h.hexdigest()


def plain(path: str, start, rows, **kw: Any) -> dict[str, np.ndarray]:
    delta, _ = train_local(path, start, rows, training=TRAINING, lora=LORA, seed=11, **kw)
    return delta


def private(path: str, start, rows, **kw: Any) -> dict[str, np.ndarray]:
    """Reproducible DP-SGD: noise too small to change a float32 weight, every record in a batch."""
    delta, _, _ = train_local_dp(
        path,
        start,
        rows,
        training=TRAINING,
        lora=LORA,
        seed=11,
        noise_multiplier=1e-30,
        max_grad_norm=1.0,
        sample_rate=1.0,
        **kw,
    )
    return delta


@pytest.mark.parametrize("train", [plain, private], ids=["plain", "dp-sgd"])
def test_proximal_term_pulls_the_delta_towards_the_global_adapter(
    tiny_model_path: str, start, rows, train
) -> None:
    free = train(tiny_model_path, start, rows)
    held = train(tiny_model_path, start, rows, proximal_mu=50.0)
    assert norm(held) < 0.8 * norm(free), (norm(held), norm(free))
    assert norm(held) > 0  # still trained


@pytest.mark.parametrize("train", [plain, private], ids=["plain", "dp-sgd"])
def test_mu_zero_trains_bit_for_bit_as_without_fedprox(
    tiny_model_path: str, start, rows, train
) -> None:
    without = train(tiny_model_path, start, rows)
    zero = train(tiny_model_path, start, rows, proximal_mu=0.0)
    assert digest(zero) == digest(without)
    tiny = train(tiny_model_path, start, rows, proximal_mu=1e-3)  # the term is live at all
    assert digest(tiny) != digest(without)


def test_dp_sgd_proximal_gradient_joins_after_opacus_noise(
    tiny_model_path: str, start, rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The accountant's view: what reaches AdamW is Opacus' clipped and noised gradient plus
    mu (w - w_global), a function of no record. An implementation that put the term in the loss
    or in `p.grad` before Opacus' step (clipped per example, or overwritten) fails here."""
    from opacus.optimizers import DPOptimizer

    mu = 5.0
    noised: list[list[torch.Tensor]] = []  # p.grad as Opacus leaves it (clipped, noised, scaled)
    stepped: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # (p, p.grad) at AdamW
    scale_grad, adamw_step = DPOptimizer.scale_grad, torch.optim.AdamW.step

    def scale_spy(self: DPOptimizer) -> None:
        scale_grad(self)
        noised.append([p.grad.detach().clone() for p in self.params])

    def step_spy(self, *args, **kwargs):
        params = [p for g in self.param_groups for p in g["params"]]
        stepped.append(([p.detach().clone() for p in params], [p.grad.clone() for p in params]))
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(DPOptimizer, "scale_grad", scale_spy)
    monkeypatch.setattr(torch.optim.AdamW, "step", step_spy)
    train_local_dp(
        tiny_model_path,
        start,
        rows,
        training=TRAINING,
        lora=LORA,
        seed=11,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        proximal_mu=mu,
    )
    assert len(noised) == len(stepped) == TRAINING.local_steps
    w_global = stepped[0][0]  # the weights as loaded, before the first step
    pulled = 0.0
    for released, (weights, grads) in zip(noised, stepped, strict=True):
        for g_opacus, w, w0, g in zip(released, weights, w_global, grads, strict=True):
            torch.testing.assert_close(g, g_opacus + mu * (w - w0), rtol=0, atol=1e-6)
            pulled = max(pulled, float((mu * (w - w0)).abs().max()))
    assert pulled > 1e-3  # the term was not zero: later steps moved away from w_global


def test_negative_mu_is_a_config_error_naming_the_field(
    tmp_path: Path, tiny_model_path: str
) -> None:
    raw = federation_dict(
        tmp_path, Path(tiny_model_path), ["a-aws", "b-gcp"], aggregation={"proximal_mu": -0.1}
    )
    with pytest.raises(ConfigError, match=r"aggregation\.proximal_mu: Input should be greater"):
        parse_federation(raw)
    assert parse_federation({**raw, "aggregation": {"proximal_mu": 0.01}}).aggregation.proximal_mu
