"""Privacy accounting: Opacus's accountants, noise calibration from a target, config refusals.

The cross-check numbers are the ones Opacus's own test suite uses for its RDP and PRV accountants
(noise 1.5, sampling rate 0.04, 2250 steps, delta 1e-5): cloudfed must report exactly what Opacus
reports, never a hand-rolled approximation.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudfed.errors import ConfigError
from cloudfed.federation import parse_federation
from cloudfed.privacy.accountant import GaussianEvent, epsilon, noise_for_target
from cloudfed.privacy.party_level import round_noise_multiplier

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE = "configs/x.yaml"
PREFIX = "parameters.federation"
DELTA = 1e-5
OPACUS_EVENT = GaussianEvent(1.5, 0.04, 2250)


def base_federation() -> dict[str, Any]:
    """The shipped local federation with privacy off (its own privacy block is not under test)."""
    doc = yaml.safe_load((REPO_ROOT / "configs/local.yaml").read_text(encoding="utf-8"))
    raw = copy.deepcopy(doc["parameters"]["federation"])
    raw.pop("privacy", None)
    return raw


def with_privacy(privacy: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    raw = base_federation()
    raw["privacy"] = privacy
    raw.update(overrides)
    return raw


def refusal(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as err:
        parse_federation(raw, source=SOURCE)
    return str(err.value)


# --- the accountants against Opacus's own reference numbers ----------------------------------


def test_rdp_matches_opacus_reference() -> None:
    assert epsilon([OPACUS_EVENT], DELTA, "rdp") == pytest.approx(7.33, abs=0.02)


def test_prv_matches_opacus_reference() -> None:
    assert epsilon([OPACUS_EVENT], DELTA, "prv") == pytest.approx(6.78, abs=0.02)


def test_prv_is_never_looser_than_rdp() -> None:
    for event in (OPACUS_EVENT, GaussianEvent(1.0, 1.0, 3), GaussianEvent(0.8, 0.01, 500)):
        assert epsilon([event], DELTA, "prv") <= epsilon([event], DELTA, "rdp"), event


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_split_history_composes_like_one_event(accountant: str) -> None:
    whole = epsilon([OPACUS_EVENT], DELTA, accountant)
    parts = [GaussianEvent(1.5, 0.04, s) for s in (1000, 750, 500)]
    assert sum(p.steps for p in parts) == OPACUS_EVENT.steps
    assert epsilon(parts, DELTA, accountant) == pytest.approx(whole, rel=1e-6)
    # One party-level round per event (q = 1): k single steps are one event of k steps.
    rounds = [GaussianEvent(2.0, 1.0, 1)] * 5
    assert epsilon(rounds, DELTA, accountant) == pytest.approx(
        epsilon([GaussianEvent(2.0, 1.0, 5)], DELTA, accountant), rel=1e-6
    )


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_heterogeneous_history_is_order_free_and_exceeds_each_part(accountant: str) -> None:
    a, b = GaussianEvent(1.0, 1.0, 2), GaussianEvent(1.2, 0.05, 200)
    ab = epsilon([a, b], DELTA, accountant)
    assert ab == pytest.approx(epsilon([b, a], DELTA, accountant), rel=1e-6)
    assert ab > max(epsilon([a], DELTA, accountant), epsilon([b], DELTA, accountant))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_empty_history_spends_nothing(accountant: str) -> None:
    assert epsilon([], DELTA, accountant) == 0.0
    assert epsilon(iter(()), DELTA, accountant) == 0.0


def test_epsilon_grows_with_steps_and_shrinks_with_noise() -> None:
    by_steps = [epsilon([GaussianEvent(1.0, 1.0, s)], DELTA, "rdp") for s in (1, 2, 5, 20)]
    assert by_steps == sorted(by_steps) and len(set(by_steps)) == len(by_steps)
    by_noise = [epsilon([GaussianEvent(z, 1.0, 3)], DELTA, "rdp") for z in (0.5, 1.0, 2.0, 8.0)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == len(by_noise)
    by_rate = [epsilon([GaussianEvent(1.0, q, 100)], DELTA, "prv") for q in (0.01, 0.05, 0.2)]
    assert by_rate == sorted(by_rate)


def test_smaller_delta_costs_more_epsilon() -> None:
    assert epsilon([OPACUS_EVENT], 1e-7, "rdp") > epsilon([OPACUS_EVENT], 1e-5, "rdp")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"noise_multiplier": 0.0}, "noise multiplier"),
        ({"noise_multiplier": float("nan")}, "noise multiplier"),
        ({"sample_rate": 0.0}, "sample rate"),
        ({"sample_rate": 1.5}, "sample rate"),
        ({"steps": 0}, "steps"),
    ],
)
def test_gaussian_event_refuses_meaningless_mechanisms(kwargs: dict, fragment: str) -> None:
    args = {"noise_multiplier": 1.0, "sample_rate": 1.0, "steps": 1, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        GaussianEvent(**args)


@pytest.mark.parametrize("delta", [0.0, 1.0, 2.0])
def test_epsilon_refuses_delta_outside_unit_interval(delta: float) -> None:
    with pytest.raises(ValueError, match="delta"):
        epsilon([GaussianEvent(1.0, 1.0, 1)], delta, "rdp")


# --- noise from a target ---------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize(
    ("target", "sample_rate", "steps"),
    [(4.0, 1.0, 3), (1.0, 1.0, 1), (2.0, 0.02, 300)],
)
def test_noise_for_target_meets_the_target(
    accountant: str, target: float, sample_rate: float, steps: int
) -> None:
    z = noise_for_target(target, DELTA, sample_rate=sample_rate, steps=steps, accountant=accountant)
    assert z > 0
    spent = epsilon([GaussianEvent(z, sample_rate, steps)], DELTA, accountant)
    assert spent <= target
    assert spent >= 0.98 * target  # not wastefully noisy
    # ...and clearly less noise would not meet it.
    less = epsilon([GaussianEvent(0.9 * z, sample_rate, steps)], DELTA, accountant)
    assert less > target


def test_noise_for_target_needs_more_noise_for_a_tighter_target() -> None:
    loose = noise_for_target(8.0, DELTA, sample_rate=1.0, steps=3, accountant="rdp")
    tight = noise_for_target(1.0, DELTA, sample_rate=1.0, steps=3, accountant="rdp")
    assert tight > loose


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_unreachable_target_is_a_config_error_naming_the_field(accountant: str) -> None:
    what = "privacy.dp_sgd.alpha-aws.target_epsilon"
    with pytest.raises(ConfigError) as err:
        noise_for_target(1e-7, DELTA, sample_rate=1.0, steps=1, accountant=accountant, what=what)
    msg = str(err.value)
    assert msg.startswith(f"{what}=1e-07")
    assert "delta=1e-05" in msg and "1 step(s)" in msg and "Fix:" in msg
    with pytest.raises(ConfigError, match=r"^privacy\.target_epsilon="):
        noise_for_target(1e-7, DELTA, sample_rate=1.0, steps=1, accountant=accountant)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_round_noise_multiplier_meets_target_over_the_planned_rounds(accountant: str) -> None:
    raw = with_privacy(
        {"mode": "central", "target_epsilon": 3.0, "max_epsilon": 8.0, "accountant": accountant},
        rounds=4,
    )
    cfg = parse_federation(raw, source=SOURCE)
    z = round_noise_multiplier(cfg)
    spent = epsilon([GaussianEvent(z, 1.0, 4)], DELTA, accountant)
    assert 0.98 * 3.0 <= spent <= 3.0
    fixed = parse_federation(
        with_privacy({"mode": "central", "noise_multiplier": 1.7, "max_epsilon": 8.0}),
        source=SOURCE,
    )
    assert round_noise_multiplier(fixed) == 1.7
    with pytest.raises(ValueError, match="off"):
        round_noise_multiplier(parse_federation(base_federation(), source=SOURCE))


# --- config refusals -------------------------------------------------------------------------

CENTRAL = {"mode": "central", "noise_multiplier": 1.0, "max_epsilon": 8.0}


def test_privacy_off_by_default_and_valid_dp_configs_parse() -> None:
    assert parse_federation(base_federation(), source=SOURCE).privacy.enabled is False
    for privacy in (
        CENTRAL,
        {"mode": "distributed", "target_epsilon": 4.0, "max_epsilon": 8.0, "accountant": "prv"},
        {**CENTRAL, "min_contributors": 3},
        {"dp_sgd": {"bank-gcp": {"target_epsilon": 3.0, "max_epsilon": 6.0}}},
    ):
        cfg = parse_federation(with_privacy(privacy), source=SOURCE)
        assert cfg.privacy.mode == privacy.get("mode", "off")
    ckks_rule = {"rules": [{"pattern": "*lora_A*", "mode": "ckks"}]}
    cfg = parse_federation(
        with_privacy({**CENTRAL, "mode": "distributed"}, protection=ckks_rule), source=SOURCE
    )
    assert cfg.privacy.mode == "distributed"


IMPOSSIBLE = [
    # (privacy block, field path, a fragment of the problem, a fragment of the fix)
    (
        {"mode": "central", "target_epsilon": 0, "max_epsilon": 8.0},
        "privacy.target_epsilon",
        "epsilon <= 0",
        "positive epsilon",
    ),
    (
        {"mode": "central", "target_epsilon": -1.0, "max_epsilon": 8.0},
        "privacy.target_epsilon",
        "positive finite",
        "positive epsilon",
    ),
    (
        {**CENTRAL, "delta": 1.0},
        "privacy.delta",
        "strictly between 0 and 1",
        "delta strictly between 0 and 1",
    ),
    (
        {**CENTRAL, "delta": 3.5},
        "privacy.delta",
        "delta >= 1",
        "delta strictly between 0 and 1",
    ),
    (
        {**CENTRAL, "delta": 0.0},
        "privacy.delta",
        "strictly between 0 and 1",
        "delta strictly between 0 and 1",
    ),
    ({**CENTRAL, "max_epsilon": 0}, "privacy.max_epsilon", "epsilon <= 0", "positive, finite"),
    (
        {**CENTRAL, "max_epsilon": -2.0},
        "privacy.max_epsilon",
        "positive finite",
        "positive, finite",
    ),
    (
        {**CENTRAL, "max_epsilon": float("inf")},
        "privacy.max_epsilon",
        "positive finite",
        "positive, finite",
    ),
    (
        {**CENTRAL, "noise_multiplier": 0},
        "privacy.noise_multiplier",
        "greater than 0",
        "positive noise multiplier",
    ),
    (
        {"dp_sgd": {"bank-gcp": {"target_epsilon": 0}}},
        "privacy.dp_sgd.bank-gcp.target_epsilon",
        "epsilon <= 0",
        "positive epsilon",
    ),
    (
        {"dp_sgd": {"bank-gcp": {"noise_multiplier": 1.0, "delta": 1.0}}},
        "privacy.dp_sgd.bank-gcp.delta",
        "strictly between 0 and 1",
        "delta strictly between 0 and 1",
    ),
    (
        {"dp_sgd": {"bank-gcp": {"noise_multiplier": 1.0, "max_epsilon": -1}}},
        "privacy.dp_sgd.bank-gcp.max_epsilon",
        "positive finite",
        "positive, finite",
    ),
]


@pytest.mark.parametrize(("privacy", "field", "problem", "fix"), IMPOSSIBLE)
def test_impossible_target_is_refused_naming_file_field_and_fix(
    privacy: dict, field: str, problem: str, fix: str
) -> None:
    msg = refusal(with_privacy(privacy))
    assert msg.startswith(f"{SOURCE}:")
    assert f"{PREFIX}.{field}:" in msg
    assert problem in msg
    assert "Fix:" in msg and fix in msg


STRUCTURAL = [
    # (privacy block, field path, the message's statement)
    (
        {"mode": "central", "noise_multiplier": 1.0},
        "privacy",
        "mode central needs a finite budget: set max_epsilon",
    ),
    (
        {"mode": "distributed", "target_epsilon": 2.0},
        "privacy",
        "mode distributed needs a finite budget: set max_epsilon",
    ),
    (
        {**CENTRAL, "target_epsilon": 2.0},
        "privacy",
        "needs exactly one of noise_multiplier and target_epsilon",
    ),
    (
        {"mode": "distributed", "max_epsilon": 8.0},
        "privacy",
        "needs exactly one of noise_multiplier and target_epsilon",
    ),
    (
        {"mode": "central", "target_epsilon": 9.0, "max_epsilon": 8.0},
        "privacy",
        "target_epsilon 9.0 exceeds max_epsilon 8.0",
    ),
    ({"noise_multiplier": 1.0}, "privacy", "mode is off"),
    (
        {"dp_sgd": {"bank-gcp": {"noise_multiplier": 1.0, "target_epsilon": 2.0}}},
        "privacy.dp_sgd.bank-gcp",
        "exactly one of noise_multiplier and target_epsilon",
    ),
    (
        {"dp_sgd": {"bank-gcp": {"max_grad_norm": 1.0}}},
        "privacy.dp_sgd.bank-gcp",
        "exactly one of noise_multiplier and target_epsilon",
    ),
]


@pytest.mark.parametrize(("privacy", "field", "statement"), STRUCTURAL)
def test_inconsistent_privacy_block_is_refused(privacy: dict, field: str, statement: str) -> None:
    msg = refusal(with_privacy(privacy))
    assert msg.startswith(f"{SOURCE}:")
    assert f"{PREFIX}.{field}:" in msg
    assert statement in msg and "Fix:" in msg


def test_distributed_with_a_plaintext_rule_is_refused() -> None:
    protection = {
        "rules": [{"pattern": "*v_proj.lora_B*", "mode": "plaintext"}],
        "public_tensors": ["*v_proj.lora_B*"],
    }
    msg = refusal(with_privacy({**CENTRAL, "mode": "distributed"}, protection=protection))
    assert msg.startswith(f"{SOURCE}:") and "Fix:" in msg
    assert "privacy.mode distributed" in msg and "plaintext" in msg
    # The same policy is fine when the coordinator adds the noise centrally.
    cfg = parse_federation(with_privacy(CENTRAL, protection=protection), source=SOURCE)
    assert cfg.privacy.mode == "central"
    # A plaintext default counts like a plaintext rule.
    msg = refusal(
        with_privacy(
            {**CENTRAL, "mode": "distributed"},
            protection={"default": "plaintext", "public_tensors": ["*"]},
        )
    )
    assert "plaintext" in msg


def test_unknown_dp_sgd_party_is_refused() -> None:
    msg = refusal(with_privacy({"dp_sgd": {"pharmacy-oci": {"noise_multiplier": 1.0}}}))
    assert msg.startswith(f"{SOURCE}:") and "Fix:" in msg
    assert "privacy.dp_sgd names unknown parties ['pharmacy-oci']" in msg


@pytest.mark.parametrize(
    ("min_contributors", "min_parties", "statement"),
    [
        (5, 2, "privacy.min_contributors=5 must lie between min_parties=2 and the 3"),
        (2, 3, "privacy.min_contributors=2 must lie between min_parties=3 and the 3"),
    ],
)
def test_min_contributors_out_of_range_is_refused(
    min_contributors: int, min_parties: int, statement: str
) -> None:
    raw = with_privacy({**CENTRAL, "min_contributors": min_contributors}, min_parties=min_parties)
    msg = refusal(raw)
    assert msg.startswith(f"{SOURCE}:") and "Fix:" in msg
    assert statement in msg


def test_min_contributors_below_two_names_its_field() -> None:
    msg = refusal(with_privacy({**CENTRAL, "min_contributors": 1}))
    assert f"{PREFIX}.privacy.min_contributors:" in msg
    assert "Fix: use a count between min_parties and the number of parties" in msg


def test_unknown_privacy_key_is_refused_with_its_path() -> None:
    msg = refusal(with_privacy({**CENTRAL, "epsilon": 3.0}))
    assert f"{PREFIX}.privacy.epsilon:" in msg and "did you mean 'max_epsilon'?" in msg


@pytest.mark.parametrize(
    "privacy",
    [
        {"dp_sgd": {"pharmacy-oci": {"noise_multiplier": 1.0}}},
        {**CENTRAL, "min_contributors": 5},
    ],
)
def test_federation_level_privacy_refusal_has_a_usable_fix(privacy: dict) -> None:
    msg = refusal(with_privacy(privacy))
    assert "correct ''" not in msg
