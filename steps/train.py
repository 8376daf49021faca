"""Party: LoRA training from the current global adapter; the update stays in party storage."""

from typing import Annotated, Any

from zenml import step

from cloudfed.artifacts import FederationPlan, GlobalAdapterRef, LocalUpdateRef
from cloudfed.data.ref import DatasetRef
from steps._party import refuse_launcher_environment
from steps._work import timed_work
from steps.artifacts import Artifacts


@step
def train_local(
    federation: dict[str, Any],
    party: str,
    round: int,
    dataset: DatasetRef,
    global_adapter: GlobalAdapterRef,
    plan: FederationPlan,
) -> Annotated[LocalUpdateRef, Artifacts.LOCAL_UPDATE_REF]:
    with timed_work(party=party):
        refuse_launcher_environment(party)
        from cloudfed.federation import parse_federation
        from cloudfed.party import train_round

        cfg = parse_federation(federation)
        result = train_round(cfg, cfg.party(party), round, dataset, global_adapter, plan)
    return result
