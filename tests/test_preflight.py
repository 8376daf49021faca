"""What preflight refuses without a party's data, and how a party reports its source's state.

The pipeline runs the same functions (`check_config` in its body, `prepare_dataset` in each
harmonise step), so these messages are the ones `zenml pipeline run` prints too; the end-to-end
matrix is in tests/test_pipeline_bad_input.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudfed.data.demo import generate_demo
from cloudfed.data.tokens import count_utf8_bytes
from cloudfed.errors import CloudfedError, ConfigError
from cloudfed.federation import FederationConfig, parse_federation
from cloudfed.party import prepare_dataset
from cloudfed.party_policy import provision
from cloudfed.preflight import check_config, check_party_source
from cloudfed.privacy.accountant import GaussianEvent, epsilon
from cloudfed.training.model import base_model_problem
from tests.e2e_support import federation

PARTIES = ["hospital-aws", "bank-gcp"]


def _cfg(tmp_path: Path, **overrides: object) -> FederationConfig:
    return parse_federation(federation(tmp_path, tmp_path / "clouds", PARTIES, **overrides))


# --- base_model -----------------------------------------------------------------------------


def test_builtin_and_saved_folders_are_loadable(tmp_path: Path) -> None:
    assert base_model_problem("builtin:tiny-llama", root=tmp_path) is None
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert base_model_problem("model", root=tmp_path) is None
    assert base_model_problem(str(tmp_path / "model"), root=Path("/")) is None


@pytest.mark.parametrize(
    ("base_model", "says"),
    [
        ("builtin:huge-llama", "'builtin:huge-llama' is not a built-in model"),
        ("./models/missing", "models/missing not found"),
        ("not a hub id!", "neither an existing local folder nor a valid Hugging Face hub id"),
        ("empty", "is a folder without config.json"),
    ],
)
def test_unloadable_base_model_names_the_problem(tmp_path: Path, base_model: str, says) -> None:
    (tmp_path / "empty").mkdir()
    problem = base_model_problem(base_model, root=tmp_path)
    assert problem is not None and says in problem and "Fix:" in problem


def test_hub_id_offline_must_be_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline (the Makefile's HF_HUB_OFFLINE=1) only a cached hub model can load; say how to
    fetch one. Online a hub id is taken on trust: checking it would need the network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    problem = base_model_problem("acme/llm-1b", root=tmp_path)
    assert problem is not None
    assert "not in the Hugging Face cache" in problem and str(tmp_path / "hub") in problem
    assert "HF_HUB_OFFLINE=1 is set (the Makefile sets it" in problem
    assert "HF_HUB_OFFLINE=0 .venv/bin/hf download acme/llm-1b" in problem

    snapshot = tmp_path / "hub" / "models--acme--llm-1b" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--acme--llm-1b" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--llm-1b" / "refs" / "main").write_text("abc123")
    assert base_model_problem("acme/llm-1b", root=tmp_path) is None

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert base_model_problem("acme/other-model", root=tmp_path) is None


def test_check_config_names_file_and_field_of_base_model(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, base_model=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError) as err:
        check_config(cfg, "configs/x.yaml", tmp_path)
    assert str(err.value).startswith("configs/x.yaml: parameters.federation.base_model: ")
    assert f"local model folder {tmp_path / 'nowhere'} not found" in str(err.value)


# --- budgets --------------------------------------------------------------------------------


def test_party_level_budget_below_one_round_is_refused(tmp_path: Path) -> None:
    privacy = {"mode": "central", "noise_multiplier": 0.8, "max_epsilon": 1.0, "clip": 0.1}
    cfg = _cfg(tmp_path, privacy=privacy)
    one_round = epsilon([GaussianEvent(0.8, 1.0, 1)], 1e-5, "rdp")
    assert one_round > 1.0  # the premise: this budget cannot afford a single round
    with pytest.raises(ConfigError) as err:
        check_config(cfg, "configs/x.yaml", tmp_path)
    msg = str(err.value)
    assert msg.startswith("configs/x.yaml: parameters.federation.privacy.max_epsilon: 1 is ")
    assert f"costs epsilon {one_round:.4g}" in msg
    assert f"Fix: raise privacy.max_epsilon to at least {one_round:.4g}" in msg

    enough = _cfg(tmp_path, privacy={**privacy, "max_epsilon": round(one_round + 0.01, 2)})
    check_config(enough, "configs/x.yaml", tmp_path)


def test_dp_sgd_budget_below_one_round_is_refused(tmp_path: Path) -> None:
    dp = {"noise_multiplier": 0.6, "sample_rate": 0.5, "max_epsilon": 2.0}
    cfg = _cfg(tmp_path, privacy={"dp_sgd": {"bank-gcp": dp}})
    one_round = epsilon([GaussianEvent(0.6, 0.5, cfg.training.local_steps)], 1e-5, "rdp")
    assert one_round > 2.0
    with pytest.raises(ConfigError) as err:
        check_config(cfg, "configs/x.yaml", tmp_path)
    msg = str(err.value)
    assert "parameters.federation.privacy.dp_sgd.bank-gcp.max_epsilon: 2 is smaller" in msg
    assert f"cost epsilon {one_round:.4g}" in msg
    # Without a fixed sample_rate the spend depends on the party's record count: not refused here.
    unknown_rate = {"noise_multiplier": 0.6, "max_epsilon": 2.0}
    check_config(
        _cfg(tmp_path, privacy={"dp_sgd": {"bank-gcp": unknown_rate}}), "configs/x.yaml", tmp_path
    )


# --- a party's source, in its own cloud -------------------------------------------------------


@pytest.fixture(scope="module")
def clouds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clouds")
    generate_demo(out, seed=9, train_rows=60, eval_rows=10)
    return out


def _party_cfg(tmp_path: Path, clouds: Path, **overrides: object) -> FederationConfig:
    return parse_federation(federation(tmp_path, clouds, PARTIES, **overrides))


def _prepare(cfg: FederationConfig, party: str, root: Path):
    return prepare_dataset(
        cfg, cfg.party(party), None, root=root, run_id="t", count_tokens=count_utf8_bytes
    )


def test_missing_raw_file_is_a_config_error_with_preflights_message(
    tmp_path: Path, clouds: Path
) -> None:
    fed = federation(tmp_path, clouds, PARTIES)
    missing = tmp_path / "nowhere.jsonl"
    fed["parties"][1]["raw"]["train"] = str(missing)
    cfg = parse_federation(fed)
    provision(cfg)
    with pytest.raises(CloudfedError) as err:
        check_party_source(cfg, cfg.party("bank-gcp"), tmp_path)
    ref = _prepare(cfg, "bank-gcp", tmp_path)
    assert ref.status == "config-error" and not ref.ok
    assert ref.message == str(err.value)
    assert f"{missing}: raw train file of party 'bank-gcp' not found. Fix:" in ref.message
    assert not (clouds / "bank-gcp" / "storage" / "harmonised").exists()


def test_party_named_for_no_mapping_is_a_config_error(tmp_path: Path, clouds: Path) -> None:
    fed = federation(tmp_path, clouds, PARTIES)
    fed["parties"][0]["name"] = "hospitel-aws"
    cfg = parse_federation(fed)
    provision(cfg)
    ref = _prepare(cfg, "hospitel-aws", tmp_path)
    assert ref.status == "config-error"
    assert "party: 'hospital-aws' but the run configuration uses this file for party " in (
        ref.message
    )
    assert "Fix: if the party is 'hospital-aws', correct parties[hospitel-aws].name" in ref.message


def test_unfit_mapping_under_dp_reports_no_data_details(tmp_path: Path, clouds: Path) -> None:
    """The first rows are read to check the mapping; under DP what they showed stays home."""
    from tests.e2e_support import REPO_ROOT

    mapping = tmp_path / "hospital-aws.yaml"
    text = (REPO_ROOT / "data_contracts/sources/hospital-aws.yaml").read_text()
    mapping.write_text(text.replace("response: answer", "response: answer_text"))
    fed = federation(tmp_path, clouds, PARTIES)
    fed["parties"][0]["mapping"] = str(mapping)
    plain = parse_federation(fed)
    provision(plain)
    detailed = _prepare(plain, "hospital-aws", tmp_path)
    assert detailed.status == "config-error" and "'answer_text'" in detailed.message
    assert "columns present" in detailed.message

    fed["privacy"] = {"dp_sgd": {"hospital-aws": {"noise_multiplier": 1.0, "sample_rate": 0.1}}}
    private = parse_federation(fed)
    provision(private, force=True)
    ref = _prepare(private, "hospital-aws", tmp_path)
    assert ref.status == "config-error"
    assert "do not fit its source mapping" in ref.message and str(mapping) in ref.message
    assert "answer" not in ref.message.replace(str(mapping), "") and "question" not in ref.message


def test_contract_failure_is_a_data_outcome_and_refusal_excludes(
    tmp_path: Path, clouds: Path
) -> None:
    from tests.e2e_support import REPO_ROOT

    mapping = tmp_path / "bank-gcp.yaml"
    text = (REPO_ROOT / "data_contracts/sources/bank-gcp.yaml").read_text()
    mapping.write_text(text.replace("domain: banking", "domain: retail"))
    fed = federation(tmp_path, clouds, PARTIES)
    fed["parties"][1]["mapping"] = str(mapping)
    cfg = parse_federation(fed)
    ref = _prepare(cfg, "bank-gcp", tmp_path)  # no policy provisioned yet: the party declines
    assert ref.status == "refused" and "no party policy" in ref.message
    provision(cfg)
    ref = _prepare(cfg, "bank-gcp", tmp_path)
    assert ref.status == "data-failed"
    assert "expect_column_values_to_be_in_set(domain)" in ref.message
    ok = _prepare(cfg, "hospital-aws", tmp_path)
    assert ok.status == "ok" and ok.message == "" and ok.rows_accepted > 0

    fed["privacy"] = {"dp_sgd": {"hospital-aws": {"noise_multiplier": 1.0, "sample_rate": 0.1}}}
    private = parse_federation(fed)
    provision(private, force=True)
    released = _prepare(private, "hospital-aws", tmp_path)  # under DP: redacted, still ok
    assert released.ok and released.redacted and released.rows_accepted == 0
    failed = _prepare(private, "bank-gcp", tmp_path)
    assert failed.status == "data-failed" and "60 of 60" not in failed.message
