"""Where a party's private keys live: its own storage, its environment, or its secret manager.

The party chooses the source in its own policy (`keys:`), never the run configuration, and none
of the sources can be the coordinator's: a key folder inside the coordinator's storage or the
exchange is refused before a byte is read or written. Each source holds the current key pair
and, during a rotation, the pending one, so a rotation survives restarts until a keys roster
approves it; promoting the pending pair overwrites (destroys) the old one.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from fsspec.implementations.local import LocalFileSystem

from cloudfed.errors import ConfigError
from cloudfed.federation import FederationConfig, PartyConfig
from cloudfed.party_policy import KeysPolicy, LoadedPolicy
from cloudfed.protection.keys import (
    KeyPairs,
    check_owner_only,
    generate_keys,
    keys_from_material,
    private_from_pem,
    private_pem,
    write_owner_only,
)
from cloudfed.storage import Store, is_inside, open_store

SECRET_MANAGER_GROUP = "cloudfed.secret_managers"
_BUILTIN_MANAGERS = {"aws": "cloudfed.keys.aws:AwsSecretsManager"}


@dataclass(frozen=True)
class KeySet:
    """What a source holds: the current pair, and the pending one while a rotation is open."""

    current: KeyPairs | None
    pending: KeyPairs | None = None


class KeySource(Protocol):
    where: str  # for messages: a path, a variable name, a secret id

    def load(self) -> KeySet: ...

    def create(self, keys: KeyPairs) -> None: ...

    def save_pending(self, keys: KeyPairs) -> None: ...

    def discard_pending(self) -> None:
        """Drop the pending pair (`rotate --cancel`): it is never approved or used."""

    def promote(self) -> None:
        """The pending pair becomes current; the old private keys are gone afterwards."""


@runtime_checkable
class SecretManager(Protocol):
    """The hook a party's secret store implements (a cloud secret manager, Vault...)."""

    def read(self, secret_id: str) -> str | None:
        """The secret's current value, or None if there is no such secret."""

    def write(self, secret_id: str, value: str) -> None:
        """Make `value` the current value (creating the secret if needed)."""

    def delete(self, secret_id: str) -> None:
        """Destroy the secret and every version of it now, without a recovery window.

        A retired key generation must be unreadable afterwards: a label removed from a version
        is not enough where the store keeps old versions readable by id.
        """


def env_var_for(party: str) -> str:
    return "CLOUDFED_PARTY_KEY_" + party.upper().replace("-", "_")


# --- storage -------------------------------------------------------------------------------------


class StorageKeySource:
    """PEM files in a folder of the party's storage; owner-only files and folder on local disk."""

    def __init__(self, name: str, folder: str, options: Mapping[str, Any] | None = None) -> None:
        self.name, self.where = name, folder
        local = "://" not in folder or folder.startswith("file://")
        if local:  # created owner-only here: the store would create it world-listable
            Path(folder.removeprefix("file://")).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store: Store = open_store(folder, options)
        self.local_dir = (
            Path(self.store.root) if isinstance(self.store.fs, LocalFileSystem) else None
        )

    def _key(self, slot: str, kind: str) -> str:
        return f"party-{self.name}{slot}.{kind}"

    def _read(self, key: str) -> bytes | None:
        if self.local_dir is not None:
            path = self.local_dir / key
            if not path.exists():
                return None
            check_owner_only(path)
            # written by write_owner_only (0600), not the store, so it has no stored digest; a
            # damaged PEM fails to parse, naming the file
            return path.read_bytes()
        try:
            return self.store.get_bytes(key)
        except FileNotFoundError:
            return None

    def _write(self, key: str, data: bytes) -> None:
        if self.local_dir is not None:
            write_owner_only(self.local_dir / key, data)
        else:
            self.store.put_bytes(key, data)

    def _pair(self, slot: str, commitment: bytes | None) -> KeyPairs | None:
        x_key, ed_key = self._key(slot, "x25519.pem"), self._key(slot, "ed25519.pem")
        x_pem, ed_pem = self._read(x_key), self._read(ed_key)
        if x_pem is None and ed_pem is None:
            return None
        if x_pem is None or ed_pem is None:
            missing = self.store.url(x_key if x_pem is None else ed_key)
            raise ConfigError(
                f"{missing}: key file missing while its pair exists; restore it from backup, or "
                f"delete both files of 'party-{self.name}{slot}' to start a new identity (peers "
                "must re-pin it)"
            )
        return KeyPairs(
            role="party",
            name=self.name,
            x25519=private_from_pem(x_pem, X25519PrivateKey, self.store.url(x_key)),
            ed25519=private_from_pem(ed_pem, Ed25519PrivateKey, self.store.url(ed_key)),
            commitment=commitment,
        )

    def _commitment(self, slot: str) -> bytes | None:
        raw = self._read(self._key(slot, "commitment"))
        return None if raw is None else base64.b64decode(raw)

    def load(self) -> KeySet:
        return KeySet(
            self._pair("", self._commitment("")),
            self._pair(".pending", self._commitment(".pending")),
        )

    def _put_pair(self, slot: str, keys: KeyPairs) -> None:
        if keys.commitment is not None:
            self._write(self._key(slot, "commitment"), base64.b64encode(keys.commitment))
        elif slot == "":  # a genesis pair derives its commitment key from its signing key
            self._delete(self._key(slot, "commitment"))
        self._write(self._key(slot, "x25519.pem"), private_pem(keys.x25519))
        self._write(self._key(slot, "ed25519.pem"), private_pem(keys.ed25519))

    def _delete(self, key: str) -> None:
        if self.store.exists(key):
            self.store.delete(key)

    def create(self, keys: KeyPairs) -> None:
        self._put_pair("", keys)

    def save_pending(self, keys: KeyPairs) -> None:
        self._put_pair(".pending", keys)

    def discard_pending(self) -> None:
        for kind in ("x25519.pem", "ed25519.pem", "commitment"):
            self._delete(self._key(".pending", kind))

    def promote(self) -> None:
        pending = self.load().pending
        if pending is None:
            raise ConfigError(f"{self.where}: no pending key pair of {self.name} to promote")
        self._put_pair("", pending)  # replaces the old files: the old private keys are gone
        self.discard_pending()


# --- environment ---------------------------------------------------------------------------------


class EnvKeySource:
    """Key material in an environment variable: read-only, so it neither creates nor rotates."""

    def __init__(self, name: str, var: str) -> None:
        self.name, self.where = name, var

    def load(self) -> KeySet:
        value = os.environ.get(self.where)
        if not value:
            return KeySet(None)
        return KeySet(_material(self.name, value, f"environment variable {self.where}"))

    def create(self, keys: KeyPairs) -> None:
        raise ConfigError(
            f"{self.name}: environment variable {self.where} is not set; set it to the output of "
            f"`python -m cloudfed.keys new-material --party {self.name}` (from your cloud's "
            "secret manager), then pin the fingerprint it prints"
        )

    def _read_only(self) -> ConfigError:
        return ConfigError(
            f"{self.name}: keys from environment variable {self.where} are read-only to cloudfed; "
            "to rotate, use keys.source: storage or secret_manager in the party's policy"
        )

    def save_pending(self, keys: KeyPairs) -> None:
        raise self._read_only()

    def discard_pending(self) -> None:
        raise self._read_only()

    def promote(self) -> None:
        raise self._read_only()


def _material(name: str, value: str, where: str) -> KeyPairs:
    text = value.strip()
    if not text.startswith("{"):  # base64 of the JSON, for stores that mangle braces
        try:
            text = base64.b64decode(text, validate=True).decode("utf-8")
        except ValueError:
            raise ConfigError(f"{where}: neither JSON nor base64 of JSON key material") from None
    try:
        doc = json.loads(text)
    except ValueError:
        raise ConfigError(f"{where}: key material is not valid JSON") from None
    return keys_from_material("party", name, doc, where=where)


# --- secret manager ------------------------------------------------------------------------------


class SecretManagerKeySource:
    """One secret per key generation, `<secret_id>.<fingerprint>`, and a pointer `<secret_id>`.

    The pointer holds only fingerprints ({"current": fp, "pending": fp | null}), so none of its
    versions holds a private key. Each generation's material is written once, to its own secret,
    and promoting the pending generation deletes the retired one outright: a store that keeps a
    secret's earlier versions readable by id (AWS keeps up to ~100) never holds a retired key.
    """

    def __init__(self, name: str, manager: SecretManager, secret_id: str) -> None:
        self.name, self.manager, self.where = name, manager, f"secret {secret_id}"
        self.secret_id = secret_id

    def _generation_id(self, fingerprint: str) -> str:
        return f"{self.secret_id}.{fingerprint}"

    def _pointer(self) -> dict[str, str | None]:
        value = self.manager.read(self.secret_id)
        if value is None:
            return {}
        try:
            doc = json.loads(value)
        except ValueError:
            doc = None
        if (
            not isinstance(doc, dict)
            or not set(doc) <= {"current", "pending"}
            or not all(v is None or isinstance(v, str) for v in doc.values())
        ):
            raise ConfigError(
                f"{self.where}: expected a JSON object with the 'current' (and 'pending') key "
                "fingerprint, as cloudfed writes it; the key material lives in "
                f"{self.secret_id}.<fingerprint>"
            )
        return doc

    def _generation(self, fingerprint: str | None, slot: str) -> KeyPairs | None:
        if fingerprint is None:
            return None
        where = f"secret {self._generation_id(fingerprint)}"
        value = self.manager.read(self._generation_id(fingerprint))
        if value is None:
            raise ConfigError(
                f"{self.where}: its {slot} key generation {where} is missing; restore it from "
                "backup, or delete the pointer secret to start a new identity (peers must re-pin)"
            )
        try:
            doc = json.loads(value)
        except ValueError:
            raise ConfigError(f"{where}: key material is not valid JSON") from None
        keys = keys_from_material("party", self.name, doc, where=where)
        if keys.public_bundle().fingerprint != fingerprint:
            raise ConfigError(f"{where}: holds a key of another fingerprint than its name says")
        return keys

    def load(self) -> KeySet:
        doc = self._pointer()
        return KeySet(
            self._generation(doc.get("current"), "current"),
            self._generation(doc.get("pending"), "pending"),
        )

    def _store(self, keys: KeyPairs) -> str:
        fingerprint = keys.public_bundle().fingerprint
        self.manager.write(self._generation_id(fingerprint), json.dumps(keys.material()))
        return fingerprint

    def create(self, keys: KeyPairs) -> None:
        self.manager.write(self.secret_id, json.dumps({"current": self._store(keys)}))

    def save_pending(self, keys: KeyPairs) -> None:
        doc = self._pointer()
        self.manager.write(self.secret_id, json.dumps({**doc, "pending": self._store(keys)}))

    def discard_pending(self) -> None:
        doc = self._pointer()
        if doc.get("pending") is None:
            return
        self.manager.write(self.secret_id, json.dumps({"current": doc.get("current")}))
        self.manager.delete(self._generation_id(doc["pending"]))

    def promote(self) -> None:
        doc = self._pointer()
        if doc.get("pending") is None:
            raise ConfigError(f"{self.where}: no pending key pair of {self.name} to promote")
        self.manager.write(self.secret_id, json.dumps({"current": doc["pending"]}))
        if doc.get("current") is not None:  # the retired generation: gone, with every version
            self.manager.delete(self._generation_id(doc["current"]))


def load_secret_manager(spec: str, options: Mapping[str, Any]) -> SecretManager:
    """`module:factory`, or a name registered under the `cloudfed.secret_managers` entry points."""
    target = spec if ":" in spec else None
    if target is None:
        # Built-in names first: an installed package cannot register its own `aws`.
        target = _BUILTIN_MANAGERS.get(spec)
        if target is None:
            found = entry_points(group=SECRET_MANAGER_GROUP, name=spec)
            target = next(iter(found)).value if found else None
    if target is None:
        raise ConfigError(
            f"keys.secret_manager={spec!r} is neither 'module:factory' nor a registered name "
            f"({', '.join(sorted(_BUILTIN_MANAGERS))} or an entry point in {SECRET_MANAGER_GROUP})"
        )
    module, _, attr = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"keys.secret_manager={spec!r}: cannot load {target}: {exc}") from None
    manager = factory(**dict(options))
    if not isinstance(manager, SecretManager):
        raise ConfigError(
            f"keys.secret_manager={spec!r}: {target} does not provide read, write and delete"
        )
    return manager


# --- which source, for a party -------------------------------------------------------------------


def refuse_coordinator_location(
    cfg: FederationConfig, party: str, location: str, where: str
) -> None:
    """Refuse a party location inside the coordinator's storage or the exchange, before any I/O.

    `where` names the field that chose the location, for the fix.
    """
    for what, parent in (
        ("the coordinator's storage (coordinator_storage)", str(cfg.coordinator_storage)),
        ("the exchange", str(cfg.exchange)),
    ):
        if is_inside(location, parent):
            raise ConfigError(
                f"{party}: {location} lies inside {what} {parent}, where the coordinator could "
                f"read the party's private keys and plaintext. Fix: point {where} at storage "
                "only the party can read"
            )


def key_folder(party: PartyConfig, loaded: LoadedPolicy | None) -> str:
    spec = loaded.policy.keys if loaded is not None else KeysPolicy()
    if spec.folder is None:
        return f"{str(party.storage).rstrip('/')}/keys"
    if "://" in spec.folder or Path(spec.folder).is_absolute() or loaded is None:
        return spec.folder
    return str(loaded.path.parent / spec.folder)


def party_key_source(
    cfg: FederationConfig | None, party: PartyConfig, loaded: LoadedPolicy | None
) -> KeySource:
    """The source the party's policy names (its storage folder when there is no policy yet)."""
    spec = loaded.policy.keys if loaded is not None else KeysPolicy()
    if spec.source == "env":
        return EnvKeySource(party.name, spec.env_var or env_var_for(party.name))
    if spec.source == "secret_manager":
        assert spec.secret_manager and spec.secret_id  # the policy's validator insists
        manager = load_secret_manager(spec.secret_manager, spec.options)
        return SecretManagerKeySource(party.name, manager, spec.secret_id)
    folder = key_folder(party, loaded)
    if cfg is not None:
        where = f"parameters.federation.parties[{party.name}].storage"
        if loaded is not None and spec.folder:
            where = f"{loaded.path} keys.folder"
        refuse_coordinator_location(cfg, party.name, folder, where)
    # The default folder is in the party's storage, so it takes that storage's options.
    options = spec.storage_options or ({} if spec.folder else dict(party.storage_options))
    return StorageKeySource(party.name, folder, options)


RETIRED_COMMITMENTS_FILE = "retired_commitment_keys.json"


def retired_commitments(loaded: LoadedPolicy | None) -> tuple[bytes, ...]:
    """Commitment keys of the party's retired key generations, from its own state.

    Each rotation draws a fresh commitment key (one derived from, or stored with, a retired
    private key would fall with it); the retired ones stay only in the party's state, so the
    digests already in the coordinator's artifacts still check, and never sign anything new.
    """
    if loaded is None:
        return ()
    path = loaded.state_dir / RETIRED_COMMITMENTS_FILE
    if not path.exists():
        return ()
    if isinstance(path, Path):
        check_owner_only(path)
    try:
        return tuple(base64.b64decode(k) for k in json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError):
        raise ConfigError(
            f"{path}: not a JSON list of base64 keys; restore it from backup"
        ) from None


def _retire_commitment(loaded: LoadedPolicy, keys: KeyPairs) -> None:
    from cloudfed.locations import write_private
    from cloudfed.protection.commitments import commitment_key

    kept = retired_commitments(loaded)
    key = commitment_key(keys)
    if key in kept:
        return
    doc = [base64.b64encode(k).decode("ascii") for k in (*kept, key)]
    write_private(loaded.state_dir / RETIRED_COMMITMENTS_FILE, json.dumps(doc).encode())


def load_party_keys(
    cfg: FederationConfig | None,
    party: PartyConfig,
    loaded: LoadedPolicy | None,
    *,
    create: bool = True,
) -> KeyPairs:
    """The party's current keys; a pending pair its own pin record now names is promoted first.

    `create=False` wherever the policy already pins the party: a round never needs a new key, and
    a key made where the launcher pointed the party's storage would be a private key written to
    a place the party did not choose.
    """
    source = party_key_source(cfg, party, loaded)
    held = source.load()
    retired = retired_commitments(loaded)
    if held.current is None:
        if held.pending is not None:
            raise ConfigError(
                f"{source.where}: a pending key pair of {party.name} without a current one; "
                "restore the current pair from backup"
            )
        if not create:
            raise ConfigError(
                f"{source.where}: no private keys of {party.name}, though its policy pins one. "
                "Fix: point the policy's keys (or the party's storage) at where the pinned key "
                "lives; only provisioning makes a new key"
            )
        keys = generate_keys("party", party.name)
        source.create(keys)
        return keys
    if held.pending is not None and loaded is not None:
        pinned = loaded.policy.pins.parties.get(party.name)
        if pinned == held.pending.public_bundle().fingerprint:
            _retire_commitment(loaded, held.current)  # before the old pair is destroyed
            source.promote()
            return dataclasses.replace(held.pending, retired=retired_commitments(loaded))
    return dataclasses.replace(held.current, retired=retired)
