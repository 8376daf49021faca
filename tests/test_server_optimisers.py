"""Server optimisers on the aggregation seam: FedAdam, FedYogi, FedAvgM.

Hand-computed steps on tiny arrays first (every expected number is written out, with the formula
it came from), then the same optimisers inside protected rounds: secure and plaintext paths agree
within the quantisation bound, the moments survive into a new run of the federation, and a
forged, replayed or foreign server state is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloudfed import run_lock, server_state
from cloudfed.aggregation.composed import Strategy, strategy_for
from cloudfed.aggregation.strategy import ServerState, make_optimiser
from cloudfed.coordinator import coordinator_keys
from cloudfed.errors import AggregationError, ConfigError, ProtectionError
from cloudfed.exchange import federation_exchange, global_adapter_key
from cloudfed.federation import parse_federation
from cloudfed.federation_state import publish_round
from cloudfed.protection import load_or_create_keys
from cloudfed.protection.messages import load_global
from tests.protected_support import Federation, federation_dict

NAMES = ("alpha-aws", "beta-gcp", "gamma-azure")
EXAMPLES = {"alpha-aws": 100, "beta-gcp": 100, "gamma-azure": 200}
W0 = {"x": np.array([1.0, -2.0], np.float32)}
D1 = {"x": np.array([0.4, -0.2], np.float32)}


def two_steps(name: str, params: dict[str, Any], d2: list[float]):
    opt = make_optimiser(name, params)
    s0 = opt.init(W0)
    s1, w1, diag1 = opt.step(s0, W0, D1)
    s2, w2, diag2 = opt.step(s1, w1, {"x": np.array(d2, np.float32)})
    return (s1, w1, diag1), (s2, w2, diag2)


# --- 1. each optimiser against a hand-computed step ----------------------------------------------


def test_fedadam_two_steps_by_hand() -> None:
    """eta 1, beta_1 0.5, beta_2 0.75, tau 0.05; eta_t = eta sqrt(1 - beta_2^t) / (1 - beta_1^t)."""
    (s1, w1, diag1), (s2, w2, _) = two_steps(
        "fedadam", {"eta": 1.0, "beta_1": 0.5, "beta_2": 0.75, "tau": 0.05}, [0.2, 0.2]
    )
    # t=1: m = 0.5 d1 = [0.2, -0.1]; v = 0.25 d1^2 = [0.04, 0.01]; eta_1 = sqrt(0.25) / 0.5 = 1
    # w1 = w0 + [0.2 / (0.2 + 0.05), -0.1 / (0.1 + 0.05)] = [1 + 0.8, -2 - 2/3]
    assert s1.step == 1
    np.testing.assert_allclose(s1.tensors["m/x"], [0.2, -0.1], rtol=1e-6)
    np.testing.assert_allclose(s1.tensors["v/x"], [0.04, 0.01], rtol=1e-6)
    np.testing.assert_allclose(w1["x"], [1.8, -2.6666667], rtol=1e-6)
    assert diag1["eta"] == pytest.approx(1.0)
    assert diag1["update_norm"] == pytest.approx(1.0413666, rel=1e-6)  # sqrt(0.64 + 4/9)
    assert diag1["m_mean_abs"] == pytest.approx(0.15, rel=1e-6)
    assert diag1["v_mean"] == pytest.approx(0.025, rel=1e-6)
    # t=2, d2 = [0.2, 0.2]: m = 0.5 m + 0.5 d2 = [0.2, 0.05]
    # v = 0.75 v + 0.25 d2^2 = [0.04, 0.0175]
    # eta_2 = sqrt(1 - 0.5625) / (1 - 0.25) = 0.8819171
    # w2 = w1 + 0.8819171 [0.2 / 0.25, 0.05 / (sqrt(0.0175) + 0.05)] = w1 + [0.7055337, 0.2419027]
    assert s2.step == 2
    np.testing.assert_allclose(s2.tensors["m/x"], [0.2, 0.05], rtol=1e-6)
    np.testing.assert_allclose(s2.tensors["v/x"], [0.04, 0.0175], rtol=1e-6)
    np.testing.assert_allclose(w2["x"], [2.5055337, -2.4247640], rtol=1e-6)


def test_fedyogi_two_steps_by_hand() -> None:
    """eta 0.5 (no bias correction), beta_1 0.5, beta_2 0.75, tau 0.05."""
    (s1, w1, _), (s2, w2, diag2) = two_steps(
        "fedyogi", {"eta": 0.5, "beta_1": 0.5, "beta_2": 0.75, "tau": 0.05}, [0.1, 0.4]
    )
    # t=1: v0 = 0 < d1^2, so v = 0 + 0.25 d1^2 = [0.04, 0.01]; m = [0.2, -0.1]
    # w1 = w0 + 0.5 [0.2 / 0.25, -0.1 / 0.15] = [1.4, -2 - 1/3]
    np.testing.assert_allclose(s1.tensors["v/x"], [0.04, 0.01], rtol=1e-6)
    np.testing.assert_allclose(w1["x"], [1.4, -2.3333333], rtol=1e-6)
    # t=2, d2^2 = [0.01, 0.16]: v - d2^2 = [+0.03, -0.15], so
    # v = [0.04 - 0.25 * 0.01, 0.01 + 0.25 * 0.16] = [0.0375, 0.05] (Adam: [0.0325, 0.0475])
    # m = 0.5 m + 0.5 d2 = [0.15, 0.15]
    # w2 = w1 + 0.5 [0.15 / (sqrt(0.0375) + 0.05), 0.15 / (sqrt(0.05) + 0.05)]
    #    = w1 + [0.3078196, 0.2741160]
    np.testing.assert_allclose(s2.tensors["v/x"], [0.0375, 0.05], rtol=1e-6)
    np.testing.assert_allclose(s2.tensors["m/x"], [0.15, 0.15], rtol=1e-6)
    np.testing.assert_allclose(w2["x"], [1.7078196, -2.0592173], rtol=1e-6)
    assert diag2["eta"] == 0.5


def test_fedavgm_two_steps_by_hand() -> None:
    """server_learning_rate 0.5, server_momentum 0.9; u = 0.9 u + d, w = w + 0.5 u."""
    (s1, w1, diag1), (s2, w2, diag2) = two_steps(
        "fedavgm", {"server_learning_rate": 0.5, "server_momentum": 0.9}, [0.2, 0.2]
    )
    # u1 = d1 = [0.4, -0.2]; w1 = [1 + 0.2, -2 - 0.1]
    np.testing.assert_allclose(s1.tensors["momentum/x"], [0.4, -0.2], rtol=1e-6)
    np.testing.assert_allclose(w1["x"], [1.2, -2.1], rtol=1e-6)
    assert diag1["update_norm"] == pytest.approx(0.2236068, rel=1e-6)  # 0.5 sqrt(0.16 + 0.04)
    # u2 = 0.9 [0.4, -0.2] + [0.2, 0.2] = [0.56, 0.02]; w2 = w1 + [0.28, 0.01] = [1.48, -2.09]
    np.testing.assert_allclose(s2.tensors["momentum/x"], [0.56, 0.02], rtol=1e-6)
    np.testing.assert_allclose(w2["x"], [1.48, -2.09], rtol=1e-6)
    assert diag2["momentum_norm"] == pytest.approx(0.5603570, rel=1e-6)  # sqrt(0.3136 + 0.0004)
    assert s2.step == 2


def test_fedavgm_with_flowers_defaults_is_fedavg() -> None:
    """Learning rate 1 and momentum 0 (Flower's defaults): the same adapter, and no buffer kept."""
    avgm, avg = make_optimiser("fedavgm"), make_optimiser("fedavg")
    s, w, _ = avgm.step(avgm.init(W0), W0, D1)
    _, w_avg, _ = avg.step(avg.init(W0), W0, D1)
    np.testing.assert_array_equal(w["x"], w_avg["x"])
    assert dict(s.tensors) == {}


# --- 2. configuration ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def raw(tmp_path: Path, model_cache: Path, **overrides: Any) -> dict[str, Any]:
    return federation_dict(tmp_path, model_cache, NAMES, **overrides)


@pytest.mark.parametrize(
    "aggregation, named",
    [
        ({"strategy": "fedadamm"}, "unknown aggregation.strategy 'fedadamm'"),
        ({"strategy": "fedadam", "params": {"beta_1": 1.0}}, "aggregation.params.beta_1"),
        ({"strategy": "fedyogi", "params": {"tau": 0}}, "aggregation.params.tau"),
        ({"strategy": "fedadam", "params": {"eta_l": 0.1}}, "training.learning_rate"),
        ({"strategy": "fedavgm", "params": {"momentum": 0.9}}, "aggregation.params.momentum"),
        ({"strategy": "fedavg", "params": {"eta": 0.1}}, "fedavg takes no aggregation.params"),
    ],
    ids=["unknown", "beta_1", "tau", "eta_l", "fedavgm-key", "fedavg-params"],
)
def test_bad_strategy_or_params_is_a_config_error_naming_the_field(
    tmp_path: Path, model_cache: Path, aggregation: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_federation(raw(tmp_path, model_cache, aggregation=aggregation))
    message = str(info.value)
    assert "parameters.federation.aggregation" in message and named in message
    assert "Fix:" in message


# --- 3. inside protected rounds ------------------------------------------------------------------


def updates_for(fed: Federation, salt: int) -> dict[str, tuple[dict[str, np.ndarray], int]]:
    """Distinct normal(0, 0.01) updates per party, round (`salt`) and tensor."""
    out = {}
    for k, p in enumerate(NAMES):
        rng = np.random.default_rng(100 * salt + k)
        state = {
            n: rng.normal(0.0, 0.01, fed.initial[n].shape).astype(np.float32)
            for n in sorted(fed.initial)
        }
        out[p] = (state, EXAMPLES[p])
    return out


@pytest.fixture
def applied(monkeypatch: pytest.MonkeyPatch) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """The opened sums and weight sums every `Strategy.apply` of the test received."""
    seen: list[tuple[dict[str, np.ndarray], np.ndarray]] = []
    original = Strategy.apply

    def spy(self, state, global_adapter, sums, weight_sums):
        seen.append(({k: np.array(v) for k, v in sums.items()}, np.array(weight_sums)))
        return original(self, state, global_adapter, sums, weight_sums)

    monkeypatch.setattr(Strategy, "apply", spy)
    return seen


def record(fed: Federation, report) -> None:
    """What the pipeline's aggregate step does after a round: the round record, under the lock."""
    exchange = federation_exchange(fed.cfg)
    run_lock.acquire(exchange, fed.plan.run_id, federation_id="f", timeout_minutes=60)
    try:
        publish_round(
            fed.cfg,
            fed.plan,
            fed.current,
            fed.plan.protection["policy_sha256"],
            aggregation=report.aggregation,
        )
    finally:
        run_lock.release(exchange, fed.plan.run_id)


ADAM = {"strategy": "fedadam", "params": {"eta": 0.05, "tau": 1e-3}}


def test_moments_continue_into_a_new_run_as_in_one_uninterrupted_sequence(
    tmp_path: Path, model_cache: Path, applied: list
) -> None:
    """Two rounds, a new run of the same federation, a third round: the adapter and moments are
    bit for bit what one in-memory strategy computes over the same three opened sums."""
    first = Federation(raw(tmp_path, model_cache, aggregation=ADAM))
    for r in (1, 2):
        _, report, _ = first.round(r, updates_for(first, r))
        record(first, report)  # each round's commit point, chained to the one before
    assert report.aggregation["state"]["step"] == 2

    second = Federation(raw(tmp_path, model_cache, aggregation=ADAM))  # a new pipeline run
    assert second.plan.start_round == 2 and second.plan.run_id != first.plan.run_id
    assert second.current == first.current
    _, report3, _ = second.round(3, updates_for(second, 3))

    opened = list(applied)  # the spy records the replay below too
    assert len(opened) == 3
    fresh = strategy_for(second.cfg, {n: v.shape for n, v in first.initial.items()})
    state, adapter = fresh.init(first.initial), dict(first.initial)
    for sums, weight_sums in opened:
        state, adapter, _ = fresh.apply(state, adapter, sums, weight_sums)
    assert state.step == 3
    published = load_global(second.exchange, second.current)
    for name in adapter:
        np.testing.assert_array_equal(published[name], adapter[name])
    stored = server_state.load(
        second.exchange,
        coordinator_keys(second.cfg, second.exchange),
        second.cfg.federation_id,
        second.current,
    )
    assert stored is not None and stored.step == 3 and stored.strategy == "fedadam"
    for key, value in state.tensors.items():
        np.testing.assert_array_equal(stored.tensors[key], value)
    # The moments matter: without them round 3 would have given another adapter.
    _, restarted, _ = fresh.apply(fresh.init(first.initial), first.global_state(), *opened[2])
    assert any(not np.array_equal(restarted[n], published[n]) for n in published)
    assert report3.aggregation["diagnostics"]["eta"] == pytest.approx(
        0.05 * np.sqrt(1 - 0.99**3) / (1 - 0.9**3)
    )


def test_secure_and_plaintext_fedadam_agree_within_the_quantisation_bound(
    tmp_path: Path, model_cache: Path
) -> None:
    """The step of round 1 is f(d) = eta sqrt(1 - b2) d / (sqrt(1 - b2) |d| + tau) per element
    (m = (1 - b1) d, v = (1 - b2) d^2, bias-corrected eta), whose slope is at most
    eta sqrt(1 - b2) / tau: the two adapters differ by at most that times the mean's error."""
    plain = Federation(
        raw(
            tmp_path / "plain",
            model_cache,
            aggregation=ADAM,
            protection={"default": "plaintext", "public_tensors": ["*"]},
        )
    )
    assert plain.plan.protection["tensors"] == {"plaintext": len(plain.initial)}
    _, plain_report, _ = plain.round(1, updates_for(plain, 1))
    # Provisioned after the plaintext round: the parties' policies now accept secagg only.
    secure = Federation(raw(tmp_path / "secure", model_cache, aggregation=ADAM))
    assert secure.plan.protection["tensors"] == {"secagg": len(secure.initial)}
    _, secure_report, _ = secure.round(1, updates_for(secure, 1))

    mean_error = secure_report.secagg["quantisation_error_bound"] / secure_report.weight_sum
    slope = 0.05 * np.sqrt(1 - 0.99) / 1e-3  # = 5
    a, b = plain.global_state(), secure.global_state()
    diff = max(float(np.max(np.abs(a[n].astype(np.float64) - b[n]))) for n in a)
    assert diff <= slope * mean_error + 1e-7, (diff, slope * mean_error)  # + float32 rounding
    moved = max(float(np.max(np.abs(a[n].astype(np.float64) - plain.initial[n]))) for n in a)
    assert moved > 1e-2  # both took a real step (about eta per element)
    for report in (plain_report, secure_report):
        assert report.aggregation["strategy"] == "fedadam"
        assert report.aggregation["state"]["step"] == 1


def test_a_strategy_change_between_runs_is_refused(tmp_path: Path, model_cache: Path) -> None:
    fed = Federation(raw(tmp_path, model_cache, aggregation=ADAM))
    _, report, _ = fed.round(1, updates_for(fed, 1))
    record(fed, report)
    from cloudfed import coordinator

    changed = parse_federation(raw(tmp_path, model_cache, aggregation={"strategy": "fedyogi"}))
    with pytest.raises(ConfigError, match=r"trained with aggregation = 'fedadam'"):
        coordinator.prepare(changed)
    assert run_lock.read_lock(federation_exchange(changed)) is None


def test_forged_replayed_or_foreign_server_state_is_refused(
    tmp_path: Path, model_cache: Path
) -> None:
    """The exchange is untrusted: whoever writes the state file beside the adapter must not
    steer the next step. Only the coordinator's signature over this adapter is accepted."""
    fed = Federation(raw(tmp_path, model_cache, aggregation=ADAM))
    r1, _, _ = fed.round(1, updates_for(fed, 1))
    state_r1 = fed.exchange.get_bytes(server_state.state_key(r1))
    r2, _, _ = fed.round(2, updates_for(fed, 2))
    key = server_state.state_key(r2)
    genuine = fed.exchange.get_bytes(key)
    keys = coordinator_keys(fed.cfg, fed.exchange)
    fid = fed.cfg.federation_id

    # Anyone with write access to the exchange signs moments of its choice as "coordinator".
    forger = load_or_create_keys("coordinator", "coordinator", tmp_path / "forger-keys")
    zeros = make_optimiser("fedadam").init(fed.initial)
    server_state.store(fed.exchange, forger, fid, r2, zeros)
    forged = fed.exchange.get_bytes(key)
    with pytest.raises(ProtectionError, match="not signed by this coordinator"):
        server_state.load(fed.exchange, keys, fid, r2)

    # The coordinator's own state of round 1, replayed beside round 2's adapter.
    fed.exchange.put_bytes(key, state_r1)
    with pytest.raises(ProtectionError, match="tampered or replayed"):
        server_state.load(fed.exchange, keys, fid, r2)

    # One flipped byte of the genuine file.
    blob = bytearray(genuine)
    blob[len(blob) // 2] ^= 0x01
    fed.exchange.put_bytes(key, bytes(blob))
    with pytest.raises(ProtectionError):
        server_state.load(fed.exchange, keys, fid, r2)

    # Signed by the coordinator, but another strategy's state: the strategy refuses to apply it.
    server_state.store(fed.exchange, keys, fid, r2, ServerState(strategy="fedavgm", step=2))
    foreign = server_state.load(fed.exchange, keys, fid, r2)
    assert foreign is not None and foreign.strategy == "fedavgm"
    strategy = strategy_for(fed.cfg, {n: v.shape for n, v in fed.initial.items()})
    sums = {n: np.zeros_like(v) for n, v in fed.initial.items()}
    with pytest.raises(AggregationError, match="made by 'fedavgm', not 'fedadam'"):
        strategy.apply(foreign, fed.global_state(), sums, (1.0,))

    # The genuine file reads back; with the forged one in its place the round stops unpublished.
    fed.exchange.put_bytes(key, genuine)
    assert server_state.load(fed.exchange, keys, fid, r2).step == 2
    fed.exchange.put_bytes(key, forged)
    with pytest.raises(ProtectionError, match="not signed by this coordinator"):
        fed.round(3, updates_for(fed, 3))
    assert not fed.exchange.exists(global_adapter_key(fed.plan.run_id, 3))


def test_a_deleted_server_state_stops_the_round(tmp_path: Path, model_cache: Path) -> None:
    """An exchange writer who deletes the state would silently reset the moments (FedAdam's
    next step is then +-eta in every coordinate): the round stops unpublished instead."""
    fed = Federation(raw(tmp_path, model_cache, aggregation=ADAM))
    fed.round(1, updates_for(fed, 1))
    r2, _, _ = fed.round(2, updates_for(fed, 2))
    fed.exchange.delete(server_state.state_key(r2))
    with pytest.raises(AggregationError, match="state beside the round-2 adapter is missing"):
        fed.round(3, updates_for(fed, 3))
    assert not fed.exchange.exists(global_adapter_key(fed.plan.run_id, 3))
