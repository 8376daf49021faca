"""The stages of one round, in the one order both runners follow.

The ZenML pipeline (`pipelines/federated_training.py`, a step per stage) and the in-process
runner (`cloudfed.simulation`, used by the comparison and the protocol tests) both iterate these
lists, so a stage added to the protocol is added once; a runner without a handler for it fails
loudly instead of skipping it.
"""

from __future__ import annotations

from collections.abc import Collection
from enum import StrEnum


class Stage(StrEnum):
    """One stage of a round. Party stages keep the names `simulate_dropouts` uses."""

    RESERVE = "reserve"  # coordinator: charge the privacy ledger before anyone trains
    TRAIN = "train"  # party
    CKKS_KEYGEN = "ckks_keygen"  # key party: fresh CKKS keys for the round
    ADVERTISE = "advertise"  # party: secure-aggregation key advertisement
    KEYS_ROSTER = "keys_roster"  # coordinator
    SHARE_KEYS = "share_keys"  # party: Shamir shares of its mask seeds
    SHARES_ROSTER = "shares_roster"  # coordinator
    UPLOAD = "upload"  # party: protect and seal the update
    INPUTS_ROSTER = "inputs_roster"  # coordinator: who uploaded
    UNMASK = "unmask"  # party: reveal the shares the unmasking needs
    CKKS_SUM = "ckks_sum"  # coordinator: add ciphertexts
    CKKS_DECRYPT = "ckks_decrypt"  # key party
    AGGREGATE = "aggregate"  # coordinator: weighted mean, DP noise, publish
    EVALUATE = "evaluate"  # every party, on its own held-out split


# A party stage that runs inside the party step of the stage before it. Allowed only for a stage
# that needs nothing from the other parties or the coordinator since its host stage: the secagg
# advertisement (fresh mask key and seed) needs the round and the plan, which training has; the
# keys roster, the first stage that reads advertisements, still waits for every training step,
# and the privacy reservation still comes before training. `check_folding` holds the rule.
FOLDED_INTO: dict[Stage, Stage] = {Stage.ADVERTISE: Stage.TRAIN}

# Stages run by the coordinator, or by the key party once per round: no deadline, no dropout.
COORDINATOR_STAGES = frozenset(
    {
        Stage.RESERVE,
        Stage.KEYS_ROSTER,
        Stage.SHARES_ROSTER,
        Stage.INPUTS_ROSTER,
        Stage.CKKS_SUM,
        Stage.AGGREGATE,
    }
)
KEY_PARTY_STAGES = frozenset({Stage.CKKS_KEYGEN, Stage.CKKS_DECRYPT})


def protection_stages(modes: Collection[str]) -> list[Stage]:
    """From a trained update to the published aggregate, for the round's protection modes.

    The advertisement comes first: it needs nothing but the round, so it can share the
    training step (`FOLDED_INTO`); CKKS key generation is independent of it.
    """
    secagg, ckks = "secagg" in modes, "ckks" in modes
    return [
        *([Stage.ADVERTISE] if secagg else []),
        *([Stage.CKKS_KEYGEN] if ckks else []),
        *([Stage.KEYS_ROSTER, Stage.SHARE_KEYS, Stage.SHARES_ROSTER] if secagg else []),
        Stage.UPLOAD,
        *([Stage.INPUTS_ROSTER, Stage.UNMASK] if secagg else []),
        *([Stage.CKKS_SUM, Stage.CKKS_DECRYPT] if ckks else []),
        Stage.AGGREGATE,
    ]


def round_stages(modes: Collection[str], *, privacy: bool) -> list[Stage]:
    """Every stage of one round in order: reserve (party-level DP), train, protect, evaluate."""
    reserve = [Stage.RESERVE] if privacy else []
    return [*reserve, Stage.TRAIN, *protection_stages(modes), Stage.EVALUATE]


def party_steps(modes: Collection[str], *, privacy: bool) -> list[tuple[Stage, ...]]:
    """The party steps of one round in order, each the stages it runs (folded ones included).

    Every party that stays in the round runs each of these once; the key party's CKKS stages
    and the coordinator's are not party steps.
    """
    steps: list[tuple[Stage, ...]] = []
    for stage in round_stages(modes, privacy=privacy):
        if stage in COORDINATOR_STAGES or stage in KEY_PARTY_STAGES:
            continue
        if stage in FOLDED_INTO:
            host = FOLDED_INTO[stage]
            assert steps and steps[-1][0] == host, f"{stage} folds into {host}, not before it"
            steps[-1] = (*steps[-1], stage)
        else:
            steps.append((stage,))
    return steps


def check_folding(stages: list[Stage]) -> None:
    """A folded stage must directly follow its host: nobody else's stage may come between."""
    for stage, host in FOLDED_INTO.items():
        if stage not in stages:
            continue
        at = stages.index(stage)
        if at == 0 or stages[at - 1] != host:
            raise ValueError(
                f"stage {stage} runs inside the {host} step, so it must follow {host} directly; "
                f"the order is {[str(s) for s in stages]}"
            )
