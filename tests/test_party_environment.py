"""A party step refuses CLOUDFED_* (and its own key variable) set anywhere in the run config.

Attack: `steps/_party.refuse_launcher_environment` once read only `environment:`; a launcher
could set CLOUDFED_PARTY_POLICIES through Docker settings or a step operator's settings
(`settings["step_operator.sagemaker"].environment`) and point the party at a policy of its own.
"""

from __future__ import annotations

import pytest
import yaml
from zenml import pipeline, step
from zenml.client import Client
from zenml.config import DockerSettings
from zenml.enums import ExecutionStatus
from zenml.integrations.aws.flavors.sagemaker_step_operator_flavor import (
    SagemakerStepOperatorSettings,
)

from cloudfed.party.launcher_env import (
    forbidden,
    party_key_env_var,
    refusal,
    variables_set_by_run_config,
)
from cloudfed.party_policy import policy_path
from steps._party import refuse_launcher_environment

PARTY = "alpha-aws"


def _bad(settings: dict, environment: dict | None = None, secrets: list[str] = ()) -> dict:
    found = variables_set_by_run_config(
        {"step": environment}, {"step": settings}, {"step": list(secrets)}
    )
    return forbidden(found, "PARTY_KEY")


def test_cloudfed_variables_in_any_settings_environment_are_found() -> None:
    settings = {
        "step_operator.sagemaker": SagemakerStepOperatorSettings(
            environment={"CLOUDFED_PARTY_POLICIES": "/evil"}
        ),
        "docker": DockerSettings(
            environment={"cloudfed_party_policy_alpha_aws": "/evil.yaml"},
            runtime_environment={"CLOUDFED_FAULT_DELAY": "alpha-aws:upload:5"},
        ),
        "orchestrator.kubernetes": {
            "pod_settings": {"env": [{"name": "CLOUDFED_PARTY_POLICIES", "value": "/evil"}]}
        },
        "step_operator.vertex": {"environment": {"HF_HOME": "/cache"}},  # harmless
    }
    bad = _bad(settings)
    assert sorted(bad) == [
        "CLOUDFED_FAULT_DELAY",
        "CLOUDFED_PARTY_POLICIES",
        "cloudfed_party_policy_alpha_aws",
    ]
    assert sorted(bad["CLOUDFED_PARTY_POLICIES"]) == [
        'step.settings["orchestrator.kubernetes"].pod_settings.env',
        'step.settings["step_operator.sagemaker"].environment',
    ]
    assert bad["CLOUDFED_FAULT_DELAY"] == ['step.settings["docker"].runtime_environment']


def test_the_partys_key_variable_and_secret_keys_are_found() -> None:
    assert _bad({}, {"PARTY_KEY": "launcher key"}) == {"PARTY_KEY": ["step.environment"]}
    assert _bad({}, secrets=["CLOUDFED_STATE"]) == {"CLOUDFED_STATE": ["step.secrets"]}
    assert _bad({"docker": DockerSettings(environment={"HF_HOME": "/x"})}, {"TZ": "UTC"}) == {}


def test_refusal_names_the_variable_where_and_the_fix() -> None:
    bad = {"CLOUDFED_PARTY_POLICIES": ['step.settings["docker"].environment']}
    message = str(refusal(PARTY, bad))
    assert f"{PARTY} refuses a run configuration that sets ['CLOUDFED_PARTY_POLICIES']" in message
    assert 'step.settings["docker"].environment' in message and "Fix: remove" in message


def test_key_variable_is_the_one_the_partys_policy_names() -> None:
    assert party_key_env_var(PARTY) is None  # no policy: consent refuses it on its own
    path = policy_path(PARTY)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "party": PARTY,
        "federation_id": "fed",
        "pins": {"coordinator": "0" * 64, "parties": {PARTY: "0" * 64}},
        "keys": {"source": "env", "env_var": "CLOUDFED_ALPHA_KEY"},
    }
    path.write_text(yaml.safe_dump(doc))
    assert party_key_env_var(PARTY) == "CLOUDFED_ALPHA_KEY"
    doc["keys"] = {"source": "env"}
    path.write_text(yaml.safe_dump(doc))
    assert party_key_env_var(PARTY) == "CLOUDFED_PARTY_KEY_ALPHA_AWS"


@step
def _party_step() -> None:
    refuse_launcher_environment(PARTY)


@pipeline(enable_cache=False)
def _one_party_step() -> None:
    _party_step()


def test_a_real_step_refuses_docker_settings_environment() -> None:
    """Through ZenML itself: the settings reach the step's configuration, and the step fails."""
    _one_party_step.with_options(settings={"docker": DockerSettings(environment={"TZ": "UTC"})})()
    evil = {"docker": DockerSettings(environment={"CLOUDFED_PARTY_POLICIES": "/evil"})}
    with pytest.raises(RuntimeError, match="_party_step"):  # the local orchestrator's wrapper
        _one_party_step.with_options(settings=evil)()
    failed = Client().get_pipeline("_one_party_step").last_run.steps["_party_step"]
    assert failed.status == ExecutionStatus.FAILED
    assert failed.exception_info is not None
    assert "refuses a run configuration that sets ['CLOUDFED_PARTY_POLICIES']" in (
        failed.exception_info.traceback
    )
