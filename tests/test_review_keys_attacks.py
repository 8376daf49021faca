"""Adversarial review of party key sources and rotation (branch review-keys), as regressions.

Each test first ran as a `test_WEAKNESS_*` that failed on main at 678d7ba; it keeps the attack
and now asserts it is refused (branch keys-fixes). Tests named `test_holds_*` held already.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cloudfed import party as party_mod
from cloudfed.coordinator.rosters import _rotations, rotation_chains_dir
from cloudfed.errors import ConfigError
from cloudfed.exchange import rotation_key, secagg_advert_key
from cloudfed.keys import follow_rotations, load_party_keys, party_key_source, rotate
from cloudfed.keys.rotation import cancel_rotation, pending_fingerprint
from cloudfed.party.sealing import dither_seed
from cloudfed.party_policy import (
    ConsentError,
    KeysPolicy,
    load_policy,
    policy_path,
    record_rotation,
)
from cloudfed.protection.commitments import commitment_key, keyed_digest, matches
from cloudfed.protection.envelope import sign_public
from cloudfed.protection.keys import generate_keys
from cloudfed.protection.messages import ADVERT, sha256, stage_context
from cloudfed.protection.rotation import parse_rotation, sign_rotation
from cloudfed.protection.secagg import protocol
from cloudfed.storage import is_inside
from tests.protected_support import Federation, federation_dict

A, B, C = NAMES = ("alpha-aws", "beta-gcp", "gamma-azure")


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def fp(keys) -> str:
    return keys.public_bundle().fingerprint


def approve(
    fed: Federation, members: dict[str, str], intents: dict[str, str | None] | None = None
) -> dict:
    """What the coordinator's keys roster carries for these advertised fingerprints, when each
    member's round advertisement names `intents[member]` as the key it rotates to."""
    members = dict(members)
    out = _rotations(fed.exchange, members, None, intents or {}, rotation_chains_dir(fed.cfg))
    return {"members": members, **out}


def intent_of(fed: Federation, name: str) -> str | None:
    """What the party's own advertisement would name: its pending key, if it holds one."""
    return pending_fingerprint(fed.cfg, fed.cfg.party(name), load_policy(name))


def advertise_intent(fed: Federation, name: str, keys, rotate_to: str | None, round: int) -> str:
    """Put the party's signed round advertisement (naming `rotate_to`) on the exchange."""
    advert = protocol.PartySecrets.generate().advertisement(rotate_to=rotate_to)
    ctx = stage_context(fed.cfg, round, name, ADVERT, run_id=fed.plan.run_id)
    blob = sign_public(advert.model_dump_json().encode(), context=ctx, sender=keys)
    fed.exchange.put_bytes(secagg_advert_key(fed.plan.run_id, round, name), blob)
    return sha256(blob)


# --- 1. replay of an abandoned rotation statement ------------------------------------------------


def test_a_replayed_abandoned_rotation_is_not_approved(tmp_path: Path, model_cache: Path) -> None:
    """Exchange attacker keeps B's first statement (old -> B1). B abandons B1 (pending pair lost
    or suspected leaked: deletes it) and rotates again (old -> B2). The attacker writes the old
    statement back into the single rotation slot before the next keys roster. B's round
    advertisement, signed by its old key under the round context, names B2: the coordinator
    approves only the statement to the advertised key, so the replay moves nothing; `rotate
    --cancel` makes even the copy of a cancelled rotation worthless.
    """
    fed = Federation(federation_dict(tmp_path, model_cache, NAMES))
    old = party_mod.party_keys(fed.cfg.party(B), fed.exchange)
    first = rotate(fed.cfg, B)
    captured = fed.exchange.get_bytes(rotation_key(B))  # the attacker keeps a copy
    source = party_key_source(fed.cfg, fed.cfg.party(B), load_policy(B))
    for kind in ("x25519.pem", "ed25519.pem"):  # B abandons its pending pair
        source.store.delete(f"party-{B}.pending.{kind}")
    second = rotate(fed.cfg, B)
    assert second.new.fingerprint != first.new.fingerprint
    fed.exchange.put_bytes(rotation_key(B), captured)  # replay

    members = {p: fp(party_mod.party_keys(fed.cfg.party(p), fed.exchange)) for p in NAMES}
    doc = approve(fed, members, {B: intent_of(fed, B)})
    assert intent_of(fed, B) == second.new.fingerprint
    assert doc["members"][B] == fp(old) and "rotations" not in doc
    assert "does not name" in doc["refused_rotations"][B]
    # The genuine statement, republished, is approved (the refusal is not blanket).
    rotate(fed.cfg, B)
    assert approve(fed, members, {B: intent_of(fed, B)})["members"][B] == second.new.fingerprint

    # Cancelled: no pending pair, an empty slot, and a replayed copy names an unannounced key.
    fresh = tmp_path / "cancel"
    fed2 = Federation(federation_dict(fresh, model_cache, NAMES))
    kept = rotate(fed2.cfg, B).model_dump_json().encode()
    cancel_rotation(fed2.cfg, B)
    assert not fed2.exchange.exists(rotation_key(B)) and intent_of(fed2, B) is None
    fed2.exchange.put_bytes(rotation_key(B), kept)
    b_fp = fp(party_mod.party_keys(fed2.cfg.party(B), fed2.exchange))
    doc2 = approve(fed2, {B: b_fp}, {B: intent_of(fed2, B)})
    assert doc2["members"][B] == b_fp and B in doc2["refused_rotations"]


def test_peers_follow_only_the_rotation_the_owners_advertisement_names(
    tmp_path: Path, model_cache: Path
) -> None:
    """Same replay, seen from the peers: even a coordinator that carries the abandoned statement
    as approved moves no pin, because B's advertisement of the round (signed by its old key)
    names its real pending key, not the abandoned one."""
    fed = Federation(federation_dict(tmp_path, model_cache, NAMES))
    old = party_mod.party_keys(fed.cfg.party(B), fed.exchange)
    abandoned = generate_keys("party", B, commitment=commitment_key(old))
    statement = sign_rotation(old, abandoned)  # signed once by B, then abandoned
    real = rotate(fed.cfg, B)  # B's real, current intent: old -> its pending pair
    fed.exchange.put_bytes(rotation_key(B), statement.model_dump_json().encode())
    members = {p: fp(party_mod.party_keys(fed.cfg.party(p), fed.exchange)) for p in NAMES}
    honest = approve(fed, members, {B: intent_of(fed, B)})
    assert honest["members"][B] == fp(old) and "rotations" not in honest

    def roster(s) -> dict:  # a coordinator that approves `s` in round 1 regardless
        digest = advertise_intent(fed, B, old, intent_of(fed, B), round=1)
        return {
            "setup": {"run_id": fed.plan.run_id, "round": 1},
            "members": {**members, B: s.new.fingerprint},
            "adverts": {B: digest},
            "rotations": {B: s.model_dump(mode="json")},
            "rotated": {B: fp(old)},
        }

    doc = roster(statement)
    b = fed.cfg.party(B)
    with pytest.raises(ConsentError, match="does not hold"):
        follow_rotations(fed.cfg, b, load_policy(B), old, doc, fed.exchange)
    a = fed.cfg.party(A)
    a_keys = party_mod.party_keys(a, fed.exchange)
    with pytest.raises(ConsentError, match="advertisement does not name"):
        follow_rotations(fed.cfg, a, load_policy(A), a_keys, doc, fed.exchange)
    assert load_policy(A).policy.pins.parties[B] == fp(old)
    # The rotation B did announce is followed.
    follow_rotations(fed.cfg, a, load_policy(A), a_keys, roster(real), fed.exchange)
    assert load_policy(A).policy.pins.parties[B] == real.new.fingerprint


# --- 2. the commitment key survives rotation, derivable from the retired key ---------------------


def test_commitment_key_after_rotation_is_fresh_and_not_derivable_from_the_retired_key(
    tmp_path: Path, model_cache: Path
) -> None:
    """Rotation used to keep `commitment = HKDF(old ed25519 private key)` forever, so whoever later
    got the retired key got the live commitment key (a membership oracle on keyed digests, and
    predictable secagg dither coins). Now each rotation draws a fresh key; the retired one stays
    only in the party's state, to check digests made before the rotation, and the dither seed of
    a (round, update) is kept in its storage on first use so a retried round rounds the same way."""
    fed = Federation(federation_dict(tmp_path, model_cache, NAMES))
    old = party_mod.party_keys(fed.cfg.party(B), fed.exchange)
    stolen = old.ed25519.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    before = keyed_digest(old, "ab" * 32, "harmonised data")
    seed_file = Path(fed.cfg.party(B).storage) / "secagg" / "dither" / "test-fed-r0001-cd.seed"
    coins = dither_seed(seed_file, old, "test-fed:1:" + "cd" * 32)
    statement = rotate(fed.cfg, B)
    loaded = record_rotation(load_policy(B), statement)
    current = load_party_keys(fed.cfg, fed.cfg.party(B), loaded, create=False)  # promotes
    assert fp(current) == statement.new.fingerprint
    from_stolen = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"cloudfed/party-commitment/v1"
    ).derive(stolen)
    assert commitment_key(current) != from_stolen
    assert commitment_key(current) != commitment_key(old)
    # A digest made before the rotation still checks; new ones use the new key only.
    assert keyed_digest(current, "ab" * 32, "harmonised data") != before
    data = b"x"
    old_digest = keyed_digest(old, sha256(data), "local update")
    assert matches(current, data, "local update", old_digest)
    assert not matches(current, data, "local update", "0" * 64)
    # The retry's coins do not depend on the key that holds now.
    assert dither_seed(seed_file, current, "test-fed:1:" + "cd" * 32) == coins
    assert seed_file.stat().st_mode & 0o077 == 0


# --- 3. key folder location: launcher-chosen, string-compared -----------------------------------


@pytest.mark.parametrize(
    "child, parent",
    [
        ("file:///srv/coord/keys", "/srv/coord"),
        ("/srv/coord/keys", "file:///srv/coord"),
        ("s3a://bkt/coord/keys", "s3://bkt/coord"),
        ("gcs://bkt/coord/keys", "gs://bkt/coord"),
    ],
)
def test_inside_check_sees_aliases_of_the_same_location(child: str, parent: str) -> None:
    assert is_inside(child, parent)


@pytest.mark.parametrize(
    "child, parent",
    [
        ("s3://bkt/coordx/keys", "s3://bkt/coord"),
        ("s3://other/coord/keys", "s3://bkt/coord"),
        ("gs://bkt/coord/keys", "s3://bkt/coord"),
        ("/srv/coordx", "file:///srv/coord"),
    ],
)
def test_inside_check_tells_other_locations_apart(child: str, parent: str) -> None:
    assert not is_inside(child, parent)


def test_file_url_storage_inside_the_coordinators_storage_is_refused_before_any_write(
    tmp_path: Path, model_cache: Path
) -> None:
    """Launcher sets parties[alpha].storage = file://<coordinator_storage>/alpha: the refusal
    used to compare strings and miss it; locations are now normalised, and the party's storage
    itself is checked before anything is read or written."""
    fed = Federation(federation_dict(tmp_path, model_cache, NAMES))
    coordinator = Path(fed.cfg.coordinator_storage).resolve()
    moved = fed.moved(storage=f"file://{coordinator}/alpha")
    before = sorted(coordinator.rglob("*"))
    with pytest.raises((ConfigError, ConsentError)) as err:
        party_mod.consent(moved, moved.party(A), fed.plan)
    written = sorted(set(coordinator.rglob("*")) - set(before))
    assert not written, f"private key files written into the coordinator's storage: {written}"
    assert "inside the coordinator's storage" in str(err.value)


def test_consent_writes_no_private_key_where_the_launcher_points_storage(
    tmp_path: Path, model_cache: Path
) -> None:
    """A party with a pinned key never needs a new one inside a round: consent() used to create
    one in `<parties[].storage>/keys` (launcher-chosen) before the pin check refused it. Now
    provisioning records the keys folder in the policy (moving storage moves no key), and
    rounds load keys with create=False (a policy without a folder refuses, writing nothing); a
    policy also records the party's storage, so moving it is refused before any I/O."""
    fed = Federation(federation_dict(tmp_path, model_cache, NAMES))
    elsewhere = tmp_path / "launcher-owned"
    moved = fed.moved(storage=str(elsewhere))
    with pytest.raises(ConsentError, match="is not the party's own storage"):
        party_mod.consent(moved, moved.party(A), fed.plan)  # the policy records its storage
    assert not list(elsewhere.rglob("*.pem")), "a private key was written to launcher storage"
    # A policy naming no folder: the default follows storage, and a round makes no key there.
    doc = yaml.safe_load(policy_path(A).read_text())
    assert doc["keys"]["folder"] == str((tmp_path / "clouds" / A / "keys").resolve())
    doc.pop("keys"), doc.pop("storage")  # a policy written before either was recorded
    policy_path(A).write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="only provisioning makes a new key"):
        party_mod.consent(moved, moved.party(A), fed.plan)
    assert not list(elsewhere.rglob("*.pem")), "a private key was written to launcher storage"


# --- 4. env source: the variable name is launcher-settable ---------------------------------------


def test_env_var_outside_the_CLOUDFED_namespace_is_refused_by_the_policy() -> None:
    """steps/_party.py refuses CLOUDFED_* in a run config's `environment:`; a policy naming any
    other variable (`env_var: PARTY_KEY`) would let the launcher set it for the step."""
    with pytest.raises(ValueError, match=r"must match \^CLOUDFED_"):
        KeysPolicy(source="env", env_var="PARTY_KEY")
    assert KeysPolicy(source="env", env_var="CLOUDFED_PARTY_KEY_X").env_var is not None


# --- 5. AWS Secrets Manager: "loses its labels" is not deletion -------------------------------


def test_aws_promote_leaves_no_readable_version_of_the_retired_private_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """forget_previous() used to remove only the AWSPREVIOUS label: a deprecated version stays
    retrievable by VersionId. Now each key generation has its own secret, deleted without a
    recovery window at promotion; the pointer secret's versions hold fingerprints only."""
    moto = pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    from cloudfed.keys import SecretManagerKeySource
    from cloudfed.keys.aws import AwsSecretsManager

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "testing")
    with moto.mock_aws():
        src = SecretManagerKeySource(A, AwsSecretsManager(region_name="eu-west-1"), "k")
        old = generate_keys("party", A)
        src.create(old)
        new = generate_keys("party", A, commitment=b"c" * 32)
        src.save_pending(new)
        client = boto3.client("secretsmanager", region_name="eu-west-1")

        def readable_with(needle: str) -> list[str]:
            found = []
            for secret in client.list_secrets(IncludePlannedDeletion=True)["SecretList"]:
                sid = secret["ARN"]
                versions = client.list_secret_version_ids(SecretId=sid, IncludeDeprecated=True)
                for v in versions["Versions"]:
                    try:
                        value = client.get_secret_value(SecretId=sid, VersionId=v["VersionId"])
                    except client.exceptions.ResourceNotFoundException:
                        continue
                    if needle in value["SecretString"]:
                        found.append(f"{secret['Name']}@{v['VersionId']}")
            return found

        assert readable_with(old.material()["ed25519"])  # positive control: before promotion
        src.promote()
        leaked = readable_with(old.material()["ed25519"])
        assert not leaked, f"retired private key still readable in versions {leaked}"
        with pytest.raises(client.exceptions.ResourceNotFoundException):
            client.get_secret_value(SecretId=f"k.{fp(old)}")
        held = src.load()
        assert fp(held.current) == fp(new) and held.pending is None
        assert held.current.commitment == b"c" * 32


# --- 6. one rotation slot: a peer two rotations behind can never catch up ------------------------


def test_a_peer_that_missed_two_rotations_catches_up_along_the_coordinators_chain(
    tmp_path: Path, model_cache: Path
) -> None:
    """The exchange keeps only B's latest statement (an exchange attacker can also delete it), so
    a roster used to carry one hop and peer A, still pinning k0 after B went k0 -> k1 -> k2,
    refused every later round. The coordinator now keeps every approved statement in its own
    storage and rosters carry the chain; A walks it from its pin."""
    fed = Federation(federation_dict(tmp_path, model_cache, NAMES))
    k0 = party_mod.party_keys(fed.cfg.party(B), fed.exchange)
    k1 = generate_keys("party", B, commitment=commitment_key(k0))
    k2 = generate_keys("party", B, commitment=commitment_key(k0))
    fed.exchange.put_bytes(rotation_key(B), sign_rotation(k0, k1).model_dump_json().encode())
    assert approve(fed, {B: fp(k0)}, {B: fp(k1)})["members"][B] == fp(k1)  # approved, A away
    fed.exchange.put_bytes(rotation_key(B), sign_rotation(k1, k2).model_dump_json().encode())
    assert approve(fed, {B: fp(k1)}, {B: fp(k2)})["members"][B] == fp(k2)  # approved, A away
    fed.exchange.delete(rotation_key(B))  # the exchange attacker empties the slot
    doc = approve(fed, {B: fp(k2)})
    assert [s["new"]["fingerprint"] for s in doc["chains"][B]] == [fp(k1), fp(k2)]
    a = fed.cfg.party(A)
    follow_rotations(
        fed.cfg, a, load_policy(A), party_mod.party_keys(a, fed.exchange), doc, fed.exchange
    )
    assert load_policy(A).policy.pins.parties[B] == fp(k2)
    # A chain with a link cut out does not chain: refused.
    broken = {**doc, "chains": {B: doc["chains"][B][1:2] * 2}}
    with pytest.raises(ConsentError, match="do not chain"):
        follow_rotations(
            fed.cfg, a, load_policy(A), party_mod.party_keys(a, fed.exchange), broken, fed.exchange
        )


# --- regressions: properties that hold -----------------------------------------------------------


def test_holds_old_statement_replayed_after_a_later_rotation_moves_no_pin(
    tmp_path: Path, model_cache: Path
) -> None:
    """A -> B, then B -> C; the attacker replays A -> B: neither the coordinator nor a peer that
    already follows C goes back (no rollback); a peer refuses rather than rolls back."""
    fed = Federation(federation_dict(tmp_path, model_cache, NAMES))
    k0 = party_mod.party_keys(fed.cfg.party(B), fed.exchange)
    k1 = generate_keys("party", B, commitment=commitment_key(k0))
    k2 = generate_keys("party", B, commitment=commitment_key(k0))
    s01, s12 = sign_rotation(k0, k1), sign_rotation(k1, k2)
    loaded = record_rotation(record_rotation(load_policy(A), s01), s12)
    assert loaded.policy.pins.parties[B] == fp(k2)

    fed.exchange.put_bytes(rotation_key(B), s01.model_dump_json().encode())
    doc = approve(fed, {B: fp(k2)}, {B: None})
    assert "rotations" not in doc and doc["members"][B] == fp(k2)
    with pytest.raises(ConsentError, match="refuses a key rotation"):
        record_rotation(load_policy(A), s01)
    assert load_policy(A).policy.pins.parties[B] == fp(k2)
    # A reverse statement (k2 -> k0) would need k2 and k0 signatures; a tampered body fails.
    tampered = s12.model_dump(mode="json") | {"new": k0.public_bundle().model_dump()}
    with pytest.raises(Exception, match="rejected"):
        parse_rotation(tampered)


def test_holds_a_rotation_roster_entry_under_another_name_is_refused(
    tmp_path: Path, model_cache: Path
) -> None:
    fed = Federation(federation_dict(tmp_path, model_cache, NAMES))
    kb = party_mod.party_keys(fed.cfg.party(B), fed.exchange)
    s = sign_rotation(kb, generate_keys("party", B))
    a = fed.cfg.party(A)
    with pytest.raises(ConsentError, match="another's"):
        follow_rotations(
            fed.cfg,
            a,
            load_policy(A),
            party_mod.party_keys(a, fed.exchange),
            {"rotations": {C: s.model_dump(mode="json")}},
            fed.exchange,
        )
    assert load_policy(A).policy.pins.parties[C] != s.new.fingerprint


def test_holds_no_key_material_in_rotation_statement_or_status(
    tmp_path: Path, model_cache: Path
) -> None:
    fed = Federation(federation_dict(tmp_path, model_cache, NAMES))
    old = party_mod.party_keys(fed.cfg.party(B), fed.exchange)
    statement = rotate(fed.cfg, B)
    pending = party_key_source(fed.cfg, fed.cfg.party(B), load_policy(B)).load().pending
    blob = fed.exchange.get_bytes(rotation_key(B))
    for keys in (old, pending):
        for v in keys.material().values():
            assert v.encode() not in blob
    assert "commitment" not in json.loads(blob)["new"]
    assert repr(pending).count("=") <= 2  # role, name only
    assert statement.new.fingerprint == fp(pending)


def test_holds_key_folder_world_listable_is_refused_on_read(tmp_path: Path) -> None:
    from cloudfed.keys import StorageKeySource

    folder = tmp_path / "k"
    src = StorageKeySource(A, str(folder))
    src.create(generate_keys("party", A))
    link = tmp_path / "link"
    link.symlink_to(folder)  # a symlinked folder is checked at its target
    folder.chmod(0o755)
    with pytest.raises(ConfigError, match="chmod 700"):
        StorageKeySource(A, str(link)).load()
    folder.chmod(0o700)
    (folder / f"party-{A}.ed25519.pem").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        StorageKeySource(A, str(link)).load()
