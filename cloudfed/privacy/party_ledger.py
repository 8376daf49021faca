"""A party's own record-level (DP-SGD) budget, kept in its own state folder and never shared.

The folder comes from the party's policy, not from the run configuration, so a launcher cannot
reset the budget by pointing `parties[].storage` elsewhere; and one ledger counts every run and
every federation on the party's data (entries are keyed `<federation>/<run that published the
adapter trained from>/r<round>[/a<attempt>]`, and epsilon composes all of them). An entry is
written before training starts; see `attempt` for when a retry is charged again (always, unless
it hands back the update already paid for, or the earlier attempt released nothing).
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cloudfed.errors import DataError
from cloudfed.locations import AnyPath, StorePath, replace_bytes
from cloudfed.privacy.accountant import GaussianEvent
from cloudfed.privacy.ledger import Ledger, LedgerEntry, _now


def ledger_path(state_dir: str | AnyPath) -> AnyPath:
    return _dir(state_dir) / "dp_sgd_ledger.json"


def _dir(state_dir: str | AnyPath) -> AnyPath:
    return state_dir if isinstance(state_dir, StorePath) else Path(state_dir)


def load(path: AnyPath, *, party: str, delta: float) -> Ledger:
    if not path.exists():
        return Ledger(federation_id=party, delta=delta, accountant="rdp")
    ledger = Ledger.model_validate_json(path.read_bytes())
    if ledger.delta != delta:
        raise DataError(
            f"{path}: this party's DP-SGD ledger accounts at delta={ledger.delta}, the config "
            f"asks for {delta}. Fix: keep privacy.dp_sgd.<party>.delta as it started"
        )
    return ledger


def save(path: AnyPath, ledger: Ledger) -> None:
    replace_bytes(path, ledger.model_dump_json(indent=1).encode(), mode=0o700)


def _same_event(entry: LedgerEntry, event: GaussianEvent) -> bool:
    return (entry.noise_multiplier, entry.sample_rate, entry.steps) == (
        event.noise_multiplier,
        event.sample_rate,
        event.steps,
    )


def attempt(
    path: AnyPath,
    *,
    party: str,
    delta: float,
    max_epsilon: float,
    base_id: str,
    run_id: str,
    round: int,
    event: GaussianEvent,
    kept: Callable[[LedgerEntry], bool],
) -> tuple[Ledger, LedgerEntry, bool]:
    """The entry a training runs under, charged before it starts; (ledger, entry, hand_back).

    `base_id` names a round trained from one global adapter. Its attempts are, in order:
    - an earlier attempt with the same event whose update is still kept (`kept(entry)`): that
      update is handed back, not retrained. Re-sending the release already paid for is
      post-processing.
    - an earlier attempt with the same event still `reserved`: it was killed before its update
      existed, so nothing was released; training runs once more under that charge.
    - otherwise a new entry (`<base_id>`, then `<base_id>/a2`, ...), charged now: a spent attempt
      whose update is gone, or a changed event (steps, sample rate, noise), is never re-trained
      under the old charge.
    Callers hold `training_lock` from here until the update is kept, so two trainings can never
    share one reservation.
    """
    ledger = load(path, party=party, delta=delta)
    tries = [e for e in ledger.entries if e.id == base_id or e.id.startswith(f"{base_id}/a")]
    for entry in reversed(tries):
        if _same_event(entry, event) and entry.status == "spent" and kept(entry):
            return ledger, entry, True
    for entry in reversed(tries):
        if _same_event(entry, event) and entry.status == "reserved":
            return ledger, entry, False
    after = ledger.epsilon(extra=[event])
    if after > max_epsilon:
        raise DataError(
            f"{party}: record-level DP-SGD budget: spent epsilon={ledger.epsilon():.4g} of "
            f"{max_epsilon:g} (the stricter of privacy.dp_sgd.{party}.max_epsilon and the "
            f"party policy's dp_sgd.max_epsilon, ledger {path}); round {round} would bring it "
            f"to {after:.4g}, so this party does not train. Fix: raise the cap only if the data "
            "owner agrees"
        )
    entry = LedgerEntry(
        id=base_id if not tries else f"{base_id}/a{len(tries) + 1}",
        run_id=run_id,
        round=round,
        mode="dp-sgd",
        noise_multiplier=event.noise_multiplier,
        sample_rate=event.sample_rate,
        steps=event.steps,
        parties=[party],
        epsilon_after=after,
        at=_now(),
    )
    ledger.entries.append(entry)
    save(path, ledger)
    return ledger, entry, False


@contextmanager
def training_lock(state_dir: str | AnyPath, party: str) -> Iterator[None]:
    """One DP-SGD training of this party at a time (the OS drops the lock if the process dies).

    State in an object store: the lock is an object written only if absent (a conditional PUT),
    removed when training ends; one left by a killed training is named in the refusal.
    """
    where = _dir(state_dir)
    if isinstance(where, StorePath):
        with _object_lock(where / "dp_sgd.lock", party):
            yield
        return
    path = where / "dp_sgd.lock"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            from cloudfed.party_policy import ConsentError

            raise ConsentError(
                f"{party} refuses to train: another DP-SGD training of this party is running "
                f"({path} is locked). Two runs at once would share one budget reservation"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextmanager
def _object_lock(lock: StorePath, party: str) -> Iterator[None]:
    from cloudfed.party_policy import ConsentError

    # a nonce: an exclusive put that finds its own bytes counts as done (a retried upload), so
    # two acquirers in one process and second must not write the same body
    body = f"{os.getpid()} {_now()} {uuid.uuid4().hex}"
    try:
        lock.store.put_bytes(lock.key, body.encode(), exclusive=True)
    except FileExistsError:
        raise ConsentError(
            f"{party} refuses to train: another DP-SGD training of this party is running ({lock} "
            "exists). Two runs at once would share one budget reservation. Fix: if no training "
            "of this party runs, the lock was left by a killed one: delete it"
        ) from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def mark_spent(path: AnyPath, ledger: Ledger, entry_id: str) -> None:
    entry = ledger.entry(entry_id)
    if entry is not None and entry.status != "spent":
        entry.status = "spent"
        entry.at = _now()
        save(path, ledger)
