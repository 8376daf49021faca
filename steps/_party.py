"""What every party step checks first: the launcher set nothing in the party's environment.

A party reads its policy (and keeps its state) where its own runtime says, via CLOUDFED_*
variables. A run configuration may set environment variables for every step (`environment:` at
pipeline or step level), so a launcher could otherwise point a party at a policy it wrote itself.
"""

from cloudfed.party_policy import ConsentError, load_policy, policy_path


def _policy_env_var(party: str) -> str | None:
    """The variable the party's policy reads its key from, when it has a readable policy."""
    if not policy_path(party).is_file():
        return None
    try:
        return load_policy(party).policy.keys.env_var
    except ConsentError:  # an invalid policy is reported by the step's own consent check
        return None


def refuse_launcher_environment(party: str) -> None:
    from zenml import get_step_context

    ctx = get_step_context()
    names = set(ctx.step_run.config.environment or {})
    names |= set(getattr(ctx.pipeline_run.config, "environment", None) or {})
    # Every CLOUDFED_* name, which includes any keys.env_var a policy may name (the policy
    # refuses others); the policy's own variable is named too, should that rule ever loosen.
    own = _policy_env_var(party)
    bad = sorted(n for n in names if n.upper().startswith("CLOUDFED_") or n == own)
    if bad:
        raise ConsentError(
            f"{party} refuses a run configuration that sets {bad} for its steps: where a party's "
            "policy and state live is the party's to say, in its own runtime. Fix: remove them "
            "from the run configuration's environment"
        )
