"""AES-256-GCM over a sequence of chunks, STREAM-style.

.. danger::
   Hazardous materials: do not use directly; use ``cloudfed.protection``. Safety relies on a key
   that is used for exactly one message; only the envelope recipe guarantees that.

Each chunk's nonce is a per-message prefix plus the chunk counter, and its associated data binds
the header digest, the chunk index and an is-last flag. A chunk therefore only decrypts at its own
position in its own message, and a stream cut short at a chunk boundary has no valid last chunk
(Hoang, Reyhanitabar, Rogaway, Vizár 2015, "Online authenticated-encryption").
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_SIZE = 32
NONCE_PREFIX_SIZE = 8
TAG_SIZE = 16
MAX_CHUNKS = 2**32 - 1

_COUNTER = struct.Struct(">I")
_AAD_TAIL = struct.Struct(">IB")


def chunk_nonce(prefix: bytes, index: int) -> bytes:
    """96-bit nonce: the counter keeps nonces distinct within a message without any state."""
    if len(prefix) != NONCE_PREFIX_SIZE or not 0 <= index <= MAX_CHUNKS:
        raise ValueError("invalid nonce prefix or chunk index")
    return prefix + _COUNTER.pack(index)


def chunk_aad(header_digest: bytes, index: int, *, last: bool) -> bytes:
    """Associated data that pins a chunk to its message, its position and the end of the stream."""
    return header_digest + _AAD_TAIL.pack(index, 1 if last else 0)


def encrypt_chunks(
    key: bytes, prefix: bytes, header_digest: bytes, chunks: Sequence[bytes | memoryview]
) -> list[bytes]:
    """Encrypt every chunk under one fresh key; the final chunk carries the is-last flag."""
    if len(key) != KEY_SIZE or not 1 <= len(chunks) <= MAX_CHUNKS:
        raise ValueError("invalid key or chunk count")
    aead = AESGCM(key)
    last = len(chunks) - 1
    return [
        aead.encrypt(chunk_nonce(prefix, i), chunk, chunk_aad(header_digest, i, last=i == last))
        for i, chunk in enumerate(chunks)
    ]


def decrypt_chunks(
    key: bytes, prefix: bytes, header_digest: bytes, ciphertexts: Sequence[bytes | memoryview]
) -> list[bytes]:
    """Decrypt in order; raises `cryptography.exceptions.InvalidTag` on any tampering."""
    if len(key) != KEY_SIZE or not 1 <= len(ciphertexts) <= MAX_CHUNKS:
        raise ValueError("invalid key or chunk count")
    aead = AESGCM(key)
    last = len(ciphertexts) - 1
    return [
        aead.decrypt(chunk_nonce(prefix, i), ct, chunk_aad(header_digest, i, last=i == last))
        for i, ct in enumerate(ciphertexts)
    ]


def decrypt_chunks_into(
    key: bytes,
    prefix: bytes,
    header_digest: bytes,
    ciphertexts: Sequence[bytes | memoryview],
    out: memoryview,
    chunk_size: int,
) -> None:
    """As `decrypt_chunks`, each chunk written at its offset in `out` (no copies, no join)."""
    if len(key) != KEY_SIZE or not 1 <= len(ciphertexts) <= MAX_CHUNKS:
        raise ValueError("invalid key or chunk count")
    aead = AESGCM(key)
    last = len(ciphertexts) - 1
    for i, ct in enumerate(ciphertexts):
        start = i * chunk_size
        size = len(ct) - TAG_SIZE
        if size < 0 or start + size > len(out):
            raise ValueError("chunk outside the output buffer")
        aad = chunk_aad(header_digest, i, last=i == last)
        aead.decrypt_into(chunk_nonce(prefix, i), ct, aad, out[start : start + size])
