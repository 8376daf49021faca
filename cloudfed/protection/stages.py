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


def protection_stages(modes: Collection[str]) -> list[Stage]:
    """From a trained update to the published aggregate, for the round's protection modes."""
    secagg, ckks = "secagg" in modes, "ckks" in modes
    return [
        *([Stage.CKKS_KEYGEN] if ckks else []),
        *(
            [Stage.ADVERTISE, Stage.KEYS_ROSTER, Stage.SHARE_KEYS, Stage.SHARES_ROSTER]
            if secagg
            else []
        ),
        Stage.UPLOAD,
        *([Stage.INPUTS_ROSTER, Stage.UNMASK] if secagg else []),
        *([Stage.CKKS_SUM, Stage.CKKS_DECRYPT] if ckks else []),
        Stage.AGGREGATE,
    ]


def round_stages(modes: Collection[str], *, privacy: bool) -> list[Stage]:
    """Every stage of one round in order: reserve (party-level DP), train, protect, evaluate."""
    reserve = [Stage.RESERVE] if privacy else []
    return [*reserve, Stage.TRAIN, *protection_stages(modes), Stage.EVALUATE]
