"""Coordinator: validate the federation, create keys and publish the round-0 adapter."""

from typing import Annotated, Any

from zenml import step

from cloudfed.artifacts import FederationPlan, GlobalAdapterRef
from steps._work import timed_work
from steps.artifacts import Artifacts


@step
def prepare_federation(
    federation: dict[str, Any], source: str = "the run configuration"
) -> tuple[
    Annotated[dict[str, Any], Artifacts.FEDERATION_CONFIG],
    Annotated[FederationPlan, Artifacts.FEDERATION_PLAN],
    Annotated[GlobalAdapterRef, Artifacts.GLOBAL_ADAPTER_REF],
]:
    """The validated config comes back as an artifact so later steps share it by reference."""
    with timed_work() as meta:
        from cloudfed.coordinator import prepare
        from cloudfed.federation import parse_federation
        from cloudfed.tracking import log_plan

        cfg = parse_federation(federation)
        plan = prepare(cfg, source=source)
        log_plan(cfg, plan)
        meta.update(
            fingerprint=plan.fingerprint,
            parties=plan.parties,
            start_round=plan.start_round,
            generation=plan.generation,
        )
        validated = cfg.model_dump(mode="json")
    return validated, plan, plan.initial_adapter  # literal tuple: three outputs
