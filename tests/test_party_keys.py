"""A party's private keys: its own source, never the coordinator's, and rotation through a roster.

Sources (the party's policy chooses): an owner-only folder of its storage, an environment
variable, a secret manager (AWS Secrets Manager under moto's in-process mock). Rotation runs end
to end through real secure-aggregation rounds (`tests.protected_support.Federation`): the new pin
is followed only through the coordinator's keys roster and only from the pinned old key.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from cloudfed import party as party_mod
from cloudfed.errors import ConfigError
from cloudfed.exchange import public_key_key, publish_public_keys, rotation_key, secagg_roster_key
from cloudfed.keys import (
    StorageKeySource,
    follow_rotations,
    load_party_keys,
    party_key_source,
    rotate,
)
from cloudfed.keys.__main__ import main as keys_cli
from cloudfed.party_policy import (
    ConsentError,
    load_policy,
    policy_path,
    provision,
    record_rotation,
)
from cloudfed.protection.commitments import commitment_key
from cloudfed.protection.envelope import open_public
from cloudfed.protection.keys import KeyPairs, generate_keys
from cloudfed.protection.messages import COORDINATOR, ROSTER, coordinator_bundle, stage_context
from cloudfed.protection.rotation import parse_rotation, sign_rotation
from tests.e2e_support import scan_for
from tests.protected_support import Federation, federation_dict

A, B, C = NAMES = ("alpha-aws", "beta-gcp", "gamma-azure")
VALUES = {A: 0.01, B: 0.02, C: 0.04}
EXAMPLES = {A: 100, B: 100, C: 200}
MEAN = 0.0275  # weights 0.1, 0.1, 0.2 (weight_cap 1000)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def make_fed(tmp_path: Path, model_cache: Path) -> Federation:
    return Federation(federation_dict(tmp_path, model_cache, NAMES))


def run_round(fed: Federation, round: int) -> Any:
    """One secure-aggregation round of constant updates; every party must be counted."""
    updates = {p: (fed.const(VALUES[p]), EXAMPLES[p]) for p in NAMES}
    ref, report, sealed = fed.round(round, updates)
    assert report.accepted == sorted(NAMES), report.rejected
    got = fed.global_state()
    for name, value in got.items():  # `round` weighted means added, to the quantisation error
        assert np.max(np.abs(value - fed.initial[name] - round * MEAN)) < 1e-5, name
    return ref, report, sealed


def keys_roster_doc(fed: Federation, round: int) -> dict[str, Any]:
    blob = fed.exchange.get_bytes(secagg_roster_key(fed.plan.run_id, round, "keys"))
    ctx = stage_context(fed.cfg, round, COORDINATOR, ROSTER, run_id=fed.plan.run_id, stage="keys")
    return json.loads(
        open_public(blob, context=ctx, sender=coordinator_bundle(fed.exchange, fed.plan)).payload
    )


def fingerprint(keys: KeyPairs) -> str:
    return keys.public_bundle().fingerprint


def secret_bytes(keys: KeyPairs) -> list[bytes]:
    """Every form a private key could be written in: raw, base64, PEM body."""
    from cloudfed.protection.keys import private_pem

    out = []
    for key in (keys.x25519, keys.ed25519):
        material = keys.material()
        out.append(
            base64.b64decode(material["x25519"] if key is keys.x25519 else material["ed25519"])
        )
        out.append(base64.b64encode(out[-1]))
        pem = private_pem(key)
        out.append(b"".join(pem.splitlines()[1:-1]))  # base64 of the PKCS8 body
    return out


def set_key_source(party: str, **spec: Any) -> None:
    path = policy_path(party)
    doc = yaml.safe_load(path.read_text())
    doc["keys"] = spec
    path.write_text(yaml.safe_dump(doc))


# --- sources -------------------------------------------------------------------------------------


def test_key_files_or_folder_open_to_others_are_refused_naming_the_chmod_fix(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "party" / "keys"
    source = StorageKeySource(A, str(folder))
    keys = generate_keys("party", A)
    source.create(keys)
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert fingerprint(source.load().current) == fingerprint(keys)

    x_file = folder / f"party-{A}.x25519.pem"
    os.chmod(x_file, 0o640)  # group-readable
    with pytest.raises(ConfigError, match=rf"{x_file}: .* fix: chmod 600 {x_file}"):
        source.load()
    os.chmod(x_file, 0o600)
    os.chmod(folder, 0o750)  # group may list and enter the folder
    with pytest.raises(ConfigError, match=rf"{folder}: .* fix: chmod 700 {folder}"):
        source.load()
    os.chmod(folder, 0o700)
    assert fingerprint(source.load().current) == fingerprint(keys)


def test_a_storage_folder_in_an_object_store_holds_current_and_pending_pairs() -> None:
    """The fsspec branch (no file modes to check): create, rotate, promote, old pair gone."""
    import fsspec

    folder = "memory://party-keys-test/alpha/keys"
    source = StorageKeySource(A, folder)
    assert source.local_dir is None
    assert source.load().current is None
    first = generate_keys("party", A)
    source.create(first)
    nxt = generate_keys("party", A, commitment=b"n" * 32)
    source.save_pending(nxt)
    held = source.load()
    assert fingerprint(held.current) == fingerprint(first)
    assert fingerprint(held.pending) == fingerprint(nxt)
    # Each generation keeps its own commitment key (the genesis one derives its own).
    assert held.current.commitment is None and held.pending.commitment == b"n" * 32
    source.promote()
    after = source.load()
    assert after.pending is None and fingerprint(after.current) == fingerprint(nxt)
    assert after.current.commitment == b"n" * 32
    assert not scan_for(["memory://party-keys-test"], secret_bytes(first))
    fsspec.filesystem("memory").rm("/party-keys-test", recursive=True)


def test_a_rotation_record_in_an_object_store_state_moves_the_pin(tmp_path: Path) -> None:
    """A policy's state_dir may be an object-store prefix: the pin record is written there too."""
    import fsspec

    from cloudfed.party_policy import LoadedPolicy, PartyPolicy

    old, new = generate_keys("party", B), generate_keys("party", B)
    policy = PartyPolicy(
        party=A,
        federation_id="fed",
        pins={"coordinator": "a" * 64, "parties": {B: fingerprint(old)}},
        state_dir="memory://party-keys-test/alpha-state",
    )
    loaded = record_rotation(LoadedPolicy(policy, tmp_path / f"{A}.yaml"), sign_rotation(old, new))
    assert loaded.policy.pins.parties[B] == fingerprint(new)
    fs = fsspec.filesystem("memory")
    assert fs.exists("/party-keys-test/alpha-state/key_rotations.json")
    assert not (tmp_path / f"{A}-state").exists()
    fs.rm("/party-keys-test", recursive=True)


def test_env_source_reads_the_variable_and_never_writes_to_storage(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = make_fed(tmp_path, model_cache)
    keys = generate_keys("party", A)
    set_key_source(A, source="env")
    var = "CLOUDFED_PARTY_KEY_ALPHA_AWS"
    monkeypatch.delenv(var, raising=False)
    party = fed.cfg.party(A)
    with pytest.raises(ConfigError, match=rf"environment variable {var} is not set"):
        load_party_keys(fed.cfg, party, load_policy(A))

    monkeypatch.setenv(var, json.dumps(keys.material()))
    loaded = load_policy(A)
    assert fingerprint(load_party_keys(fed.cfg, party, loaded)) == fingerprint(keys)
    monkeypatch.setenv(var, base64.b64encode(json.dumps(keys.material()).encode()).decode())
    assert fingerprint(load_party_keys(fed.cfg, party, loaded)) == fingerprint(keys)
    # The policy still pins the storage key: a new identity from the environment is refused...
    with pytest.raises(ConsentError, match=rf"party key of {A} .*pins.parties.{A}="):
        party_mod.consent(fed.cfg, party, fed.plan)
    # ...until the party pins the fingerprint of the key its environment holds.
    doc = yaml.safe_load(policy_path(A).read_text())
    doc["pins"]["parties"][A] = fingerprint(keys)
    policy_path(A).write_text(yaml.safe_dump(doc))
    got, _ = party_mod.consent(fed.cfg, party, fed.plan)
    assert fingerprint(got) == fingerprint(keys)
    assert not scan_for([Path(party.storage)], secret_bytes(keys))
    # Re-provisioning keeps where the party's keys live, and pins the key found there.
    provision(fed.cfg, force=True)
    assert load_policy(A).policy.keys.source == "env"
    assert load_policy(A).policy.pins.parties[A] == fingerprint(keys)

    monkeypatch.setenv(var, '{"x25519": "AAAA", "ed25519": "AAAA"}')
    with pytest.raises(ConfigError, match=rf"environment variable {var}: expected a JSON"):
        load_party_keys(fed.cfg, party, load_policy(A))
    monkeypatch.setenv(var, json.dumps(keys.material()))
    with pytest.raises(ConfigError, match="read-only to cloudfed"):
        rotate(fed.cfg, A)


def test_secret_manager_source_on_aws_secrets_manager(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    moto = pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "testing")
    fed = make_fed(tmp_path, model_cache)
    party = fed.cfg.party(A)
    with moto.mock_aws():
        # The registered name and the dotted path load the same hook.
        for manager in ("aws", "cloudfed.keys.aws:AwsSecretsManager"):
            set_key_source(
                A,
                source="secret_manager",
                secret_manager=manager,
                secret_id=f"cloudfed/{A}",
                options={"region_name": "eu-west-1"},
            )
            first = load_party_keys(fed.cfg, party, load_policy(A))  # made once, in the secret
            again = load_party_keys(fed.cfg, party, load_policy(A))
            assert fingerprint(first) == fingerprint(again)
        client = boto3.client("secretsmanager", region_name="eu-west-1")
        # The pointer secret names the generation; the generation's own secret holds the keys.
        stored = json.loads(client.get_secret_value(SecretId=f"cloudfed/{A}")["SecretString"])
        assert stored == {"current": fingerprint(first)}
        generation = f"cloudfed/{A}.{fingerprint(first)}"
        held_first = json.loads(client.get_secret_value(SecretId=generation)["SecretString"])
        assert held_first == first.material()
        assert not scan_for([Path(party.storage)], secret_bytes(first))

        # Rotation keeps both pairs in the secret until the pin follows, then only the new one.
        doc = yaml.safe_load(policy_path(A).read_text())
        doc["pins"]["parties"][A] = fingerprint(first)
        policy_path(A).write_text(yaml.safe_dump(doc))
        statement = rotate(fed.cfg, A)
        source = party_key_source(fed.cfg, party, load_policy(A))
        held = source.load()
        assert fingerprint(held.current) == fingerprint(first)
        assert fingerprint(held.pending) == statement.new.fingerprint
        assert held.pending.commitment not in (None, commitment_key(first))  # drawn fresh
        source.promote()
        after = source.load()
        assert after.pending is None and fingerprint(after.current) == statement.new.fingerprint
        current = client.get_secret_value(SecretId=f"cloudfed/{A}")["SecretString"].encode()
        assert not any(s in current for s in secret_bytes(first))
        with pytest.raises(client.exceptions.ResourceNotFoundException):  # deleted, no recovery
            client.get_secret_value(SecretId=generation)

    set_key_source(A, source="secret_manager", secret_manager="no.such:Thing", secret_id="x")
    with pytest.raises(ConfigError, match=r"keys.secret_manager='no.such:Thing': cannot load"):
        load_party_keys(fed.cfg, party, load_policy(A))


# --- the coordinator never holds a party's private key --------------------------------------------


def test_no_party_private_key_reaches_coordinator_exchange_or_mlflow(
    tmp_path: Path, model_cache: Path
) -> None:
    import mlflow

    from cloudfed import tracking

    fed = make_fed(tmp_path, model_cache)
    ref, report, sealed = run_round(fed, 1)
    mlruns = tmp_path / "mlruns"
    mlruns.mkdir()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{mlruns / 'mlflow.db'}")
    try:
        exp = mlflow.create_experiment("keys", artifact_location=str(mlruns / "artifacts"))
        with mlflow.start_run(experiment_id=exp):
            tracking.log_plan(fed.cfg, fed.plan)
            mlflow.log_dict(report.model_dump(mode="json"), "report.json")
            mlflow.log_dict({"sealed": [s.model_dump(mode="json") for s in sealed]}, "sealed.json")
    finally:
        mlflow.set_tracking_uri(previous)

    needles = [
        n for p in NAMES for n in secret_bytes(party_mod.party_keys(fed.cfg.party(p), fed.exchange))
    ]
    # Positive control: the scan finds the keys where they do live, the parties' own storage.
    assert scan_for([tmp_path / "clouds"], needles)
    for root in (tmp_path / "coordinator", tmp_path / "exchange", tmp_path / "mlruns"):
        assert root.exists() and not scan_for([root], needles), root


def test_a_party_key_source_in_the_coordinators_storage_is_refused(
    tmp_path: Path, model_cache: Path
) -> None:
    fed = make_fed(tmp_path, model_cache)
    coordinator = Path(fed.cfg.coordinator_storage)
    before = sorted(p for p in coordinator.rglob("*"))
    # The launcher points the party's storage into the coordinator's.
    moved = fed.moved(storage=str(coordinator / "alpha"))
    with pytest.raises(ConfigError, match=rf"parties\[{A}\].storage at storage only the party"):
        party_mod.consent(moved, moved.party(A), fed.plan)
    # The party's own policy names a folder there (or on the exchange).
    for folder in (str(coordinator / "keys"), str(tmp_path / "exchange" / "k")):
        set_key_source(A, source="storage", folder=folder)
        with pytest.raises(ConfigError, match=rf"{policy_path(A)} keys.folder"):
            party_mod.consent(fed.cfg, fed.cfg.party(A), fed.plan)
    assert sorted(p for p in coordinator.rglob("*")) == before  # nothing was written there


def test_the_coordinator_role_has_no_way_to_load_a_party_key() -> None:
    """No coordinator module or coordinator step imports the party key sources."""
    import ast

    root = Path(__file__).resolve().parents[1]
    files = [*(root / "cloudfed" / "coordinator").glob("*.py")]
    files += [
        root / "steps" / f for f in ("prepare.py", "aggregate.py") if (root / "steps" / f).exists()
    ]
    assert len(files) > 5
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            bad = [
                n
                for n in names
                if n.startswith("cloudfed.keys") or n in ("load_party_keys", "party_keys")
            ]
            assert not bad, f"{path}: imports {bad}"


# --- rotation ------------------------------------------------------------------------------------


def test_rotation_is_followed_through_the_keys_roster_across_rounds(
    tmp_path: Path, model_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fed = make_fed(tmp_path, model_cache)
    run_round(fed, 1)
    old = party_mod.party_keys(fed.cfg.party(B), fed.exchange)
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump({"parameters": {"federation": fed.cfg.model_dump(mode="json")}})
    )
    assert keys_cli(["rotate", str(config), "--party", B]) == 0
    statement = parse_rotation(fed.exchange.get_bytes(rotation_key(B)))
    assert statement.old.fingerprint == fingerprint(old)
    new_fp = statement.new.fingerprint
    assert rotate(fed.cfg, B).new.fingerprint == new_fp  # again before approval: same pending pair
    capsys.readouterr()
    assert keys_cli(["status", str(config), "--party", B]) == 0
    assert f"pending  {new_fp}" in capsys.readouterr().out
    # Until a roster approves it, nothing changes: the old key is in use and pinned everywhere.
    held = party_key_source(fed.cfg, fed.cfg.party(B), load_policy(B)).load()
    assert fingerprint(held.current) == fingerprint(old) and held.pending is not None
    assert all(load_policy(p).policy.pins.parties[B] == fingerprint(old) for p in NAMES)

    ref, report, _ = run_round(fed, 2)
    doc = keys_roster_doc(fed, 2)
    assert doc["rotated"] == {B: fingerprint(old)} and doc["members"][B] == new_fp
    assert report.accepted == sorted(NAMES)
    # Every party follows, in its own state; B's old private key is gone from its storage.
    for p in NAMES:
        loaded = load_policy(p)
        assert loaded.policy.pins.parties[B] == new_fp
        assert yaml.safe_load(policy_path(p).read_text())["pins"]["parties"][B] == fingerprint(old)
        assert json.loads(loaded.rotations_file.read_text())[0]["new"]["fingerprint"] == new_fp
    after = party_key_source(fed.cfg, fed.cfg.party(B), load_policy(B)).load()
    assert after.pending is None and fingerprint(after.current) == new_fp
    # A fresh commitment key; the old one stays only in B's state, to check earlier digests.
    assert after.current.commitment not in (None, commitment_key(old))
    promoted = load_party_keys(fed.cfg, fed.cfg.party(B), load_policy(B), create=False)
    assert promoted.retired == (commitment_key(old),)
    assert not scan_for([Path(fed.cfg.party(B).storage)], secret_bytes(old))
    published = json.loads(fed.exchange.get_bytes(public_key_key("party", B)))
    assert published["fingerprint"] == new_fp

    # The next round runs on the new key alone; the statement only rides along for laggards.
    run_round(fed, 3)
    doc = keys_roster_doc(fed, 3)
    assert doc["members"][B] == new_fp and doc["rotated"] == {}
    assert doc["rotations"][B]["new"]["fingerprint"] == new_fp


def test_a_forged_rotation_on_the_exchange_is_refused(tmp_path: Path, model_cache: Path) -> None:
    fed = make_fed(tmp_path, model_cache)
    victim = party_mod.party_keys(fed.cfg.party(B), fed.exchange)
    attacker_old, attacker_new = generate_keys("party", B), generate_keys("party", B)
    # The attacker controls the exchange: a bundle of its own under the victim's name, and a
    # rotation statement to a key it holds, signed by its own key (it lacks the victim's).
    publish_public_keys(fed.exchange, attacker_old.public_bundle())
    forged = sign_rotation(attacker_old, attacker_new)
    fed.exchange.put_bytes(rotation_key(B), forged.model_dump_json().encode())

    ref, report, _ = run_round(fed, 1)
    doc = keys_roster_doc(fed, 1)
    assert "rotations" not in doc and doc["members"][B] == fingerprint(victim)
    assert "not signed by the key the party advertised with" in doc["refused_rotations"][B]
    assert all(load_policy(p).policy.pins.parties[B] == fingerprint(victim) for p in NAMES)
    assert not load_policy(A).rotations_file.exists()

    # The same statement with the victim's real old bundle pasted in fails its signature.
    pasted = forged.model_dump(mode="json") | {"old": victim.public_bundle().model_dump()}
    fed.exchange.put_bytes(rotation_key(B), json.dumps(pasted).encode())
    run_round(fed, 2)
    assert "not signed by the key of fingerprint" in keys_roster_doc(fed, 2)["refused_rotations"][B]

    # A coordinator that carries a foreign-signed rotation anyway: every party refuses it.
    party = fed.cfg.party(A)
    keys = party_mod.party_keys(party, fed.exchange)
    with pytest.raises(ConsentError, match=rf"{A} refuses a key rotation of {B}: it is signed"):
        follow_rotations(
            fed.cfg,
            party,
            load_policy(A),
            keys,
            {"rotations": {B: forged.model_dump()}},
            fed.exchange,
        )
    with pytest.raises(ConsentError, match=rf"{A} refuses the roster: rotation statement"):
        follow_rotations(
            fed.cfg, party, load_policy(A), keys, {"rotations": {B: pasted}}, fed.exchange
        )
    assert load_policy(A).policy.pins.parties[B] == fingerprint(victim)
    # A record in the party's own state that does not start at its pin moves nothing.
    load_policy(A).rotations_file.parent.mkdir(parents=True, exist_ok=True)
    load_policy(A).rotations_file.write_text(json.dumps([forged.model_dump(mode="json")]))
    assert load_policy(A).policy.pins.parties[B] == fingerprint(victim)


def test_the_ckks_key_party_rotates_only_in_a_round_without_ckks(
    tmp_path: Path, model_cache: Path
) -> None:
    pytest.importorskip("tenseal")
    hybrid = {
        "rules": [{"pattern": "*lora_A*", "mode": "ckks"}],
        "ckks": {"workers": 1},
    }
    fed = Federation(federation_dict(tmp_path, model_cache, NAMES, protection=hybrid))
    assert fed.cfg.ckks_key_party == A and "ckks" in fed.plan.protection["tensors"]
    old_a = fingerprint(party_mod.party_keys(fed.cfg.party(A), fed.exchange))
    rotate(fed.cfg, A)  # the key party: deferred
    new_b = rotate(fed.cfg, B).new.fingerprint  # another party: approved in this very round
    updates = {p: (fed.const(VALUES[p]), EXAMPLES[p]) for p in NAMES}
    _, report, _ = fed.round(1, updates)
    assert report.accepted == sorted(NAMES), report.rejected
    for name, value in fed.global_state().items():
        assert np.max(np.abs(value - fed.initial[name] - MEAN)) < 1e-4, name
    doc = keys_roster_doc(fed, 1)
    assert doc["refused_rotations"][A].startswith("deferred")
    assert doc["rotated"] == {B: doc["rotations"][B]["old"]["fingerprint"]}
    assert all(load_policy(p).policy.pins.parties[A] == old_a for p in NAMES)
    assert all(load_policy(p).policy.pins.parties[B] == new_b for p in NAMES)
