import hashlib
import struct
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from cloudfed.errors import ProtectionError
from cloudfed.protection import (
    KeyPairs,
    SealContext,
    load_or_create_keys,
    open_sealed,
    open_sealed_into,
    open_sealed_with_metadata,
    read_public_header,
    seal,
    sealed_length,
)
from cloudfed.protection.envelope import _PREFIX, _signed_message
from cloudfed.protection.hazmat import aead, signing

KB = 1024
MB = 1 << 20


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPairs]:
    d = tmp_path_factory.mktemp("keys")
    return {
        "alice": load_or_create_keys("party", "alice", d / "alice"),
        "bob": load_or_create_keys("party", "bob", d / "bob"),
        "coord": load_or_create_keys("coordinator", "coordinator", d / "coord"),
        "coord2": load_or_create_keys("coordinator", "coordinator", d / "coord2"),
    }


RUN = "ab" * 16
SHA = "ef" * 32


def ctx(round: int = 3, party: str = "alice", fed: str = "fed-1", **meta: object) -> SealContext:
    return SealContext(federation_id=fed, round=round, party=party, metadata=meta)


def payload(size: int) -> bytes:
    # Deterministic, non-repeating content (no RNG in tests).
    blocks = (hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


def seal_ab(keys: dict[str, KeyPairs], data: bytes, chunk_size: int = MB, **meta: object) -> bytes:
    return seal(
        data,
        context=ctx(**meta),
        sender=keys["alice"],
        recipient=keys["coord"].public_bundle(),
        chunk_size=chunk_size,
    )


def open_ab(keys: dict[str, KeyPairs], blob: bytes, context: SealContext | None = None) -> bytes:
    return open_sealed(
        blob,
        context=context or ctx(),
        recipient=keys["coord"],
        sender=keys["alice"].public_bundle(),
    )


def chunk_spans(blob: bytes) -> list[tuple[int, int]]:
    """(start, end) of each length-prefixed chunk record, from the public layout."""
    (hlen,) = struct.unpack_from(">I", blob, len(_PREFIX))
    offset, spans = len(_PREFIX) + 4 + hlen, []
    while offset < len(blob) - signing.SIGNATURE_SIZE:
        (n,) = struct.unpack_from(">I", blob, offset)
        spans.append((offset, offset + 4 + n))
        offset += 4 + n
    return spans


def resign(keys: dict[str, KeyPairs], blob: bytes) -> bytes:
    """A forged-but-validly-signed blob, to exercise the AEAD layer behind the signature."""
    spans = chunk_spans(blob)
    header_digest = hashlib.sha256(blob[: spans[0][0]]).digest()
    cts = [blob[s + 4 : e] for s, e in spans]
    sig = signing.sign(keys["alice"].ed25519, _signed_message(header_digest, cts))
    return blob[: -signing.SIGNATURE_SIZE] + sig


@pytest.mark.parametrize("size", [0, 1, 5 * KB])
def test_round_trip_small(keys: dict[str, KeyPairs], size: int) -> None:
    data = payload(size)
    assert open_ab(keys, seal_ab(keys, data)) == data


def test_round_trip_multi_chunk(keys: dict[str, KeyPairs]) -> None:
    data = payload(3 * MB + MB // 2)
    blob = seal_ab(keys, data, chunk_size=MB)
    assert len(chunk_spans(blob)) == 4
    assert read_public_header(blob)["chunks"] == 4
    assert open_ab(keys, blob) == data


def test_open_into_a_buffer_matches_open_and_checks_the_same(keys: dict[str, KeyPairs]) -> None:
    """The coordinator's streaming open: same plaintext, same rejections, no joined copy."""
    data = payload(3 * KB + 100)
    blob = seal_ab(keys, data, chunk_size=KB, run_id=RUN)
    out = bytearray(sealed_length(blob))
    meta = open_sealed_into(
        blob, out, context=ctx(), recipient=keys["coord"], sender=keys["alice"].public_bundle()
    )
    assert bytes(out) == data and meta == {"run_id": RUN}
    start, end = chunk_spans(blob)[2]
    for bad, reason in (
        (flip(blob, (start + end) // 2), "signature invalid"),
        (resign(keys, flip(blob, (start + end) // 2)), "decryption failed"),
    ):
        with pytest.raises(ProtectionError, match=reason):
            open_sealed_into(
                bad,
                bytearray(len(data)),
                context=ctx(),
                recipient=keys["coord"],
                sender=keys["alice"].public_bundle(),
            )
    with pytest.raises(ProtectionError, match="context mismatch"):
        open_sealed_into(
            blob,
            out,
            context=ctx(round=4),
            recipient=keys["coord"],
            sender=keys["alice"].public_bundle(),
        )
    with pytest.raises(ValueError, match="writable buffer of"):
        open_sealed_into(
            blob,
            bytearray(len(data) - 1),
            context=ctx(),
            recipient=keys["coord"],
            sender=keys["alice"].public_bundle(),
        )


def test_exact_multiple_of_chunk_size(keys: dict[str, KeyPairs]) -> None:
    data = payload(4 * KB)
    blob = seal_ab(keys, data, chunk_size=KB)
    assert len(chunk_spans(blob)) == 4
    assert open_ab(keys, blob) == data


def test_each_seal_is_fresh(keys: dict[str, KeyPairs]) -> None:
    data = payload(100)
    assert seal_ab(keys, data) != seal_ab(keys, data)


def test_ciphertext_hides_plaintext(keys: dict[str, KeyPairs]) -> None:
    data = b"SECRET-LORA-WEIGHTS-" * 500
    blob = seal_ab(keys, data, chunk_size=KB)
    assert b"SECRET-LORA" not in blob
    assert data[:64] not in blob


def test_metadata_is_public_and_authenticated(keys: dict[str, KeyPairs]) -> None:
    blob = seal_ab(keys, b"x", run_id=RUN, base_sha256=SHA)
    header = read_public_header(blob)
    assert header["metadata"] == {"run_id": RUN, "base_sha256": SHA}
    assert header["context"] == {
        "federation_id": "fed-1",
        "round": 3,
        "party": "alice",
        "kind": "update",
    }
    opened = open_sealed_with_metadata(
        blob, context=ctx(), recipient=keys["coord"], sender=keys["alice"].public_bundle()
    )
    assert opened.payload == b"x"
    assert opened.metadata == {"run_id": RUN, "base_sha256": SHA}
    with pytest.raises(ProtectionError, match="context mismatch"):
        open_ab(keys, blob, ctx(run_id=RUN, base_sha256="0" * 64))


def flip(blob: bytes, index: int) -> bytes:
    out = bytearray(blob)
    out[index] ^= 0x01
    return bytes(out)


def test_flipped_ciphertext_byte(keys: dict[str, KeyPairs]) -> None:
    blob = seal_ab(keys, payload(3 * KB), chunk_size=KB)
    start, end = chunk_spans(blob)[1]
    with pytest.raises(ProtectionError, match="signature invalid"):
        open_ab(keys, flip(blob, (start + end) // 2))


def test_flipped_ciphertext_byte_even_if_resigned(keys: dict[str, KeyPairs]) -> None:
    blob = seal_ab(keys, payload(3 * KB), chunk_size=KB)
    start, end = chunk_spans(blob)[1]
    with pytest.raises(ProtectionError, match="decryption failed"):
        open_ab(keys, resign(keys, flip(blob, (start + end) // 2)))


def test_flipped_header_byte(keys: dict[str, KeyPairs]) -> None:
    blob = seal_ab(keys, payload(100))
    salt_at = blob.index(b'"salt":"') + len(b'"salt":"')
    tampered = (
        blob[:salt_at]
        + (b"B" if blob[salt_at : salt_at + 1] != b"B" else b"C")
        + blob[salt_at + 1 :]
    )
    with pytest.raises(ProtectionError, match="signature invalid"):
        open_ab(keys, tampered)
    with pytest.raises(ProtectionError, match="decryption failed"):
        open_ab(keys, resign(keys, tampered))


@pytest.mark.parametrize(
    "expected",
    [
        ctx(round=4),
        ctx(round=2),
        ctx(party="bob"),
        ctx(fed="fed-2"),
        SealContext(federation_id="fed-1", round=3, party="alice", kind="global"),
    ],
    ids=["next-round", "prev-round", "other-party", "other-federation", "other-kind"],
)
def test_context_mismatch(keys: dict[str, KeyPairs], expected: SealContext) -> None:
    blob = seal_ab(keys, payload(100))
    with pytest.raises(ProtectionError, match="context mismatch"):
        open_ab(keys, blob, expected)


def test_swapped_party_update_rejected(keys: dict[str, KeyPairs]) -> None:
    # Bob's valid update presented as Alice's: the sender key no longer verifies.
    bob_blob = seal(
        payload(100),
        context=ctx(party="bob"),
        sender=keys["bob"],
        recipient=keys["coord"].public_bundle(),
    )
    with pytest.raises(ProtectionError, match="signature invalid"):
        open_ab(keys, bob_blob)


def test_wrong_recipient_key(keys: dict[str, KeyPairs]) -> None:
    blob = seal_ab(keys, payload(100))
    with pytest.raises(ProtectionError, match="not addressed to this recipient"):
        open_sealed(
            blob, context=ctx(), recipient=keys["coord2"], sender=keys["alice"].public_bundle()
        )


def test_wrong_sender_signing_key(keys: dict[str, KeyPairs]) -> None:
    blob = seal_ab(keys, payload(100))
    with pytest.raises(ProtectionError, match="signature invalid"):
        open_sealed(
            blob, context=ctx(), recipient=keys["coord"], sender=keys["bob"].public_bundle()
        )


def test_truncated_last_chunk(keys: dict[str, KeyPairs]) -> None:
    blob = seal_ab(keys, payload(3 * KB), chunk_size=KB)
    spans = chunk_spans(blob)
    dropped = blob[: spans[-1][0]] + blob[-signing.SIGNATURE_SIZE :]
    with pytest.raises(ProtectionError, match="malformed"):
        open_ab(keys, dropped)
    with pytest.raises(ProtectionError, match="malformed"):
        open_ab(keys, blob[:-1])


def test_reordered_chunks(keys: dict[str, KeyPairs]) -> None:
    blob = seal_ab(keys, payload(3 * KB), chunk_size=KB)
    (s0, e0), (s1, e1), _ = chunk_spans(blob)
    swapped = blob[:s0] + blob[s1:e1] + blob[s0:e0] + blob[e1:]
    assert swapped != blob
    with pytest.raises(ProtectionError, match="signature invalid"):
        open_ab(keys, swapped)
    with pytest.raises(ProtectionError, match="decryption failed"):
        open_ab(keys, resign(keys, swapped))


def test_aead_stream_detects_truncation_and_reordering() -> None:
    key, prefix, digest = b"k" * 32, b"p" * 8, b"h" * 32
    cts = aead.encrypt_chunks(key, prefix, digest, [b"one", b"two", b"three"])
    assert aead.decrypt_chunks(key, prefix, digest, cts) == [b"one", b"two", b"three"]
    for forged in (cts[:2], [cts[1], cts[0], cts[2]], cts[:1] + cts[2:]):
        with pytest.raises(InvalidTag):
            aead.decrypt_chunks(key, prefix, digest, forged)
    with pytest.raises(InvalidTag):
        aead.decrypt_chunks(key, prefix, b"H" * 32, cts)


def test_chunk_from_other_message(keys: dict[str, KeyPairs]) -> None:
    data = payload(2 * KB)
    a, b = seal_ab(keys, data, chunk_size=KB), seal_ab(keys, data, chunk_size=KB)
    (sa, ea), _ = chunk_spans(a)
    (sb, eb), _ = chunk_spans(b)
    mixed = resign(keys, a[:sa] + b[sb:eb] + a[ea:])
    with pytest.raises(ProtectionError, match="decryption failed"):
        open_ab(keys, mixed)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"garbage",
        b"CFSEAL",
        b"\x00" * 200,
        b"CFSEAL\x02" + b"\x00" * 100,
        b"CFSEAL\x01\x00\x00\x00\x05{}{}{" + b"\x00" * 64,
    ],
    ids=["empty", "garbage", "magic-only", "zeros", "bad-version", "bad-header"],
)
def test_garbage_is_malformed(keys: dict[str, KeyPairs], blob: bytes) -> None:
    with pytest.raises(ProtectionError, match="malformed"):
        open_ab(keys, blob)
    with pytest.raises(ProtectionError, match="malformed"):
        read_public_header(blob)


def test_error_messages_leak_nothing(keys: dict[str, KeyPairs]) -> None:
    data = b"PLAINTEXT-MARKER" * 10
    blob = seal_ab(keys, data)
    with pytest.raises(ProtectionError) as info:
        open_ab(keys, blob, ctx(round=9))
    message = str(info.value)
    assert message == "sealed update rejected: context mismatch"
    assert keys["coord"].public_bundle().x25519_b64 not in message


def test_seal_refuses_to_speak_for_another_party(keys: dict[str, KeyPairs]) -> None:
    with pytest.raises(ValueError, match="sender's own name"):
        seal(
            b"x",
            context=ctx(party="bob"),
            sender=keys["alice"],
            recipient=keys["coord"].public_bundle(),
        )


def test_signature_covers_written_bytes(tmp_path: Path, keys: dict[str, KeyPairs]) -> None:
    # A sealed blob survives a trip through the file system byte-for-byte.
    blob = seal_ab(keys, payload(KB))
    (tmp_path / "u.sealed").write_bytes(blob)
    assert open_ab(keys, (tmp_path / "u.sealed").read_bytes()) == payload(KB)
