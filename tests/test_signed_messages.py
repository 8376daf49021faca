"""Signed public messages: readable by all, forgeable, replayable or swappable by nobody."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from cloudfed.errors import ProtectionError
from cloudfed.protection import KeyPairs, SealContext, load_or_create_keys, seal
from cloudfed.protection.envelope import (
    SIGNED_MAGIC,
    Opened,
    open_public,
    sign_public,
)
from cloudfed.protection.hazmat import signing

PAYLOAD = b'{"mask_pk":"AAAA","seed_commitment":"' + b"ab" * 32 + b'"}'
_PREFIX_LEN = len(SIGNED_MAGIC) + 1


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPairs]:
    d = tmp_path_factory.mktemp("signed-keys")
    return {
        "alice": load_or_create_keys("party", "alice", d / "alice"),
        "bob": load_or_create_keys("party", "bob", d / "bob"),
        # Same name, different identity: an impostor with its own key pair.
        "alice2": load_or_create_keys("party", "alice", d / "alice2"),
        "coord": load_or_create_keys("coordinator", "coordinator", d / "coord"),
    }


RUN = "ab" * 16
OTHER_RUN = "cd" * 16


def ctx(
    round: int = 3,
    party: str = "alice",
    fed: str = "fed-1",
    kind: str = "secagg-advert",
    **meta: object,
) -> SealContext:
    return SealContext(federation_id=fed, round=round, party=party, kind=kind, metadata=meta)


def signed(keys: dict[str, KeyPairs], payload: bytes = PAYLOAD, **meta: object) -> bytes:
    return sign_public(payload, context=ctx(**meta), sender=keys["alice"])


def open_as_alice(
    keys: dict[str, KeyPairs], blob: bytes, context: SealContext | None = None
) -> Opened:
    return open_public(blob, context=context or ctx(), sender=keys["alice"].public_bundle())


def header_span(blob: bytes) -> tuple[int, int]:
    (size,) = struct.unpack_from(">I", blob, _PREFIX_LEN)
    start = _PREFIX_LEN + 4
    return start, start + size


def header_of(blob: bytes) -> dict:
    start, end = header_span(blob)
    return json.loads(blob[start:end])


def with_header(blob: bytes, header: dict) -> bytes:
    """Same payload and signature under an edited header (length field kept consistent)."""
    _, end = header_span(blob)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return blob[:_PREFIX_LEN] + struct.pack(">I", len(raw)) + raw + blob[end:]


def flip(blob: bytes, at: int) -> bytes:
    out = bytearray(blob)
    out[at] ^= 0x01
    return bytes(out)


# --- round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"x", PAYLOAD, bytes(range(256)) * 40])
def test_round_trip_returns_payload_and_metadata(keys: dict[str, KeyPairs], payload: bytes) -> None:
    blob = signed(keys, payload, run_id=RUN)
    opened = open_as_alice(keys, blob)
    assert isinstance(opened, Opened)
    assert opened.payload == payload
    assert opened.metadata == {"run_id": RUN}
    # Public, not confidential: the payload is in the clear.
    assert payload in blob
    assert blob.startswith(SIGNED_MAGIC)


def test_expected_metadata_must_match(keys: dict[str, KeyPairs]) -> None:
    blob = signed(keys, run_id=RUN)
    assert open_as_alice(keys, blob, ctx(run_id=RUN)).metadata == {"run_id": RUN}
    with pytest.raises(ProtectionError, match="context mismatch"):
        open_as_alice(keys, blob, ctx(run_id=OTHER_RUN))


def test_signatures_are_deterministic_per_content(keys: dict[str, KeyPairs]) -> None:
    # Ed25519 is deterministic, so equal inputs give equal blobs; different rounds do not.
    assert signed(keys) == signed(keys)
    assert signed(keys) != sign_public(PAYLOAD, context=ctx(round=4), sender=keys["alice"])


# --- tampering -------------------------------------------------------------------------------


def test_tampered_payload_byte_is_rejected(keys: dict[str, KeyPairs]) -> None:
    blob = signed(keys)
    _, end = header_span(blob)
    for at in (end, end + len(PAYLOAD) // 2, end + len(PAYLOAD) - 1):
        with pytest.raises(ProtectionError, match="rejected"):
            open_as_alice(keys, flip(blob, at))


def test_tampered_signature_byte_is_rejected(keys: dict[str, KeyPairs]) -> None:
    blob = signed(keys)
    for at in (len(blob) - 1, len(blob) - signing.SIGNATURE_SIZE):
        with pytest.raises(ProtectionError, match="signature invalid"):
            open_as_alice(keys, flip(blob, at))


def test_tampered_header_bytes_are_rejected(keys: dict[str, KeyPairs]) -> None:
    blob = signed(keys)
    start, end = header_span(blob)
    for at in range(start, end, 7):
        with pytest.raises(ProtectionError, match="rejected"):
            open_as_alice(keys, flip(blob, at))
    for at in range(_PREFIX_LEN + 4):  # magic, version and header length
        with pytest.raises(ProtectionError, match="rejected"):
            open_as_alice(keys, flip(blob, at))


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h["context"].update(round=4),
        lambda h: h["context"].update(party="bob"),
        lambda h: h["context"].update(kind="update"),
        lambda h: h["metadata"].update(run_id=OTHER_RUN),
        lambda h: h["sender"].update(name="bob"),
    ],
)
def test_well_formed_header_edits_break_the_signature(keys: dict[str, KeyPairs], edit) -> None:
    blob = signed(keys, run_id=RUN)
    header = header_of(blob)
    edit(header)
    forged = with_header(blob, header)
    with pytest.raises(ProtectionError, match="signature invalid"):
        open_as_alice(keys, forged)


def test_swapped_payload_with_matching_digest_still_needs_the_signature(
    keys: dict[str, KeyPairs],
) -> None:
    """An attacker who updates length and sha256 for a new payload cannot re-sign the header."""
    blob = signed(keys)
    header = header_of(blob)
    evil = b'{"mask_pk":"EVIL","seed_commitment":"' + b"cd" * 32 + b'"}'
    header.update(length=len(evil), sha256=hashlib.sha256(evil).hexdigest())
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    forged = (
        blob[:_PREFIX_LEN]
        + struct.pack(">I", len(raw))
        + raw
        + evil
        + blob[-signing.SIGNATURE_SIZE :]
    )
    with pytest.raises(ProtectionError, match="signature invalid"):
        open_as_alice(keys, forged)


# --- framing -----------------------------------------------------------------------------------


def test_truncated_blobs_are_rejected(keys: dict[str, KeyPairs]) -> None:
    blob = signed(keys)
    start, end = header_span(blob)
    cuts = {0, 1, _PREFIX_LEN, _PREFIX_LEN + 3, start, end - 1, end, end + 5, len(blob) - 1}
    for cut in sorted(cuts):
        with pytest.raises(ProtectionError, match="rejected"):
            open_as_alice(keys, blob[:cut])


def test_trailing_bytes_are_rejected(keys: dict[str, KeyPairs]) -> None:
    blob = signed(keys)
    for extra in (b"\x00", b"x" * 64, blob):
        with pytest.raises(ProtectionError, match="malformed"):
            open_as_alice(keys, blob + extra)


def test_not_a_signed_message(keys: dict[str, KeyPairs]) -> None:
    sealed = seal(
        PAYLOAD, context=ctx(), sender=keys["alice"], recipient=keys["coord"].public_bundle()
    )
    for junk in (sealed, b"", b"CFSIGN", PAYLOAD, bytes(200)):
        with pytest.raises(ProtectionError, match="malformed"):
            open_as_alice(keys, junk)
    with pytest.raises(ProtectionError, match="malformed"):
        open_as_alice(keys, "CFSIGN not bytes")  # type: ignore[arg-type]


def test_oversized_or_garbage_header_is_rejected(keys: dict[str, KeyPairs]) -> None:
    blob = signed(keys)
    _, end = header_span(blob)
    huge = blob[:_PREFIX_LEN] + struct.pack(">I", 1 << 20) + blob[_PREFIX_LEN + 4 :]
    for raw in (b"[]", b"{", b"\xff\xfe", b"[" * 5000 + b"]" * 5000, b'{"suite":1}'):
        forged = blob[:_PREFIX_LEN] + struct.pack(">I", len(raw)) + raw + blob[end:]
        with pytest.raises(ProtectionError, match="malformed"):
            open_as_alice(keys, forged)
    with pytest.raises(ProtectionError, match="malformed"):
        open_as_alice(keys, huge)


def test_header_with_other_suite_or_bad_length_is_malformed(keys: dict[str, KeyPairs]) -> None:
    blob = signed(keys)
    for change in ({"suite": "none"}, {"length": -1}, {"length": 10**6}, {"length": 1.5}):
        header = {**header_of(blob), **change}
        with pytest.raises(ProtectionError, match="malformed"):
            open_as_alice(keys, with_header(blob, header))


# --- wrong identity, replay, swap ----------------------------------------------------------


def test_wrong_sender_key_is_rejected(keys: dict[str, KeyPairs]) -> None:
    blob = signed(keys)
    for other in ("bob", "alice2", "coord"):
        with pytest.raises(ProtectionError, match="rejected"):
            open_public(blob, context=ctx(), sender=keys[other].public_bundle())
    # The impostor under alice's name signs validly for itself, but not as the real alice.
    fake = sign_public(PAYLOAD, context=ctx(), sender=keys["alice2"])
    assert open_public(fake, context=ctx(), sender=keys["alice2"].public_bundle()).payload
    with pytest.raises(ProtectionError, match="signature invalid"):
        open_as_alice(keys, fake)


@pytest.mark.parametrize(
    "context",
    [
        ctx(round=4),
        ctx(round=2),
        ctx(fed="fed-2"),
        ctx(kind="update"),
        ctx(kind="secagg-roster"),
    ],
    ids=["next-round", "previous-round", "other-federation", "kind-update", "kind-roster"],
)
def test_replay_into_another_context_is_rejected(
    keys: dict[str, KeyPairs], context: SealContext
) -> None:
    blob = signed(keys)
    with pytest.raises(ProtectionError, match="context mismatch"):
        open_as_alice(keys, blob, context)


def test_swap_to_another_party_is_rejected(keys: dict[str, KeyPairs]) -> None:
    alice_blob = signed(keys)
    bob_blob = sign_public(PAYLOAD, context=ctx(party="bob"), sender=keys["bob"])
    assert open_public(bob_blob, context=ctx(party="bob"), sender=keys["bob"].public_bundle())
    # Alice's message presented as bob's: bob's key does not verify it.
    with pytest.raises(ProtectionError, match="signature invalid"):
        open_public(alice_blob, context=ctx(party="bob"), sender=keys["bob"].public_bundle())
    # Alice's key, but the coordinator expects bob's slot: the binding names alice.
    with pytest.raises(ProtectionError, match="context mismatch"):
        open_public(alice_blob, context=ctx(party="bob"), sender=keys["alice"].public_bundle())
    # Bob's message in alice's slot.
    with pytest.raises(ProtectionError, match="rejected"):
        open_as_alice(keys, bob_blob)


def test_sign_public_refuses_a_context_for_another_party(keys: dict[str, KeyPairs]) -> None:
    with pytest.raises(ValueError, match="sender's own name"):
        sign_public(PAYLOAD, context=ctx(party="bob"), sender=keys["alice"])
    with pytest.raises(ValueError, match="sender's own name"):
        sign_public(PAYLOAD, context=ctx(party="coordinator"), sender=keys["alice"])


def test_rejections_do_not_leak_the_payload(keys: dict[str, KeyPairs]) -> None:
    secretish = b"TOP-SECRET-ROSTER-" * 10
    blob = signed(keys, secretish)
    with pytest.raises(ProtectionError) as exc:
        open_as_alice(keys, blob, ctx(round=9))
    assert b"TOP-SECRET" not in str(exc.value).encode()
    assert len(str(exc.value)) < 80


def test_key_files_persist_identity(keys: dict[str, KeyPairs], tmp_path: Path) -> None:
    """Reloaded keys verify messages signed before the reload (keys are stable across runs)."""
    first = load_or_create_keys("party", "carol", tmp_path / "carol")
    blob = sign_public(PAYLOAD, context=ctx(party="carol"), sender=first)
    again = load_or_create_keys("party", "carol", tmp_path / "carol")
    assert open_public(blob, context=ctx(party="carol"), sender=again.public_bundle()).payload == (
        PAYLOAD
    )
