"""The container a party seals to the coordinator: one section per protection mode, and `meta`.

`meta` is JSON the coordinator needs to check an upload (the privacy settings it was made under,
and, without privacy, how many values secure aggregation clipped); it travels inside the
encryption because the sealed header is readable on the exchange.

    b"CFUPD" | u8 version | u32 header_len | header JSON {"sections": [[name, length], ...]}
    | section bytes in header order

Parsed strictly (no trailing bytes, no unknown or repeated sections), because what comes out of
it is fed to arithmetic that would silently accept garbage.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

from cloudfed.errors import ProtectionError

MAGIC = b"CFUPD"
VERSION = 1
SECTIONS = ("secagg", "ckks", "plaintext", "meta")
_U32 = struct.Struct(">I")
_MAX_HEADER = 1 << 12


def pack(sections: Mapping[str, bytes]) -> bytes:
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}")
    order = [name for name in SECTIONS if name in sections]
    header = json.dumps({"sections": [[n, len(sections[n])] for n in order]}).encode()
    return b"".join(
        [MAGIC, bytes([VERSION]), _U32.pack(len(header)), header, *(sections[n] for n in order)]
    )


def unpack(blob: bytes) -> dict[str, bytes]:
    try:
        if blob[: len(MAGIC)] != MAGIC or blob[len(MAGIC)] != VERSION:
            raise ValueError("bad magic")
        (size,) = _U32.unpack_from(blob, len(MAGIC) + 1)
        start = len(MAGIC) + 5
        if size > _MAX_HEADER or start + size > len(blob):
            raise ValueError("bad header size")
        listed = json.loads(blob[start : start + size])["sections"]
        out: dict[str, bytes] = {}
        pos = start + size
        for name, length in listed:
            if name not in SECTIONS or name in out or not isinstance(length, int) or length < 0:
                raise ValueError("bad section")
            out[name] = blob[pos : pos + length]
            pos += length
        if pos != len(blob):
            raise ValueError("length mismatch")
    except (ValueError, IndexError, KeyError, TypeError, struct.error) as exc:
        raise ProtectionError("update payload rejected: malformed") from exc
    return out
