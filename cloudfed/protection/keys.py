"""Long-term key pairs of parties and the coordinator, and the public half they publish.

Each owner generates its keys once, in its own storage folder, and only ever publishes a
`PublicKeyBundle`. The exchange is untrusted, so a bundle carries a fingerprint that a federation
config (or an operator reading it out loud) can pin.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cloudfed.errors import ConfigError
from cloudfed.federation import PARTY_NAME_PATTERN

Role = Literal["party", "coordinator"]
ROLES: tuple[Role, ...] = ("party", "coordinator")
_FINGERPRINT_DOMAIN = b"cloudfed/key-fingerprint/v1"
_PrivateKey = TypeVar("_PrivateKey", X25519PrivateKey, Ed25519PrivateKey)


def _raw(public: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _b64decode32(value: str) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("public key is not valid base64") from exc
    if len(raw) != 32:
        raise ValueError("public key must be 32 bytes")
    return raw


def fingerprint(x25519_raw: bytes, ed25519_raw: bytes) -> str:
    """One hex string that pins both public keys, short enough to compare by eye in a config."""
    return hashlib.sha256(_FINGERPRINT_DOMAIN + x25519_raw + ed25519_raw).hexdigest()


class PublicKeyBundle(BaseModel):
    """What an owner publishes on the exchange; validated so a forged bundle cannot be malformed."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    name: str = Field(pattern=PARTY_NAME_PATTERN)
    role: Role
    x25519_b64: str
    ed25519_b64: str
    fingerprint: str

    @model_validator(mode="after")
    def _fingerprint_matches(self) -> PublicKeyBundle:
        expected = fingerprint(_b64decode32(self.x25519_b64), _b64decode32(self.ed25519_b64))
        if self.fingerprint != expected:
            raise ValueError("fingerprint does not match the public keys")
        return self

    def x25519_key(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(_b64decode32(self.x25519_b64))

    def ed25519_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(_b64decode32(self.ed25519_b64))

    def x25519_raw(self) -> bytes:
        return _b64decode32(self.x25519_b64)


@dataclass(frozen=True)
class KeyPairs:
    """An owner's private keys; `repr` hides them so they cannot end up in logs."""

    role: Role
    name: str
    x25519: X25519PrivateKey = field(repr=False)
    ed25519: Ed25519PrivateKey = field(repr=False)
    # The key of the party's keyed digests and seeds (`commitments`). None: derived from the
    # signing key, as for every identity that never rotated; each rotation draws a fresh one.
    commitment: bytes | None = field(default=None, repr=False)
    # Commitment keys of retired generations (from the party's state): they only check digests
    # made before a rotation, never make new ones.
    retired: tuple[bytes, ...] = field(default=(), repr=False)

    def public_bundle(self) -> PublicKeyBundle:
        x_raw, ed_raw = _raw(self.x25519.public_key()), _raw(self.ed25519.public_key())
        return PublicKeyBundle(
            name=self.name,
            role=self.role,
            x25519_b64=base64.b64encode(x_raw).decode("ascii"),
            ed25519_b64=base64.b64encode(ed_raw).decode("ascii"),
            fingerprint=fingerprint(x_raw, ed_raw),
        )

    def material(self) -> dict[str, str]:
        """The private keys as JSON-able base64 (raw bytes), for an environment or secret store."""
        doc = {
            "x25519": base64.b64encode(_private_raw(self.x25519)).decode("ascii"),
            "ed25519": base64.b64encode(_private_raw(self.ed25519)).decode("ascii"),
        }
        if self.commitment is not None:
            doc["commitment"] = base64.b64encode(self.commitment).decode("ascii")
        return doc


def _private_raw(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def generate_keys(role: Role, name: str, *, commitment: bytes | None = None) -> KeyPairs:
    _check_owner(role, name)
    return KeyPairs(
        role=role,
        name=name,
        x25519=X25519PrivateKey.generate(),
        ed25519=Ed25519PrivateKey.generate(),
        commitment=commitment,
    )


def keys_from_material(role: Role, name: str, doc: object, *, where: str) -> KeyPairs:
    """Parse `KeyPairs.material()` output; `where` names the variable or secret in errors."""
    fix = (
        f'{where}: expected a JSON object {{"x25519": <base64 of 32 bytes>, "ed25519": '
        "<base64 of 32 bytes>} as `python -m cloudfed.keys new-material` prints"
    )
    if not isinstance(doc, dict) or not {"x25519", "ed25519"} <= set(doc):
        raise ConfigError(fix)
    try:
        raw = {k: base64.b64decode(doc[k], validate=True) for k in doc if k in _MATERIAL}
    except (binascii.Error, ValueError, TypeError):
        raise ConfigError(f"{fix} (a value is not base64)") from None
    if set(doc) - set(_MATERIAL) or any(len(v) != 32 for v in raw.values()):
        raise ConfigError(f"{fix} (unknown field or a key not 32 bytes)")
    return KeyPairs(
        role=role,
        name=name,
        x25519=X25519PrivateKey.from_private_bytes(raw["x25519"]),
        ed25519=Ed25519PrivateKey.from_private_bytes(raw["ed25519"]),
        commitment=raw.get("commitment"),
    )


_MATERIAL = ("x25519", "ed25519", "commitment")


def key_paths(role: Role, name: str, key_dir: Path) -> tuple[Path, Path]:
    """File names per owner, so several owners can share one folder in the local demo."""
    _check_owner(role, name)
    stem = f"{role}-{name}"
    return key_dir / f"{stem}.x25519.pem", key_dir / f"{stem}.ed25519.pem"


def load_or_create_keys(role: Role, name: str, key_dir: Path) -> KeyPairs:
    """Keep an owner's identity stable across runs: generate once, then always reload."""
    x_path, ed_path = key_paths(role, name, Path(key_dir))
    if x_path.exists() != ed_path.exists():
        missing = ed_path if x_path.exists() else x_path
        raise ConfigError(
            f"{missing}: key file missing while its pair exists; restore it from backup, or delete "
            f"both files of '{role}-{name}' to start a new identity (peers must re-pin it)"
        )
    if not x_path.exists():
        Path(key_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(x_path, X25519PrivateKey.generate())
        _write_private(ed_path, Ed25519PrivateKey.generate())
    return KeyPairs(
        role=role,
        name=name,
        x25519=_read_private(x_path, X25519PrivateKey),
        ed25519=_read_private(ed_path, Ed25519PrivateKey),
    )


def _check_owner(role: str, name: str) -> None:
    if role not in ROLES:
        raise ConfigError(f"key role '{role}' is not one of {', '.join(ROLES)}")
    if not re.fullmatch(PARTY_NAME_PATTERN, name):
        raise ConfigError(f"key owner name '{name}' must match {PARTY_NAME_PATTERN}")


def private_pem(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def private_from_pem(data: bytes, kind: type[_PrivateKey], where: str) -> _PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError:
        raise ConfigError(f"{where}: not a PEM private key") from None
    if not isinstance(key, kind):
        raise ConfigError(f"{where}: expected a {kind.__name__[:-10]} private key")
    return key


def write_owner_only(path: Path, data: bytes) -> None:
    """Owner-only from the first byte: the file is created 0600, never chmod-ed afterwards."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_private(path: Path, key: X25519PrivateKey | Ed25519PrivateKey) -> None:
    write_owner_only(path, private_pem(key))


def check_owner_only(path: Path) -> None:
    """Refuse a private key file, or the folder holding it, that others may read or enter."""
    folder_mode = stat.S_IMODE(path.parent.stat().st_mode)
    if folder_mode & 0o077:
        raise ConfigError(
            f"{path.parent}: the folder holding private keys is open to group or others (mode "
            f"{folder_mode:o}); fix: chmod 700 {path.parent}"
        )
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{path}: private key is readable by others (mode {mode:o}); fix: chmod 600 {path}"
        )


def _read_private(path: Path, kind: type[_PrivateKey]) -> _PrivateKey:
    check_owner_only(path)
    return private_from_pem(path.read_bytes(), kind, str(path))
