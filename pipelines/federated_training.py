"""The federation as a dynamic ZenML pipeline: wiring only, every decision lives in cloudfed.

    zenml pipeline run pipelines.federated_training.federated_training -c configs/local.yaml

Party steps carry their party's step operator (none locally); coordinator steps carry the active
stack's experiment tracker, so one MLflow run holds every round of a pipeline run.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from zenml import pipeline
from zenml.enums import ExecutionMode

from cloudfed.artifacts import Rejection
from cloudfed.errors import CloudfedError, ConfigError, DataError
from cloudfed.federation import FederationConfig, parse_federation
from steps.aggregate import aggregate
from steps.evaluate import evaluate
from steps.export import export_update
from steps.harmonize import harmonize
from steps.prepare import prepare_federation
from steps.track import log_baseline, log_round, publish_report
from steps.train import train_local

logger = logging.getLogger("cloudfed")


def _config_source() -> str:
    """The -c file as the user typed it, so messages can name it."""
    argv = sys.argv
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return "the run configuration"


@contextmanager
def _user_errors() -> Iterator[None]:
    """A fixable problem ends the run with its message and exit code 2, not a traceback."""
    try:
        yield
    except CloudfedError as exc:
        print(f"\ncloudfed: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _tracker() -> str | None:
    from zenml.client import Client

    tracker = Client().active_stack.experiment_tracker
    return tracker.name if tracker else None


def _party_step(step: Any, cfg: FederationConfig, party: str) -> Any:
    operator = cfg.party(party).step_operator
    return step.with_options(step_operator=operator) if operator else step


@pipeline(dynamic=True, enable_cache=False, execution_mode=ExecutionMode.CONTINUE_ON_FAILURE)
def federated_training(federation: dict[str, Any]) -> None:
    with _user_errors():
        cfg = parse_federation(federation, source=_config_source())
        tracker = _tracker()

        def coord(step: Any) -> Any:
            return step.with_options(experiment_tracker=tracker) if tracker else step

        # Step outputs travel by reference; plain values would be uploaded again for every step.
        federation, plan, current = coord(prepare_federation)(federation, id="prepare")
        parties = plan.load().parties
        datasets, excluded = {}, []
        for p in parties:
            try:
                datasets[p] = _party_step(harmonize, cfg, p)(federation, p, id=f"harmonize_{p}")
            except DataError as exc:  # its data fails the contract: the others may go on
                logger.warning("party %s excluded: %s", p, exc)
                excluded.append(Rejection(party=p, reason=f"excluded: {exc}"))
        if len(datasets) < cfg.min_parties:
            raise DataError(
                f"{len(datasets)} of {len(parties)} parties passed their data contracts, fewer "
                f"than min_parties ({cfg.min_parties}):\n"
                + "\n".join(f"[{r.party}] {r.reason}" for r in excluded)
            )
        parties = list(datasets)
        evals = [
            _party_step(evaluate, cfg, p)(
                federation, p, datasets[p], current, id=f"evaluate_{p}_r0"
            )
            for p in parties
        ]
        rows = [coord(log_baseline)(evals, list(datasets.values()), excluded, id="log_round_r0")]
        stop_reason = f"round limit ({cfg.rounds}) reached"
        for r in range(1, cfg.rounds + 1):
            local, sealed, dropped = [], [], []
            for p in parties:
                try:
                    upd = _party_step(train_local, cfg, p)(
                        federation, p, r, datasets[p], current, id=f"train_{p}_r{r}"
                    )
                    out = _party_step(export_update, cfg, p)(
                        federation, p, upd, plan, id=f"export_{p}_r{r}"
                    )
                    local.append(upd)
                    sealed.append(out)
                except ConfigError:
                    raise
                except Exception as exc:  # a party failing must not sink the round
                    why = str(exc) if isinstance(exc, CloudfedError) else type(exc).__name__
                    logger.warning("round %d: party %s dropped: %s", r, p, why)
                    dropped.append(Rejection(party=p, reason=f"dropped: {why}"))
            new_ref, report = coord(aggregate)(
                federation, r, sealed, current, dropped, plan, id=f"aggregate_r{r}"
            )
            current = new_ref
            evals = [
                _party_step(evaluate, cfg, p)(
                    federation, p, datasets[p], current, id=f"evaluate_{p}_r{r}"
                )
                for p in parties
            ]
            rows.append(coord(log_round)(r, evals, report, local, sealed, id=f"log_round_r{r}"))
        coord(publish_report)(federation, rows, current, stop_reason, id="publish_report")
