"""Party: held-out metrics of the global adapter on its own eval split, as the release rules allow.

Without DP the party's metrics come back as they are; under DP only its masked share of the
round's secure sum over every evaluator does (see `cloudfed.party.evaluate_round`).
"""

from typing import Annotated, Any

from zenml import step

from cloudfed.artifacts import EvalRelease, FederationPlan, GlobalAdapterRef
from cloudfed.data.ref import DatasetRef
from steps._party import refuse_launcher_environment
from steps._work import timed_work
from steps.artifacts import Artifacts


@step
def evaluate(
    federation: dict[str, Any],
    party: str,
    dataset: DatasetRef,
    global_adapter: GlobalAdapterRef,
    plan: FederationPlan,
    evaluators: list[str],
) -> Annotated[EvalRelease, Artifacts.PARTY_EVAL]:
    with timed_work(party=party):
        refuse_launcher_environment(party)
        from cloudfed.federation import parse_federation
        from cloudfed.party import evaluate_round

        cfg = parse_federation(federation)
        result = evaluate_round(cfg, cfg.party(party), dataset, global_adapter, plan, evaluators)
    return result
