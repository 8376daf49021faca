"""The privacy-budget ledger: budget stop, resume without double spending, tamper resistance.

Every test uses a real on-disk exchange and real coordinator keys; the ledger's two copies (the
signed one on the exchange, the coordinator's own) are manipulated directly, as an attacker with
write access to the untrusted exchange, or an operator wiping a directory, would.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cloudfed.errors import CloudfedError, DataError, ProtectionError
from cloudfed.exchange import Exchange
from cloudfed.privacy import party_ledger
from cloudfed.privacy.accountant import GaussianEvent, epsilon
from cloudfed.privacy.ledger import (
    LEDGER_KEY,
    LEDGER_KIND,
    Ledger,
    LedgerStore,
    commit,
    reserve,
)
from cloudfed.privacy.settings import DpSgdSettings
from cloudfed.protection import load_or_create_keys
from cloudfed.protection.envelope import SealContext, sign_public

FED = "test-fed"
DELTA = 1e-5
Z = 2.0
PARTIES = ["alpha-aws", "beta-gcp", "gamma-azure"]


class Site:
    """One coordinator: its exchange, its keys and its storage, all under tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.exchange = Exchange(str(tmp_path / "ex"))
        self.keys = load_or_create_keys("coordinator", "coordinator", tmp_path / "keys")
        self.storage = tmp_path / "coordinator"

    def store(self) -> LedgerStore:
        """A fresh store object each time, as a restarted process would build it."""
        return LedgerStore(
            self.exchange, self.keys, federation_id=FED, coordinator_storage=str(self.storage)
        )

    @property
    def local(self) -> Path:
        return self.storage / FED / "privacy" / "ledger.json"

    @property
    def remote(self) -> Path:
        return Path(self.exchange._path(LEDGER_KEY))

    def reserve(
        self,
        round: int,
        *,
        run_id: str = "run-a",
        max_epsilon: float = 1e6,
        z: float = Z,
        parties: list[str] | None = None,
        accountant: str = "rdp",
        delta: float = DELTA,
    ):
        return reserve(
            self.store(),
            delta=delta,
            accountant=accountant,
            max_epsilon=max_epsilon,
            run_id=run_id,
            round=round,
            mode="central",
            noise_multiplier=z,
            parties=PARTIES if parties is None else parties,
        )

    def commit(self, entry_id: str, contributors: list[str], **kw):
        return commit(
            self.store(),
            delta=kw.get("delta", DELTA),
            accountant=kw.get("accountant", "rdp"),
            entry_id=entry_id,
            contributors=contributors,
            effective_noise_multiplier=kw.get("effective", Z),
            global_sha256="ab" * 32,
        )

    def load(self, *, delta: float = DELTA, accountant: str = "rdp") -> Ledger:
        return self.store().load(delta=delta, accountant=accountant)


def eps_rounds(k: int, z: float = Z, accountant: str = "rdp") -> float:
    return epsilon([GaussianEvent(z, 1.0, 1)] * k, DELTA, accountant)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


# --- budget stop ------------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_budget_stop_refuses_the_round_that_would_pass_max_epsilon(
    site: Site, accountant: str
) -> None:
    # A budget between three and four rounds' worth: three are granted, the fourth is refused.
    three, four = eps_rounds(3, accountant=accountant), eps_rounds(4, accountant=accountant)
    budget = round((three + four) / 2, 3)
    assert three < budget < four
    granted = [site.reserve(r, max_epsilon=budget, accountant=accountant) for r in range(1, 4)]
    assert all(g.granted and not g.already_reserved for g in granted)
    assert [g.epsilon_after for g in granted] == pytest.approx(
        [eps_rounds(k, accountant=accountant) for k in (1, 2, 3)], rel=1e-6
    )
    assert granted[1].epsilon_before == pytest.approx(granted[0].epsilon_after, rel=1e-9)
    before = site.local.read_bytes(), site.exchange.get_bytes(LEDGER_KEY)

    refused = site.reserve(4, max_epsilon=budget, accountant=accountant)
    assert refused.granted is False
    assert refused.entry_id == "run-a/r0004"
    assert refused.epsilon_before == pytest.approx(three, rel=1e-6)
    assert refused.epsilon_after == pytest.approx(four, rel=1e-6)
    assert refused.epsilon_after > refused.max_epsilon == budget
    msg = refused.message
    assert f"spent epsilon={three:.4g}" in msg
    assert f"max_epsilon={budget:g}" in msg
    assert f"would bring it to {four:.4g}" in msg
    assert "3 round(s)" in msg and "not started" in msg and accountant in msg

    # The refused round left no trace in either copy, and stays refused.
    assert (site.local.read_bytes(), site.exchange.get_bytes(LEDGER_KEY)) == before
    ledger = site.load(accountant=accountant)
    assert [e.id for e in ledger.entries] == ["run-a/r0001", "run-a/r0002", "run-a/r0003"]
    assert ledger.entry("run-a/r0004") is None
    assert site.reserve(4, max_epsilon=budget, accountant=accountant).granted is False
    assert len(site.load(accountant=accountant).entries) == 3


def test_a_round_exactly_at_the_budget_is_granted(site: Site) -> None:
    one = eps_rounds(1)
    assert site.reserve(1, max_epsilon=one * (1 + 1e-9)).granted
    assert not site.reserve(2, max_epsilon=one * (1 + 1e-9)).granted


def test_a_noisier_round_may_still_fit_after_a_refusal(site: Site) -> None:
    budget = eps_rounds(1) * 1.2
    assert site.reserve(1, max_epsilon=budget).granted
    assert not site.reserve(2, max_epsilon=budget).granted
    noisy = site.reserve(2, max_epsilon=budget, z=20.0)
    assert noisy.granted and noisy.noise_multiplier == 20.0
    expected = epsilon([GaussianEvent(Z, 1.0, 1), GaussianEvent(20.0, 1.0, 1)], DELTA, "rdp")
    assert noisy.epsilon_after == pytest.approx(expected, rel=1e-6)


# --- resume without double spending ---------------------------------------------------------


def test_reserving_the_same_round_twice_charges_once(site: Site) -> None:
    first = site.reserve(1)
    again = site.reserve(1, z=0.5)  # a retried step, even with other settings, charges nothing
    assert first.granted and not first.already_reserved
    assert again.granted and again.already_reserved
    assert again.entry_id == first.entry_id == "run-a/r0001"
    assert again.epsilon_after == again.epsilon_before == pytest.approx(first.epsilon_after)
    assert again.noise_multiplier == Z  # what was charged, not what was asked the second time
    assert "charged once" in again.message
    ledger = site.load()
    assert len(ledger.entries) == 1
    assert ledger.epsilon() == pytest.approx(eps_rounds(1), rel=1e-9)


def test_a_restarted_store_sees_the_same_spend(site: Site) -> None:
    for r in (1, 2):
        site.reserve(r)
    restarted = Site(site.tmp)  # new objects, same directories: a new process
    ledger = restarted.load()
    assert [e.id for e in ledger.entries] == ["run-a/r0001", "run-a/r0002"]
    assert ledger.epsilon() == pytest.approx(eps_rounds(2), rel=1e-9)
    again = restarted.reserve(2)
    assert again.already_reserved and len(restarted.load().entries) == 2


class _Killed(BaseException):
    """The process dies here: nothing after it runs (not an error anything may catch)."""


def test_a_kill_between_the_exchange_copy_and_its_digest_does_not_stop_the_rerun(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CI-found kill point: round 2's exchange copy written, its sha256 not yet.

    Before the store announced digests, the rerun read round 2's bytes against round 1's digest
    and refused the ledger as tampered.
    """
    from cloudfed import storage

    site.reserve(1)
    write = storage._atomic_local_write
    digest_of_ledger = site.exchange._sidecar(str(site.remote))

    def dies_before_the_digest(path: str, data: bytes, *, exclusive: bool) -> None:
        if path == digest_of_ledger:
            raise _Killed
        write(path, data, exclusive=exclusive)

    monkeypatch.setattr(storage, "_atomic_local_write", dies_before_the_digest)
    with pytest.raises(_Killed):
        site.reserve(2)
    monkeypatch.setattr(storage, "_atomic_local_write", write)
    restarted = Site(site.tmp)
    assert [e.id for e in restarted.load().entries] == ["run-a/r0001", "run-a/r0002"]
    assert restarted.reserve(2).already_reserved  # charged once
    assert restarted.reserve(3).entry_id == "run-a/r0003"


def test_a_second_run_continues_from_the_first_runs_total(site: Site) -> None:
    for r in (1, 2, 3):
        site.reserve(r, run_id="run-a")
    first_total = site.load().epsilon()
    nxt = site.reserve(1, run_id="run-b", z=1.5)
    assert nxt.granted and not nxt.already_reserved
    assert nxt.entry_id == "run-b/r0001"
    assert nxt.epsilon_before == pytest.approx(first_total, rel=1e-9)
    events = [GaussianEvent(Z, 1.0, 1)] * 3 + [GaussianEvent(1.5, 1.0, 1)]
    assert nxt.epsilon_after == pytest.approx(epsilon(events, DELTA, "rdp"), rel=1e-9)
    assert nxt.epsilon_after > first_total
    ledger = site.load()
    assert [e.id for e in ledger.entries][-1] == "run-b/r0001"
    assert [e.run_id for e in ledger.entries] == ["run-a"] * 3 + ["run-b"]
    assert ledger.entries[-1].epsilon_after == pytest.approx(nxt.epsilon_after)
    # Round 1 of run-a and round 1 of run-b are different rounds: both are charged.
    assert site.reserve(1, run_id="run-a").already_reserved
    assert len(site.load().entries) == 4


def test_both_copies_hold_the_same_signed_ledger(site: Site) -> None:
    site.reserve(1)
    local = json.loads(site.local.read_bytes())
    assert local["federation_id"] == FED and local["delta"] == DELTA
    assert [e["id"] for e in local["entries"]] == ["run-a/r0001"]
    assert local["entries"][0]["status"] == "reserved"
    # The exchange copy carries the same JSON, signed (not encrypted: anyone may audit it).
    assert site.local.read_bytes() in site.exchange.get_bytes(LEDGER_KEY)


# --- commit -----------------------------------------------------------------------------------


def test_commit_marks_spent_by_the_contributors(site: Site) -> None:
    site.reserve(1)
    ledger = site.commit("run-a/r0001", ["gamma-azure", "alpha-aws"], effective=2.4)
    entry = ledger.entry("run-a/r0001")
    assert entry is not None and entry.status == "spent"
    assert entry.parties == ["alpha-aws", "gamma-azure"]
    assert entry.effective_noise_multiplier == 2.4
    assert entry.global_sha256 == "ab" * 32
    assert entry.noise_multiplier == Z  # charged at the floor, not the effective noise
    reloaded = site.load().entry("run-a/r0001")
    assert reloaded is not None and reloaded.status == "spent"
    assert reloaded.parties == ["alpha-aws", "gamma-azure"]
    # Committing again changes nothing.
    again = site.commit("run-a/r0001", ["alpha-aws"])
    assert again.entry("run-a/r0001").parties == ["alpha-aws", "gamma-azure"]


def test_commit_of_an_unreserved_round_is_refused(site: Site) -> None:
    site.reserve(1)
    with pytest.raises(ProtectionError, match=re.escape("run-a/r0002 was never reserved")):
        site.commit("run-a/r0002", ["alpha-aws", "beta-gcp"])
    assert site.load().entry("run-a/r0002") is None


def test_commit_with_a_party_outside_the_reservation_is_refused(site: Site) -> None:
    site.reserve(1, parties=["alpha-aws", "beta-gcp"])
    with pytest.raises(ProtectionError, match=r"\['gamma-azure'\] contributed without"):
        site.commit("run-a/r0001", ["alpha-aws", "gamma-azure"])
    entry = site.load().entry("run-a/r0001")
    assert entry is not None and entry.status == "reserved"


def test_party_epsilon_counts_only_that_partys_rounds(site: Site) -> None:
    site.reserve(1)
    site.commit("run-a/r0001", ["alpha-aws", "beta-gcp"])  # gamma dropped out of round 1
    site.reserve(2, parties=["alpha-aws", "gamma-azure"])
    site.reserve(3, parties=["alpha-aws", "beta-gcp"])
    ledger = site.load()
    assert ledger.parties() == PARTIES
    assert ledger.epsilon(party="alpha-aws") == pytest.approx(eps_rounds(3), rel=1e-9)
    assert ledger.epsilon(party="beta-gcp") == pytest.approx(eps_rounds(2), rel=1e-9)
    assert ledger.epsilon(party="gamma-azure") == pytest.approx(eps_rounds(1), rel=1e-9)
    assert ledger.epsilon(party="delta-oci") == 0.0
    assert ledger.epsilon() == pytest.approx(eps_rounds(3), rel=1e-9)
    assert ledger.epsilon(party="gamma-azure") < ledger.epsilon()


# --- tamper resistance ------------------------------------------------------------------------


def _context() -> SealContext:
    return SealContext(federation_id=FED, round=0, party="coordinator", kind=LEDGER_KIND)


def test_exchange_copy_resigned_by_another_key_is_refused(site: Site) -> None:
    for r in (1, 2, 3):
        site.reserve(r)
    ledger = site.load()
    ledger.entries = ledger.entries[:1]  # an attacker shrinks the spend...
    other = load_or_create_keys("coordinator", "coordinator", site.tmp / "other-keys")
    blob = ledger.model_dump_json(indent=1).encode()
    site.exchange.put_bytes(LEDGER_KEY, sign_public(blob, context=_context(), sender=other))
    site.local.unlink()  # ...even with the coordinator's copy gone, it is not believed
    with pytest.raises(ProtectionError, match="not signed by this coordinator") as err:
        site.load()
    assert "Fix:" in str(err.value)
    with pytest.raises(ProtectionError):
        site.reserve(4)


@pytest.mark.parametrize("where", ["payload", "signature"])
def test_exchange_copy_with_flipped_bytes_is_refused(site: Site, where: str) -> None:
    site.reserve(1)
    blob = bytearray(site.exchange.get_bytes(LEDGER_KEY))
    if where == "payload":
        pos = blob.index(b'"noise_multiplier": 2.0')
        blob[pos : pos + 23] = b'"noise_multiplier": 9.0'
    else:
        blob[-5] ^= 0x01
    site.exchange.put_bytes(LEDGER_KEY, bytes(blob))
    with pytest.raises(ProtectionError):
        site.load()
    with pytest.raises(ProtectionError):
        site.reserve(2)


def test_deleting_the_exchange_copy_does_not_reset_the_budget(site: Site) -> None:
    for r in (1, 2):
        site.reserve(r)
    site.remote.unlink()
    assert not site.exchange.exists(LEDGER_KEY)
    ledger = site.load()
    assert len(ledger.entries) == 2
    assert ledger.epsilon() == pytest.approx(eps_rounds(2), rel=1e-9)
    nxt = site.reserve(3)
    assert nxt.epsilon_before == pytest.approx(eps_rounds(2), rel=1e-9)
    assert site.exchange.exists(LEDGER_KEY)  # restored from the coordinator's copy
    assert site.local.read_bytes() in site.exchange.get_bytes(LEDGER_KEY)


def test_deleting_the_coordinators_copy_does_not_reset_the_budget(site: Site) -> None:
    for r in (1, 2):
        site.reserve(r)
    site.local.unlink()
    assert len(site.load().entries) == 2
    assert site.reserve(3).epsilon_before == pytest.approx(eps_rounds(2), rel=1e-9)
    assert site.local.exists()


def test_an_older_exchange_copy_is_ignored_for_the_longer_local_one(site: Site) -> None:
    site.reserve(1)
    old = site.exchange.get_bytes(LEDGER_KEY)
    site.reserve(2)
    site.exchange.put_bytes(LEDGER_KEY, old)  # rollback of the untrusted store
    assert [e.id for e in site.load().entries] == ["run-a/r0001", "run-a/r0002"]
    assert site.reserve(2).already_reserved


def test_diverging_copies_are_refused(site: Site) -> None:
    site.reserve(1)
    after_one = site.exchange.get_bytes(LEDGER_KEY)
    site.reserve(2)
    local_12 = site.local.read_bytes()
    # Make the exchange hold [r1, r3], validly signed, while the coordinator holds [r1, r2].
    site.local.unlink()
    site.exchange.put_bytes(LEDGER_KEY, after_one)
    site.reserve(3)
    site.local.write_bytes(local_12)
    with pytest.raises(ProtectionError, match="neither is a prefix"):
        site.load()
    with pytest.raises(ProtectionError):
        site.reserve(4)


@pytest.mark.parametrize(("delta", "accountant"), [(1e-6, "rdp"), (DELTA, "prv"), (1e-6, "prv")])
def test_changing_delta_or_accountant_between_runs_is_refused(
    site: Site, delta: float, accountant: str
) -> None:
    site.reserve(1)
    with pytest.raises(CloudfedError) as err:
        site.reserve(1, run_id="run-b", delta=delta, accountant=accountant)
    msg = str(err.value)
    assert f"delta={DELTA}" in msg and "rdp" in msg and "Fix:" in msg
    assert len(site.load().entries) == 1


def test_a_ledger_of_another_federation_is_refused(site: Site) -> None:
    site.reserve(1)
    site.remote.unlink()
    doc = json.loads(site.local.read_bytes())
    doc["federation_id"] = "other-fed"
    site.local.write_text(json.dumps(doc))
    with pytest.raises(ProtectionError, match="other-fed"):
        site.load()


# --- the party's own DP-SGD ledger ------------------------------------------------------------


def _dp_sgd(**kw) -> DpSgdSettings:
    return DpSgdSettings(**{"noise_multiplier": 1.1, "delta": DELTA, **kw})


def _party_reserve(path: Path, entry_id: str, round: int, event: GaussianEvent, **kw):
    """(ledger, already charged): a retry of a reserved round reuses its entry."""
    settings = kw.pop("settings", _dp_sgd())
    existed = path.exists() and any(
        e.id == entry_id for e in party_ledger.load(path, party="alpha-aws", delta=DELTA).entries
    )
    ledger, entry, _ = party_ledger.attempt(
        path,
        party="alpha-aws",
        delta=settings.delta,
        max_epsilon=settings.max_epsilon,
        base_id=entry_id,
        run_id=entry_id.split("/")[0],
        round=round,
        event=event,
        kept=lambda entry: False,
    )
    return ledger, existed and entry.id == entry_id


def test_party_ledger_charges_a_retried_round_once(tmp_path: Path) -> None:
    path = party_ledger.ledger_path(tmp_path / "alpha")
    event = GaussianEvent(1.1, 0.05, 40)
    ledger, charged = _party_reserve(path, "run-a/r0001", 1, event)
    assert charged is False
    assert len(ledger.entries) == 1
    entry = ledger.entries[0]
    assert (entry.mode, entry.parties, entry.run_id) == ("dp-sgd", ["alpha-aws"], "run-a")
    assert (entry.sample_rate, entry.steps) == (0.05, 40)
    on_disk = path.read_bytes()

    again, charged = _party_reserve(path, "run-a/r0001", 1, event)
    assert charged is True
    assert len(again.entries) == 1
    assert path.read_bytes() == on_disk
    assert again.epsilon() == pytest.approx(epsilon([event], DELTA, "rdp"), rel=1e-9)

    nxt, charged = _party_reserve(path, "run-a/r0002", 2, event)
    assert charged is False and len(nxt.entries) == 2
    assert nxt.epsilon() == pytest.approx(epsilon([event, event], DELTA, "rdp"), rel=1e-9)
    party_ledger.mark_spent(path, nxt, "run-a/r0002")
    reloaded = party_ledger.load(path, party="alpha-aws", delta=DELTA)
    assert [e.status for e in reloaded.entries] == ["reserved", "spent"]


def test_party_ledger_refuses_to_pass_its_max_epsilon(tmp_path: Path) -> None:
    path = party_ledger.ledger_path(tmp_path / "alpha")
    event = GaussianEvent(1.1, 0.05, 40)
    one, two = epsilon([event], DELTA, "rdp"), epsilon([event] * 2, DELTA, "rdp")
    settings = _dp_sgd(max_epsilon=round((one + two) / 2, 3))
    _party_reserve(path, "run-a/r0001", 1, event, settings=settings)
    on_disk = path.read_bytes()
    with pytest.raises(DataError) as err:
        _party_reserve(path, "run-a/r0002", 2, event, settings=settings)
    msg = str(err.value)
    assert msg.startswith("alpha-aws:")
    assert f"spent epsilon={one:.4g}" in msg
    assert (
        f"of {settings.max_epsilon:g} (the stricter of privacy.dp_sgd.alpha-aws.max_epsilon" in msg
    )
    assert f"would bring it to {two:.4g}" in msg and "Fix:" in msg
    assert path.read_bytes() == on_disk  # nothing charged for a round that does not train
    # A retry of the round already charged still passes (it does not spend again).
    assert _party_reserve(path, "run-a/r0001", 1, event, settings=settings)[1] is True


def test_party_ledger_refuses_a_changed_delta(tmp_path: Path) -> None:
    path = party_ledger.ledger_path(tmp_path / "alpha")
    _party_reserve(path, "run-a/r0001", 1, GaussianEvent(1.1, 0.05, 40))
    with pytest.raises(DataError, match="delta"):
        _party_reserve(
            path, "run-b/r0001", 1, GaussianEvent(1.1, 0.05, 40), settings=_dp_sgd(delta=1e-6)
        )
