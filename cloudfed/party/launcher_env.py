"""Which environment variables a run configuration sets for a party's step, and which it must not.

The pure half of `steps/_party.refuse_launcher_environment` (no ZenML here): it walks the step's
and the pipeline's `environment`, every settings entry, and the keys of listed secrets.
A party reads its policy and state location from CLOUDFED_* variables and may read its private key
from a variable its policy names; none of these is the launcher's to set.
"""

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from cloudfed.keys.sources import env_var_for
from cloudfed.party_policy import ConsentError, load_policy, policy_path

# Fields of a settings entry whose value names environment variables (a mapping of name to
# value, or Kubernetes' list of {"name": ..., "value": ...}).
_ENV_FIELDS = frozenset({"environment", "runtime_environment", "env", "environment_variables"})


def _names_in(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        return [str(k) for k in value]
    if isinstance(value, list | tuple):
        return [str(v["name"]) for v in value if isinstance(v, Mapping) and "name" in v]
    return []


def _walk(value: Any, where: str, found: list[tuple[str, str]]) -> None:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, Mapping):
        for key, inner in value.items():
            here = f"{where}.{key}"
            if key in _ENV_FIELDS:
                found.extend((name, here) for name in _names_in(inner))
            _walk(inner, here, found)
    elif isinstance(value, list | tuple):
        for i, inner in enumerate(value):
            _walk(inner, f"{where}[{i}]", found)


def variables_set_by_run_config(
    environments: Mapping[str, Mapping[str, Any] | None],
    settings: Mapping[str, Mapping[str, Any] | None],
    secret_keys: Mapping[str, Iterable[str]] | None = None,
) -> list[tuple[str, str]]:
    """(variable, where) for every variable the run configuration sets for a step.

    `environments` and `settings` map a label (`step`, `pipeline`) to that level's `environment`
    and `settings`; `secret_keys` maps a label to the keys of the ZenML secrets it lists.
    """
    found: list[tuple[str, str]] = []
    for label, environment in environments.items():
        found.extend((name, f"{label}.environment") for name in (environment or {}))
    for label, entries in settings.items():
        for key, entry in (entries or {}).items():
            _walk(entry, f'{label}.settings["{key}"]', found)
    for label, keys in (secret_keys or {}).items():
        found.extend((name, f"{label}.secrets") for name in keys)
    return found


def forbidden(found: list[tuple[str, str]], key_env_var: str | None = None) -> dict[str, list[str]]:
    """The CLOUDFED_* variables (and the party's key variable) among `found`, with where."""
    bad: dict[str, list[str]] = {}
    for name, where in found:
        if name.upper().startswith("CLOUDFED_") or (key_env_var and name == key_env_var):
            bad.setdefault(name, []).append(where)
    return bad


def refusal(party: str, bad: Mapping[str, list[str]]) -> ConsentError:
    places = "; ".join(f"{name} in {', '.join(sorted(set(w)))}" for name, w in sorted(bad.items()))
    return ConsentError(
        f"{party} refuses a run configuration that sets {sorted(bad)} for its steps ({places}): "
        "where a party's policy, state and keys live is the party's to say, in its own runtime. "
        "Fix: remove them from the run configuration (environment, settings, secrets)"
    )


def party_key_env_var(party: str) -> str | None:
    """The variable the party's own policy reads its key from, if it reads one from the env."""
    if not policy_path(party).is_file():
        return None  # consent refuses a missing policy with its own message
    try:
        keys = load_policy(party).policy.keys
    except ConsentError:
        return None  # likewise an invalid one
    if keys.source != "env":
        return None
    return keys.env_var or env_var_for(party)
