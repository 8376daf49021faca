"""Party: held-out loss of the global adapter on the party's own eval split; metrics only."""

from typing import Annotated, Any

from zenml import step

from cloudfed.artifacts import GlobalAdapterRef, PartyEval
from cloudfed.data.ref import DatasetRef
from steps._work import timed_work
from steps.artifacts import Artifacts


@step
def evaluate(
    federation: dict[str, Any],
    party: str,
    dataset: DatasetRef,
    global_adapter: GlobalAdapterRef,
) -> Annotated[PartyEval, Artifacts.PARTY_EVAL]:
    with timed_work(party=party):
        from cloudfed.federation import parse_federation
        from cloudfed.party import evaluate_round

        cfg = parse_federation(federation)
        result = evaluate_round(cfg, cfg.party(party), dataset, global_adapter)
    return result
