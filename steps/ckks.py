"""CKKS stages: the key party makes keys and decrypts sums; the coordinator adds ciphertexts."""

from typing import Annotated, Any

from zenml import step

from cloudfed.artifacts import (
    CkksKeyRef,
    FederationPlan,
    GlobalAdapterRef,
    SealedUpdateRef,
    SecAggRoster,
    StageRef,
)
from steps._party import refuse_launcher_environment
from steps._work import timed_work


@step
def ckks_keygen(
    federation: dict[str, Any], party: str, round: int, plan: FederationPlan
) -> Annotated[CkksKeyRef, "ckks_key_ref"]:
    with timed_work(party=party, round=round):
        refuse_launcher_environment(party)
        from cloudfed.federation import parse_federation
        from cloudfed.party import ckks_keygen as keygen

        cfg = parse_federation(federation)
        result = keygen(cfg, cfg.party(party), plan, round)
    return result


@step
def ckks_sum(
    federation: dict[str, Any],
    round: int,
    sealed: list[SealedUpdateRef],
    rosters: list[SecAggRoster],
    current: GlobalAdapterRef,
    plan: FederationPlan,
    ckks_key: CkksKeyRef,
) -> Annotated[StageRef, "ckks_sum_ref"]:
    with timed_work(round=round):
        from cloudfed.coordinator import ckks_sum as add_ciphertexts
        from cloudfed.federation import parse_federation

        cfg = parse_federation(federation)
        result = add_ciphertexts(cfg, round, sealed, rosters, current, plan, ckks_key)
    return result


@step
def ckks_decrypt(
    federation: dict[str, Any], party: str, round: int, summed: StageRef, plan: FederationPlan
) -> Annotated[StageRef, "ckks_plain_ref"]:
    with timed_work(party=party, round=round):
        refuse_launcher_environment(party)
        from cloudfed.exchange import federation_exchange
        from cloudfed.federation import parse_federation
        from cloudfed.party import ckks_decrypt_sum
        from cloudfed.protection.messages import layout_for, strategy_of

        cfg = parse_federation(federation)
        layout = layout_for(cfg, federation_exchange(cfg), plan)
        segment = layout.segment("ckks")
        assert segment is not None and summed.round == round
        length = segment.size + strategy_of(cfg, layout).n_slots  # values, then weight slots
        result = ckks_decrypt_sum(cfg, cfg.party(party), round, plan, length)
    return result
