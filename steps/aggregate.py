"""Coordinator: open, check and average the sealed updates of one round."""

from typing import Annotated, Any

from zenml import step

from cloudfed.artifacts import AggregateReport, GlobalAdapterRef, Rejection, SealedUpdateRef
from steps.artifacts import Artifacts


@step
def aggregate(
    federation: dict[str, Any],
    round: int,
    sealed: list[SealedUpdateRef],
    current: GlobalAdapterRef,
    dropped: list[Rejection],
) -> tuple[
    Annotated[GlobalAdapterRef, Artifacts.GLOBAL_ADAPTER_REF],
    Annotated[AggregateReport, Artifacts.AGGREGATE_REPORT],
]:
    from cloudfed.coordinator import aggregate_round
    from cloudfed.federation import parse_federation

    cfg = parse_federation(federation)
    new_global, report = aggregate_round(cfg, round, sealed, current, dropped=dropped)
    return new_global, report  # a literal tuple: ZenML reads two outputs from the source
