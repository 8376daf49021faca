"""The federation's privacy-budget ledger: reserved before a release, kept across runs.

Why a ledger and not a counter in the run: every pipeline run releases models trained on the same
records, so budgets compose across runs. The ledger is append-only JSON, keyed by
`<run_id>/r<round>`, kept in two places that must agree:
- on the exchange (`privacy/ledger.json`, next to the published global adapters), signed by the
  coordinator so an untrusted store cannot shrink it unnoticed;
- in the coordinator's own storage (`privacy/ledger.json`), so deleting the exchange copy does not
  reset the budget.
A round is *reserved* before any party trains and *committed* after its aggregate is published.
Reserving an id that is already there charges nothing (a retried step never spends twice); a
reservation whose round never published stays charged, because the coordinator may already have
seen that round's (noisy) sum. Epsilon is always recomputed from the whole history by the
accountant, never added up.

The ledger cannot roll back unnoticed: every saved version carries its version number and the
hashes of all earlier versions (a hash chain), signed with the rest. Each party keeps the newest
version and hash it has seen in its own state folder and refuses an older ledger, or one whose
chain does not pass through what it saw (`verified_for_party`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cloudfed.errors import CloudfedError, ProtectionError
from cloudfed.locations import AnyPath, location, replace_bytes
from cloudfed.privacy.accountant import GaussianEvent, epsilon
from cloudfed.privacy.settings import AccountantName

LEDGER_KEY = "privacy/ledger.json"
LEDGER_KIND = "privacy-ledger"
LEDGER_FILE = "ledger.json"


class BudgetExhausted(CloudfedError):
    """The next round would spend more than `privacy.max_epsilon`: the federation stops."""


class LedgerEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    run_id: str
    round: int
    mode: str
    noise_multiplier: float  # what the accountant is charged (the guaranteed floor)
    sample_rate: float = 1.0
    steps: int = 1
    parties: list[str]  # reserved: who may contribute; spent: who did
    status: Literal["reserved", "spent"] = "reserved"
    effective_noise_multiplier: float | None = None
    global_sha256: str | None = None
    epsilon_after: float
    at: str

    def event(self) -> GaussianEvent:
        return GaussianEvent(self.noise_multiplier, self.sample_rate, self.steps)


class Ledger(BaseModel):
    model_config = ConfigDict(extra="forbid")

    federation_id: str
    delta: float
    accountant: AccountantName
    entries: list[LedgerEntry] = Field(default_factory=list)
    version: int = 0  # 0: never saved; each save adds one
    chain: list[str] = Field(default_factory=list)  # heads of versions 1 .. version-1

    def head(self) -> str:
        """SHA-256 of this version's canonical JSON: what the next version chains to."""
        doc = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()

    def entry(self, entry_id: str) -> LedgerEntry | None:
        return next((e for e in self.entries if e.id == entry_id), None)

    def epsilon(self, *, party: str | None = None, extra: Sequence[GaussianEvent] = ()) -> float:
        """Federation epsilon, or one party's (only the rounds it was, or may be, part of)."""
        events = [e.event() for e in self.entries if party is None or party in e.parties]
        return epsilon([*events, *extra], self.delta, self.accountant)

    def parties(self) -> list[str]:
        return sorted({p for e in self.entries for p in e.parties})


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _is_prefix(short: Ledger, long: Ledger) -> bool:
    ids = [e.id for e in long.entries]
    return [e.id for e in short.entries] == ids[: len(short.entries)]


def _progress(ledger: Ledger) -> tuple[int, int]:
    return len(ledger.entries), sum(e.status == "spent" for e in ledger.entries)


class LedgerStore:
    """Reads and writes the two copies; the coordinator alone writes (it holds the signing key)."""

    def __init__(
        self,
        exchange,
        keys,
        *,
        federation_id: str,
        coordinator_storage: str,
        coordinator_options: Mapping[str, Any] | None = None,
    ) -> None:
        """`coordinator_storage` is a folder or an object-store URL (with its fsspec options)."""
        self.exchange, self.keys, self.federation_id = exchange, keys, federation_id
        where = location(coordinator_storage, coordinator_options)
        self.local = where / federation_id / "privacy" / LEDGER_FILE
        self._base: Ledger | None = None  # the version last loaded or saved, as persisted

    def _context(self, version: int | None = None):
        return ledger_context(self.federation_id, version)

    def _from_exchange(self) -> Ledger | None:
        from cloudfed.protection.envelope import open_public

        if not self.exchange.exists(LEDGER_KEY):
            return None
        try:
            opened = open_public(
                self.exchange.get_bytes(LEDGER_KEY),
                context=self._context(),
                sender=self.keys.public_bundle(),
            )
        except ProtectionError:
            raise ProtectionError(
                f"{self.exchange.url(LEDGER_KEY)}: the privacy ledger is not signed by this "
                "coordinator (tampered or from another coordinator). Fix: restore it from the "
                f"coordinator's copy {self.local}"
            ) from None
        return Ledger.model_validate_json(opened.payload)

    def _from_local(self) -> Ledger | None:
        return Ledger.model_validate_json(self.local.read_bytes()) if self.local.exists() else None

    def load(self, *, delta: float, accountant: AccountantName) -> Ledger:
        """The longer of the two copies, provided the shorter is a prefix of it."""
        remote, local = self._from_exchange(), self._from_local()
        found = [c for c in (remote, local) if c is not None]
        if not found:
            empty = Ledger(federation_id=self.federation_id, delta=delta, accountant=accountant)
            self._base = empty.model_copy(deep=True)
            return empty
        if len(found) == 2 and not (_is_prefix(remote, local) or _is_prefix(local, remote)):
            raise ProtectionError(
                f"the privacy ledgers on the exchange and in {self.local} disagree (neither is a "
                "prefix of the other). Fix: keep the copy with every round you know was run and "
                "delete the other; the budget must never be reset by accident"
            )
        ledger = max(found, key=lambda c: (c.version, *_progress(c)))
        if ledger.federation_id != self.federation_id:
            raise ProtectionError(f"{self.local}: the ledger belongs to {ledger.federation_id}")
        if (ledger.delta, ledger.accountant) != (delta, accountant):
            raise CloudfedError(
                f"{self.local}: the ledger accounts at delta={ledger.delta} with "
                f"{ledger.accountant}, the config asks for delta={delta} with {accountant}. Fix: "
                "keep privacy.delta and privacy.accountant as the federation started with them"
            )
        self._base = ledger.model_copy(deep=True)  # callers change the ledger they get back
        return ledger

    def save(self, ledger: Ledger) -> None:
        """Write the next version, chained to the version this store last loaded or saved."""
        from cloudfed.protection.envelope import sign_public

        current = self._base or self.load(delta=ledger.delta, accountant=ledger.accountant)
        if not _is_prefix(current, ledger):
            raise ProtectionError("privacy ledger: a new version must extend the current one")
        ledger.chain = [*current.chain, current.head()] if current.version else []
        ledger.version = current.version + 1
        blob = ledger.model_dump_json(indent=1).encode()
        replace_bytes(self.local, blob)  # os.replace locally; an object-store PUT is atomic
        self.exchange.put_bytes(
            LEDGER_KEY, sign_public(blob, context=self._context(ledger.version), sender=self.keys)
        )
        self._base = ledger.model_copy(deep=True)


def ledger_context(federation_id: str, version: int | None = None):
    from cloudfed.protection.envelope import SealContext

    return SealContext(
        federation_id=federation_id,
        round=0,
        party="coordinator",
        kind=LEDGER_KIND,
        metadata={} if version is None else {"version": version},
    )


def verified_for_party(exchange, coordinator, *, federation_id: str, head_file: AnyPath) -> Ledger:
    """The exchange's ledger as a party accepts it, or a ProtectionError.

    It must be signed by the pinned coordinator, no older than the newest version this party has
    seen before, and chained through it.
    """
    from cloudfed.protection.envelope import open_public

    if not exchange.exists(LEDGER_KEY):
        raise ProtectionError("privacy ledger missing on the exchange; no round can be verified")
    opened = open_public(
        exchange.get_bytes(LEDGER_KEY), context=ledger_context(federation_id), sender=coordinator
    )
    ledger = Ledger.model_validate_json(opened.payload)
    if ledger.federation_id != federation_id or opened.metadata.get("version") != ledger.version:
        raise ProtectionError("privacy ledger rejected: wrong federation or version")
    if len(ledger.chain) != max(0, ledger.version - 1):
        raise ProtectionError("privacy ledger rejected: its hash chain is incomplete")
    if head_file.exists():
        seen = json.loads(head_file.read_text(encoding="utf-8"))
        v, h = int(seen["version"]), str(seen["head"])
        if ledger.version < v:
            raise ProtectionError(
                f"privacy ledger rolled back: version {ledger.version} is older than version {v} "
                f"this party saw ({head_file}); refusing it"
            )
        at = ledger.head() if ledger.version == v else ledger.chain[v - 1]
        if at != h:
            raise ProtectionError(
                f"privacy ledger forked: its version {v} is not the one this party saw "
                f"({head_file}); refusing it"
            )
    seen = {"version": ledger.version, "head": ledger.head()}
    replace_bytes(head_file, json.dumps(seen).encode(), mode=0o700)
    return ledger


class Reservation(BaseModel):
    model_config = ConfigDict(frozen=True)

    granted: bool
    entry_id: str
    epsilon_before: float
    epsilon_after: float
    max_epsilon: float
    noise_multiplier: float
    message: str
    already_reserved: bool = False


def reserve(
    store: LedgerStore,
    *,
    delta: float,
    accountant: AccountantName,
    max_epsilon: float,
    run_id: str,
    round: int,
    mode: str,
    noise_multiplier: float,
    parties: Sequence[str],
) -> Reservation:
    """Charge one round before anything is released, unless it would pass the budget."""
    ledger = store.load(delta=delta, accountant=accountant)
    entry_id = f"{run_id}/r{round:04d}"
    before = ledger.epsilon()
    if (existing := ledger.entry(entry_id)) is not None:
        return Reservation(
            granted=True,
            entry_id=entry_id,
            epsilon_before=before,
            epsilon_after=before,
            max_epsilon=max_epsilon,
            noise_multiplier=existing.noise_multiplier,
            message=f"round {round} of run {run_id} was already reserved; charged once",
            already_reserved=True,
        )
    event = GaussianEvent(noise_multiplier, 1.0, 1)
    after = ledger.epsilon(extra=[event])
    if after > max_epsilon:
        return Reservation(
            granted=False,
            entry_id=entry_id,
            epsilon_before=before,
            epsilon_after=after,
            max_epsilon=max_epsilon,
            noise_multiplier=noise_multiplier,
            message=(
                f"privacy budget: spent epsilon={before:.4g} of max_epsilon={max_epsilon:g} "
                f"(delta={delta:g}, {accountant}) over {len(ledger.entries)} round(s) of this "
                f"federation; round {round} would bring it to {after:.4g}, so it was not started"
            ),
        )
    ledger.entries.append(
        LedgerEntry(
            id=entry_id,
            run_id=run_id,
            round=round,
            mode=mode,
            noise_multiplier=noise_multiplier,
            parties=sorted(parties),
            epsilon_after=after,
            at=_now(),
        )
    )
    store.save(ledger)
    return Reservation(
        granted=True,
        entry_id=entry_id,
        epsilon_before=before,
        epsilon_after=after,
        max_epsilon=max_epsilon,
        noise_multiplier=noise_multiplier,
        message=f"round {round} reserved: epsilon {before:.4g} -> {after:.4g} of {max_epsilon:g}",
    )


def commit(
    store: LedgerStore,
    *,
    delta: float,
    accountant: AccountantName,
    entry_id: str,
    contributors: Sequence[str],
    effective_noise_multiplier: float,
    global_sha256: str,
) -> Ledger:
    """Mark a reserved round as spent by exactly the parties whose updates are in the sum."""
    ledger = store.load(delta=delta, accountant=accountant)
    entry = ledger.entry(entry_id)
    if entry is None:
        raise ProtectionError(f"privacy ledger: {entry_id} was never reserved; refusing to publish")
    if entry.status == "spent":
        return ledger
    extra = set(contributors) - set(entry.parties)
    if extra:
        raise ProtectionError(f"privacy ledger: {sorted(extra)} contributed without a reservation")
    entry.status = "spent"
    entry.parties = sorted(contributors)
    entry.effective_noise_multiplier = effective_noise_multiplier
    entry.global_sha256 = global_sha256
    entry.at = _now()
    store.save(ledger)
    return ledger
