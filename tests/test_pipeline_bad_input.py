"""Bad input through `zenml pipeline run`: stops before training, names file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudfed.data.demo import generate_demo
from tests.e2e_support import REPO_ROOT, federation, make_project, run_pipeline, write_config

pytestmark = pytest.mark.e2e
PARTIES = ["hospital-aws", "bank-gcp"]


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


def _assert_stopped_before_training(out: str, clouds: Path) -> None:
    assert "Traceback" not in out, out[-4000:]
    assert "train_" not in out, "a training step started"
    assert not list(clouds.glob("*/storage/updates/*")), "an update was written"


def test_negative_learning_rate(setup: dict) -> None:
    fed = federation(setup["work"], setup["clouds"], PARTIES)
    fed["training"]["learning_rate"] = -0.1
    config, proc, out = _run(setup, "neg_lr", fed)
    assert proc.returncode == 2, out[-4000:]
    assert f"{config}: " in out
    assert "parameters.federation.training.learning_rate" in out
    assert "Fix: use a positive learning rate" in out
    _assert_stopped_before_training(out, setup["clouds"])


def test_missing_raw_file(setup: dict) -> None:
    fed = federation(setup["work"], setup["clouds"], PARTIES)
    missing = setup["clouds"] / "bank-gcp" / "raw" / "nowhere.jsonl"
    fed["parties"][1]["raw"]["train"] = str(missing)
    _, proc, out = _run(setup, "missing", fed)
    assert proc.returncode == 2, out[-4000:]
    assert str(missing) in out and "not found" in out and "Fix:" in out
    _assert_stopped_before_training(out, setup["clouds"])


def test_mapping_names_unknown_column(setup: dict) -> None:
    mapping = setup["work"] / "hospital-aws.yaml"
    text = (REPO_ROOT / "data_contracts/sources/hospital-aws.yaml").read_text()
    mapping.write_text(text.replace("response: answer", "response: answer_text"))
    fed = federation(setup["work"], setup["clouds"], PARTIES)
    fed["parties"][0]["mapping"] = str(mapping)
    _, proc, out = _run(setup, "unknown_col", fed)
    assert proc.returncode == 2, out[-4000:]
    assert "answer_text" in out and str(mapping) in out
    _assert_stopped_before_training(out, setup["clouds"])


def test_launcher_cannot_point_parties_at_policies_of_its_own(setup: dict) -> None:
    """A run config may set environment variables for every step; a party refuses CLOUDFED_*."""
    import yaml

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
    _assert_stopped_before_training(out, setup["clouds"])
