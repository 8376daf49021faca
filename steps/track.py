"""Coordinator: log a round, and at the end the run's table, plot and adapter, to MLflow."""

from typing import Annotated, Any

from zenml import step

from cloudfed.artifacts import (
    AggregateReport,
    GlobalAdapterRef,
    LocalUpdateRef,
    PartyEval,
    Rejection,
    SealedUpdateRef,
)
from cloudfed.data.ref import DatasetRef
from steps._work import timed_work
from steps.artifacts import Artifacts


@step
def log_baseline(
    evals: list[PartyEval], datasets: list[DatasetRef], excluded: list[Rejection]
) -> Annotated[dict[str, Any], Artifacts.ROUND_ROW]:
    """Round 0: base model, what each party's data passed, and who was excluded and why."""
    with timed_work():
        from cloudfed.tracking import log_exclusions, log_round_metrics

        log_exclusions(excluded)
        row = log_round_metrics(0, evals, None, [], [], datasets)
    return row


@step
def log_round(
    round: int,
    evals: list[PartyEval],
    report: AggregateReport,
    local_updates: list[LocalUpdateRef],
    sealed: list[SealedUpdateRef],
) -> Annotated[dict[str, Any], Artifacts.ROUND_ROW]:
    with timed_work():
        from cloudfed.tracking import log_round_metrics

        row = log_round_metrics(round, evals, report, local_updates, sealed)
    return row


@step
def publish_report(
    federation: dict[str, Any],
    rows: list[dict[str, Any]],
    final_adapter: GlobalAdapterRef,
    stop_reason: str,
) -> Annotated[str, Artifacts.RUN_SUMMARY]:
    with timed_work():
        from cloudfed.federation import parse_federation
        from cloudfed.tracking import publish_run_report

        text = publish_run_report(parse_federation(federation), rows, final_adapter, stop_reason)
    return text
