"""What every party step checks first: the launcher set nothing in the party's environment.

A party reads its policy (and keeps its state) where its own runtime says, via CLOUDFED_*
variables, and may read its private key from an environment variable its policy names. A run
configuration can set environment variables for a step in several places: `environment:` at
pipeline or step level, any settings entry carrying an environment (Docker settings'
`environment` and `runtime_environment`, a step operator's or orchestrator's settings such as
`settings["step_operator.sagemaker"].environment`, Kubernetes `pod_settings.env`), and ZenML
secrets listed under `secrets:` (their keys become variables). A launcher could otherwise point a
party at a policy it wrote itself, or hand it a key of its choosing. Environment set on the stack
and its components is not checked: those are registered by whoever runs the party's runtime.
"""

from collections.abc import Iterable
from typing import Any

from cloudfed.party.launcher_env import (
    forbidden,
    party_key_env_var,
    refusal,
    variables_set_by_run_config,
)


def _secret_keys(secrets: Iterable[Any]) -> list[str]:
    from zenml.utils.env_utils import resolve_secrets

    return list(resolve_secrets(list(secrets)))


def refuse_launcher_environment(party: str) -> None:
    from zenml import get_step_context

    ctx = get_step_context()
    step, pipeline = ctx.step_run.config, ctx.pipeline_run.config
    found = variables_set_by_run_config(
        {"step": step.environment, "pipeline": getattr(pipeline, "environment", None)},
        {"step": step.settings, "pipeline": getattr(pipeline, "settings", None)},
        {
            "step": _secret_keys(step.secrets or []),
            "pipeline": _secret_keys(getattr(pipeline, "secrets", None) or []),
        },
    )
    # CLOUDFED_* first: the policy path itself is read from the environment.
    if bad := forbidden(found):
        raise refusal(party, bad)
    if bad := forbidden(found, party_key_env_var(party)):
        raise refusal(party, bad)
