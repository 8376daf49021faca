"""Weighting presets: exact weights per preset, the bounds, config refusals, the MLflow label,
the secure and plaintext paths of `paper`, and what a curious co-contributor learns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloudfed.aggregation.strategy import PartyStats, RoundInfo
from cloudfed.aggregation.weights import WeightingSettings, label, party_weight
from cloudfed.errors import AggregationError, ConfigError
from cloudfed.federation import parse_federation
from cloudfed.tracking import aggregation_label
from tests.attacks import peer_weight
from tests.protected_support import Federation, federation_dict, random_updates

A, B, C = NAMES = ("alpha-aws", "beta-gcp", "gamma-azure")
CAP = 1000  # protection.weight_cap's default
DP_SGD = {n: {"noise_multiplier": 1.0, "max_epsilon": 50.0} for n in NAMES}
PAPER = {
    "preset": "paper",
    "reference_loss": 4.0,
    "reference_examples": 100,
    "reference_bandwidth_mbps": 100.0,
}
# loss 2, 200 examples, 50 Mbit/s, 3 rounds stale.
STATS = PartyStats(examples=200, loss=2.0, bandwidth_mbps=50.0, staleness=3)


def weight(stats: PartyStats = STATS, private: bool = False, **settings: Any) -> float:
    return party_weight(
        WeightingSettings(**settings), stats, RoundInfo(1, private=private), weight_cap=CAP
    )


# --- exact weights per preset --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "private", "want"),
    [
        ({"preset": "uniform"}, False, 1.0),
        ({"preset": "uniform"}, True, 1.0),
        ({"preset": "auto"}, False, 0.2),  # 200 / 1000
        ({"preset": "auto"}, True, 1.0),
        ({"preset": "examples"}, False, 0.2),
        # (2/4) * (200/100)^-1 * (50/100)^-1 = 0.5 * 0.5 * 2
        (PAPER, False, 0.5),
        # alpha 2: 0.5 * 0.5 * (50/100)^-2 = 1.0, exactly the bound
        ({**PAPER, "alpha": 2.0}, False, 1.0),
        # alpha 0: the bandwidth drops out, 0.5 * 0.5
        ({**PAPER, "alpha": 0.0}, False, 0.25),
        ({"preset": "inverse_loss", "reference_loss": 1.0}, False, 0.5),  # (2/1)^-1
        ({"preset": "bandwidth", "reference_bandwidth_mbps": 100.0}, False, 0.5),  # 50/100
        ({"preset": "bandwidth", "reference_bandwidth_mbps": 100.0}, True, 0.5),
        # (200/1000) * (1+3)^-0.5
        ({"preset": "staleness"}, False, 0.1),
        ({"preset": "staleness"}, True, 0.5),  # under DP the count drops out
        ({"preset": "staleness", "staleness": {"function": "constant"}}, False, 0.2),
        (
            {"preset": "staleness", "staleness": {"function": "hinge", "a": 1.0, "b": 1.0}},
            False,
            0.2 / 3,  # 0.2 / (1 (3 - 1) + 1)
        ),
        # (2/4)^2 * (200/800)^0.5 * (50/100)^-1 * 4^-0.5 = 0.25 * 0.5 * 2 * 0.5
        (
            {
                "preset": "custom",
                "exponents": {"loss": 2.0, "examples": 0.5, "bandwidth": -1.0},
                "reference_loss": 4.0,
                "reference_examples": 800,
                "reference_bandwidth_mbps": 100.0,
            },
            False,
            0.125,
        ),
    ],
)
def test_each_preset_gives_its_exact_weight(
    settings: dict[str, Any], private: bool, want: float
) -> None:
    assert weight(private=private, **settings) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(
    ("examples", "want"), [(1, 0.001), (100, 0.1), (999, 0.999), (1000, 1.0), (5000, 1.0)]
)
def test_examples_is_min_examples_cap_over_cap_bit_for_bit(examples: int, want: float) -> None:
    got = weight(PartyStats(examples=examples), preset="examples")
    assert got == min(examples, CAP) / CAP == want


def test_examples_refuses_a_non_positive_count() -> None:
    with pytest.raises(AggregationError, match="example count 0 must be positive"):
        weight(PartyStats(examples=0), preset="examples")


# --- bounds ------------------------------------------------------------------------------------


def test_raw_weights_above_one_clip_to_one() -> None:
    # (2/1) * (200/400)^-1 * (50/100)^-1 = 2 * 2 * 2 = 8: references that let raw exceed 1
    small = {**PAPER, "reference_loss": 1.0, "reference_examples": 400}
    assert weight(**small) == 1.0
    assert weight(PartyStats(examples=10**9), preset="examples") == 1.0


def test_raw_weights_below_min_weight_clip_up_to_it() -> None:
    # 50 / 10^6 = 5e-5, below the default floor 1 / weight_cap
    assert weight(preset="bandwidth", reference_bandwidth_mbps=1e6) == 1 / CAP
    assert weight(preset="bandwidth", reference_bandwidth_mbps=1e6, min_weight=0.01) == 0.01
    # a raw weight above the floor is untouched
    assert weight(preset="bandwidth", reference_bandwidth_mbps=200.0, min_weight=0.01) == 0.25


def test_extreme_exponents_saturate_instead_of_overflowing() -> None:
    huge = {"preset": "custom", "reference_bandwidth_mbps": 100.0}
    up = weight(**huge, exponents={"bandwidth": -1e6})  # (0.5)^-1e6 overflows a float
    down = weight(**huge, exponents={"bandwidth": 1e6})  # (0.5)^1e6 underflows to 0
    assert (up, down) == (1.0, 1 / CAP)
    assert all(0 < w <= 1 for w in (up, down))


@pytest.mark.parametrize("loss", [float("nan"), None, float("inf"), 0.0, -1.0])
def test_an_unusable_loss_counts_as_the_reference(loss: float | None) -> None:
    """NaN comes from DP-SGD rounds whose Poisson batches were all empty: neutral, not fatal."""
    stats = PartyStats(examples=200, loss=loss, bandwidth_mbps=50.0)
    # (4/4) * (200/100)^-1 * (50/100)^-1 = 1.0 * 0.5 * 2
    assert weight(stats, **PAPER) == 1.0
    assert weight(stats, preset="inverse_loss", reference_loss=4.0) == 1.0


def test_a_party_without_bandwidth_cannot_weigh_itself_by_it() -> None:
    with pytest.raises(AggregationError, match=r"bandwidth_mbps None.*parties\[\]\.bandwidth_mbps"):
        weight(PartyStats(examples=200), preset="bandwidth", reference_bandwidth_mbps=100.0)


def test_the_party_refuses_a_data_dependent_weight_under_dp_even_unvalidated() -> None:
    """Defence in depth: a settings object that skipped validation still cannot leak a loss."""
    settings = WeightingSettings.model_construct(**PAPER)
    with pytest.raises(AggregationError, match="preset paper uses the training loss"):
        party_weight(settings, STATS, RoundInfo(1, private=True), weight_cap=CAP)


# --- configuration -------------------------------------------------------------------------------


def config(tmp_path: Path, weighting: dict[str, Any], bandwidths=(100.0, 50.0, 25.0), **kw: Any):
    raw = federation_dict(tmp_path, tmp_path / "models", NAMES, **kw)
    for party, mbps in zip(raw["parties"], bandwidths, strict=True):
        if mbps is not None:
            party["bandwidth_mbps"] = mbps
    raw["aggregation"] = {"weighting": weighting}
    return parse_federation(raw, source="run.yaml")


@pytest.mark.parametrize(
    "weighting",
    [
        PAPER,
        {"preset": "examples"},
        {"preset": "inverse_loss", "reference_loss": 1.0},
        {"preset": "custom", "exponents": {"examples": 0.5}},
    ],
    ids=["paper", "examples", "inverse_loss", "custom"],
)
@pytest.mark.parametrize(
    "privacy",
    [{"dp_sgd": {A: DP_SGD[A]}}, {"mode": "central", "noise_multiplier": 1.0, "max_epsilon": 9}],
    ids=["dp_sgd", "central"],
)
def test_dp_refuses_presets_that_read_loss_or_examples(
    tmp_path: Path, weighting: dict[str, Any], privacy: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError) as err:
        config(tmp_path, weighting, privacy=privacy)
    msg = str(err.value)
    assert f"aggregation.weighting.preset {weighting['preset']} reads" in msg
    assert "Use uniform, bandwidth, staleness or auto" in msg
    assert config(tmp_path, weighting).aggregation.weighting.preset == weighting["preset"]


@pytest.mark.parametrize(
    "weighting",
    [
        {"preset": "auto"},
        {"preset": "uniform"},
        {"preset": "bandwidth", "reference_bandwidth_mbps": 100.0},
        {"preset": "staleness"},
        {"preset": "custom", "exponents": {"bandwidth": -1.0}, "reference_bandwidth_mbps": 10.0},
    ],
)
def test_dp_accepts_presets_of_public_values(tmp_path: Path, weighting: dict[str, Any]) -> None:
    cfg = config(tmp_path, weighting, privacy={"dp_sgd": {A: DP_SGD[A]}})
    assert cfg.privacy.protects_records


def test_a_bandwidth_preset_names_the_party_without_bandwidth(tmp_path: Path) -> None:
    weighting = {"preset": "bandwidth", "reference_bandwidth_mbps": 100.0}
    with pytest.raises(ConfigError, match=r"parties\[1\]\.bandwidth_mbps \(beta-gcp\) is not set"):
        config(tmp_path, weighting, bandwidths=(100.0, None, 25.0))
    # a party outside `participants` needs none
    cfg = config(tmp_path, weighting, bandwidths=(100.0, None, 25.0), participants=[A, C])
    assert cfg.parties[1].bandwidth_mbps is None
    # presets that never read it do not ask for it
    assert config(tmp_path, {"preset": "examples"}, bandwidths=(None, None, None))


@pytest.mark.parametrize(
    ("weighting", "match"),
    [
        ({"preset": "paper"}, r"weighting\.reference_loss \(L0\)"),
        ({**PAPER, "reference_examples": None}, r"weighting\.reference_examples \(D0\)"),
        ({**PAPER, "reference_bandwidth_mbps": None}, r"weighting\.reference_bandwidth_mbps"),
        ({"preset": "custom"}, r"preset custom needs aggregation\.weighting\.exponents"),
        ({"preset": "uniform", "exponents": {"loss": 1}}, r"exponents is read only by preset"),
        ({"preset": "examples", "alpha": 2.0}, r"alpha is read only by preset paper"),
        ({**PAPER, "min_weight": 0.0}, r"min_weight.*greater than 0"),
        ({"preset": "fastest"}, r"preset.*'paper'"),
        ({"preset": "staleness", "staleness": {"function": "cubic"}}, r"staleness\.function"),
    ],
)
def test_bad_weighting_is_a_config_error_naming_the_field(
    tmp_path: Path, weighting: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        config(tmp_path, weighting)


def test_bandwidth_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"parties\[0\]\.bandwidth_mbps: .*greater than 0"):
        config(tmp_path, {"preset": "uniform"}, bandwidths=(0.0, 1.0, 1.0))


# --- the MLflow label ----------------------------------------------------------------------------


def test_label_says_the_preset_and_its_formula(tmp_path: Path) -> None:
    paper = WeightingSettings(**PAPER)
    assert label(paper, False, CAP) == (
        "paper: clip((loss/4)^1 * (examples/100)^-1 * (bandwidth_mbps/100)^-1, 0.001, 1)"
    )
    assert label(WeightingSettings(preset="staleness"), False, CAP) == (
        "staleness: clip((examples/1000)^1 * s(tau), 0.001, 1), s(tau) = (1+tau)^-0.5"
    )
    assert label(WeightingSettings(preset="staleness"), True, CAP) == (
        "staleness: clip(s(tau), 0.001, 1), s(tau) = (1+tau)^-0.5"
    )
    assert label(WeightingSettings(), False, CAP) == "min(examples, 1000) / 1000"
    assert label(WeightingSettings(), True, CAP) == "uniform (any DP)"
    cfg = config(tmp_path, {"preset": "bandwidth", "reference_bandwidth_mbps": 100.0})
    assert aggregation_label(cfg) == (
        "fedavg(weights: bandwidth: clip((bandwidth_mbps/100)^1, 0.001, 1))"
    )


# --- in-process protected rounds -----------------------------------------------------------------


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


EXAMPLES = {A: 100, B: 200, C: 400}
LOSSES = {A: 3.0, B: 2.0, C: 1.0}
MBPS = {A: 100.0, B: 50.0, C: 200.0}
# (L/4) * (100/D) * (100/B): A 0.75 * 1 * 1, B 0.5 * 0.5 * 2, C 0.25 * 0.25 * 0.5
PAPER_WEIGHTS = {A: 0.75, B: 0.5, C: 0.03125}


def fed_with(
    tmp_path: Path, model_cache: Path, names, weighting: dict[str, Any], **kw: Any
) -> Federation:
    raw = federation_dict(tmp_path, model_cache, names, **kw)
    for party in raw["parties"]:
        party["bandwidth_mbps"] = MBPS[party["name"]]
    raw["aggregation"] = {"weighting": weighting}
    return Federation(raw)


def delta(fed: Federation) -> dict[str, np.ndarray]:
    got = fed.global_state()
    return {n: got[n].astype(np.float64) - fed.initial[n].astype(np.float64) for n in got}


def test_paper_preset_secure_and_plaintext_paths_agree(tmp_path: Path, model_cache: Path) -> None:
    runs = {}
    for path, protection in {
        "secagg": {},
        "plaintext": {"default": "plaintext", "public_tensors": ["*"]},
    }.items():
        fed = fed_with(tmp_path / path, model_cache, NAMES, PAPER, protection=protection)
        fed.losses = dict(LOSSES)
        updates = random_updates(fed, EXAMPLES)
        _, report, _ = fed.round(1, updates)
        runs[path] = (fed, updates, report)

    _, updates, plain = runs["plaintext"]
    total = sum(PAPER_WEIGHTS.values())  # 1.28125
    # Weights travel in the clear here; the report gives each one's share of the total.
    assert plain.weights == pytest.approx({p: w / total for p, w in PAPER_WEIGHTS.items()})
    fed, _, secure = runs["secagg"]
    assert secure.weights == {}  # ...and stay inside the sum under secure aggregation
    assert secure.weight_sum == pytest.approx(total, abs=1e-6)
    assert plain.weight_sum == pytest.approx(total, rel=1e-6)

    exact = {
        n: sum(PAPER_WEIGHTS[p] * updates[p][0][n].astype(np.float64) for p in NAMES) / total
        for n in fed.initial
    }
    # Per value: the sum is off by < bound, the weight sum by < bound' (both tiny): /total.
    bound = secure.secagg["quantisation_error_bound"] / total + 1e-7  # + float32 storage
    got = {p: delta(runs[p][0]) for p in runs}
    for n in exact:
        assert np.max(np.abs(got["secagg"][n] - got["plaintext"][n])) < bound
        assert np.max(np.abs(got["plaintext"][n] - exact[n])) < 1e-7
    # Not uniform: weighting moved the mean (a broken preset would give the plain average).
    uniform = {n: sum(updates[p][0][n].astype(np.float64) for p in NAMES) / 3 for n in exact}
    assert max(np.max(np.abs(got["secagg"][n] - uniform[n])) for n in exact) > 1e-3


def test_a_co_contributor_reads_its_peers_paper_weight_without_dp(
    tmp_path: Path, model_cache: Path
) -> None:
    """Without DP the weight sum of a 2-party round hands A its peer's loss-per-example ratio."""
    fed = fed_with(tmp_path, model_cache, (A, B), PAPER)
    fed.losses = {A: LOSSES[A], B: LOSSES[B]}
    _, report, _ = fed.round(1, random_updates(fed, {A: EXAMPLES[A], B: EXAMPLES[B]}))
    own = weight(PartyStats(examples=EXAMPLES[A], loss=LOSSES[A], bandwidth_mbps=MBPS[A]), **PAPER)
    learned = peer_weight(report.weight_sum, own)
    assert learned == pytest.approx(PAPER_WEIGHTS[B], abs=1e-6)
    # w_B = (L_B / 4) * (100 / |D_B|) * (100 / B_B): with B's public bandwidth, A solves for
    # B's private L_B / |D_B| (= 2 / 200).
    ratio = learned * 4.0 / (100 * (100 / MBPS[B]))
    assert ratio == pytest.approx(LOSSES[B] / EXAMPLES[B], rel=1e-5)


@pytest.mark.parametrize(
    "weighting",
    [{"preset": "bandwidth", "reference_bandwidth_mbps": 200.0}, {"preset": "staleness"}],
    ids=["bandwidth", "staleness"],
)
def test_under_dp_the_weight_sum_is_a_function_of_public_config(
    tmp_path: Path, model_cache: Path, weighting: dict[str, Any]
) -> None:
    """Two runs whose peer differs in data (count, loss, update) release the same weight sum."""
    sums = []
    for run, (examples, loss) in enumerate(((10, 0.5), (700, 6.0))):
        fed = fed_with(
            tmp_path / str(run),
            model_cache,
            (A, B),
            weighting,
            privacy={"dp_sgd": {n: DP_SGD[n] for n in (A, B)}},
        )
        fed.losses = {A: 1.0, B: loss}
        _, report, _ = fed.round(1, random_updates(fed, {A: 50, B: examples}, seed=run))
        sums.append(report.weight_sum)
    public = {  # from bandwidth_mbps alone; staleness 0 in a synchronous round: s = 1
        "bandwidth": MBPS[A] / 200 + MBPS[B] / 200,
        "staleness": 2.0,
    }[weighting["preset"]]
    assert sums[0] == pytest.approx(public, abs=1e-6)
    assert sums[1] == pytest.approx(public, abs=1e-6)
    assert abs(sums[0] - sums[1]) < 1e-6


def test_examples_preset_round_is_todays_weighted_mean(tmp_path: Path, model_cache: Path) -> None:
    fed = fed_with(tmp_path, model_cache, NAMES, {"preset": "examples"})
    updates = random_updates(fed, EXAMPLES)
    _, report, _ = fed.round(1, updates)
    assert report.weight_sum == pytest.approx(0.7, abs=1e-6)  # 0.1 + 0.2 + 0.4
    want = {
        n: sum(EXAMPLES[p] / CAP * updates[p][0][n].astype(np.float64) for p in NAMES) / 0.7
        for n in fed.initial
    }
    got = delta(fed)
    assert max(float(np.max(np.abs(got[n] - want[n]))) for n in want) < 1e-6
