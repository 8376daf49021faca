"""A party's first step of a round: train, then (under secure aggregation) advertise its keys.

Two protocol stages in one step because on a cloud step operator every step is a job launch of
minutes (`cloudfed.protection.stages.FOLDED_INTO`). The advertisement needs nothing from the
other parties: fresh per-round secrets, the round and the plan. The coordinator's keys roster
still waits for every party's step, so no party meets a roster before every advertisement is in.
"""

from __future__ import annotations

from cloudfed.artifacts import FederationPlan, GlobalAdapterRef, LocalUpdateRef, StageRef
from cloudfed.data.ref import DatasetRef
from cloudfed.federation import FederationConfig, PartyConfig
from cloudfed.party.secagg import advertise
from cloudfed.party.training import train_round


def train_and_advertise(
    cfg: FederationConfig,
    party: PartyConfig,
    round: int,
    data: DatasetRef,
    global_ref: GlobalAdapterRef,
    plan: FederationPlan,
    *,
    secagg: bool,
) -> tuple[LocalUpdateRef, list[StageRef]]:
    """The update's reference and, under secure aggregation, the signed advertisement's.

    A failed advertisement fails the step: the party cannot join this round's secure sum, and
    a retry hands back the update it trained (seeded, or a DP-SGD update already paid for).
    """
    local = train_round(cfg, party, round, data, global_ref, plan)
    return local, [advertise(cfg, party, local, plan)] if secagg else []
