"""Coordinator: log a round, and at the end the run's table, plot and adapter, to MLflow."""

from typing import Annotated, Any

from zenml import step

from cloudfed.artifacts import (
    AggregateReport,
    EvalRelease,
    FederationPlan,
    GlobalAdapterRef,
    LocalUpdateRef,
    Rejection,
    SealedUpdateRef,
)
from cloudfed.data.ref import DatasetRef
from steps._work import timed_work
from steps.artifacts import Artifacts


@step
def log_baseline(
    federation: dict[str, Any],
    plan: FederationPlan,
    model: GlobalAdapterRef,
    evals: list[EvalRelease],
    datasets: list[DatasetRef],
    excluded: list[Rejection],
) -> Annotated[dict[str, Any], Artifacts.ROUND_ROW]:
    """The run's starting model (round 0: the base model), data outcomes, who was excluded."""
    with timed_work():
        from cloudfed.coordinator import round_eval
        from cloudfed.federation import parse_federation
        from cloudfed.tracking import log_exclusions, log_round_metrics

        cfg = parse_federation(federation)
        log_exclusions(excluded)
        ev = round_eval(cfg, plan, model, evals)
        row = log_round_metrics(model.round, ev, None, [], [], datasets)
    return row


@step
def log_round(
    federation: dict[str, Any],
    plan: FederationPlan,
    model: GlobalAdapterRef,
    round: int,
    evals: list[EvalRelease],
    report: AggregateReport,
    local_updates: list[LocalUpdateRef],
    sealed: list[SealedUpdateRef],
    clock: dict[str, float] | None = None,
) -> Annotated[dict[str, Any], Artifacts.ROUND_ROW]:
    """`clock`: a buffered round's virtual-clock values (cloudfed.aggregation.fedbuff.clock)."""
    with timed_work():
        from cloudfed.coordinator import round_eval
        from cloudfed.federation import parse_federation
        from cloudfed.tracking import log_round_metrics, log_virtual_clock

        cfg = parse_federation(federation)
        ev = round_eval(cfg, plan, model, evals)
        row = log_round_metrics(round, ev, report, local_updates, sealed)
        if clock:
            row.update(log_virtual_clock(round, clock))
    return row


@step
def publish_report(
    federation: dict[str, Any],
    plan: FederationPlan,
    rows: list[dict[str, Any]],
    final_adapter: GlobalAdapterRef,
    stop_reason: str,
) -> Annotated[str, Artifacts.RUN_SUMMARY]:
    with timed_work():
        from cloudfed.federation import parse_federation
        from cloudfed.tracking import name_run, publish_run_report

        text = publish_run_report(
            parse_federation(federation), plan, rows, final_adapter, stop_reason
        )
        name_run()  # the last tracked step: ZenML no longer needs the run under its own name
    return text
