import hashlib
import os
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from cloudfed.errors import ConfigError, ProtectionError
from cloudfed.exchange import (
    Exchange,
    fetch_public_keys,
    global_adapter_key,
    public_key_key,
    publish_public_keys,
    update_key,
    validate_key,
)
from cloudfed.protection import PublicKeyBundle, load_or_create_keys
from cloudfed.protection.keys import key_paths


def test_keys_persist_and_reload_identically(tmp_path: Path) -> None:
    first = load_or_create_keys("party", "org-a", tmp_path)
    again = load_or_create_keys("party", "org-a", tmp_path)
    assert first.public_bundle() == again.public_bundle()
    other = load_or_create_keys("party", "org-b", tmp_path)
    assert other.public_bundle().fingerprint != first.public_bundle().fingerprint


def test_private_key_files_are_owner_only(tmp_path: Path) -> None:
    load_or_create_keys("coordinator", "coordinator", tmp_path / "k")
    for path in key_paths("coordinator", "coordinator", tmp_path / "k"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert not [p for p in (tmp_path / "k").iterdir() if p.name.endswith(".tmp")]


def test_world_readable_key_is_refused(tmp_path: Path) -> None:
    load_or_create_keys("party", "org-a", tmp_path)
    x_path, _ = key_paths("party", "org-a", tmp_path)
    os.chmod(x_path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_keys("party", "org-a", tmp_path)


def test_half_missing_key_pair_is_not_regenerated(tmp_path: Path) -> None:
    load_or_create_keys("party", "org-a", tmp_path)
    _, ed_path = key_paths("party", "org-a", tmp_path)
    ed_path.unlink()
    with pytest.raises(ConfigError, match="key file missing"):
        load_or_create_keys("party", "org-a", tmp_path)


@pytest.mark.parametrize(("role", "name"), [("admin", "x"), ("party", "../x"), ("party", "A")])
def test_bad_owner_rejected(tmp_path: Path, role: str, name: str) -> None:
    with pytest.raises(ConfigError):
        load_or_create_keys(role, name, tmp_path)  # type: ignore[arg-type]


def test_key_pairs_repr_hides_private_keys(tmp_path: Path) -> None:
    keys = load_or_create_keys("party", "org-a", tmp_path)
    assert repr(keys) == "KeyPairs(role='party', name='org-a')"


def test_bundle_json_round_trip_and_fingerprint_check(tmp_path: Path) -> None:
    bundle = load_or_create_keys("party", "org-a", tmp_path).public_bundle()
    assert len(bundle.fingerprint) == 64
    assert PublicKeyBundle.model_validate_json(bundle.model_dump_json()) == bundle
    forged = bundle.model_dump() | {"fingerprint": "0" * 64}
    with pytest.raises(ValidationError, match="fingerprint"):
        PublicKeyBundle.model_validate(forged)
    short = bundle.model_dump() | {"x25519_b64": "AAAA"}
    with pytest.raises(ValidationError, match="32 bytes"):
        PublicKeyBundle.model_validate(short)


RUN = "0123abcd"


def test_key_layout() -> None:
    assert update_key(RUN, 3, "org-a") == "runs/0123abcd/r0003/updates/org-a.sealed"
    assert global_adapter_key(RUN, 12) == "runs/0123abcd/r0012/global/adapter.safetensors"
    assert public_key_key("coordinator", "coordinator") == "keys/coordinator/coordinator.json"
    # A later run retrying a round writes under its own run id, never over the first attempt.
    assert update_key("fedcba98", 3, "org-a") != update_key(RUN, 3, "org-a")
    with pytest.raises(ValueError):
        update_key(RUN, -1, "org-a")
    with pytest.raises(ValueError):
        update_key(RUN, 1, "../org-a")
    with pytest.raises(ValueError):
        update_key("../x", 1, "org-a")
    with pytest.raises(ValueError):
        public_key_key("admin", "x")


@pytest.mark.parametrize(
    "key",
    ["", "/etc/passwd", "a/../b", "..", "a//b", "a/./b", ".hidden", "a\\b", "s3://x/y", "a/"],
)
def test_invalid_keys(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="invalid storage key"):
        validate_key(key)
    with pytest.raises(ValueError):
        Exchange(str(tmp_path)).put_bytes(key, b"x")


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_put_get_list(tmp_path: Path, scheme: str) -> None:
    ex = Exchange(f"{scheme}{tmp_path / 'ex'}")
    ex.put_bytes(update_key(RUN, 1, "org-b"), b"bb")
    ex.put_bytes(update_key(RUN, 1, "org-a"), b"aa")
    ex.put_bytes(global_adapter_key(RUN, 0), b"g0")
    assert ex.get_bytes(update_key(RUN, 1, "org-a")) == b"aa"
    assert ex.exists(update_key(RUN, 1, "org-b"))
    assert not ex.exists(update_key(RUN, 2, "org-b"))
    assert ex.list(f"runs/{RUN}/r0001/updates") == [
        f"runs/{RUN}/r0001/updates/org-a.sealed",
        f"runs/{RUN}/r0001/updates/org-b.sealed",
    ]
    assert len(ex.list()) == 3
    assert ex.list(f"runs/{RUN}/r0009") == []
    assert (
        ex.url(global_adapter_key(RUN, 0))
        == f"file://{tmp_path / 'ex'}/runs/{RUN}/r0000/global/adapter.safetensors"
    )
    with pytest.raises(FileNotFoundError):
        ex.get_bytes(update_key(RUN, 5, "org-a"))


def test_exclusive_write_happens_once(tmp_path: Path) -> None:
    ex = Exchange(str(tmp_path))
    ex.put_bytes("history/r.signed", b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        ex.put_bytes("history/r.signed", b"second", exclusive=True)
    assert ex.get_bytes("history/r.signed") == b"first"
    assert sorted(p.name for p in (tmp_path / "history").iterdir()) == ["r.signed"]


def test_overwrite_is_atomic_and_leaves_no_temp(tmp_path: Path) -> None:
    ex = Exchange(str(tmp_path))
    ex.put_bytes("a/b.bin", b"one")
    ex.put_bytes("a/b.bin", b"two")
    assert ex.get_bytes("a/b.bin") == b"two"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin"]
    digest = (tmp_path / ".sha256" / "a" / "b.bin").read_text().strip()
    assert digest == hashlib.sha256(b"two").hexdigest()


def test_non_local_backend_via_fsspec() -> None:
    ex = Exchange("memory://cloudfed-test-exchange")
    ex.put_bytes("rounds/r0000/x.bin", b"m")
    assert ex.get_bytes("rounds/r0000/x.bin") == b"m"
    assert ex.list("rounds") == ["rounds/r0000/x.bin"]
    assert ex.url("rounds/r0000/x.bin").startswith("memory://")


def test_publish_and_pinned_fetch(tmp_path: Path) -> None:
    ex = Exchange(str(tmp_path / "ex"))
    bundle = load_or_create_keys("party", "org-a", tmp_path / "k").public_bundle()
    assert publish_public_keys(ex, bundle) == "keys/party/org-a.json"
    assert fetch_public_keys(ex, "party", "org-a", fingerprint=bundle.fingerprint) == bundle
    impostor = load_or_create_keys("party", "org-a", tmp_path / "evil").public_bundle()
    publish_public_keys(ex, impostor)
    with pytest.raises(ProtectionError, match="fingerprint mismatch"):
        fetch_public_keys(ex, "party", "org-a", fingerprint=bundle.fingerprint)
    ex.put_bytes("keys/party/org-b.json", impostor.model_dump_json().encode())
    with pytest.raises(ProtectionError, match="owner mismatch"):
        fetch_public_keys(ex, "party", "org-b")
    ex.put_bytes("keys/party/org-c.json", b"{not json")
    with pytest.raises(ProtectionError, match="malformed"):
        fetch_public_keys(ex, "party", "org-c")
