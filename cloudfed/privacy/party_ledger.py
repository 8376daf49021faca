"""A party's own record-level (DP-SGD) budget, kept in its own state folder and never shared.

The folder comes from the party's policy, not from the run configuration, so a launcher cannot
reset the budget by pointing `parties[].storage` elsewhere; and one ledger counts every run and
every federation on the party's data (entries are keyed `<federation>/<run_id>/r<round>`, and
epsilon composes all of them). An entry is written
before training starts; a retried training step for the same run and round finds it and charges
nothing more: either the earlier attempt crashed before its update left the party (nothing was
released), or its update is still on disk and is handed back instead of training again.
"""

from __future__ import annotations

import os
from pathlib import Path

from cloudfed.errors import DataError
from cloudfed.privacy.accountant import GaussianEvent
from cloudfed.privacy.ledger import Ledger, LedgerEntry, _now


def ledger_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / "dp_sgd_ledger.json"


def load(path: Path, *, party: str, delta: float) -> Ledger:
    if not path.exists():
        return Ledger(federation_id=party, delta=delta, accountant="rdp")
    ledger = Ledger.model_validate_json(path.read_bytes())
    if ledger.delta != delta:
        raise DataError(
            f"{path}: this party's DP-SGD ledger accounts at delta={ledger.delta}, the config "
            f"asks for {delta}. Fix: keep privacy.dp_sgd.<party>.delta as it started"
        )
    return ledger


def save(path: Path, ledger: Ledger) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(ledger.model_dump_json(indent=1).encode())
    os.replace(tmp, path)


def reserve(
    path: Path,
    *,
    party: str,
    delta: float,
    max_epsilon: float,
    entry_id: str,
    round: int,
    event: GaussianEvent,
) -> tuple[Ledger, bool]:
    """Charge one round's DP-SGD before training; (ledger, already_charged)."""
    ledger = load(path, party=party, delta=delta)
    if ledger.entry(entry_id) is not None:
        return ledger, True
    after = ledger.epsilon(extra=[event])
    if after > max_epsilon:
        raise DataError(
            f"{party}: record-level DP-SGD budget: spent epsilon={ledger.epsilon():.4g} of "
            f"{max_epsilon:g} (the stricter of privacy.dp_sgd.{party}.max_epsilon and the "
            f"party policy's dp_sgd.max_epsilon, ledger {path}); round {round} would bring it "
            f"to {after:.4g}, so this party does not train. Fix: raise the cap only if the data "
            "owner agrees"
        )
    ledger.entries.append(
        LedgerEntry(
            id=entry_id,
            run_id=entry_id.split("/")[-2],
            round=round,
            mode="dp-sgd",
            noise_multiplier=event.noise_multiplier,
            sample_rate=event.sample_rate,
            steps=event.steps,
            parties=[party],
            epsilon_after=after,
            at=_now(),
        )
    )
    save(path, ledger)
    return ledger, False


def mark_spent(path: Path, ledger: Ledger, entry_id: str) -> None:
    entry = ledger.entry(entry_id)
    if entry is not None and entry.status != "spent":
        entry.status = "spent"
        entry.at = _now()
        save(path, ledger)
