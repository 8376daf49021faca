"""What a party does in its own cloud: train on its rows, seal its update, evaluate the global.

Every function here reads raw or harmonised rows only from the party's own storage and returns
references and numbers. The plaintext update is written to the party's storage and leaves it only
through `cloudfed.party.sealing.upload`, protected per the policy and sealed to the coordinator.

Every party function first checks the run configuration against the party's own policy
(`cloudfed.party_policy`) and the keys it meets against the party's pins. Under any DP, what it
returns follows the release rules (README, Privacy budgets): no example count, no per-party
metric, keyed digests instead of hashes of its data.

The modules follow a party's concerns: `data`, `admission` (keys and consent), `training`,
`evaluation`, the protection stages `secagg`, `sealing` (the upload) and `ckks`, and
`round_start` (training and the advertisement, one step).
"""

from cloudfed.party.admission import consent, party_keys, simulated_dropout
from cloudfed.party.ckks import back_onto_grid, ckks_decrypt_sum, ckks_keygen
from cloudfed.party.data import prepare_dataset, read_rows, read_verified, release_dataset
from cloudfed.party.evaluation import evaluate_round
from cloudfed.party.round_start import train_and_advertise
from cloudfed.party.sealing import upload
from cloudfed.party.secagg import advertise, reveal_shares, share_keys
from cloudfed.party.training import LocalUpdateRecord, load_local_update, train_round, training_seed

__all__ = [
    "LocalUpdateRecord",
    "advertise",
    "back_onto_grid",
    "ckks_decrypt_sum",
    "ckks_keygen",
    "consent",
    "evaluate_round",
    "load_local_update",
    "party_keys",
    "prepare_dataset",
    "read_rows",
    "read_verified",
    "release_dataset",
    "reveal_shares",
    "share_keys",
    "simulated_dropout",
    "train_and_advertise",
    "train_round",
    "training_seed",
    "upload",
]
