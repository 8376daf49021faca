"""Buffered asynchronous rounds: the virtual clock's schedule, staleness discounts, the
coordinator's window of accepted base adapters, and secure aggregation over each buffer.

Protected rounds run in-process through `tests.protected_support.Federation`, stage by stage as
the pipeline wires them; a party's update names the published version it was trained from.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloudfed.aggregation.composed import strategy_for
from cloudfed.aggregation.fedbuff import (
    Arrival,
    Event,
    clock,
    drive,
    durations,
    schedule,
    schedule_for,
    synchronous,
)
from cloudfed.aggregation.staleness import StalenessSettings
from cloudfed.aggregation.strategy import PartyStats, RoundInfo, mean_from_sums
from cloudfed.errors import AggregationError, ConfigError
from cloudfed.federation import load_run_config, parse_federation
from cloudfed.protection.messages import load_global
from tests.protected_support import Federation, federation_dict

A, B, C = NAMES = ("a-fast", "b-fast", "c-slow")
# federation_dict trains 1 step x batch 2 x 64 tokens = 128 tokens: 1 virtual second at scale 1.
CLOCK = {"tokens_per_second": 128.0}


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def raw(tmp_path: Path, model_cache: Path, buffer: dict[str, Any] | None, **over: Any) -> dict:
    fed = federation_dict(tmp_path, model_cache, NAMES, **over)
    fed["parties"][2]["compute_scale"] = 5.0
    fed["aggregation"] = {"buffer": None if buffer is None else {**CLOCK, **buffer}}
    return fed


def arrivals(event: Event) -> list[tuple[str, int, int, float, float]]:
    return [(a.party, a.base, a.staleness, a.started, a.arrived) for a in event.arrivals]


# --- the virtual clock ----------------------------------------------------------------------------


def test_schedule_of_speeds_1_1_5_with_a_buffer_of_2(tmp_path: Path, model_cache: Path) -> None:
    cfg = parse_federation(raw(tmp_path, model_cache, {"size": 2, "max_staleness": 5}, rounds=8))
    plan = schedule_for(cfg)
    # The fast pair fills every buffer until the slow party's first update lands at t=5, one
    # arrival after buffer 5 filled: it joins buffer 6 with tau = (6 - 1) - 0 = 5. b-fast,
    # arriving at t=6 just after buffer 6 filled, is late: buffer 7, tau 1.
    fast = [[(A, r - 1, 0, r - 1.0, float(r)), (B, r - 1, 0, r - 1.0, float(r))] for r in (1, 2)]
    assert [arrivals(e) for e in plan.events] == [
        *fast,
        [(A, 2, 0, 2.0, 3.0), (B, 2, 0, 2.0, 3.0)],
        [(A, 3, 0, 3.0, 4.0), (B, 3, 0, 3.0, 4.0)],
        [(A, 4, 0, 4.0, 5.0), (B, 4, 0, 4.0, 5.0)],
        [(C, 0, 5, 0.0, 5.0), (A, 5, 0, 5.0, 6.0)],
        [(B, 5, 1, 5.0, 6.0), (A, 6, 0, 6.0, 7.0)],
        [(A, 7, 0, 7.0, 8.0), (B, 7, 0, 7.0, 8.0)],
    ]
    assert [e.round for e in plan.events] == list(range(1, 9))
    assert [e.at for e in plan.events] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert [e.seconds for e in plan.events] == [1.0] * 8
    assert plan.event(6).restarts == (C, A) and plan.total_seconds == 8.0
    assert clock(plan.event(6)) == {
        "virtual_seconds": 1.0,
        "virtual_seconds_total": 6.0,
        "staleness_max": 5.0,
        "staleness_mean": 2.5,
        "dropped_stale": 0.0,
    }
    # Synchronous rounds on the same clock wait for the slowest party: 5 s each.
    sync = synchronous(durations(cfg), rounds=cfg.rounds)  # the buffered config's clock
    assert [e.at for e in sync.events][:3] == [5.0, 10.0, 15.0]
    assert {a.party for a in sync.event(2).arrivals} == set(NAMES)


def test_an_update_staler_than_max_staleness_is_dropped_and_its_party_restarts() -> None:
    plan = schedule({A: 1.0, B: 1.0, C: 5.0}, size=2, max_staleness=4, rounds=7)
    sixth = plan.event(6)
    assert sixth.dropped == (Arrival(C, 0, 0.0, 5.0, 5),)
    assert [(a.party, a.base) for a in sixth.arrivals] == [(A, 5), (B, 5)]
    # c-slow restarted at t=5 from global 5; its next update is 5 s away, past round 7.
    assert all(C not in {a.party for a in e.arrivals} for e in plan.events)


def test_a_resumed_run_restarts_the_clock_from_its_first_version() -> None:
    plan = schedule({A: 1.0, B: 2.0, C: 3.0}, size=2, max_staleness=3, rounds=5, start_round=3)
    assert [e.round for e in plan.events] == [4, 5]
    assert [(a.party, a.base, a.staleness) for a in plan.event(4).arrivals] == [
        (A, 3, 0),
        (B, 3, 0),
    ]
    assert [(a.party, a.base, a.staleness) for a in plan.event(5).arrivals] == [
        (A, 4, 0),
        (C, 3, 1),
    ]


def test_drive_trains_each_arrival_from_the_version_it_started_from() -> None:
    plan = schedule({A: 1.0, B: 1.0, C: 5.0}, size=2, max_staleness=5, rounds=6)
    seen: list[tuple[str, int, float]] = []

    def train(a: Arrival, round: int, base: float) -> float:
        seen.append((a.party, round, base))
        return 1.0

    globals_ = drive(plan, 0.0, train, lambda event, ups: float(event.round) * 10)
    assert globals_ == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    assert (C, 6, 0.0) in seen and (A, 6, 50.0) in seen


def test_a_buffer_larger_than_the_parties_or_below_min_parties_is_refused(
    tmp_path: Path, model_cache: Path
) -> None:
    with pytest.raises(ConfigError, match=r"aggregation\.buffer\.size=4 must lie between"):
        parse_federation(raw(tmp_path, model_cache, {"size": 4}))
    with pytest.raises(ConfigError, match=r"aggregation.buffer.size.*Fix: use a buffer size"):
        parse_federation(raw(tmp_path, model_cache, {"size": 1}))
    with pytest.raises(AggregationError, match="needs between 2 and the 2 parties"):
        schedule({A: 1.0, B: 1.0}, size=3, max_staleness=1, rounds=2)


# --- staleness discounts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "a", "b", "taus", "expected"),
    [
        ("constant", 0.5, 4.0, (0, 1, 7), (1.0, 1.0, 1.0)),
        ("polynomial", 0.5, 4.0, (0, 3, 8, 15), (1.0, 0.5, 1 / 3, 0.25)),
        ("polynomial", 1.0, 4.0, (0, 1, 4), (1.0, 0.5, 0.2)),
        ("hinge", 0.5, 2.0, (0, 2, 4, 10), (1.0, 1.0, 0.5, 0.2)),
        ("hinge", 2.0, 0.0, (0, 1, 3), (1.0, 1 / 3, 1 / 7)),
    ],
)
def test_staleness_functions(function: str, a: float, b: float, taus, expected) -> None:
    settings = StalenessSettings(function=function, a=a, b=b)
    assert [settings.discount(t) for t in taus] == pytest.approx(list(expected), abs=1e-15)


def test_a_negative_staleness_is_an_error() -> None:
    with pytest.raises(AggregationError, match="staleness -1 must be a whole number"):
        StalenessSettings().discount(-1)


def test_weighted_mean_with_staleness_discounts(tmp_path: Path, model_cache: Path) -> None:
    """(1 x 1 + 0.5 x 4) / (1 + 0.5) = 2: a's fresh update, c's three versions stale."""
    cfg = parse_federation(
        raw(tmp_path, model_cache, {"size": 2, "max_staleness": 4}, privacy={"dp_sgd": {}})
    )
    strategy = strategy_for(cfg, {"w": (2,)})
    info = RoundInfo(5, private=False)
    one = strategy.contribution({"w": np.ones(2)}, PartyStats(examples=1000, staleness=0), info)
    four = strategy.contribution({"w": np.full(2, 4.0)}, PartyStats(1000, staleness=3), info)
    assert (one.weights, four.weights) == ((1.0,), (0.5,))
    sums = {"w": one.tensors["w"] + four.tensors["w"]}
    mean = mean_from_sums(sums, np.add(one.weights, four.weights), strategy.slots)
    assert mean["w"].tolist() == [2.0, 2.0]


def test_a_stale_update_is_discounted_once_when_the_weighting_has_its_own_discount(
    tmp_path: Path, model_cache: Path
) -> None:
    """The staleness preset's s(tau) replaces the buffer's; they never multiply."""
    fed = raw(tmp_path, model_cache, {"size": 2, "max_staleness": 4})
    fed["aggregation"]["buffer"]["staleness"] = {"function": "polynomial", "a": 0.5}
    fed["aggregation"]["weighting"] = {
        "preset": "staleness",
        "staleness": {"function": "polynomial", "a": 1.0},
    }
    strategy = strategy_for(parse_federation(fed), {"w": (2,)})
    info = RoundInfo(5, private=False)
    stale = strategy.contribution({"w": np.ones(2)}, PartyStats(examples=1000, staleness=3), info)
    assert stale.weights == (pytest.approx(1 / 4),)  # (1+3)^-1, not also (1+3)^-0.5
    fed["aggregation"]["weighting"] = {"preset": "examples"}
    strategy = strategy_for(parse_federation(fed), {"w": (2,)})
    stale = strategy.contribution({"w": np.ones(2)}, PartyStats(examples=1000, staleness=3), info)
    assert stale.weights == (pytest.approx(1 / 2),)  # the buffer's (1+3)^-0.5


def test_no_staleness_discount_takes_a_weight_below_the_public_floor(
    tmp_path: Path, model_cache: Path
) -> None:
    """A launcher's steep discount (a = 60: 2^-60 at tau 1) would make the fresh party's update
    the whole aggregate; the weight stops at min_weight, which each party's policy bounds."""
    fed = raw(tmp_path, model_cache, {"size": 2, "max_staleness": 4})
    fed["aggregation"]["buffer"]["staleness"] = {"function": "polynomial", "a": 60.0}
    strategy = strategy_for(parse_federation(fed), {"w": (2,)})
    info = RoundInfo(5, private=False)
    stale = strategy.contribution({"w": np.ones(2)}, PartyStats(examples=1000, staleness=1), info)
    assert stale.weights == (pytest.approx(1 / 1000),)  # 1 / protection.weight_cap


# --- protected buffered rounds -------------------------------------------------------------------


def const(fed: Federation, value: float, examples: int = 100):
    return (fed.const(value), examples)


def test_stale_updates_within_the_window_are_accepted_and_older_ones_refused(
    tmp_path: Path, model_cache: Path
) -> None:
    fed = Federation(raw(tmp_path, model_cache, {"size": 2, "max_staleness": 1}, rounds=4))
    fed.round(1, {A: const(fed, 0.01), B: const(fed, 0.03)})
    v1 = fed.global_state()
    # Round 2: a trained from v1 (tau 0), c from v0 (tau 1, within max_staleness 1).
    ref, report, _ = fed.round(2, {A: const(fed, 0.02), C: const(fed, 0.04)}, bases={A: 1, C: 0})
    assert report.accepted == [A, C] and report.rejected == []
    assert fed.last_upload_rosters[0].parties == [A, C]  # the secagg group is the buffer
    s1 = 2**-0.5  # polynomial a=0.5 at tau 1
    assert report.weight_sum == pytest.approx(0.1 + 0.1 * s1, abs=1e-6)
    got = load_global(fed.exchange, ref)
    want = (0.02 + s1 * 0.04) / (1 + s1)
    assert max(float(np.max(np.abs(got[n] - v1[n] - want))) for n in got) < 1e-6
    # Round 3: b's update from v0 is two versions stale. An honest b refuses to send it...
    _, report, _ = fed.round(
        3, {A: const(fed, 0.01), B: const(fed, 0.5), C: const(fed, 0.03)}, bases={A: 2, B: 0, C: 1}
    )
    assert report.accepted == [A, C]
    assert {r.party: r.reason for r in report.rejected}[B] == (
        "dropped at upload: an update trained from global version 0 cannot be sent in round 3: "
        "staleness 2 lies outside 0..aggregation.buffer.max_staleness=1"
    )
    # ... and the coordinator refuses it by its base adapter, even when b's record claims the
    # current version (so that b would weigh it as fresh): the round goes on with a and c.
    fed.versions[99] = fed.versions[0].model_copy(update={"round": 3})
    ref, report, _ = fed.round(
        4, {A: const(fed, 0.01), B: const(fed, 0.5), C: const(fed, 0.03)}, bases={A: 3, B: 99, C: 2}
    )
    assert report.accepted == [A, C]
    assert {r.party: r.reason for r in report.rejected}[B] == (
        "update was trained from global version 0: staleness 3 exceeds "
        "aggregation.buffer.max_staleness=1 (too stale, dropped)"
    )
    v3 = load_global(fed.exchange, fed.versions[3])
    got = load_global(fed.exchange, ref)
    want = (0.01 + s1 * 0.03) / (1 + s1)  # b's 0.5 is nowhere in the mean
    assert max(float(np.max(np.abs(got[n] - v3[n] - want))) for n in got) < 1e-6


def test_an_update_from_an_adapter_never_published_is_refused(
    tmp_path: Path, model_cache: Path
) -> None:
    fed = Federation(raw(tmp_path, model_cache, {"size": 2, "max_staleness": 3}))
    fed.round(1, {A: const(fed, 0.01), B: const(fed, 0.02)})
    forged = fed.current.model_copy(update={"sha256": "0" * 64, "round": 0})
    fed.versions[0] = forged  # a's record names an adapter nobody published
    _, report, _ = fed.round(
        2, {A: const(fed, 0.01), B: const(fed, 0.02), C: const(fed, 0.03)}, bases={A: 0}
    )
    assert report.accepted == [B, C]
    assert (
        "did not publish in this generation"
        in dict((r.party, r.reason) for r in report.rejected)[A]
    )


def test_synchronous_rounds_still_refuse_an_update_from_the_previous_adapter(
    tmp_path: Path, model_cache: Path
) -> None:
    fed = Federation(raw(tmp_path, model_cache, None))
    fed.round(1, {A: const(fed, 0.01), B: const(fed, 0.02), C: const(fed, 0.03)})
    _, report, _ = fed.round(
        2, {A: const(fed, 0.01), B: const(fed, 0.02), C: const(fed, 0.03)}, bases={C: 0}
    )
    assert report.accepted == [A, B]
    assert {r.party: r.reason for r in report.rejected}[C] == (
        "update was trained from another global adapter (stale or replayed)"
    )


@pytest.mark.parametrize("examples", [(10, 10), (10, 900)])
def test_a_curious_co_contributor_learns_only_the_public_discount_under_dp(
    tmp_path: Path, model_cache: Path, examples: tuple[int, int]
) -> None:
    """Two-party buffer under DP-SGD: a subtracts its own weight from the released weight sum.

    What it reads must be c's public discount s(tau), the same whatever c's example count.
    """
    dp = {n: {"noise_multiplier": 1.0, "max_epsilon": 50.0} for n in NAMES}
    fed = Federation(
        raw(tmp_path, model_cache, {"size": 2, "max_staleness": 3}, privacy={"dp_sgd": dp})
    )
    fed.round(1, {A: const(fed, 0.01), B: const(fed, 0.02)})
    fed.round(2, {A: const(fed, 0.01), B: const(fed, 0.02)}, bases={A: 1, B: 1})
    _, report, _ = fed.round(
        3, {A: const(fed, 0.01, examples[0]), C: const(fed, 0.02, examples[1])}, bases={A: 2, C: 0}
    )
    learned = report.weight_sum - 1.0  # a's own weight: uniform under DP, fresh update
    assert learned == pytest.approx(3**-0.5, abs=1e-6)  # s(2) = (1 + 2)^-0.5, public
    assert not math.isclose(learned, examples[1] / 1000)


def test_the_async_demo_config_and_its_mlflow_keys() -> None:
    from tests.e2e_support import REPO_ROOT
    from tests.mlflow_keys import unlisted

    cfg = load_run_config(REPO_ROOT / "configs" / "async.yaml")
    assert cfg.protection.default == "secagg" and cfg.aggregation.buffer is not None
    assert cfg.aggregation.buffer.size == 2 and cfg.party("insurer-azure").compute_scale == 5.0
    plan = schedule_for(cfg)
    # 30 steps x 32 x 128 tokens at 1000 tokens/s: 122.88 virtual seconds a round, 614.4 for the
    # slow party, whose first update joins round 6, five versions stale.
    assert [e.seconds for e in plan.events] == pytest.approx([122.88] * 6)
    assert [(a.party, a.base, a.staleness) for a in plan.event(6).arrivals] == [
        ("insurer-azure", 0, 5),
        ("bank-gcp", 5, 0),
    ]
    assert not unlisted([f"round/{k}" for k in clock(plan.event(6))])
