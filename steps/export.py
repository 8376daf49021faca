"""Party: protect the local update per the policy and seal it to the coordinator."""

from typing import Annotated, Any

from zenml import step

from cloudfed.artifacts import (
    CkksKeyRef,
    FederationPlan,
    LocalUpdateRef,
    SealedUpdateRef,
    SecAggRoster,
)
from steps._party import refuse_launcher_environment
from steps._work import timed_work
from steps.artifacts import Artifacts


@step
def export_update(
    federation: dict[str, Any],
    party: str,
    local_update: LocalUpdateRef,
    plan: FederationPlan,
    rosters: list[SecAggRoster],
    ckks_keys: list[CkksKeyRef],
) -> Annotated[SealedUpdateRef, Artifacts.SEALED_UPDATE_REF]:
    with timed_work(party=party):
        refuse_launcher_environment(party)
        from cloudfed.federation import parse_federation
        from cloudfed.party import upload

        cfg = parse_federation(federation)
        result = upload(cfg, cfg.party(party), local_update, plan, rosters, ckks_keys)
    return result
