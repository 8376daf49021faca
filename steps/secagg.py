"""Secure-aggregation stages: party steps (share keys, reveal) and coordinator rosters.

Each stage is its own step so that a multi-cloud run executes the same protocol as the local one:
party steps run on the party's (light) step operator, roster steps beside the coordinator. The
advertisement runs inside the training step (steps/train.py).
"""

from typing import Annotated, Any

from zenml import step

from cloudfed.artifacts import (
    FederationPlan,
    GlobalAdapterRef,
    SealedUpdateRef,
    SecAggRoster,
    StageRef,
)
from steps._party import refuse_launcher_environment
from steps._work import timed_work

STAGE_REF = "secagg_stage_ref"
ROSTER = "secagg_roster"


@step
def secagg_keys_roster(
    federation: dict[str, Any], round: int, adverts: list[StageRef], plan: FederationPlan
) -> Annotated[SecAggRoster, ROSTER]:
    with timed_work(round=round) as meta:
        from cloudfed.coordinator import keys_roster
        from cloudfed.federation import parse_federation

        result = keys_roster(parse_federation(federation), round, adverts, plan)
        meta.update(parties=result.parties, neighbours=result.neighbours, t=result.threshold)
    return result


@step
def secagg_share_keys(
    federation: dict[str, Any], party: str, roster: SecAggRoster, plan: FederationPlan
) -> Annotated[StageRef, STAGE_REF]:
    with timed_work(party=party):
        refuse_launcher_environment(party)
        from cloudfed.federation import parse_federation
        from cloudfed.party import share_keys

        cfg = parse_federation(federation)
        result = share_keys(cfg, cfg.party(party), roster, plan)
    return result


@step
def secagg_shares_roster(
    federation: dict[str, Any],
    round: int,
    shares: list[StageRef],
    roster: SecAggRoster,
    plan: FederationPlan,
) -> Annotated[SecAggRoster, ROSTER]:
    with timed_work(round=round) as meta:
        from cloudfed.coordinator import shares_roster
        from cloudfed.federation import parse_federation

        result = shares_roster(parse_federation(federation), round, shares, roster, plan)
        meta.update(shared=result.shared)
    return result


@step
def secagg_inputs_roster(
    federation: dict[str, Any],
    round: int,
    sealed: list[SealedUpdateRef],
    roster: SecAggRoster,
    current: GlobalAdapterRef,
    plan: FederationPlan,
) -> Annotated[SecAggRoster, ROSTER]:
    with timed_work(round=round) as meta:
        from cloudfed.coordinator import inputs_roster
        from cloudfed.federation import parse_federation

        result = inputs_roster(parse_federation(federation), round, sealed, roster, current, plan)
        meta.update(uploaded=result.uploaded)
    return result


@step
def secagg_reveal(
    federation: dict[str, Any], party: str, roster: SecAggRoster, plan: FederationPlan
) -> Annotated[StageRef, STAGE_REF]:
    with timed_work(party=party):
        refuse_launcher_environment(party)
        from cloudfed.federation import parse_federation
        from cloudfed.party import reveal_shares

        cfg = parse_federation(federation)
        result = reveal_shares(cfg, cfg.party(party), roster, plan)
    return result
