"""What a party's protection stages share: owner-only secrets between stages, receipts, pins.

Per-round secrets (mask key, self-mask seed, CKKS secret context) stay in the party's storage,
written owner-only and atomically, so a stage in a later step, or a retry, finds them intact.
Records that make a stage once-only (what it uploaded under which view, what it revealed, for
which survivors) live in the party's own state (`party_record`) instead: `parties[].storage` is
named by whoever launches the run, and a relaunch with a fresh storage would forget them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cloudfed.artifacts import StageRef
from cloudfed.federation import PartyConfig
from cloudfed.locations import AnyPath, party_root, write_private
from cloudfed.party_policy import LoadedPolicy, check_pin
from cloudfed.protection.keys import KeyPairs
from cloudfed.protection.messages import sha256


def secret_path(party: PartyConfig, round: int, run_id: str, what: str) -> AnyPath:
    return party_root(party) / "secagg" / run_id / f"r{round:04d}.{what}"


def party_record(loaded: LoadedPolicy, run_id: str, round: int, what: str) -> AnyPath:
    """A once-only record of one round, in the policy's `state_dir` (with its `state_options`).

    Not in `parties[].storage`: the launcher picks that, and a fresh prefix must not reset which
    view a party already uploaded or revealed under.
    """
    state = loaded.state_dir
    if isinstance(state, Path):  # owner-only, as the party's other state (checked on load)
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
    return state / "secagg" / loaded.policy.federation_id / run_id / f"r{round:04d}.{what}"


def write_owner_only(path: AnyPath, data: bytes) -> None:
    """Locally 0600 in a 0700 folder; in an object store, one PUT under the party's own prefix."""
    write_private(path, data)


def check_members(loaded: LoadedPolicy, doc: dict[str, Any]) -> None:
    """Every member of a roster must carry the key this party pinned for it."""
    for name, fingerprint in doc["members"].items():
        check_pin(loaded, "party", name, fingerprint)


def stage_ref(
    party: str, round: int, stage: str, key: str, blob: bytes, keys: KeyPairs, start: float
) -> StageRef:
    return StageRef(
        party=party,
        round=round,
        stage=stage,
        key=key,
        sha256=sha256(blob),
        bytes=len(blob),
        fingerprint=keys.public_bundle().fingerprint,
        seconds=time.perf_counter() - start,
    )
