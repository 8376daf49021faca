"""Adversarial review of party-storage (every location through fsspec) and stages-deadlines.

`test_WEAKNESS_*` fail while the weakness is there; `test_holds_*` pin what held under attack.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from cloudfed import party as party_mod
from cloudfed.deadlines import LateAnswers, StageDeadlines, StageWindow
from cloudfed.errors import ConfigError, ProtectionError
from cloudfed.federation import parse_federation
from cloudfed.locations import StorePath, is_remote, on_disk
from cloudfed.party.secagg import _reveal_across_runs
from cloudfed.party.stages import party_record, secret_path, write_owner_only
from cloudfed.party_policy import ConsentError, policy_path
from cloudfed.privacy import party_ledger
from cloudfed.storage import open_store
from tests.protected_support import Federation, federation_dict

A, B, C = NAMES = ("alpha-aws", "beta-gcp", "gamma-azure")


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def _keys_elsewhere(tmp_path: Path, party: str) -> None:
    """The party's own policy keeps its keys in a private folder (not its storage)."""
    folder = tmp_path / "private-keys" / party
    shutil.copytree(tmp_path / "clouds" / party / "keys", folder)  # the same (pinned) keys
    path = policy_path(party)
    doc = yaml.safe_load(path.read_text())
    doc["keys"] = {"source": "storage", "folder": str(folder)}
    path.write_text(yaml.safe_dump(doc))


# --- (1) party storage aliases into the coordinator's storage or the exchange ------------------


def test_file_url_alias_of_coordinator_storage_is_refused_before_any_write(
    tmp_path: Path, model_cache: Path
) -> None:
    """Attack: `_inside` compared a file:// URL with a plain path as strings, and the check was
    bypassed (keys written into the coordinator's storage). Locations are now normalised, and
    consent refuses before anything is written."""
    fed = Federation(federation_dict(tmp_path, model_cache, NAMES))
    coordinator = Path(fed.cfg.coordinator_storage)
    before = sorted(coordinator.rglob("*"))
    moved = fed.moved(storage=f"file://{coordinator / 'alpha'}")
    try:
        party_mod.consent(moved, moved.party(A), fed.plan)
        raised = None
    except Exception as exc:  # today: a ConsentError from the pin check, after the keys were made
        raised = exc
    written = sorted(set(coordinator.rglob("*")) - set(before))
    assert not written, f"party private keys written into the coordinator's storage: {written}"
    assert isinstance(raised, ConfigError), raised


def test_party_storage_on_the_exchange_is_refused(tmp_path: Path, model_cache: Path) -> None:
    """Attack: only the key folder was checked: with keys elsewhere (env, secret manager,
    keys.folder), parties[].storage could point into the exchange, where harmonised splits,
    plaintext updates and secagg secrets would be written. Consent now refuses the storage."""
    fed = Federation(federation_dict(tmp_path, model_cache, NAMES))
    _keys_elsewhere(tmp_path, A)
    exchange = Path(fed.cfg.exchange)
    moved = fed.moved(storage=str(exchange / "alpha"))
    secrets = Path(str(secret_path(moved.party(A), 1, fed.plan.run_id, "secrets")))
    assert secrets.is_relative_to(exchange)  # where the party's mask secrets would go
    party_mod.consent(fed.cfg, fed.cfg.party(A), fed.plan)  # the moved keys are the pinned ones
    with pytest.raises(ConfigError):
        party_mod.consent(moved, moved.party(A), fed.plan)


def test_key_folder_check_sees_object_store_aliases(tmp_path: Path, model_cache: Path) -> None:
    """Attack: a doubled slash, '.', s3a:// or gcs:// named the same objects as the plain
    spelling and passed the key-folder check; the check now normalises both sides."""
    from cloudfed.storage import is_inside

    assert is_inside("s3://coord-bucket/fed/alpha/keys", "s3://coord-bucket/fed")  # the plain case
    aliases = [
        ("s3://coord-bucket//fed/alpha/keys", "s3://coord-bucket/fed"),
        ("s3a://coord-bucket/fed/alpha/keys", "s3://coord-bucket/fed"),
        ("s3://coord-bucket/fed/./alpha/keys", "s3://coord-bucket/fed"),
        ("gcs://coord-bucket/fed/alpha/keys", "gs://coord-bucket/fed"),
        ("s3://coord-bucket/other/../fed/alpha", "s3://coord-bucket/fed"),  # normalised
        ("s3://coord-bucket/fed/../alpha", "s3://coord-bucket/fed"),  # a literal key under fed/
    ]
    missed = [a for a in aliases if not is_inside(*a)]
    assert not missed, f"key-folder check bypassed by aliases: {missed}"


def test_unmask_record_survives_a_relaunch_with_a_fresh_storage(
    tmp_path: Path, model_cache: Path
) -> None:
    """Attack: the across-runs record (one survivor set per round and base adapter) was kept in
    parties[].storage, which the run configuration names: a relaunch with a fresh storage forgot
    it, and the party unmasked the same (seeded) update for a second survivor set. The record now
    lives in the party policy's own state_dir, which no run configuration can move."""
    fed = Federation(federation_dict(tmp_path, model_cache, NAMES))
    cfg, plan = fed.cfg, fed.plan
    _keys_elsewhere(tmp_path, A)  # so a fresh storage still holds no keys of its own
    _, loaded = party_mod.consent(cfg, cfg.party(A), plan)
    write_owner_only(party_record(loaded, plan.run_id, 1, "base"), b"ab" * 32)
    first = _reveal_across_runs(loaded, plan, 1, [A, B, C])
    assert first is not None and Path(str(first)).is_relative_to(Path(str(loaded.state_dir)))
    write_owner_only(first, json.dumps(sorted([A, B, C])).encode())
    with pytest.raises(ProtectionError, match="already unmasked"):  # same storage: refused
        _reveal_across_runs(loaded, plan, 1, [A, B])
    # The launcher relaunches with a fresh storage prefix; the retrained seeded update is the same.
    fresh = tmp_path / "fresh" / A
    moved = fed.moved(storage=str(fresh))
    with pytest.raises(ConsentError, match="is not the party's own storage"):
        party_mod.consent(moved, moved.party(A), plan)  # a policy that records its storage
    # A policy without a recorded storage (or one its party moved): the record still holds.
    doc = yaml.safe_load(policy_path(A).read_text())
    doc.pop("storage")
    policy_path(A).write_text(yaml.safe_dump(doc))
    _, loaded2 = party_mod.consent(moved, moved.party(A), plan)
    write_owner_only(party_record(loaded2, plan.run_id, 1, "base"), b"ab" * 32)
    with pytest.raises(ProtectionError, match="already unmasked"):
        _reveal_across_runs(loaded2, plan, 1, [A, B])
    assert not list(fresh.rglob("*revealed*")), "no once-only record in the launcher's storage"


def test_raw_exports_or_a_storage_around_the_coordinator_are_refused_before_any_write(
    tmp_path: Path, model_cache: Path
) -> None:
    """Raw exports in the exchange, and a party storage that contains the coordinator's storage
    (the party writes updates/ and secagg/ below its storage), are refused by consent, under
    any spelling, with the field and the fix named, before anything is written."""
    fed = Federation(federation_dict(tmp_path, model_cache, NAMES))
    _keys_elsewhere(tmp_path, A)
    exchange, coordinator = Path(fed.cfg.exchange), Path(fed.cfg.coordinator_storage)
    raw = fed.cfg.party(A).raw.model_dump()
    cases = [
        ({"raw": raw | {"train": f"file://{exchange}//alpha/../alpha/train.csv"}}, "raw.train"),
        ({"raw": raw | {"eval": f"{coordinator}/./x/../eval.csv"}}, "raw.eval"),
        ({"storage": f"file://{coordinator.parent}/"}, "coordinator_storage="),
        ({"storage": str(coordinator / ".." / coordinator.name)}, ".storage"),
    ]
    for change, field in cases:
        before = sorted(tmp_path.rglob("*"))
        moved = fed.moved(**change)
        with pytest.raises(ConfigError, match="Fix: point") as refused:
            party_mod.consent(moved, moved.party(A), fed.plan)
        assert field in str(refused.value), (change, refused.value)
        assert f"parties[{A}]" in str(refused.value)
        assert sorted(tmp_path.rglob("*")) == before, f"written before the refusal: {change}"


# --- (1) party state in an object store: the DP-SGD training lock ------------------------------


def test_object_lock_release_leaves_a_successors_lock() -> None:
    """Attack: the lock was deleted unconditionally on release. After a stale-lock cleanup (as
    the refusal advised) a finishing training deleted its successor's lock, and a third training
    then ran beside the second: two trainings sharing one budget reservation. Release now
    deletes only a lock that still carries the holder's nonce."""
    state = StorePath(open_store("memory://review-lock/state"))
    with ExitStack() as first:
        first.enter_context(party_ledger.training_lock(state, A))
        (state / "dp_sgd.lock").unlink()  # "the lock was left by a killed one: delete it"
        with ExitStack() as second:
            second.enter_context(party_ledger.training_lock(state, A))
            first.close()  # the first training ends: the second's lock stays
            assert (state / "dp_sgd.lock").exists()
            with pytest.raises(ConsentError):
                with party_ledger.training_lock(state, A):  # third, while the second runs
                    pass
        assert not (state / "dp_sgd.lock").exists()  # the second removed its own


def test_object_lock_refusal_says_how_to_check_the_holder() -> None:
    state = StorePath(open_store("memory://review-lock3/state"))
    with party_ledger.training_lock(state, A):
        with pytest.raises(ConsentError) as refused:
            with party_ledger.training_lock(state, A):
                pass
    message = str(refused.value)
    assert f"held by process {os.getpid()} on host {socket.gethostname()}" in message
    assert "check whether that training still runs" in message
    assert "only once it has ended or been killed, delete the lock" in message


def test_holds_object_lock_refuses_a_second_training() -> None:
    state = StorePath(open_store("memory://review-lock2/state"))
    with party_ledger.training_lock(state, A):
        with pytest.raises(ConsentError, match="another DP-SGD training"):
            with party_ledger.training_lock(state, A):
                pass
    with party_ledger.training_lock(state, A):  # released afterwards
        pass


# --- (1) on_disk: temp folders -----------------------------------------------------------------


def test_holds_on_disk_is_private_removed_and_skips_hidden_names(tmp_path: Path) -> None:
    target = StorePath(open_store("memory://review-ondisk/p"))
    (target / "keys" / "x.pem").write_bytes(b"secret")
    with on_disk(target) as work:
        assert (work.stat().st_mode & 0o777) == 0o700
        assert ((work / "keys" / "x.pem").stat().st_mode & 0o777) == 0o600
        (work / ".staging").mkdir()
        (work / ".staging" / "train.parquet").write_bytes(b"rows")
        (work / "harmonised").mkdir()
        (work / "harmonised" / ".train.tmp").write_bytes(b"rows")
        kept = work
    assert not kept.exists()
    assert sorted(target.keys()) == ["keys/x.pem"]


# --- (1) credentials in options ----------------------------------------------------------------


def test_holds_credentials_refused_in_every_new_options_field(
    tmp_path: Path, model_cache: Path
) -> None:
    raw = federation_dict(tmp_path, model_cache, NAMES)
    for where, doc in (
        ("storage_options", {"secret": "x"}),
        ("raw_options", {"client_kwargs": {"aws_secret_access_key": "x"}}),
    ):
        bad = json.loads(json.dumps(raw))
        bad["parties"][0][where] = doc
        with pytest.raises(Exception, match="credentials"):
            parse_federation(bad)
    bad = json.loads(json.dumps(raw))
    bad["coordinator_storage_options"] = {"account_key": "x"}
    with pytest.raises(Exception, match="credentials"):
        parse_federation(bad)


def test_credentials_in_header_options_and_url_userinfo_are_refused(
    tmp_path: Path, model_cache: Path
) -> None:
    """Attack: an Authorization header (HTTP raw exports), an x-api-key, or userinfo in a URL
    once passed the credentials check (fixed on main); each is now refused."""
    raw = federation_dict(tmp_path, model_cache, NAMES)
    accepted = []
    for name, change in (
        ("raw_options headers", ("raw_options", {"headers": {"Authorization": "Bearer s3cr3t"}})),
        ("x-api-key", ("storage_options", {"client_kwargs": {"headers": {"x-api-key": "s3cr3t"}}})),
        ("url userinfo", ("raw", {"train": "sftp://u:s3cr3t@host/t.csv", "eval": "e.csv"})),
    ):
        bad = json.loads(json.dumps(raw))
        bad["parties"][0][change[0]] = change[1]
        try:
            parse_federation(bad)
            accepted.append(name)
        except Exception:
            pass
    assert not accepted, f"credentials accepted in the run configuration: {accepted}"


# --- (2) deadlines -----------------------------------------------------------------------------


class _Step:
    def __init__(self, clock: list[float], done_at: float) -> None:
        self.clock, self.done_at = clock, done_at

    def running(self) -> bool:
        return self.clock[0] < self.done_at


def test_holds_deadline_is_judged_on_the_coordinators_clock_and_late_answers_refused() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    window = StageWindow("upload", 1, 5.0, clock=lambda: now[0], sleep=sleep)
    steps = {A: _Step(now, 1.0), B: _Step(now, 2.0), C: _Step(now, 9.0)}
    finished, dropped, late = window.collect(steps)
    assert sorted(finished) == [A, B] and [r.party for r in dropped] == [C] and list(late) == [C]
    answers = LateAnswers(clock=lambda: now[0])
    answers.add(window, late)
    now[0] = 10.0
    came = answers.sweep()
    assert [r.party for r in came] == [C] and "refused" in came[0].reason


def test_holds_fault_hook_and_deadlines_cannot_disable_checks_from_run_config(
    tmp_path: Path, model_cache: Path
) -> None:
    raw = federation_dict(tmp_path, model_cache, NAMES)
    for extra in ({"fault_delay": "alpha-aws:upload:5"}, {"deadlines": {"upload": 0}}):
        bad = json.loads(json.dumps(raw)) | extra
        with pytest.raises(ConfigError):
            parse_federation(bad)
    assert StageDeadlines().seconds("unmask") > 0


def test_holds_light_operator_never_gets_heavy_steps(tmp_path: Path, model_cache: Path) -> None:
    raw = federation_dict(tmp_path, model_cache, NAMES)
    raw["parties"][0] |= {"step_operator": "gpu-a", "light_step_operator": "k8s-a"}
    p = parse_federation(raw).party(A)
    assert {p.step_operator_for(s) for s in ("harmonize", "train", "evaluate")} == {"gpu-a"}
    assert {p.step_operator_for(s) for s in ("share_keys", "upload", "unmask")} == {"k8s-a"}
    assert not is_remote(str(tmp_path))
