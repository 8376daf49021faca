"""Adversarial review of party key sources and rotation (branch review-keys).

Tests named `test_WEAKNESS_*` FAIL on main as of 678d7ba: each demonstrates a real weakness and
asserts the property that should hold. Tests named `test_holds_*` pass: regression tests for
properties that hold.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cloudfed import party as party_mod
from cloudfed.coordinator.rosters import _rotations
from cloudfed.errors import ConfigError
from cloudfed.exchange import rotation_key
from cloudfed.federation import parse_federation
from cloudfed.keys import follow_rotations, party_key_source, rotate
from cloudfed.keys.sources import _inside
from cloudfed.party_policy import ConsentError, KeysPolicy, load_policy, record_rotation
from cloudfed.protection.commitments import commitment_key
from cloudfed.protection.keys import generate_keys
from cloudfed.protection.rotation import parse_rotation, sign_rotation
from tests.protected_support import Federation, federation_dict

A, B, C = NAMES = ("alpha-aws", "beta-gcp", "gamma-azure")


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def fp(keys) -> str:
    return keys.public_bundle().fingerprint


def approve(fed: Federation, members: dict[str, str]) -> dict:
    """What the coordinator's keys roster carries for these advertised fingerprints."""
    members = dict(members)
    out = _rotations(fed.exchange, members, None)
    return {"members": members, **out}


# --- 1. replay of an abandoned rotation statement ------------------------------------------------


def test_WEAKNESS_replayed_abandoned_rotation_locks_peers_onto_a_key_the_party_dropped(
    tmp_path: Path, model_cache: Path
) -> None:
    """Exchange attacker keeps B's first statement (old -> B1). B abandons B1 (pending pair lost
    or suspected leaked: deletes it) and rotates again (old -> B2). The attacker writes the old
    statement back into the single rotation slot before the next keys roster. The statement has
    no freshness (no round, nonce or epoch) and B's round-bound advertisement says nothing about
    which rotation it intends, so the honest coordinator approves old -> B1, every peer records
    B1 as B's pin in its own state, and B refuses the roster (it does not hold B1): B is locked
    out until every peer re-pins out of band; if B1 leaked, its holder now IS B to every peer.
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

    doc = approve(fed, {p: fp(party_mod.party_keys(fed.cfg.party(p), fed.exchange)) for p in NAMES})
    assert doc["members"][B] == fp(old) or doc["members"][B] == second.new.fingerprint, (
        "the coordinator approved a rotation the party had abandoned"
    )


def test_WEAKNESS_peers_record_a_rotation_the_rotating_party_itself_refuses(
    tmp_path: Path, model_cache: Path
) -> None:
    """Same replay, seen from the peers: they persist the pin move before the owner confirms."""
    fed = Federation(federation_dict(tmp_path, model_cache, NAMES))
    old = party_mod.party_keys(fed.cfg.party(B), fed.exchange)
    abandoned = generate_keys("party", B, commitment=commitment_key(old))
    statement = sign_rotation(old, abandoned)  # signed once by B, then abandoned
    rotate(fed.cfg, B)  # B's real, current intent: old -> its pending pair
    fed.exchange.put_bytes(rotation_key(B), statement.model_dump_json().encode())
    doc = approve(fed, {p: fp(party_mod.party_keys(fed.cfg.party(p), fed.exchange)) for p in NAMES})

    b = fed.cfg.party(B)
    with pytest.raises(ConsentError, match="does not hold"):
        follow_rotations(fed.cfg, b, load_policy(B), old, doc, fed.exchange)
    a = fed.cfg.party(A)
    try:
        follow_rotations(
            fed.cfg, a, load_policy(A), party_mod.party_keys(a, fed.exchange), doc, fed.exchange
        )
    except ConsentError:
        pass
    assert load_policy(A).policy.pins.parties[B] == fp(old), (
        "peer A now pins a key B does not hold (and refused): B is locked out of the federation"
    )


# --- 2. the commitment key survives rotation, derivable from the retired key ---------------------


def test_WEAKNESS_commitment_key_after_rotation_is_derivable_from_the_retired_private_key(
    tmp_path: Path, model_cache: Path
) -> None:
    """Rotation keeps `commitment = HKDF(old ed25519 private key)` forever. Whoever later gets the
    retired key (the filesystem/versioned-bucket/AWS-deprecated-version copies the README admits)
    gets the live commitment key: every keyed digest in the coordinator's artifacts becomes a
    membership oracle again, and the secagg dither coins (keyed_seed) become predictable, for
    every round after the rotation too. Rotation does not heal this key."""
    fed = Federation(federation_dict(tmp_path, model_cache, NAMES))
    old = party_mod.party_keys(fed.cfg.party(B), fed.exchange)
    stolen = old.ed25519.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    statement = rotate(fed.cfg, B)
    loaded = record_rotation(load_policy(B), statement)
    source = party_key_source(fed.cfg, fed.cfg.party(B), loaded)
    source.promote()
    current = source.load().current
    assert fp(current) == statement.new.fingerprint
    from_stolen = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"cloudfed/party-commitment/v1"
    ).derive(stolen)
    assert commitment_key(current) != from_stolen


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
def test_WEAKNESS_inside_check_misses_aliases_of_the_same_location(child: str, parent: str) -> None:
    assert _inside(child, parent)


def test_WEAKNESS_file_url_storage_puts_party_keys_in_the_coordinators_storage(
    tmp_path: Path, model_cache: Path
) -> None:
    """Launcher sets parties[alpha].storage = file://<coordinator_storage>/alpha: the refusal
    compares strings, misses it, and the party writes a private key there (then refuses on the
    pin, but the write already happened; `provision` would even pin it)."""
    fed = Federation(federation_dict(tmp_path, model_cache, NAMES))
    coordinator = Path(fed.cfg.coordinator_storage).resolve()
    raw = fed.cfg.model_dump(mode="json")
    raw["parties"][0]["storage"] = f"file://{coordinator}/alpha"
    moved = parse_federation(raw)
    before = sorted(coordinator.rglob("*"))
    with pytest.raises((ConfigError, ConsentError)) as err:
        party_mod.consent(moved, moved.party(A), fed.plan)
    written = sorted(set(coordinator.rglob("*")) - set(before))
    assert not written, f"private key files written into the coordinator's storage: {written}"
    assert "inside the coordinator's storage" in str(err.value)


def test_WEAKNESS_consent_writes_a_fresh_private_key_wherever_the_launcher_points_storage(
    tmp_path: Path, model_cache: Path
) -> None:
    """A party with a pinned key never needs a new one inside a round, yet consent() creates one
    in `<parties[].storage>/keys` (launcher-chosen: any bucket/folder it can read that is not
    literally coordinator_storage or exchange) before the pin check refuses it."""
    fed = Federation(federation_dict(tmp_path, model_cache, NAMES))
    elsewhere = tmp_path / "launcher-owned"
    raw = fed.cfg.model_dump(mode="json")
    raw["parties"][0]["storage"] = str(elsewhere)
    moved = parse_federation(raw)
    with pytest.raises(ConsentError):
        party_mod.consent(moved, moved.party(A), fed.plan)
    assert not list(elsewhere.rglob("*.pem")), "a private key was written to launcher storage"


# --- 4. env source: the variable name is launcher-settable ---------------------------------------


def test_WEAKNESS_env_var_outside_CLOUDFED_namespace_is_settable_by_the_run_config() -> None:
    """steps/_party.py refuses only CLOUDFED_* in a run config's `environment:`; the policy may
    name any variable (`env_var: PARTY_KEY`), which the launcher can then set for the step."""
    with pytest.raises(ValueError):
        KeysPolicy(source="env", env_var="PARTY_KEY")


# --- 5. AWS Secrets Manager: "loses its labels" is not deletion -------------------------------


def test_WEAKNESS_aws_promote_leaves_the_old_private_key_readable_by_version_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """forget_previous() only removes the AWSPREVIOUS label; a deprecated version stays
    retrievable by VersionId (AWS prunes only beyond ~100 versions), so the retired private key
    (and, via HKDF, the carried-over commitment key) stays one GetSecretValue away."""
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
        src.save_pending(generate_keys("party", A, commitment=commitment_key(old)))
        src.promote()
        client = boto3.client("secretsmanager", region_name="eu-west-1")
        versions = client.list_secret_version_ids(SecretId="k", IncludeDeprecated=True)
        leaked = []
        for v in versions["Versions"]:
            value = client.get_secret_value(SecretId="k", VersionId=v["VersionId"])
            if old.material()["ed25519"] in value["SecretString"]:
                leaked.append(v["VersionId"])
        assert not leaked, f"retired private key still readable in versions {leaked}"


# --- 6. one rotation slot: a peer two rotations behind can never catch up ------------------------


def test_WEAKNESS_peer_that_missed_two_rotations_is_stuck(
    tmp_path: Path, model_cache: Path
) -> None:
    """The exchange keeps only B's latest statement (an exchange attacker can also delete it), so
    a roster carries one hop: peer A, still pinning k0 after B went k0 -> k1 -> k2, refuses every
    later round until someone re-pins out of band."""
    fed = Federation(federation_dict(tmp_path, model_cache, NAMES))
    k0 = party_mod.party_keys(fed.cfg.party(B), fed.exchange)
    k1 = generate_keys("party", B, commitment=commitment_key(k0))
    k2 = generate_keys("party", B, commitment=commitment_key(k0))
    fed.exchange.put_bytes(rotation_key(B), sign_rotation(k1, k2).model_dump_json().encode())
    doc = approve(fed, {B: fp(k2)})
    a = fed.cfg.party(A)
    follow_rotations(
        fed.cfg, a, load_policy(A), party_mod.party_keys(a, fed.exchange), doc, fed.exchange
    )
    assert load_policy(A).policy.pins.parties[B] == fp(k2)


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
    doc = approve(fed, {B: fp(k2)})
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
