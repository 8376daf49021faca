"""Coordinator: charge the privacy ledger for a round before any party trains for it."""

from typing import Annotated, Any

from zenml import step

from cloudfed.artifacts import FederationPlan
from steps._work import timed_work


@step
def privacy_reserve(
    federation: dict[str, Any], round: int, plan: FederationPlan, parties: list[str]
) -> Annotated[dict[str, Any], "privacy_reservation"]:
    """A refused reservation is an answer, not a failure: the pipeline stops the loop on it."""
    with timed_work(round=round) as meta:
        from cloudfed.federation import parse_federation
        from cloudfed.privacy.budget import reserve_for_round
        from cloudfed.tracking import log_ledger

        granted, ledger = reserve_for_round(parse_federation(federation), plan, round, parties)
        log_ledger(ledger, granted, round)  # MLflow after the ledger commit: budget never logs
        reservation = granted.model_dump()
        meta.update(reservation)
    return reservation
