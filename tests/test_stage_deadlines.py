"""Stage deadlines, folded stages and the light step operator, without ZenML.

The pipeline hands `StageWindow` ZenML's step futures; here the "futures" are fakes driven by a
fake coordinator clock, so every test is exact and takes no wall time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cloudfed.deadlines import LateAnswers, StageDeadlines, StageWindow
from cloudfed.errors import ConfigError
from cloudfed.federation import HEAVY_PARTY_STEPS, parse_federation
from cloudfed.party.admission import FAULT_DELAY_ENV, injected_delay
from cloudfed.protection.stages import (
    FOLDED_INTO,
    Stage,
    check_folding,
    party_steps,
    round_stages,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODES = (["secagg"], ["ckks"], ["secagg", "ckks"], ["plaintext"], ["secagg", "plaintext"])


class Clock:
    """The coordinator's clock: moves only when the window sleeps."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds


@dataclass
class Step:
    """A party step that ends at `ends` on the coordinator's clock (None: never)."""

    clock: Clock
    ends: float | None

    def running(self) -> bool:
        return self.ends is None or self.clock() < self.ends


def _window(clock: Clock, stage: str = "upload", seconds: float = 10.0) -> StageWindow:
    return StageWindow(stage, 1, seconds, clock=clock, sleep=clock.sleep)


def test_window_returns_once_everyone_answered_before_the_deadline() -> None:
    clock = Clock()
    steps = {"a": Step(clock, 101.0), "b": Step(clock, 103.0)}
    finished, dropped, late = _window(clock).collect(steps)
    assert set(finished) == {"a", "b"} and dropped == [] and late == {}
    assert clock.now < 104.0  # it did not sit out the deadline


def test_party_still_running_at_the_deadline_is_dropped_with_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    steps = {"a": Step(clock, 102.0), "slow": Step(clock, 130.0), "hung": Step(clock, None)}
    window = _window(clock, "share_keys", 10.0)
    with caplog.at_level(logging.WARNING, logger="cloudfed.deadlines"):
        finished, dropped, late = window.collect(steps)
    assert list(finished) == ["a"]
    assert [(r.party, r.reason) for r in dropped] == [
        ("hung", "missed the share_keys deadline"),
        ("slow", "missed the share_keys deadline"),
    ]
    assert set(late) == {"hung", "slow"}
    assert clock.now == pytest.approx(110.0)  # closed at the deadline, not later
    assert window.closed_at == pytest.approx(110.0)
    assert "party slow dropped: missed the share_keys deadline (10 s)" in caplog.text


def test_answer_observed_after_the_close_is_late_even_if_written_before() -> None:
    """Lateness is the coordinator's observation: a step that ends exactly at the deadline, or
    whose own clock says it was on time, still counts as late once the window has closed."""
    clock = Clock()
    steps = {"edge": Step(clock, 110.0)}
    finished, dropped, _ = _window(clock).collect(steps)
    assert finished == {} and [r.party for r in dropped] == ["edge"]


def test_late_answers_are_refused_when_they_come_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    slow, hung = Step(clock, 125.0), Step(clock, None)
    window = _window(clock)
    _, _, late = window.collect({"a": Step(clock, 101.0), "slow": slow, "hung": hung})
    tracker = LateAnswers(clock=clock)
    tracker.add(window, late)
    assert tracker.sweep() == []  # nothing came in yet
    clock.now = 127.5
    with caplog.at_level(logging.WARNING, logger="cloudfed.deadlines"):
        came = tracker.sweep()
    assert [(r.party, r.reason) for r in came] == [
        ("slow", "late upload refused: observed 17.5 s after the round 1 upload stage closed")
    ]
    assert "party slow: late upload refused" in caplog.text
    assert tracker.sweep() == []  # refused once
    assert tracker.still_running() == ["hung (upload, round 1)"]
    assert [r.party for r in tracker.refused] == ["slow"]
    assert tracker.drain(30.0, sleep=clock.sleep) == ["hung (upload, round 1)"]
    assert clock.now == pytest.approx(157.5)  # a bounded wait for a step that never ends


def test_deadline_defaults_and_validation() -> None:
    d = StageDeadlines()
    assert d.seconds("train") > d.seconds("upload") > 0
    with pytest.raises(KeyError):
        d.seconds("advertise")  # runs inside the training step: no deadline of its own
    raw = yaml.safe_load((REPO_ROOT / "configs/local.yaml").read_text())["parameters"]["federation"]
    raw["deadlines"] = {"train": 60, "upload": 5.5}
    cfg = parse_federation(raw)
    assert cfg.deadlines.seconds("train") == 60 and cfg.deadlines.seconds("upload") == 5.5
    assert cfg.deadlines.seconds("unmask") == StageDeadlines().unmask
    for bad, field, fix in (
        ({"upload": 0}, "deadlines.upload", "positive number of seconds"),
        ({"share_keys": 10**7}, "deadlines.share_keys", "at most 604800"),
        ({"uplaod": 5}, "deadlines.uplaod", "did you mean 'upload'?"),
    ):
        raw["deadlines"] = bad
        with pytest.raises(ConfigError) as err:
            parse_federation(raw, source="configs/x.yaml")
        assert f"parameters.federation.{field}" in str(err.value), err.value
        assert fix in str(err.value), err.value


@pytest.mark.parametrize("modes", MODES)
def test_folded_stages_follow_their_host_and_reservation_precedes_training(modes) -> None:
    for privacy in (False, True):
        stages = round_stages(modes, privacy=privacy)
        check_folding(stages)
        if privacy:
            assert stages.index(Stage.RESERVE) < stages.index(Stage.TRAIN)
        if Stage.ADVERTISE in stages:  # the keys roster reads every advertisement
            assert stages.index(Stage.ADVERTISE) < stages.index(Stage.KEYS_ROSTER)
        steps = party_steps(modes, privacy=privacy)
        assert [s for step in steps for s in step] == [
            s for s in stages if s in {x for step in steps for x in step}
        ]


def test_check_folding_refuses_a_stage_between_host_and_folded() -> None:
    stages = [Stage.TRAIN, Stage.CKKS_KEYGEN, Stage.ADVERTISE, Stage.KEYS_ROSTER]
    with pytest.raises(ValueError, match="advertise runs inside the train step"):
        check_folding(stages)
    assert FOLDED_INTO == {Stage.ADVERTISE: Stage.TRAIN}


def test_party_steps_per_round() -> None:
    """A secure-aggregation round: 5 party steps per party instead of 6 (advertise folded)."""
    assert party_steps(["secagg"], privacy=False) == [
        (Stage.TRAIN, Stage.ADVERTISE),
        (Stage.SHARE_KEYS,),
        (Stage.UPLOAD,),
        (Stage.UNMASK,),
        (Stage.EVALUATE,),
    ]
    assert len(party_steps(["ckks"], privacy=True)) == 3


def test_light_step_operator_runs_only_the_protocol_stages() -> None:
    raw = yaml.safe_load((REPO_ROOT / "configs/local.yaml").read_text())["parameters"]["federation"]
    raw["parties"][0]["step_operator"] = "sagemaker"
    raw["parties"][0]["light_step_operator"] = "eks-pod"
    raw["parties"][1]["step_operator"] = "vertex"
    cfg = parse_federation(raw)
    heavy, light = cfg.parties[0], cfg.parties[1]
    for step in HEAVY_PARTY_STEPS:
        assert heavy.step_operator_for(step) == "sagemaker"
    for stage in (Stage.SHARE_KEYS, Stage.UPLOAD, Stage.UNMASK, Stage.CKKS_DECRYPT):
        assert heavy.step_operator_for(stage) == "eks-pod"
        assert light.step_operator_for(stage) == "vertex"  # no light operator: its own
    assert cfg.parties[2].step_operator_for("train") is None  # local orchestrator


def test_fault_delay_hook_reads_only_its_party_and_stage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []
    monkeypatch.setattr("cloudfed.party.admission.time.sleep", slept.append)
    monkeypatch.setenv(FAULT_DELAY_ENV, "bank-gcp:upload:2.5, hospital-aws:train:1")
    assert injected_delay("bank-gcp", "upload", 1) == 2.5
    assert injected_delay("bank-gcp", "train", 1) == 0.0
    assert injected_delay("insurer-azure", "upload", 1) == 0.0
    assert slept == [2.5]
    monkeypatch.setenv(FAULT_DELAY_ENV, "bank-gcp:upload:soon")
    with pytest.raises(ValueError, match="not party:stage:seconds"):
        injected_delay("bank-gcp", "upload", 1)
