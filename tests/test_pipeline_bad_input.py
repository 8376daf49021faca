"""Bad input through `zenml pipeline run`: stops before training, names file and field.

A configuration error stops the run whichever command starts it: each refused configuration goes
through `python -m cloudfed.preflight` and the real pipeline, which must both exit 2 with the same
message, before any party trains or any budget is charged. Three parties with min_parties 2, so a
party merely excluded would let the run go on: the stop is the configuration error's own.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudfed.data.demo import generate_demo
from tests.e2e_support import (
    BIN,
    REPO_ROOT,
    federation,
    make_project,
    party_env,
    run_pipeline,
    write_config,
)

pytestmark = pytest.mark.e2e
PARTIES = ["hospital-aws", "bank-gcp", "insurer-azure"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("bad")
    clouds = work / "clouds"
    generate_demo(clouds, seed=5, train_rows=60, eval_rows=10)
    return {"work": work, "clouds": clouds, "project": make_project(work / "project")}


def _run(setup: dict, name: str, fed: dict):
    config = write_config(setup["work"] / f"{name}.yaml", fed)
    proc = run_pipeline(setup["project"], config, timeout=300)
    return config, proc, proc.stdout + proc.stderr


def _assert_stopped_before_training(out: str, setup: dict) -> None:
    assert "Traceback" not in out, out[-4000:]
    assert "train_" not in out, "a training step started"
    assert "privacy_reserve" not in out, "a round's privacy spend was reserved"
    assert not list(setup["clouds"].glob("*/storage/updates/*")), "an update was written"
    assert not list(setup["work"].rglob("ledger*.json")), "a privacy ledger was written"


def _missing_raw_file(fed: dict, setup: dict) -> list[str]:
    missing = setup["clouds"] / "bank-gcp" / "raw" / "nowhere.jsonl"
    fed["parties"][1]["raw"]["train"] = str(missing)
    return [f"{missing}: raw train file of party 'bank-gcp' not found", "Fix:"]


def _party_matching_no_data(fed: dict, setup: dict) -> list[str]:
    fed["parties"][0]["name"] = "hospitel-aws"  # its mapping and files are hospital-aws's
    return [
        "party: 'hospital-aws' but the run configuration uses this file for party 'hospitel-aws'",
        "Fix: if the party is 'hospital-aws', correct parties[hospitel-aws].name",
    ]


def _typo_key(fed: dict, setup: dict) -> list[str]:
    fed["training"]["lerning_rate"] = fed["training"].pop("learning_rate")
    return [
        "parameters.federation.training.lerning_rate: ",
        "Fix: did you mean 'learning_rate'? Rename 'lerning_rate' to 'learning_rate'.",
    ]


def _budget_below_one_round(fed: dict, setup: dict) -> list[str]:
    fed["privacy"] = {"mode": "central", "noise_multiplier": 0.8, "max_epsilon": 1.0, "clip": 0.1}
    return [
        "parameters.federation.privacy.max_epsilon: 1 is smaller than one round's spend",
        "Fix: raise privacy.max_epsilon to at least",
    ]


def _unloadable_base_model(fed: dict, setup: dict) -> list[str]:
    fed["base_model"] = "acme/no-such-model"  # HF_HUB_OFFLINE=1 (tests/conftest.py, Makefile)
    return [
        "parameters.federation.base_model: hub model 'acme/no-such-model' is not in the Hugging "
        "Face cache",
        "HF_HUB_OFFLINE=1 is set (the Makefile sets it",
        "HF_HUB_OFFLINE=0 .venv/bin/hf download acme/no-such-model",
    ]


REFUSED: dict[str, Callable[[dict[str, Any], dict], list[str]]] = {
    "missing_raw_file": _missing_raw_file,
    "party_matching_no_data": _party_matching_no_data,
    "typo_key": _typo_key,
    "budget_below_one_round": _budget_below_one_round,
    "unloadable_base_model": _unloadable_base_model,
}


def _assert_refused_like_preflight(setup: dict, config: Path, expected: list[str]) -> None:
    pre = subprocess.run(
        [str(BIN / "python"), "-m", "cloudfed.preflight", str(config)],
        cwd=setup["project"],
        env=party_env(setup["project"], config),
        capture_output=True,
        text=True,
        timeout=300,
    )
    message = pre.stderr.strip()
    assert pre.returncode == 2, pre.stdout + pre.stderr
    assert message.startswith("cloudfed: ") and "Traceback" not in message, message
    for text in expected:
        assert text in message, message

    proc = run_pipeline(setup["project"], config, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    assert message in out, f"preflight said:\n{message}\npipeline said:\n{out[-4000:]}"
    _assert_stopped_before_training(out, setup)


@pytest.mark.parametrize("case", list(REFUSED))
def test_rejected_config_matrix_stops_like_preflight(setup: dict, case: str) -> None:
    fed = federation(setup["work"], setup["clouds"], PARTIES)
    expected = REFUSED[case](fed, setup)
    config = write_config(setup["work"] / f"{case}.yaml", fed)
    _assert_refused_like_preflight(setup, config, expected)


def test_misspelt_parameters_block_stops_like_preflight(setup: dict) -> None:
    """ZenML passes no parameters from a misspelt block; the pipeline then reads the file."""
    fed = federation(setup["work"], setup["clouds"], PARTIES)
    config = setup["work"] / "paramters.yaml"
    config.write_text(yaml.safe_dump({"enable_cache": False, "paramters": {"federation": fed}}))
    expected = ["parameters.federation is missing. Fix: did you mean 'parameters'?"]
    _assert_refused_like_preflight(setup, config, expected)


def test_negative_learning_rate(setup: dict) -> None:
    fed = federation(setup["work"], setup["clouds"], PARTIES)
    fed["training"]["learning_rate"] = -0.1
    config, proc, out = _run(setup, "neg_lr", fed)
    assert proc.returncode == 2, out[-4000:]
    assert f"{config}: " in out
    assert "parameters.federation.training.learning_rate" in out
    assert "Fix: use a positive learning rate" in out
    _assert_stopped_before_training(out, setup)


def test_mapping_names_unknown_column(setup: dict) -> None:
    mapping = setup["work"] / "hospital-aws.yaml"
    text = (REPO_ROOT / "data_contracts/sources/hospital-aws.yaml").read_text()
    mapping.write_text(text.replace("response: answer", "response: answer_text"))
    fed = federation(setup["work"], setup["clouds"], PARTIES)
    fed["parties"][0]["mapping"] = str(mapping)
    _, proc, out = _run(setup, "unknown_col", fed)
    assert proc.returncode == 2, out[-4000:]
    assert "answer_text" in out and str(mapping) in out
    _assert_stopped_before_training(out, setup)


def test_launcher_cannot_point_parties_at_policies_of_its_own(setup: dict) -> None:
    """A run config may set environment variables for every step; a party refuses CLOUDFED_*."""
    fed = federation(setup["work"], setup["clouds"], PARTIES)
    evil = setup["work"] / "launcher-policies"
    config = setup["work"] / "evil_env.yaml"
    doc = {
        "enable_cache": False,
        "environment": {"CLOUDFED_PARTY_POLICIES": str(evil)},
        "parameters": {"federation": fed},
    }
    config.write_text(yaml.safe_dump(doc))
    proc = run_pipeline(setup["project"], config, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    for party in PARTIES:
        assert f"{party} refuses a run configuration that sets ['CLOUDFED_PARTY_POLICIES']" in out
    assert "fewer than min_parties" in out
    _assert_stopped_before_training(out, setup)
