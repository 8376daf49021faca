"""What the coordinator does: fix the plan, open and check sealed updates, publish the aggregate.

The coordinator is honest-but-curious. What it may learn of a round is decided by the protection
policy: under secure aggregation or CKKS only the aggregate. The modules follow its concerns:
`plan` (keys, the run's start, publishing), `uploads` (opening what parties sent), `rosters`
(the signed stage rosters), `round` (the sums, unmasking, the aggregate) and `evaluation`.
"""

from cloudfed.coordinator.evaluation import RoundEval, round_eval
from cloudfed.coordinator.plan import coordinator_keys, ledger_head, prepare, publish_global
from cloudfed.coordinator.rosters import inputs_roster, keys_roster, shares_roster
from cloudfed.coordinator.round import aggregate_protected, ckks_sum
from cloudfed.coordinator.uploads import Upload, open_upload, verified_uploads

__all__ = [
    "RoundEval",
    "Upload",
    "aggregate_protected",
    "ckks_sum",
    "coordinator_keys",
    "inputs_roster",
    "keys_roster",
    "ledger_head",
    "open_upload",
    "prepare",
    "publish_global",
    "round_eval",
    "shares_roster",
    "verified_uploads",
]
