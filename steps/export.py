"""Party: seal the local update to the coordinator and put it on the exchange."""

from typing import Annotated, Any

from zenml import step

from cloudfed.artifacts import FederationPlan, LocalUpdateRef, SealedUpdateRef
from steps._work import timed_work
from steps.artifacts import Artifacts


@step
def export_update(
    federation: dict[str, Any],
    party: str,
    local_update: LocalUpdateRef,
    plan: FederationPlan,
) -> Annotated[SealedUpdateRef, Artifacts.SEALED_UPDATE_REF]:
    with timed_work(party=party):
        from cloudfed.federation import parse_federation
        from cloudfed.party import export_update as seal_and_send

        cfg = parse_federation(federation)
        pinned = plan.coordinator_fingerprint
        result = seal_and_send(
            cfg, cfg.party(party), local_update, coordinator_fingerprint=pinned, run_id=plan.run_id
        )
    return result
