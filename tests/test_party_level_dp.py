"""Party-level DP: clipping, noise calibration, noise inside secure aggregation, protected rounds.

Statistical tests use `seeded_sampler` (reproducible, NOT secure) in place of OpenDP's sampler;
one test exercises the real OpenDP sampler with generous bounds. End-to-end rounds run in-process
through `tests.protected_support.Federation`; where a test needs to know the exact noise that was
added, the OpenDP sampler is replaced by a recording seeded one, so the aggregate can be checked
against (clipped sum + that noise) to within the quantisation bound.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from cloudfed import party as party_role
from cloudfed.coordinator import coordinator_keys
from cloudfed.errors import AggregationError, CloudfedError
from cloudfed.exchange import global_adapter_key
from cloudfed.federation import FederationConfig, parse_federation
from cloudfed.privacy import noise as noise_module
from cloudfed.privacy.accountant import GaussianEvent, epsilon
from cloudfed.privacy.budget import load_ledger, reserve_round
from cloudfed.privacy.ledger import LEDGER_KEY
from cloudfed.privacy.noise import (
    CENTRAL_GRID_BITS,
    Calibration,
    add_integer_noise,
    central_noise,
    opendp_discrete_gaussian,
    power_of_two_grid,
    seeded_sampler,
)
from cloudfed.privacy.party_level import (
    calibration,
    charged_multiplier,
    ckks_grid,
    clip_update,
    dp_value_spec,
    l2_norm,
)
from cloudfed.protection.hazmat.quantize import (
    MODULUS_BITS,
    QuantSpec,
    dequantize_sum,
    headroom_bits,
    noise_bits,
    quantize,
)
from cloudfed.protection.messages import layout_for, load_global
from tests.protected_support import Federation, accept_anything, federation_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
A, B, C = NAMES = ("alpha-aws", "beta-gcp", "gamma-azure")
CLIP = 0.05
DELTA = 1e-5
MOD = 1 << MODULUS_BITS


def local_cfg(privacy: dict[str, Any], **overrides: Any) -> FederationConfig:
    doc = yaml.safe_load((REPO_ROOT / "configs/local.yaml").read_text(encoding="utf-8"))
    raw = copy.deepcopy(doc["parameters"]["federation"])
    raw["privacy"] = privacy
    raw.update(overrides)
    return parse_federation(raw, source="configs/local.yaml")


def dp(mode: str, z: float = 1.0, **extra: Any) -> dict[str, Any]:
    return {"mode": mode, "clip": CLIP, "noise_multiplier": z, "max_epsilon": 1e6, **extra}


def random_update(seed: int, norm: float, shapes=((4, 96), (96, 4), (300,))) -> dict:
    rng = np.random.default_rng(seed)
    update = {f"t{i}": rng.normal(size=s).astype(np.float32) for i, s in enumerate(shapes)}
    factor = norm / l2_norm(update)
    return {k: (v.astype(np.float64) * factor).astype(np.float32) for k, v in update.items()}


class Recorder:
    """A seeded stand-in for OpenDP's sampler that remembers every draw."""

    def __init__(self, seed: int) -> None:
        self.inner = seeded_sampler(seed)
        self.calls: list[tuple[int, float, np.ndarray]] = []

    def __call__(self, size: int, scale: float) -> np.ndarray:
        out = self.inner(size, scale)
        self.calls.append((size, scale, out.copy()))
        return out


# --- clipping ----------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [1.0001, 100.0, 1e6])
@pytest.mark.parametrize("seed", [0, 1])
def test_clip_bounds_a_long_update_to_the_clip(seed: int, factor: float) -> None:
    update = random_update(seed, CLIP * factor)
    out, norm, clipped = clip_update(update, CLIP)
    assert clipped is True
    assert norm == pytest.approx(CLIP * factor, rel=1e-5)
    assert l2_norm(out) <= CLIP
    assert l2_norm(out) >= CLIP * (1 - 1e-5)  # scaled to the clip, not further
    assert sorted(out) == sorted(update)
    for k, v in out.items():
        assert v.dtype == np.float32 and v.shape == update[k].shape
        # Same direction: clipping rescales the whole update, it does not clip coordinates.
        a, b = v.astype(np.float64).ravel(), update[k].astype(np.float64).ravel()
        cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cos == pytest.approx(1.0, abs=1e-6)
    # No value of a clipped update lies outside +-clip, so quantisation clips nothing more.
    _, twice = quantize(np.concatenate([v.ravel() for v in out.values()]), QuantSpec(CLIP, 27, 3))
    assert twice == 0


@pytest.mark.parametrize("factor", [0.0, 0.3, 1.0])
def test_clip_leaves_an_update_within_the_clip_untouched(factor: float) -> None:
    update = random_update(3, CLIP * factor) if factor else {"t": np.zeros(10, np.float32)}
    out, norm, clipped = clip_update(update, CLIP)
    assert clipped is False
    assert norm == pytest.approx(l2_norm(update))
    for k in update:
        np.testing.assert_array_equal(out[k], update[k])


def test_clip_refuses_non_finite_updates() -> None:
    update = random_update(4, CLIP)
    update["t0"][0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        clip_update(update, CLIP)


# --- noise calibration (seeded, statistical) -------------------------------------------------

N = 200_000


def test_central_noise_std_matches_and_lands_exactly_on_its_grid() -> None:
    cal = Calibration("central", noise_multiplier=1.3, clip=CLIP, min_contributors=2, colluding=0)
    sums = np.random.default_rng(3).uniform(-0.3, 0.3, N)  # reals on no grid at all
    x, grid = central_noise(sums, cal.sum_std, seeded_sampler(11))
    assert x.shape == (N,) and x.dtype == np.float64
    assert cal.sum_std == pytest.approx(1.3 * CLIP)
    assert (x - sums).std() == pytest.approx(cal.sum_std, rel=0.01)
    assert abs((x - sums).mean()) < 5 * cal.sum_std / math.sqrt(N)
    # A power of two at most std / 2^20, and every released value an exact multiple of it.
    assert grid == power_of_two_grid(cal.sum_std, CENTRAL_GRID_BITS)
    assert cal.sum_std / 2**31 < grid <= cal.sum_std / 2**30
    assert math.log2(grid) == int(math.log2(grid))
    np.testing.assert_array_equal(x / grid, np.rint(x / grid))
    with pytest.raises(ValueError, match="positive"):
        central_noise(sums[:3], 0.0, seeded_sampler(0))


def test_integer_noise_std_matches_party_scale_and_wraps_modulo_2_32() -> None:
    scale = 3.7e5  # a party's share in quantisation steps, as in a real round
    centre = np.full(N, 1 << 31, dtype=np.uint32)
    noisy = add_integer_noise(centre, scale, seeded_sampler(12))
    assert noisy.dtype == np.uint32
    noise = noisy.astype(np.int64) - (1 << 31)
    assert noise.std() == pytest.approx(scale, rel=0.01)
    assert abs(noise.mean()) < 5 * scale / math.sqrt(N)
    # From zero words, negative noise wraps to the top of the ring, exactly modulo 2^32.
    zeros = np.zeros(N, dtype=np.uint32)
    wrapped = add_integer_noise(zeros, scale, seeded_sampler(12)).astype(np.int64)
    assert np.any(wrapped > MOD - 10 * scale)
    np.testing.assert_array_equal(np.where(wrapped >= 1 << 31, wrapped - MOD, wrapped), noise)


@pytest.mark.parametrize(("m", "c", "s"), [(2, 1, 2), (3, 1, 3), (2, 1, 3), (3, 2, 7)])
def test_party_shares_minus_the_colluders_reach_the_calibrated_std(m: int, c: int, s: int) -> None:
    """Any m - c shares reach sum_std; s contributors carry z*sqrt((s-c)/(m-c)) past c of them."""
    cal = Calibration(
        "distributed", noise_multiplier=0.9, clip=CLIP, min_contributors=m, colluding=c
    )
    assert cal.party_std == pytest.approx(cal.sum_std / math.sqrt(m - c))
    step = 2 * CLIP / ((1 << 27) - 1)
    scale = cal.party_std / step
    sampler = seeded_sampler(100 * m + s)
    shares = []
    for _ in range(s):
        words = np.full(N, 1 << 31, dtype=np.uint32)
        shares.append(add_integer_noise(words, scale, sampler).astype(np.int64) - (1 << 31))
    # c colluding co-contributors subtract their own shares from the sum they see.
    std = (sum(shares[c:])).std() * step
    assert cal.effective_multiplier(s) == pytest.approx(0.9 * math.sqrt((s - c) / (m - c)))
    assert std == pytest.approx(cal.effective_multiplier(s) * CLIP, rel=0.01)
    assert std >= cal.sum_std * 0.99
    assert cal.effective_multiplier_vs_coordinator(s) == pytest.approx(0.9 * math.sqrt(s / (m - c)))


def test_central_effective_multiplier_is_the_configured_one() -> None:
    cal = Calibration("central", noise_multiplier=0.9, clip=CLIP, min_contributors=2, colluding=0)
    assert [cal.effective_multiplier(s) for s in (2, 3, 10)] == [0.9, 0.9, 0.9]


def test_calibration_from_config_uses_min_contributors() -> None:
    cal = calibration(local_cfg(dp("distributed", 1.2, min_contributors=3), min_parties=2))
    assert (cal.mode, cal.noise_multiplier, cal.clip, cal.min_contributors) == (
        "distributed",
        1.2,
        CLIP,
        3,
    )
    assert calibration(local_cfg(dp("distributed", 1.2))).min_contributors == 2  # min_parties
    assert calibration(local_cfg(dp("distributed", 1.2))).colluding == 1  # the default


def test_opendp_sampler_matches_its_scale() -> None:
    """The real, unseedable sampler: generous bounds, modest sizes (about 9 us a value)."""
    ints = opendp_discrete_gaussian(50_000, 1000.0)
    assert ints.dtype == np.int64 and ints.shape == (50_000,)
    assert ints.std() == pytest.approx(1000.0, rel=0.03)
    assert abs(ints.mean()) < 5 * 1000.0 / math.sqrt(50_000)
    assert len(np.unique(ints)) > 1000
    # 64-bit: scales past 2^31 keep their size (OpenDP's default int is i32 and saturates).
    big = opendp_discrete_gaussian(20_000, 1.2e9)
    assert big.std() == pytest.approx(1.2e9, rel=0.03)
    assert opendp_discrete_gaussian(0, 5.0).shape == (0,)
    reals, grid = central_noise(np.zeros(20_000), 0.07)
    assert reals.std() == pytest.approx(0.07, rel=0.03)
    assert abs(reals.mean()) < 5 * 0.07 / math.sqrt(20_000)
    np.testing.assert_array_equal(reals / grid, np.rint(reals / grid))
    words = add_integer_noise(np.full(20_000, 1 << 31, dtype=np.uint32), 250.0)
    assert (words.astype(np.int64) - (1 << 31)).std() == pytest.approx(250.0, rel=0.03)


# --- noise inside secure aggregation: wrap-around and decoding -------------------------------


def _party_values(rng: np.random.Generator, size: int) -> np.ndarray:
    """A quarter at +clip, a quarter at -clip, the rest inside the range."""
    q = size // 4
    return np.concatenate(
        [np.full(q, CLIP), np.full(q, -CLIP), rng.uniform(-CLIP, CLIP, size - 2 * q)]
    )


def _noisy_sum(values: list[np.ndarray], spec: QuantSpec, scale: float, seed: int):
    """Each party quantises and adds its noise share; the words are summed modulo 2^32.

    Returns the summed words, the true integer sum (words + noise, no modulus), the total
    integer noise, and the plain sum of the noisy uint32 words (to see the ring wrap).
    """
    rec = Recorder(seed)
    rng = np.random.default_rng(seed + 1)
    total = np.zeros(values[0].shape[0], dtype=np.int64)
    raw = np.zeros_like(total)
    unreduced = np.zeros_like(total)
    for v in values:
        words, clipped = quantize(v, spec, rng)
        assert clipped == 0
        noisy = add_integer_noise(words, scale, rec)
        assert noisy.dtype == words.dtype
        total = (total + noisy.astype(np.int64)) % MOD
        unreduced += noisy.astype(np.int64)
        raw += words.astype(np.int64)
    noise = sum(c[2] for c in rec.calls)
    assert len(rec.calls) == len(values) and all(c[1] == scale for c in rec.calls)
    return total.astype(np.uint32), raw + noise, noise, unreduced


def _distributed_spec(parties: int, z: float) -> tuple[QuantSpec, float]:
    cal = Calibration("distributed", noise_multiplier=z, clip=CLIP, min_contributors=2)
    noise_std = cal.party_std * math.sqrt(parties)
    spec = QuantSpec(CLIP, noise_bits(parties, noise_std / (2 * CLIP)), parties)
    return spec, cal.party_std / spec.step


@pytest.mark.parametrize(("parties", "summed", "z"), [(3, 3, 1.0), (3, 2, 1.0), (5, 4, 3.0)])
def test_distributed_noise_that_wraps_decodes(parties: int, summed: int, z: float) -> None:
    spec, scale = _distributed_spec(parties, z)
    rng = np.random.default_rng(parties * 10 + summed)
    values = [_party_values(rng, 4000) for _ in range(summed)]
    words, integer_sum, noise, unreduced = _noisy_sum(values, spec, scale, seed=summed)
    assert np.any(integer_sum < 0)  # noise took the sum below zero...
    assert np.any(integer_sum > summed * spec.levels)  # ...and past the noiseless maximum
    assert np.any(unreduced >= MOD)  # party words (wrapped below zero) carried past 2^32
    decoded = dequantize_sum(words, spec, summed)
    expected = np.sum(values, axis=0) + noise * spec.step
    assert np.max(np.abs(decoded - expected)) <= spec.sum_error_bound(summed) + 1e-12
    # Control: decoding without centring would be off by a whole ring where it wrapped.
    naive = words.astype(np.float64) * spec.step - summed * CLIP
    assert np.max(np.abs(naive - expected)) > 1.0


def test_noise_bits_are_what_keeps_the_noisy_sum_decodable() -> None:
    spec, scale = _distributed_spec(3, 3.0)
    widest = QuantSpec.for_parties(CLIP, 3)
    assert spec.bits < widest.bits
    values = [np.concatenate([np.full(2000, CLIP), np.full(2000, -CLIP)]) for _ in range(3)]
    for s, ok in ((spec, True), (widest, False)):
        # The same noise in real units, in each spec's own steps.
        words, _, noise, _ = _noisy_sum(values, s, scale * spec.step / s.step, seed=5)
        err = np.abs(dequantize_sum(words, s, 3) - (np.sum(values, axis=0) + noise * s.step))
        assert bool(np.max(err) <= s.sum_error_bound(3) + 1e-12) is ok


def test_noise_bits_shrink_as_noise_grows_and_fail_when_impossible() -> None:
    ranges = [0.0, 0.01, 0.1, 1.0, 10.0, 100.0, 1e4, 1e6]
    for parties in (2, 3, 10, 100):
        bits = [noise_bits(parties, r) for r in ranges]
        assert bits[0] == MODULUS_BITS - headroom_bits(parties)
        assert bits == sorted(bits, reverse=True)
        assert bits[-1] < bits[-2] < bits[0]
        for r, b in zip(ranges, bits, strict=True):
            levels = (1 << b) - 1
            assert parties * levels / 2 + 12 * r * levels < 1 << 31  # room for 12 sigma
            if b < bits[0]:  # the widest such width
                wider = (1 << (b + 1)) - 1
                assert parties * wider / 2 + 12 * r * wider >= 1 << 31
    with pytest.raises(ValueError, match="no bit width"):
        noise_bits(3, 1e9)


# --- the spec and what is charged ------------------------------------------------------------


@pytest.mark.parametrize("z", [0.5, 1.0, 3.0])
@pytest.mark.parametrize(("parties", "values"), [(3, 10**5), (3, 10**7), (10, 10**6)])
def test_distributed_charges_slightly_less_than_configured(
    z: float, parties: int, values: int
) -> None:
    cfg = local_cfg(dp("distributed", z))
    spec = dp_value_spec(cfg, parties)
    cal = calibration(cfg)
    assert spec.clip == CLIP and spec.parties == parties
    assert spec.bits < MODULUS_BITS - headroom_bits(parties)  # bits given up to the noise
    noise_steps = cal.party_std * math.sqrt(parties) / spec.step
    assert parties * spec.levels / 2 + 12 * noise_steps < 1 << 31
    charged = charged_multiplier(cfg, parties, {"secagg": values})
    assert charged < z
    assert charged == pytest.approx(z, rel=1e-3)
    assert charged == pytest.approx(z * CLIP / (CLIP + math.sqrt(values) * spec.step), rel=1e-12)
    assert charged_multiplier(cfg, parties, {"secagg": 10 * values}) < charged  # more slack
    # CKKS values are rounded onto the shares' noise grid (half a step each, charged as a step).
    both = charged_multiplier(cfg, parties, {"secagg": values, "ckks": values})
    grid = ckks_grid(cfg)
    slack = math.sqrt(values) * (spec.step + grid)
    assert both == pytest.approx(z * CLIP / (CLIP + slack), rel=1e-12)


@pytest.mark.parametrize("parties", [2, 3, 100])
def test_central_charges_the_configured_multiplier(parties: int) -> None:
    cfg = local_cfg(dp("central", 1.1))
    assert charged_multiplier(cfg, parties, {}) == 1.1  # nothing rounded: exactly z
    step = dp_value_spec(cfg, parties).step
    # Secagg rounding only: the coordinator noises the summed words as integers.
    charged = charged_multiplier(cfg, parties, {"secagg": 10**6})
    assert charged == pytest.approx(1.1 * CLIP / (CLIP + 1e3 * step), rel=1e-12) and charged < 1.1
    # Public tensors' real sum is rounded onto the noise grid: that rounding is charged.
    grid = power_of_two_grid(1.1 * CLIP, CENTRAL_GRID_BITS)
    plain = charged_multiplier(cfg, parties, {"plaintext": 10**6})
    assert plain == pytest.approx(1.1 * CLIP / (CLIP + 1e3 * grid), rel=1e-12)
    assert 1.1 * (1 - 1e-4) < plain < 1.1
    # The quantiser gives up top bits so that the coordinator's noise cannot wrap either.
    assert dp_value_spec(cfg, parties).bits <= QuantSpec.for_parties(CLIP, parties).bits
    assert dp_value_spec(cfg, 3).bits < QuantSpec.for_parties(CLIP, 3).bits
    target = local_cfg({"mode": "central", "target_epsilon": 4.0, "max_epsilon": 8.0}, rounds=3)
    z = charged_multiplier(target, parties, {"secagg": 10**6})
    assert epsilon([GaussianEvent(z, 1.0, 3)], DELTA, "rdp") <= 4.0


def test_configured_bits_cap_the_distributed_spec() -> None:
    cfg = local_cfg(dp("distributed", 1.0), protection={"secagg": {"bits": 20}})
    assert dp_value_spec(cfg, 3).bits == 20
    assert dp_value_spec(local_cfg(dp("distributed", 1.0)), 3).bits > 20


# --- protected rounds in process --------------------------------------------------------------


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def make_fed(tmp_path: Path, model_cache: Path, privacy: dict | None, **kw: Any) -> Federation:
    extra = {"privacy": privacy} if privacy is not None else {}
    return Federation(federation_dict(tmp_path, model_cache, NAMES, **extra, **kw))


def reserve(fed: Federation, round: int, parties=NAMES):
    keys = coordinator_keys(fed.cfg, fed.exchange)
    reservation = reserve_round(fed.cfg, fed.exchange, keys, fed.plan, round, list(parties))
    assert reservation.granted, reservation.message
    return reservation


def state_update(fed: Federation, seed: int, norm: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {k: rng.normal(size=v.shape) for k, v in sorted(fed.initial.items())}
    factor = norm / math.sqrt(sum(float(np.sum(v**2)) for v in state.values()))
    return {k: (v * factor).astype(np.float32) for k, v in state.items()}


def delta_of(fed: Federation, ref) -> dict[str, np.ndarray]:
    got = load_global(fed.exchange, ref)
    return {k: got[k].astype(np.float64) - fed.initial[k].astype(np.float64) for k in got}


def norm_of(tensors: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in tensors.values()))


def recorded_noise(fed: Federation, rec: Recorder, mode: str) -> dict[str, np.ndarray]:
    """The real-valued noise on the sum, per tensor, rebuilt from the recorded draws."""
    seg = layout_for(fed.cfg, fed.exchange, fed.plan).segment("secagg")
    assert seg is not None
    if mode == "distributed":
        spec = dp_value_spec(fed.cfg, len(NAMES))
        party_scale = calibration(fed.cfg).party_std / spec.step
        assert len(rec.calls) == len(NAMES)
        assert all(size == seg.size and scale == party_scale for size, scale, _ in rec.calls)
        flat = sum(c[2] for c in rec.calls).astype(np.float64) * spec.step
    else:  # one draw, on the summed words
        spec = dp_value_spec(fed.cfg, len(NAMES))
        assert len(rec.calls) == 1 and rec.calls[0][0] == seg.size
        assert rec.calls[0][1] == calibration(fed.cfg).sum_std / spec.step
        flat = rec.calls[0][2].astype(np.float64) * spec.step
    out, pos = {}, 0
    for name, shape in seg.tensors:  # name order, as both noise paths lay them out
        n = int(np.prod(shape))
        out[name] = flat[pos : pos + n].reshape(shape)
        pos += n
    return out


@pytest.mark.parametrize("mode", ["distributed", "central"])
def test_a_100x_update_contributes_at_most_the_clip(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    rec = Recorder(21)
    monkeypatch.setattr(noise_module, "opendp_discrete_gaussian", rec)
    fed = make_fed(tmp_path, model_cache, dp(mode, 0.5))
    small = {A: state_update(fed, 1, 0.8 * CLIP), B: state_update(fed, 2, 0.8 * CLIP)}
    big = state_update(fed, 3, 100 * 0.8 * CLIP)  # 100x the others' norm
    reserve(fed, 1)
    ref, report, _ = fed.round(1, {A: (small[A], 10), B: (small[B], 10), C: (big, 10)})

    assert report.accepted == sorted(NAMES)
    # Whether a party's update was clipped depends on its data: not released under DP.
    assert not {"clipped_parties", "fraction_clipped"} & set(report.privacy)
    assert report.weight_sum == pytest.approx(3.0, abs=1e-6)  # equal weights under DP
    delta = delta_of(fed, ref)
    noise = recorded_noise(fed, rec, mode)
    n = len(NAMES)
    # What reached the aggregate from the 100x party, once the others and the noise are removed.
    from_big = {k: n * delta[k] - small[A][k] - small[B][k] - noise[k] for k in delta}
    assert norm_of(from_big) <= CLIP * (1 + 2e-3)
    assert norm_of(from_big) >= CLIP * (1 - 2e-3)  # scaled to the clip, in its own direction
    unit = {k: big[k].astype(np.float64) / norm_of(big) for k in big}
    assert max(float(np.max(np.abs(from_big[k] - CLIP * unit[k]))) for k in big) < 5e-6
    # Equivalently: the aggregate moved by at most clip / n because of that party.
    rest = {k: delta[k] - (small[A][k] + small[B][k] + noise[k]) / n for k in delta}
    assert norm_of(rest) <= CLIP / n * (1 + 2e-3)
    assert norm_of(big) / n > 30 * norm_of(rest)  # what an unclipped update would have moved it
    # The noise that was added has the calibrated size on the mean (1344 coordinates).
    # All noise that was added: every share (distributed), or the coordinator's own (central).
    key = "effective_noise_multiplier" + ("_vs_coordinator" if mode == "distributed" else "")
    eff = report.privacy[key]
    sample = np.concatenate([v.ravel() for v in noise.values()])
    assert sample.std() == pytest.approx(eff * CLIP, rel=0.1)


@pytest.mark.parametrize("mode", ["distributed", "central"])
def test_dp_round_reports_privacy_and_commits_the_ledger(
    tmp_path: Path, model_cache: Path, mode: str
) -> None:
    fed = make_fed(tmp_path, model_cache, dp(mode, 1.0, max_epsilon=100.0))
    charged = charged_multiplier(fed.cfg, len(NAMES), fed.plan.protection["values"])
    norms = {A: 0.5 * CLIP, B: 2 * CLIP, C: 0.9 * CLIP}
    updates = {p: (state_update(fed, i, norms[p]), 50) for i, p in enumerate(NAMES)}
    reservation = reserve(fed, 1)
    assert reservation.noise_multiplier == pytest.approx(charged, rel=1e-12)
    ref, report, _ = fed.round(1, updates)

    privacy = report.privacy
    one_round = epsilon([GaussianEvent(charged, 1.0, 1)], DELTA, "rdp")
    assert privacy["mode"] == mode
    assert privacy["epsilon"] > 0
    assert privacy["epsilon"] == pytest.approx(one_round, rel=1e-9)
    assert privacy["party_epsilon"] == pytest.approx({p: one_round for p in NAMES}, rel=1e-9)
    assert "fraction_clipped" not in privacy and "clipped_parties" not in privacy
    assert privacy["clip"] == CLIP and privacy["delta"] == DELTA
    assert privacy["noise_std"] == pytest.approx(1.0 * CLIP)
    assert privacy["noise_multiplier"] == pytest.approx(charged, rel=1e-12)
    assert privacy["ledger_rounds"] == 1
    if mode == "distributed":
        assert charged < 1.0
        # m=2, c=1: each party adds the full variance; 3 contributors, one of them curious.
        assert privacy["effective_noise_multiplier"] == pytest.approx(math.sqrt(2))
        assert privacy["effective_noise_multiplier_vs_coordinator"] == pytest.approx(math.sqrt(3))
        assert privacy["colluding"] == 1 and privacy["contributors"] == 3
        assert report.secagg["bits"] == dp_value_spec(fed.cfg, len(NAMES)).bits
    else:
        assert charged == pytest.approx(1.0, rel=1e-3) and charged < 1.0  # rounding slack
        assert privacy["effective_noise_multiplier"] == 1.0
        # The coordinator unmasks the exact sum: no noise stands against it in central mode.
        assert privacy["effective_noise_multiplier_vs_coordinator"] == 0.0
    ledger = load_ledger(fed.cfg, fed.exchange, coordinator_keys(fed.cfg, fed.exchange))
    entry = ledger.entry(f"{fed.plan.run_id}/r0001")
    assert entry is not None and entry.status == "spent"
    assert entry.parties == sorted(NAMES) and entry.global_sha256 == ref.sha256

    # A second round composes with the first.
    reserve(fed, 2)
    _, report2, _ = fed.round(2, updates)
    two_rounds = epsilon([GaussianEvent(charged, 1.0, 1)] * 2, DELTA, "rdp")
    assert report2.privacy["epsilon"] == pytest.approx(two_rounds, rel=1e-9)
    assert report2.privacy["ledger_rounds"] == 2


def test_dp_round_with_a_dropout_charges_only_the_contributors(
    tmp_path: Path, model_cache: Path
) -> None:
    fed = make_fed(tmp_path, model_cache, dp("distributed", 1.0))
    reserve(fed, 1)
    updates = {p: (state_update(fed, i, CLIP / 2), 50) for i, p in enumerate(NAMES)}
    ref, report, _ = fed.round(1, updates, drop={C: "upload"})
    assert report.accepted == [A, B]
    privacy = report.privacy
    assert set(privacy["party_epsilon"]) == {A, B}
    # Two survivors of min_contributors=2: against the other survivor, exactly the calibrated
    # noise (its own share subtracted); against the coordinator, both shares.
    assert privacy["effective_noise_multiplier"] == pytest.approx(1.0)
    assert privacy["effective_noise_multiplier_vs_coordinator"] == pytest.approx(math.sqrt(2))
    entry = load_ledger(fed.cfg, fed.exchange, coordinator_keys(fed.cfg, fed.exchange)).entry(
        f"{fed.plan.run_id}/r0001"
    )
    assert entry is not None and entry.parties == [A, B]


def test_distributed_round_below_min_contributors_publishes_nothing(
    tmp_path: Path, model_cache: Path
) -> None:
    fed = make_fed(tmp_path, model_cache, dp("distributed", 1.0, min_contributors=3))
    reserve(fed, 1)
    updates = {p: (state_update(fed, i, CLIP / 2), 50) for i, p in enumerate(NAMES)}
    with pytest.raises(AggregationError, match="privacy.min_contributors=3"):
        fed.round(1, updates, drop={C: "upload"})
    assert not fed.exchange.exists(global_adapter_key(fed.plan.run_id, 1))


def test_round_without_privacy_reports_no_privacy(tmp_path: Path, model_cache: Path) -> None:
    fed = make_fed(tmp_path, model_cache, None)
    assert fed.cfg.privacy.enabled is False
    updates = {p: (state_update(fed, i, 1.0), 50) for i, p in enumerate(NAMES)}
    _, report, _ = fed.round(1, updates)  # no reservation needed when privacy is off
    assert report.privacy == {}
    assert not fed.exchange.exists(LEDGER_KEY)


@pytest.mark.parametrize("mode", ["distributed", "central"])
def test_aggregation_without_reservation_is_refused(
    tmp_path: Path, model_cache: Path, mode: str
) -> None:
    fed = make_fed(tmp_path, model_cache, dp(mode, 1.0))
    updates = {p: (state_update(fed, i, CLIP / 2), 50) for i, p in enumerate(NAMES)}
    with pytest.raises(AggregationError, match="no privacy-budget reservation"):
        fed.round(1, updates)
    assert not fed.exchange.exists(global_adapter_key(fed.plan.run_id, 1))
    assert fed.exchange.exists(global_adapter_key(fed.plan.run_id, 0))
    # A reservation for another round does not count for this one. (Round 1 itself cannot be
    # retried: its parties uploaded once and refuse a second upload under new masks.)
    reserve(fed, 3)
    with pytest.raises(AggregationError, match="no privacy-budget reservation"):
        fed.round(2, updates)
    assert not fed.exchange.exists(global_adapter_key(fed.plan.run_id, 2))


@pytest.mark.parametrize(
    ("party_privacy", "reason"),
    [
        (dp("distributed", 1.0, clip=0.1), "with clip 0.1, not 'distributed' with 0.05"),
        (dp("central", 1.0), "privacy mode 'central' with clip 0.05, not 'distributed'"),
        (None, "privacy mode None with clip None"),
    ],
)
def test_upload_under_other_privacy_settings_is_rejected(
    tmp_path: Path,
    model_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    party_privacy: dict | None,
    reason: str,
) -> None:
    raw = federation_dict(tmp_path, model_cache, NAMES, privacy=dp("distributed", 1.0))
    fed = Federation(raw)
    other_raw = copy.deepcopy(raw)
    if party_privacy is None:
        other_raw.pop("privacy")
    else:
        other_raw["privacy"] = party_privacy
    other = parse_federation(other_raw)
    accept_anything(other, C)  # C agrees to anything: the coordinator's check is what's tested
    upload = party_role.upload

    def upload_with_own_settings(cfg, party, *args, **kwargs):
        return upload(other if party.name == C else cfg, party, *args, **kwargs)

    monkeypatch.setattr(party_role, "upload", upload_with_own_settings)
    reserve(fed, 1)
    updates = {p: (state_update(fed, i, CLIP / 2), 50) for i, p in enumerate(NAMES)}
    ref, report, _ = fed.round(1, updates)
    assert report.accepted == [A, B]
    rejection = next(r.reason for r in report.rejected if r.party == C)
    assert "update was made under" in rejection and reason in rejection
    assert set(report.privacy["party_epsilon"]) == {A, B}


def test_upload_with_a_smaller_noise_share_is_rejected(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = federation_dict(tmp_path, model_cache, NAMES, privacy=dp("distributed", 1.0))
    fed = Federation(raw)
    other_raw = copy.deepcopy(raw)
    other_raw["privacy"] = dp("distributed", 0.01)  # same mode and clip, 100x less noise
    other = parse_federation(other_raw)
    accept_anything(other, C)  # C agrees to anything: the coordinator's check is what's tested
    upload = party_role.upload

    def upload_with_own_settings(cfg, party, *args, **kwargs):
        return upload(other if party.name == C else cfg, party, *args, **kwargs)

    monkeypatch.setattr(party_role, "upload", upload_with_own_settings)
    reserve(fed, 1)
    updates = {p: (state_update(fed, i, CLIP / 2), 50) for i, p in enumerate(NAMES)}
    _, report, _ = fed.round(1, updates)
    assert C not in report.accepted
    rejection = next(r.reason for r in report.rejected if r.party == C)
    assert "noise share of std" in rejection and "below this round's" in rejection


def test_contributor_outside_the_reservation_publishes_nothing(
    tmp_path: Path, model_cache: Path
) -> None:
    fed = make_fed(tmp_path, model_cache, dp("central", 1.0))
    reserve(fed, 1, parties=[A, B])
    updates = {p: (state_update(fed, i, CLIP / 2), 50) for i, p in enumerate(NAMES)}
    with pytest.raises(CloudfedError):
        fed.round(1, updates)
    assert not fed.exchange.exists(global_adapter_key(fed.plan.run_id, 1))
