"""What every party step checks first: the launcher set nothing in the party's environment.

A party reads its policy (and keeps its state) where its own runtime says, via CLOUDFED_*
variables. A run configuration may set environment variables for every step (`environment:` at
pipeline or step level), so a launcher could otherwise point a party at a policy it wrote itself.
"""

from cloudfed.party_policy import ConsentError


def refuse_launcher_environment(party: str) -> None:
    from zenml import get_step_context

    ctx = get_step_context()
    names = set(ctx.step_run.config.environment or {})
    names |= set(getattr(ctx.pipeline_run.config, "environment", None) or {})
    bad = sorted(n for n in names if n.upper().startswith("CLOUDFED_"))
    if bad:
        raise ConsentError(
            f"{party} refuses a run configuration that sets {bad} for its steps: where a party's "
            "policy and state live is the party's to say, in its own runtime. Fix: remove them "
            "from the run configuration's environment"
        )
