"""Heterogeneous LoRA ranks: truncate/pad, band-weighted means, protected rounds, training, config.

A party with `lora_rank: r` < lora.rank = R trains the global adapter's first r components and
pads its delta with zeros; each rank band divides by the weight of the parties that trained it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cloudfed.aggregation.composed import strategy_for
from cloudfed.aggregation.ranks import (
    band_weights,
    edges_for,
    pad,
    slot_map,
    thin_bands,
    truncate,
)
from cloudfed.aggregation.strategy import PartyStats, RoundInfo, mean_from_sums, scale
from cloudfed.errors import AggregationError, CloudfedError, ConfigError
from cloudfed.exchange import global_adapter_key
from cloudfed.federation import LoraSettings, TrainingSettings, parse_federation
from cloudfed.privacy.party_level import clip_update
from tests.protected_support import Federation, federation_dict

A_NAME = "m.layers.0.q_proj.lora_A.weight"
B_NAME = "m.layers.0.q_proj.lora_B.weight"
NAMES = ("alpha-aws", "beta-gcp", "gamma-azure")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def ranked(tmp_path: Path, model_cache: Path, ranks: list[int | None], **overrides: Any) -> dict:
    names = NAMES[: len(ranks)]
    raw = federation_dict(tmp_path, model_cache, names, **overrides)
    for party, r in zip(raw["parties"], ranks, strict=True):
        party["lora_rank"] = r
    return raw


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


# --- 1. shapes: truncate and pad -----------------------------------------------------------------


def test_truncate_then_pad_keeps_the_first_components_and_zeros_the_rest() -> None:
    state = {
        A_NAME: np.arange(12, dtype=np.float32).reshape(4, 3),  # (r, in)
        B_NAME: np.arange(20, dtype=np.float32).reshape(5, 4),  # (out, r)
        "m.norm.weight": np.array([7.0, 8.0], np.float32),  # not LoRA: untouched
    }
    low = truncate(state, 1)
    assert low[A_NAME].shape == (1, 3) and low[B_NAME].shape == (5, 1)
    assert low[A_NAME].tolist() == [[0.0, 1.0, 2.0]]
    assert low[B_NAME][:, 0].tolist() == [0.0, 4.0, 8.0, 12.0, 16.0]
    back = pad(low, 4)
    assert back[A_NAME].shape == (4, 3) and back[B_NAME].shape == (5, 4)
    assert np.array_equal(back[A_NAME][:1], state[A_NAME][:1]) and not back[A_NAME][1:].any()
    assert np.array_equal(back[B_NAME][:, :1], state[B_NAME][:, :1])
    assert not back[B_NAME][:, 1:].any()
    assert back["m.norm.weight"].tolist() == [7.0, 8.0]
    assert all(np.array_equal(pad(truncate(state, 4), 4)[n], state[n]) for n in state)
    with pytest.raises(AggregationError, match="above 2"):
        pad(state, 2)


def test_bands_come_from_the_distinct_ranks() -> None:
    assert edges_for([4, 16, 16], 16) == (0, 4, 16)
    assert edges_for([16, 16], 16) == (0, 16)  # one band: one weight slot, as before
    assert edges_for([2, 2], 8) == (0, 2, 8)  # nobody at R: the top band is never trained
    assert band_weights((0, 4, 16), 4, 0.5) == (0.5, 0.0)
    assert band_weights((0, 4, 16), 16, 0.5) == (0.5, 0.5)
    slots = slot_map({A_NAME: (3, 2), B_NAME: (5, 3), "x": (2,)}, (0, 1, 3))
    assert np.asarray(slots[A_NAME]).ravel().tolist() == [0, 1, 1]
    assert np.asarray(slots[A_NAME]).shape == (3, 1)
    assert np.asarray(slots[B_NAME]).shape == (1, 3) and slots["x"] == 0
    with pytest.raises(AggregationError, match="should be the LoRA rank 3"):
        slot_map({A_NAME: (2, 2)}, (0, 1, 3))
    assert thin_bands((0, 4, 16), [4, 16, 16], 2) == []
    assert thin_bands((0, 4, 16), [4, 4, 16], 2) == ["[4, 16) with 1 trainer(s)"]


# --- 2. exact arithmetic of the mixed-rank mean --------------------------------------------------


def test_mixed_rank_mean_divides_each_band_by_its_own_weight() -> None:
    """Ranks 1 and 2 (R = 2), weights 0.25 and 0.5: band 0 divides by 0.75, band 1 by 0.5."""
    edges = (0, 1, 2)
    slots = slot_map({A_NAME: (2, 2), B_NAME: (3, 2), "x": (2,)}, edges)
    low = {  # rank 1, padded: zero in row 1 of A and column 1 of B
        A_NAME: np.array([[1.0, 2.0], [0.0, 0.0]]),
        B_NAME: np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]),
        "x": np.array([3.0, 0.0]),
    }
    full = {
        A_NAME: np.array([[4.0, 8.0], [5.0, 6.0]]),
        B_NAME: np.array([[4.0, 7.0], [8.0, 9.0], [12.0, 11.0]]),
        "x": np.array([0.0, 3.0]),
    }
    w_low, w_full = band_weights(edges, 1, 0.25), band_weights(edges, 2, 0.5)
    assert w_low == (0.25, 0.0) and w_full == (0.5, 0.5)
    a, b = scale(low, slots, w_low), scale(full, slots, w_full)
    sums = {n: a[n] + b[n] for n in a}
    weight_sums = np.add(w_low, w_full)
    assert weight_sums.tolist() == [0.75, 0.5]
    mean = mean_from_sums(sums, weight_sums, slots)
    # band 0: (0.25 * 1 + 0.5 * 4) / 0.75 = 3, (0.25 * 2 + 0.5 * 8) / 0.75 = 6
    # band 1: only the rank-2 party: 0.5 * 5 / 0.5 = 5 (a single slot would give 3.33, diluted)
    assert mean[A_NAME].tolist() == [[3.0, 6.0], [5.0, 6.0]]
    # B column 0: (0.25 * [1, 2, 3] + 0.5 * [4, 8, 12]) / 0.75 = [3, 6, 9]; column 1 is [7, 9, 11]
    assert mean[B_NAME].tolist() == [[3.0, 7.0], [6.0, 9.0], [9.0, 11.0]]
    assert mean["x"].tolist() == [1.0, 2.0]  # not LoRA: band 0, everyone's weight


def test_a_band_nobody_trained_keeps_the_global(tmp_path: Path, model_cache: Path) -> None:
    cfg = parse_federation(ranked(tmp_path, model_cache, [1, 1], lora={"rank": 2, "alpha": 4}))
    shapes = {A_NAME: (2, 2), B_NAME: (3, 2)}
    strategy = strategy_for(cfg, shapes)
    assert strategy.edges == (0, 1, 2) and strategy.n_slots == 2
    glob = {A_NAME: np.full((2, 2), 10.0, np.float32), B_NAME: np.full((3, 2), 20.0, np.float32)}
    deltas = [pad({A_NAME: np.full((1, 2), v), B_NAME: np.full((3, 1), v)}, 2) for v in (1, 3)]
    stats = [PartyStats(examples=n, rank=1) for n in (100, 300)]
    parts = [strategy.contribution(d, s, RoundInfo(1)) for d, s in zip(deltas, stats, strict=True)]
    assert [p.weights for p in parts] == [(0.1, 0.0), (0.3, 0.0)]
    sums = {n: parts[0].tensors[n] + parts[1].tensors[n] for n in shapes}
    weight_sums = np.add(parts[0].weights, parts[1].weights)
    _, new, diag = strategy.apply(strategy.init(glob), glob, sums, weight_sums)
    # (0.1 * 1 + 0.3 * 3) / 0.4 = 2.5 on band 0; band 1 untouched
    assert new[A_NAME].tolist() == [[12.5, 12.5], [10.0, 10.0]]
    assert new[B_NAME].tolist() == [[22.5, 20.0]] * 3
    assert diag["mean_delta_norm"] == pytest.approx(np.sqrt(5 * 2.5**2))


def test_under_dp_band_weights_are_uniform_and_padding_keeps_the_clip(
    tmp_path: Path, model_cache: Path
) -> None:
    cfg = parse_federation(ranked(tmp_path, model_cache, [1, 2, 2], lora={"rank": 2, "alpha": 4}))
    strategy = strategy_for(cfg, {A_NAME: (2, 2), B_NAME: (3, 2)})
    low = pad({A_NAME: np.full((1, 2), 3.0), B_NAME: np.full((3, 1), 4.0)}, 2)
    for examples in (1, 999):  # nothing data-dependent moves the weights under DP
        c = strategy.contribution(low, PartyStats(examples, rank=1), RoundInfo(1, private=True))
        assert c.weights == (1.0, 0.0)
    # Party-level DP clips the padded delta: its norm is the trained delta's, sqrt(2*9 + 3*16).
    clipped, norm, _ = clip_update(low, 1.0)
    assert norm == pytest.approx(np.sqrt(66.0))
    assert not clipped[A_NAME][1:].any() and not clipped[B_NAME][:, 1:].any()
    assert clipped[A_NAME][0, 0] == pytest.approx(3.0 / np.sqrt(66.0))


# --- 3. protected rounds: secure sum == plaintext sum == the band-weighted mean -------------------


def band_mean(updates: dict, ranks: dict[str, int], edges: tuple[int, ...]) -> dict:
    """The reference: per element, sum over its trainers of w x / their w (float64)."""
    names = sorted(next(iter(updates.values()))[0])
    slots = slot_map({n: updates[NAMES[0]][0][n].shape for n in names}, edges)
    sums = {n: 0.0 for n in names}
    ws = np.zeros(len(edges) - 1)
    for p, (state, examples) in updates.items():
        w = band_weights(edges, ranks[p], min(examples, 1000) / 1000)
        for n, v in scale(state, slots, w).items():
            sums[n] = sums[n] + v
        ws += w
    div = {n: ws[np.asarray(slots[n])] for n in names}
    return {n: np.where(div[n] > 0, sums[n] / np.where(div[n] > 0, div[n], 1), 0) for n in names}


def rank_updates(fed: Federation, ranks: dict[str, int]) -> dict:
    """Random updates, zero above each party's rank (what its training hands back)."""
    out = {}
    for k, p in enumerate(NAMES):
        rng = np.random.default_rng(k)
        state = {
            n: rng.normal(0.0, 0.01, fed.initial[n].shape).astype(np.float32)
            for n in sorted(fed.initial)
        }
        out[p] = (pad(truncate(state, ranks[p]), fed.cfg.lora.rank), (100, 100, 200)[k])
    return out


HYBRID = {
    "rules": [
        {"pattern": "*lora_A*", "mode": "ckks"},
        {"pattern": "*v_proj.lora_B*", "mode": "plaintext"},
    ],
    "public_tensors": ["*v_proj.lora_B*"],
    "ckks": {"workers": 1},
}


def test_secure_hybrid_and_plaintext_rounds_give_the_band_mean(
    tmp_path: Path, model_cache: Path
) -> None:
    ranks = dict(zip(NAMES, (2, 4, 4), strict=True))
    lora = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    results = {}
    for mode, protection in {
        "secagg": {},
        "hybrid": HYBRID,  # lora_A under CKKS, q_proj.lora_B under secagg, v_proj.lora_B public
        "plaintext": {"default": "plaintext", "public_tensors": ["*"]},
    }.items():
        raw = ranked(
            tmp_path / mode, model_cache, list(ranks.values()), lora=lora, protection=protection
        )
        fed = Federation(raw)
        updates = rank_updates(fed, ranks)
        _, report, _ = fed.round(1, updates)
        assert report.accepted == sorted(NAMES)
        assert report.weight_sum == pytest.approx(0.4, abs=1e-6)  # band 0: 0.1 + 0.1 + 0.2
        new = fed.global_state()
        results[mode] = {n: new[n].astype(np.float64) - fed.initial[n] for n in new}
        if mode == "secagg":
            bound = report.secagg["quantisation_error_bound"]
            assert 0 < bound < 1e-6
            want = band_mean(updates, ranks, (0, 2, 4))
            err = max(float(np.max(np.abs(results[mode][n] - want[n]))) for n in want)
            assert err < 1e-6
            # The rank-2 party's zeros did not dilute band [2, 4): there the mean is over the two
            # rank-4 parties only (weights 0.1 and 0.2), not over all three.
            name = next(n for n in want if "lora_A" in n)
            beta, gamma = updates[NAMES[1]][0][name][2:], updates[NAMES[2]][0][name][2:]
            only_rank4 = (0.1 * beta.astype(np.float64) + 0.2 * gamma) / 0.3
            assert np.max(np.abs(results[mode][name][2:] - only_rank4)) < 1e-6
    for mode in ("hybrid", "secagg"):
        err = max(float(np.max(np.abs(results[mode][n] - results["plaintext"][n]))) for n in want)
        assert err < 1e-6, mode


def test_thin_band_after_a_dropout_is_never_unmasked(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attacker is the coordinator: with gamma gone, band [2, 4) of the sum is beta's update.

    The coordinator skips its own check; the parties still refuse to reveal shares for that sum,
    so it is never unmasked and nothing is published. The control run, with the parties' check
    off too, shows what the coordinator would get otherwise: beta's rows in the clear.
    """
    from cloudfed import party as party_role
    from cloudfed.coordinator import round as coordinator_round
    from cloudfed.party import ckks as party_ckks
    from cloudfed.party import secagg as party_secagg

    ranks = dict(zip(NAMES, (2, 4, 4), strict=True))
    lora = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    monkeypatch.setattr(coordinator_round, "band_shortfall", lambda *a: None)
    fed = Federation(ranked(tmp_path / "guarded", model_cache, list(ranks.values()), lora=lora))
    updates = rank_updates(fed, ranks)
    refusals: list[str] = []
    reveal = party_role.reveal_shares

    def spy(*args: Any, **kwargs: Any) -> Any:
        try:
            return reveal(*args, **kwargs)
        except CloudfedError as exc:
            refusals.append(str(exc))
            raise

    monkeypatch.setattr(party_role, "reveal_shares", spy)
    with pytest.raises(AggregationError, match="no model"):
        fed.round(1, updates, drop={NAMES[2]: "upload"})
    assert len(refusals) == 2
    assert all("rank band(s) [2, 4) with 1 trainer(s)" in r for r in refusals)
    assert not fed.exchange.exists(global_adapter_key(fed.plan.run_id, 1))

    control = Federation(ranked(tmp_path / "ctl", model_cache, list(ranks.values()), lora=lora))
    monkeypatch.setattr(party_secagg, "band_shortfall", lambda *a: None)
    monkeypatch.setattr(party_ckks, "band_shortfall", lambda *a: None)
    updates = rank_updates(control, ranks)
    control.round(1, updates, drop={NAMES[2]: "upload"})
    leaked = control.global_state()
    name = next(n for n in leaked if "lora_A" in n)
    beta_rows = updates[NAMES[1]][0][name][2:]
    got = leaked[name][2:].astype(np.float64) - control.initial[name][2:]
    assert np.max(np.abs(got - beta_rows)) < 1e-6  # the attack is real without the guard


# --- 4. training at a lower rank -----------------------------------------------------------------

LORA8 = LoraSettings(rank=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
TRAINING = TrainingSettings(local_steps=3, batch_size=4, learning_rate=0.01, max_seq_len=64)


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    colours = ["red", "blue", "green", "gold"]
    return pd.DataFrame(
        {
            "instruction": [f"Colour of item {i}?" for i in range(16)],
            "response": [f"Item {i} is {colours[i % 4]}." for i in range(16)],
        }
    )


def assert_rank4_delta(delta: dict, initial: dict) -> None:
    assert {n: d.shape for n, d in delta.items()} == {n: t.shape for n, t in initial.items()}
    a_names = [n for n in delta if "lora_A" in n]
    b_names = [n for n in delta if "lora_B" in n]
    assert a_names and b_names
    for n in a_names:
        assert not delta[n][4:].any() and delta[n][:4].any()
    for n in b_names:
        assert not delta[n][:, 4:].any() and delta[n][:, :4].any()


def test_rank_4_party_trains_the_first_4_components_only(
    tiny_model_path: str, rows: pd.DataFrame
) -> None:
    import torch
    from peft.tuners.lora import LoraLayer

    from cloudfed.training.local import _peft_model, initial_adapter, train_local
    from cloudfed.training.model import Device

    initial = initial_adapter(tiny_model_path, LORA8, seed=3)
    delta, metrics = train_local(
        tiny_model_path, initial, rows, training=TRAINING, lora=LORA8, seed=3, rank=4
    )
    assert metrics.steps == 3
    assert_rank4_delta(delta, initial)
    # peft's scale stays the federation's alpha / R = 2 at r = 4 (alpha becomes 8).
    cpu = Device("cpu", torch.float32)
    model, _ = _peft_model(tiny_model_path, LORA8, None, seed=3, device=cpu, rank=4)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and {m.r["default"] for m in layers} == {4}
    assert {m.scaling["default"] for m in layers} == {2.0}
    # Aggregated with another rank-4 update, the global keeps its components 4..7 exactly.
    cfg_edges = (0, 4, 8)
    strategy_slots = slot_map({n: t.shape for n, t in initial.items()}, cfg_edges)
    w = band_weights(cfg_edges, 4, 1.0)
    twice = {n: 2 * d for n, d in delta.items()}
    sums = {
        n: scale(delta, strategy_slots, w)[n] + scale(twice, strategy_slots, w)[n] for n in delta
    }
    mean = mean_from_sums(sums, np.add(w, w), strategy_slots)
    new = {n: initial[n] + mean[n] for n in initial}
    for n in new:
        if "lora_A" in n:
            assert np.array_equal(new[n][4:], initial[n][4:])
            assert np.allclose(new[n][:4], initial[n][:4] + 1.5 * delta[n][:4], atol=1e-6)
        elif "lora_B" in n:
            assert np.array_equal(new[n][:, 4:], initial[n][:, 4:])


def test_rank_4_party_under_dp_sgd_pads_too(tiny_model_path: str, rows: pd.DataFrame) -> None:
    from cloudfed.training.dp_sgd import train_local_dp
    from cloudfed.training.local import initial_adapter

    initial = initial_adapter(tiny_model_path, LORA8, seed=3)
    delta, _, run = train_local_dp(
        tiny_model_path,
        initial,
        rows,
        training=TRAINING,
        lora=LORA8,
        seed=3,
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        rank=4,
    )
    assert run.event.steps == 3
    assert_rank4_delta(delta, initial)


# --- 5. configuration -----------------------------------------------------------------------------


def test_party_rank_above_the_federation_rank_is_refused_naming_the_field(
    tmp_path: Path, model_cache: Path
) -> None:
    raw = ranked(tmp_path, model_cache, [None, 2, 4], lora={"rank": 2, "alpha": 4})
    with pytest.raises(ConfigError) as info:
        parse_federation(raw)
    msg = str(info.value)
    assert "parties[2].lora_rank=4 (gamma-azure) exceeds lora.rank=2" in msg
    assert "set parties[2].lora_rank to at most 2" in msg


def test_party_rank_zero_is_refused_with_its_fix(tmp_path: Path, model_cache: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_federation(ranked(tmp_path, model_cache, [0, 2, 2]))
    msg = str(info.value)
    assert "parameters.federation.parties[0].lora_rank" in msg
    assert "use a party LoRA rank between 1 and lora.rank" in msg


def test_a_band_with_a_single_trainer_is_refused(tmp_path: Path, model_cache: Path) -> None:
    raw = ranked(tmp_path, model_cache, [1, 1, 2], lora={"rank": 2, "alpha": 4})
    with pytest.raises(ConfigError, match=r"band\(s\) \[1, 2\) with 1 trainer\(s\)"):
        parse_federation(raw)
    cfg = parse_federation(ranked(tmp_path, model_cache, [1, 2, None], lora={"rank": 2}))
    assert [p.lora_rank for p in cfg.parties] == [1, 2, None]
