"""A party's own record-level (DP-SGD) budget, kept in its own storage and never shared.

Same entry format as the federation ledger, keyed by `<run_id>/r<round>`. An entry is written
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
from cloudfed.privacy.settings import DpSgdSettings


def ledger_path(storage: str | Path) -> Path:
    return Path(storage) / "privacy" / "dp_sgd_ledger.json"


def load(path: Path, *, federation_id: str, delta: float) -> Ledger:
    if not path.exists():
        return Ledger(federation_id=federation_id, delta=delta, accountant="rdp")
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
    federation_id: str,
    settings: DpSgdSettings,
    entry_id: str,
    round: int,
    event: GaussianEvent,
) -> tuple[Ledger, bool]:
    """Charge one round's DP-SGD before training; (ledger, already_charged)."""
    ledger = load(path, federation_id=federation_id, delta=settings.delta)
    if ledger.entry(entry_id) is not None:
        return ledger, True
    after = ledger.epsilon(extra=[event])
    if settings.max_epsilon is not None and after > settings.max_epsilon:
        raise DataError(
            f"{party}: record-level DP-SGD budget: spent epsilon={ledger.epsilon():.4g} of "
            f"privacy.dp_sgd.{party}.max_epsilon={settings.max_epsilon:g}; round {round} would "
            f"bring it to {after:.4g}, so this party does not train. Fix: raise max_epsilon "
            "only if the data owner agrees"
        )
    ledger.entries.append(
        LedgerEntry(
            id=entry_id,
            run_id=entry_id.split("/")[0],
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
