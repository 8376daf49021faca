"""Coordinator: open, check and average the sealed updates of one round."""

from typing import Annotated, Any

from zenml import step

from cloudfed.artifacts import (
    AggregateReport,
    FederationPlan,
    GlobalAdapterRef,
    Rejection,
    SealedUpdateRef,
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
) -> tuple[
    Annotated[GlobalAdapterRef, Artifacts.GLOBAL_ADAPTER_REF],
    Annotated[AggregateReport, Artifacts.AGGREGATE_REPORT],
]:
    with timed_work(round=round) as meta:
        from cloudfed.coordinator import aggregate_round
        from cloudfed.federation import parse_federation

        cfg = parse_federation(federation)
        new_global, report = aggregate_round(
            cfg, round, sealed, current, run_id=plan.run_id, dropped=dropped
        )
        meta.update(accepted=report.accepted, rejected=[r.model_dump() for r in report.rejected])
    return new_global, report  # a literal tuple: ZenML reads two outputs from the source
