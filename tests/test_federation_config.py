from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cloudfed.errors import ConfigError
from cloudfed.federation import load_run_config, parse_federation

REPO_ROOT = Path(__file__).resolve().parents[1]


def _local() -> dict:
    doc = yaml.safe_load((REPO_ROOT / "configs/local.yaml").read_text())
    return doc["parameters"]["federation"]


def test_local_config_is_valid() -> None:
    cfg = load_run_config(REPO_ROOT / "configs/local.yaml")
    assert [p.name for p in cfg.parties] == ["hospital-aws", "bank-gcp", "insurer-azure"]
    assert cfg.rounds == 4 and cfg.min_parties == 2
    assert all(p.step_operator is None for p in cfg.parties)


@pytest.mark.parametrize(
    ("path", "value", "field", "fix"),
    [
        (("rounds",), 0, "parameters.federation.rounds", "at least 1"),
        (
            ("training", "learning_rate"),
            -0.001,
            "parameters.federation.training.learning_rate",
            "positive learning rate",
        ),
        (
            ("participants",),
            ["hospital-aws", "pharmacy-oci"],
            "parameters.federation",
            "pharmacy-oci",
        ),
        (("min_parties",), 5, "parameters.federation", "min_parties"),
        (("lora", "rnak"), 4, "parameters.federation.lora.rnak", "did you mean 'rank'?"),
        (("lora", "zzz"), 4, "parameters.federation.lora.zzz", "remove 'zzz'"),
    ],
)
def test_bad_values_name_file_field_and_fix(path, value, field, fix) -> None:
    raw = _local()
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ConfigError) as err:
        parse_federation(raw, source="configs/x.yaml")
    msg = str(err.value)
    assert msg.startswith("configs/x.yaml:")
    assert field in msg and fix in msg and "Fix:" in msg


@pytest.mark.parametrize(
    ("path", "meant"),
    [
        (("trainig",), "training"),
        (("parties", 0, "stroage"), "storage"),
        (("protection", "secagg", "trheshold"), "threshold"),
        (("privacy", "dp_sgd", "bank-gcp", "sample_rat"), "sample_rate"),
    ],
)
def test_typo_key_gets_the_closest_key_at_its_level(path, meant) -> None:
    """The suggestion comes from the block the key sits in, through lists and dp_sgd names."""
    raw = _local()
    raw["privacy"] = {"dp_sgd": {"bank-gcp": {"noise_multiplier": 1.0}}}
    target = raw
    for key in path[:-1]:
        target = target.setdefault(key, {}) if isinstance(key, str) else target[key]
    target[path[-1]] = 1
    with pytest.raises(ConfigError) as err:
        parse_federation(raw, source="configs/x.yaml")
    field = "parameters.federation" + "".join(
        f"[{k}]" if isinstance(k, int) else f".{k}" for k in path
    )
    assert f"{field}: " in str(err.value)
    assert f"Fix: did you mean '{meant}'? Rename '{path[-1]}' to '{meant}'." in str(err.value)


def test_duplicate_party_names_refused() -> None:
    raw = _local()
    raw["parties"][1]["name"] = "hospital-aws"
    with pytest.raises(ConfigError, match="unique"):
        parse_federation(raw)


def test_fingerprint_changes_with_settings() -> None:
    a = parse_federation(_local())
    raw = _local()
    raw["training"]["local_steps"] += 1
    assert parse_federation(raw).fingerprint() != a.fingerprint()
    assert parse_federation(_local()).fingerprint() == a.fingerprint()


def test_preflight_cli_reports_unknown_party(tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO_ROOT / "configs/local.yaml").read_text())
    doc["parameters"]["federation"]["participants"] = ["hospital-aws", "nope-cloud"]
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    proc = subprocess.run(
        [sys.executable, "-m", "cloudfed.preflight", str(cfg)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert str(cfg) in proc.stderr and "nope-cloud" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_multicloud_example_names_a_step_operator_per_party() -> None:
    cfg = load_run_config(REPO_ROOT / "configs/multicloud.yaml")
    assert {p.cloud: p.step_operator for p in cfg.parties} == {
        "aws": "sagemaker_hospital",
        "gcp": "vertex_bank",
        "azure": "azureml_insurer",
    }
    assert cfg.exchange.startswith("s3://")


@pytest.mark.parametrize(
    ("text", "fix"),
    [
        ("paramters:\n  federation: {}\n", "did you mean 'parameters'? Rename 'paramters'"),
        ("parameters:\n  federaton: {}\n", "did you mean 'federation'? Rename 'federaton'"),
        ("enable_cache: false\n", "add a 'parameters: federation:' block"),
    ],
)
def test_misspelt_parameters_block_gets_the_closest_key(tmp_path: Path, text, fix) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert str(err.value).startswith(f"{path}: parameters.federation is missing. Fix: {fix}")
