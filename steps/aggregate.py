"""Coordinator: combine the protected updates of one round and publish the new global adapter."""

from typing import Annotated, Any

from zenml import step

from cloudfed.artifacts import (
    AggregateReport,
    FederationPlan,
    GlobalAdapterRef,
    Rejection,
    SealedUpdateRef,
    SecAggRoster,
    StageRef,
)
from steps._work import timed_work
from steps.artifacts import Artifacts


@step
def aggregate(
    federation: dict[str, Any],
    round: int,
    sealed: list[SealedUpdateRef],
    current: GlobalAdapterRef,
    dropped: list[Rejection],
    plan: FederationPlan,
    rosters: list[SecAggRoster],
    reveals: list[StageRef],
    ckks_plain: list[StageRef],
) -> tuple[
    Annotated[GlobalAdapterRef, Artifacts.GLOBAL_ADAPTER_REF],
    Annotated[AggregateReport, Artifacts.AGGREGATE_REPORT],
]:
    with timed_work(round=round) as meta:
        from cloudfed.coordinator import aggregate_protected
        from cloudfed.federation import parse_federation
        from cloudfed.federation_state import publish_round

        cfg = parse_federation(federation)
        new_global, report = aggregate_protected(
            cfg,
            round,
            sealed,
            current,
            plan,
            dropped=dropped,
            rosters=rosters,
            reveals=reveals,
            ckks_plain=ckks_plain,
        )
        publish_round(cfg, plan, new_global, report.policy_sha256, report.aggregation)
        meta.update(
            accepted=report.accepted,
            rejected=[r.model_dump() for r in report.rejected],
            protection=report.protection_mode,
        )
    return new_global, report  # a literal tuple: ZenML reads two outputs from the source
