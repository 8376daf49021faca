"""Party: LoRA training from the current global adapter; the update stays in party storage.

Under secure aggregation the same step then advertises the party's round keys (one job launch
instead of two on a cloud step operator; see `cloudfed.party.round_start`).
"""

from typing import Annotated, Any

from zenml import step

from cloudfed.artifacts import FederationPlan, GlobalAdapterRef, LocalUpdateRef, StageRef
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
) -> tuple[
    Annotated[LocalUpdateRef, Artifacts.LOCAL_UPDATE_REF],
    Annotated[list[StageRef], Artifacts.SECAGG_ADVERTS],
]:
    """The update's reference; the advertisement's in a list (empty without secure aggregation)."""
    with timed_work(party=party):
        refuse_launcher_environment(party)
        from cloudfed.federation import parse_federation
        from cloudfed.party import train_and_advertise

        cfg = parse_federation(federation)
        secagg = "secagg" in plan.protection.get("tensors", {})
        local, adverts = train_and_advertise(
            cfg, cfg.party(party), round, dataset, global_adapter, plan, secagg=secagg
        )
    return local, adverts  # a literal tuple: ZenML reads two outputs from the source
