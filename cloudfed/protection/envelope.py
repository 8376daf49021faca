"""Sealed messages: confidential to one recipient, signed by one sender, bound to one context.

A sealed update crosses an untrusted exchange, so it must fail to open anywhere but at the
intended recipient, for the intended federation, round, party and kind: a replayed, swapped,
truncated or re-ordered message is rejected. Every rejection is a `ProtectionError` whose message
is a short label only, never key material, plaintext or which byte was wrong.

Wire format, version 1 (all integers big-endian)::

    b"CFSEAL" | u8 version | u32 header_len | header (canonical JSON)
    | chunks x (u32 len | AES-256-GCM ciphertext+tag) | Ed25519 signature (64 bytes)

The header holds the suite, the context binding, the public metadata, sender and recipient
names and fingerprints, the ephemeral X25519 public key, the HKDF salt, the nonce prefix, the
chunk size and count and the plaintext length. The signature covers SHA-256 of everything up to
the header and a SHA-256 over all length-prefixed chunks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from cloudfed.errors import ProtectionError
from cloudfed.federation import PARTY_NAME_PATTERN
from cloudfed.protection.hazmat import aead, kdf, signing
from cloudfed.protection.headers import check_public_metadata
from cloudfed.protection.keys import KeyPairs, PublicKeyBundle

MAGIC = b"CFSEAL"
VERSION = 1
SUITE = "x25519-hkdf-sha256/aes-256-gcm/ed25519"
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 1 << 30
MAX_HEADER_SIZE = 1 << 16
_PREFIX = MAGIC + bytes([VERSION])
_U32 = struct.Struct(">I")
_KDF_DOMAIN = b"cloudfed/seal/v1/kdf"
_SIG_DOMAIN = b"cloudfed/seal/v1/signature"


class SealContext(BaseModel):
    """What a message is for; both ends must name the same binding or opening fails."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    federation_id: str = Field(pattern=PARTY_NAME_PATTERN)
    round: int = Field(ge=0)
    party: str = Field(pattern=PARTY_NAME_PATTERN)
    kind: str = Field(default="update", pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    metadata: dict[str, JsonValue] = Field(default_factory=dict)

    def binding(self) -> dict[str, Any]:
        """Return what a recipient knows in advance; metadata is authenticated, not expected."""
        return self.model_dump(include={"federation_id", "round", "party", "kind"})


class _Peer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    name: str
    fingerprint: str


class _Header(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    suite: str
    context: dict[str, JsonValue]
    metadata: dict[str, JsonValue]
    sender: _Peer
    recipient: _Peer
    epk: str
    salt: str
    nonce_prefix: str
    chunk_size: int = Field(ge=1, le=MAX_CHUNK_SIZE)
    chunks: int = Field(ge=1, le=aead.MAX_CHUNKS)
    length: int = Field(ge=0)


class Opened(NamedTuple):
    payload: bytes
    metadata: dict[str, JsonValue]


@dataclass(frozen=True)
class _Parsed:
    header: _Header
    header_digest: bytes
    chunks: list[memoryview]
    signature: bytes


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str, size: int) -> bytes:
    raw = base64.b64decode(text, validate=True)
    if len(raw) != size:
        raise ValueError("wrong field size")
    return raw


def _kdf_info(binding: dict[str, Any], epk: bytes, recipient_pk: bytes) -> bytes:
    """Bind the key to protocol version, context and both public keys (no key reuse across them)."""
    return _KDF_DOMAIN + hashlib.sha256(_canonical(binding)).digest() + epk + recipient_pk


def _signed_message(header_digest: bytes, chunks: list[bytes] | list[memoryview]) -> bytes:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(_U32.pack(len(chunk)))
        h.update(chunk)
    return _SIG_DOMAIN + header_digest + h.digest()


def _reject(context: SealContext, reason: str) -> ProtectionError:
    return ProtectionError(f"sealed {context.kind} rejected: {reason}")


def seal(
    payload: bytes,
    *,
    context: SealContext,
    sender: KeyPairs,
    recipient: PublicKeyBundle,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> bytes:
    """Encrypt for `recipient`, sign as `sender`; a fresh ephemeral key makes every key unique."""
    if context.party != sender.name:
        raise ValueError("context.party must be the sender's own name")
    check_public_metadata(context.kind, context.metadata)
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK_SIZE}]")
    view = memoryview(payload).cast("B")
    count = max(1, -(-len(view) // chunk_size))
    ephemeral = X25519PrivateKey.generate()
    epk = ephemeral.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    salt, prefix = kdf.random_bytes(kdf.SALT_SIZE), kdf.random_bytes(aead.NONCE_PREFIX_SIZE)
    me = sender.public_bundle()
    header = _canonical(
        {
            "suite": SUITE,
            "context": context.binding(),
            "metadata": context.metadata,
            "sender": {"name": me.name, "fingerprint": me.fingerprint},
            "recipient": {"name": recipient.name, "fingerprint": recipient.fingerprint},
            "epk": _b64(epk),
            "salt": _b64(salt),
            "nonce_prefix": _b64(prefix),
            "chunk_size": chunk_size,
            "chunks": count,
            "length": len(view),
        }
    )
    if len(header) > MAX_HEADER_SIZE:
        raise ValueError("public metadata too large")
    try:
        shared = kdf.agree(ephemeral, recipient.x25519_key())
    except ValueError as exc:
        raise _reject(context, "recipient key invalid") from exc
    key = kdf.derive_key(
        shared, salt=salt, info=_kdf_info(context.binding(), epk, recipient.x25519_raw())
    )
    start = _PREFIX + _U32.pack(len(header)) + header
    digest = hashlib.sha256(start).digest()
    parts = [view[i * chunk_size : (i + 1) * chunk_size] for i in range(count)]
    cts = aead.encrypt_chunks(key, prefix, digest, parts)
    signature = signing.sign(sender.ed25519, _signed_message(digest, cts))
    out = [start]
    for ct in cts:
        out += [_U32.pack(len(ct)), ct]
    out.append(signature)
    return b"".join(out)


def _split_header(blob: bytes | memoryview) -> tuple[_Header, int]:
    """Header and the offset just after it; raises ValueError on anything malformed."""
    view = memoryview(blob).cast("B")
    if len(view) < len(_PREFIX) + 4 or bytes(view[: len(MAGIC)]) != MAGIC:
        raise ValueError("not a sealed message")
    if view[len(MAGIC)] != VERSION:
        raise ValueError("unsupported version")
    (size,) = _U32.unpack_from(view, len(_PREFIX))
    end = len(_PREFIX) + 4 + size
    if size > MAX_HEADER_SIZE or end > len(view):
        raise ValueError("header length out of range")
    header = _Header.model_validate(json.loads(bytes(view[len(_PREFIX) + 4 : end])))
    if header.suite != SUITE:
        raise ValueError("unsupported suite")
    return header, end


def _parse(blob: bytes) -> _Parsed:
    """Check the layout against the header before any cryptography runs."""
    view = memoryview(blob).cast("B")
    header, offset = _split_header(view)
    full, rest = divmod(header.length, header.chunk_size)
    expected_chunks = max(1, full + (1 if rest else 0))
    if header.chunks != expected_chunks:
        raise ValueError("chunk count does not match length")
    digest = hashlib.sha256(view[:offset]).digest()
    chunks: list[memoryview] = []
    for i in range(header.chunks):
        last = i == header.chunks - 1
        plain = header.length - i * header.chunk_size if last else header.chunk_size
        if offset + 4 > len(view) or _U32.unpack_from(view, offset)[0] != plain + aead.TAG_SIZE:
            raise ValueError("chunk length mismatch")
        offset += 4
        chunks.append(view[offset : offset + plain + aead.TAG_SIZE])
        offset += plain + aead.TAG_SIZE
    if len(view) - offset != signing.SIGNATURE_SIZE:
        raise ValueError("trailing bytes or missing signature")
    return _Parsed(header, digest, chunks, bytes(view[offset:]))


def read_public_header(blob: bytes) -> dict[str, Any]:
    """Peek at round, party and metadata, unverified, to choose which keys open the blob."""
    try:
        header, _ = _split_header(blob)
    except (ValueError, TypeError, RecursionError, ValidationError) as exc:
        raise ProtectionError("sealed message rejected: malformed") from exc
    return header.model_dump()


def _verified(
    blob: bytes, context: SealContext, recipient: KeyPairs, sender: PublicKeyBundle
) -> tuple[_Parsed, bytes]:
    """Signature, then context, then recipient; the parsed message and its content key."""
    try:
        parsed = _parse(blob)
    except (ValueError, TypeError, RecursionError, ValidationError) as exc:
        raise _reject(context, "malformed") from exc
    header = parsed.header
    if not signing.verify(
        sender.ed25519_key(), parsed.signature, _signed_message(parsed.header_digest, parsed.chunks)
    ):
        raise _reject(context, "signature invalid")
    binding = context.binding()
    if (
        header.context != binding
        or context.party != sender.name
        or header.sender != _Peer(name=sender.name, fingerprint=sender.fingerprint)
        or (context.metadata and context.metadata != header.metadata)
    ):
        raise _reject(context, "context mismatch")
    if header.recipient.fingerprint != recipient.public_bundle().fingerprint:
        raise _reject(context, "not addressed to this recipient")
    try:
        epk = _unb64(header.epk, 32)
        shared = kdf.agree(recipient.x25519, X25519PublicKey.from_public_bytes(epk))
        key = kdf.derive_key(
            shared,
            salt=_unb64(header.salt, kdf.SALT_SIZE),
            info=_kdf_info(binding, epk, recipient.public_bundle().x25519_raw()),
        )
    except ValueError as exc:
        raise _reject(context, "decryption failed") from exc
    return parsed, key


def open_sealed_with_metadata(
    blob: bytes, *, context: SealContext, recipient: KeyPairs, sender: PublicKeyBundle
) -> Opened:
    """Verify signature, then context, then recipient, then decrypt; metadata is authenticated."""
    parsed, key = _verified(blob, context, recipient, sender)
    try:
        plain = aead.decrypt_chunks(
            key,
            _unb64(parsed.header.nonce_prefix, aead.NONCE_PREFIX_SIZE),
            parsed.header_digest,
            parsed.chunks,
        )
    except (ValueError, InvalidTag) as exc:
        raise _reject(context, "decryption failed") from exc
    return Opened(b"".join(plain), dict(parsed.header.metadata))


def sealed_length(blob: bytes) -> int:
    """The plaintext length a sealed message declares (unverified: to size a buffer only)."""
    try:
        header, _ = _split_header(blob)
    except (ValueError, TypeError, RecursionError, ValidationError) as exc:
        raise ProtectionError("sealed message rejected: malformed") from exc
    return header.length


def open_sealed_into(
    blob: bytes,
    out: memoryview | bytearray,
    *,
    context: SealContext,
    recipient: KeyPairs,
    sender: PublicKeyBundle,
) -> dict[str, JsonValue]:
    """Like `open_sealed_with_metadata`, but decrypts straight into `out`; returns the metadata.

    For the coordinator's running sum: one reusable buffer per upload instead of a list of
    chunks and their joined copy. `out` must be exactly the declared length (`sealed_length`);
    its contents are the plaintext only if this returns, and garbage if it raises.
    """
    parsed, key = _verified(blob, context, recipient, sender)
    view = memoryview(out).cast("B")
    if view.readonly or len(view) != parsed.header.length:
        raise ValueError(f"out must be a writable buffer of {parsed.header.length} bytes")
    try:
        aead.decrypt_chunks_into(
            key,
            _unb64(parsed.header.nonce_prefix, aead.NONCE_PREFIX_SIZE),
            parsed.header_digest,
            parsed.chunks,
            view,
            parsed.header.chunk_size,
        )
    except (ValueError, InvalidTag) as exc:
        raise _reject(context, "decryption failed") from exc
    return dict(parsed.header.metadata)


def open_sealed(
    blob: bytes, *, context: SealContext, recipient: KeyPairs, sender: PublicKeyBundle
) -> bytes:
    """Plaintext of a message that verified for exactly this context, sender and recipient."""
    return open_sealed_with_metadata(
        blob, context=context, recipient=recipient, sender=sender
    ).payload


# --- Signed public messages -------------------------------------------------------------------
# Public keys and rosters need authenticity and binding, not confidentiality: anyone may read
# them, nobody may forge, replay or swap them. Same header discipline as sealed messages.
#
#     b"CFSIGN" | u8 version | u32 header_len | header (canonical JSON) | payload | signature

SIGNED_MAGIC = b"CFSIGN"
_SIGNED_PREFIX = SIGNED_MAGIC + bytes([VERSION])
_SIGNED_SUITE = "ed25519/sha256"
_SIGNED_DOMAIN = b"cloudfed/signed/v1"


class _SignedHeader(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    suite: str
    context: dict[str, JsonValue]
    metadata: dict[str, JsonValue]
    sender: _Peer
    length: int = Field(ge=0)
    sha256: str


def sign_public(payload: bytes, *, context: SealContext, sender: KeyPairs) -> bytes:
    """Readable by all, attributable to `sender` and bound to federation, round, party and kind."""
    if context.party != sender.name:
        raise ValueError("context.party must be the sender's own name")
    check_public_metadata(context.kind, context.metadata)
    payload = memoryview(payload).cast("B").tobytes()
    me = sender.public_bundle()
    header = _canonical(
        {
            "suite": _SIGNED_SUITE,
            "context": context.binding(),
            "metadata": context.metadata,
            "sender": {"name": me.name, "fingerprint": me.fingerprint},
            "length": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
    )
    if len(header) > MAX_HEADER_SIZE:
        raise ValueError("public metadata too large")
    start = _SIGNED_PREFIX + _U32.pack(len(header)) + header
    signature = signing.sign(sender.ed25519, _SIGNED_DOMAIN + hashlib.sha256(start).digest())
    return start + bytes(payload) + signature


def open_public(blob: bytes, *, context: SealContext, sender: PublicKeyBundle) -> Opened:
    """Payload of a signed message that verified for exactly this context and sender."""
    try:
        view = memoryview(blob).cast("B")
        if len(view) < len(_SIGNED_PREFIX) + 4 or bytes(view[: len(_SIGNED_PREFIX)]) != (
            _SIGNED_PREFIX
        ):
            raise ValueError("not a signed message")
        (size,) = _U32.unpack_from(view, len(_SIGNED_PREFIX))
        end = len(_SIGNED_PREFIX) + 4 + size
        if size > MAX_HEADER_SIZE or end > len(view):
            raise ValueError("header length out of range")
        header = _SignedHeader.model_validate(
            json.loads(bytes(view[len(_SIGNED_PREFIX) + 4 : end]))
        )
        if header.suite != _SIGNED_SUITE:
            raise ValueError("unsupported suite")
        if len(view) != end + header.length + signing.SIGNATURE_SIZE:
            raise ValueError("length mismatch")
        payload = bytes(view[end : end + header.length])
        signature = bytes(view[end + header.length :])
    except (ValueError, TypeError, RecursionError, ValidationError) as exc:
        raise _reject(context, "malformed") from exc
    digest = hashlib.sha256(view[:end]).digest()
    if not signing.verify(sender.ed25519_key(), signature, _SIGNED_DOMAIN + digest):
        raise _reject(context, "signature invalid")
    if hashlib.sha256(payload).hexdigest() != header.sha256:
        raise _reject(context, "payload does not match its signed digest")
    if (
        header.context != context.binding()
        or context.party != sender.name
        or header.sender != _Peer(name=sender.name, fingerprint=sender.fingerprint)
        or (context.metadata and context.metadata != header.metadata)
    ):
        raise _reject(context, "context mismatch")
    return Opened(payload, dict(header.metadata))
