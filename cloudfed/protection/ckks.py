"""CKKS homomorphic aggregation (HE-FL): the coordinator sums updates it cannot read.

Trust model
-----------
* A designated **key party** (one federation member, named in the federation config) calls
  `generate_keys` and alone keeps the secret context. It publishes the public context, which
  carries only the public key: no secret key, and no relinearisation or Galois keys, because
  aggregation only adds ciphertexts. Everyone pins the public context by `public_fingerprint`.
* Each party encrypts its flattened update with the public context (`encrypt_vector`) and sends
  the blocks (framed by `pack_blocks`) to the coordinator.
* The **coordinator** holds only the public context. It adds the parties' ciphertexts blockwise
  (`add_encrypted`) and sends the summed ciphertext to the key party.
* The key party decrypts the sum only (`decrypt_vector`, re-randomised) and returns the
  plaintext aggregate. In cloudfed the key party makes fresh keys every round.

What the key party is trusted with:

* **Not to collude with the coordinator.** The coordinator holds every party's individual
  ciphertext; with the secret key the two together can decrypt any single update.
* **Not to decrypt anything but the sum.** Nothing in CKKS stops the key party from decrypting a
  single party's ciphertext if it gets hold of one (e.g. by observing the exchange), so individual
  ciphertexts must reach only the coordinator.
* **Not to hand the exact decryption to anyone who holds the summed ciphertext.** CKKS is not
  IND-CPA-D secure (Li and Micciancio, EUROCRYPT 2021): a ciphertext together with its
  approximate decryption gives linear equations in the secret key, and that key then opens every
  individual ciphertext of the round, which is exactly what the coordinator holds. So the
  decrypted aggregate must not reach the coordinator (or anyone colluding with it) as is: either
  the key party sends it only to the parties, or it floods the decryption with noise far above
  the CKKS noise before release (which with a 40-bit scale costs most of the precision), and it
  generates fresh keys every round so that one leak does not span rounds.

The coordinator is assumed honest-but-curious. The key party cannot tell a sum from a single
ciphertext, so a coordinator that forwards one party's ciphertext as "the sum" gets that update
decrypted; against a malicious coordinator the key party must recompute the sum itself from the
parties' signed uploads (`add_encrypted` needs only the public context), or the scheme must move
to threshold decryption.

TenSEAL has no threshold or multiparty decryption, so one party necessarily holds the whole
secret key. The upgrade path is OpenFHE, which implements threshold/multiparty CKKS (every party
holds a key share, decryption needs all or t of them) and a noise-flooding decryption mode
(`NOISE_FLOODING_DECRYPT`) against the attack above.

CKKS is approximate: the decrypted sum differs from the exact sum by encoding and encryption
noise, bounded by `tolerance`, and callers compare with that bound, never with equality. A
ciphertext made under a different key with the same parameters decrypts to garbage rather than
failing; `decrypt_vector` rejects values beyond the plausible range. CKKS ciphertexts carry no
integrity protection, so binding a block to its sender, round and key (the public-context
fingerprint) is the job of the sealed envelope that carries it.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import struct
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from cloudfed.errors import ProtectionError

MAGIC = b"CFCKKS"
VERSION = 1
MAX_BLOCKS = 1 << 20
MAX_BLOCK_BYTES = 1 << 26
MAX_PARTIES = 1 << 16
MAX_ABS_VALUE = 2.0**32
"""Largest |x| `encrypt_vector` accepts; a sum of `MAX_PARTIES` such values still decodes."""

# 128-bit classical security budget for the total coefficient modulus (HE standard, as SEAL).
SECURITY_BUDGET_BITS: dict[int, int] = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
# Bits between the scale and the data modulus needed so |sum| <= MAX_ABS_VALUE * MAX_PARTIES
# (2**48) decodes without wrap-around, plus a sign bit and a factor of 2 from the encoding.
_HEADROOM_BITS = 50
# Below this many blocks per worker, process start-up (~0.5 s: interpreter, numpy and TenSEAL
# imports, context load) costs more than the encryption it would share (~4 ms per block on one
# core). Measured with 2 workers on 2 cores: 1.2-1.5x slower at 1M values (245 blocks), about
# even at ~1.2M, 1.5x faster at 4M (2.7-2.9 s against 4.0-4.3 s).
MIN_BLOCKS_PER_WORKER = 160
# Tasks per worker: more than one so a slow worker does not hold up the rest.
_TASKS_PER_WORKER = 4
_U32 = struct.Struct(">I")
_HEADER = struct.Struct(">6sBI")


@dataclass(frozen=True)
class CkksParams:
    """CKKS parameters; the defaults give 4096 slots, 40-bit precision and 128-bit security."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    global_scale_bits: int = 40
    workers: int = 2

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    def check(self) -> None:
        """Fail before key generation: SEAL's own errors do not say which setting to change."""
        degree = self.poly_modulus_degree
        if not _is_int(degree) or degree not in SECURITY_BUDGET_BITS:
            raise ValueError(
                f"poly_modulus_degree={degree!r} is unsupported; use one of "
                f"{sorted(SECURITY_BUDGET_BITS)}"
            )
        sizes = self.coeff_mod_bit_sizes
        if (
            not isinstance(sizes, tuple)
            or len(sizes) < 2
            or not all(_is_int(s) and 20 <= s <= 60 for s in sizes)
        ):
            raise ValueError(
                f"coeff_mod_bit_sizes={sizes!r} is invalid; give a tuple of at least 2 integers "
                "in 20..60 (data primes, then the special prime), e.g. (60, 40, 40, 60)"
            )
        budget = SECURITY_BUDGET_BITS[degree]
        if sum(sizes) > budget:
            raise ValueError(
                f"coeff_mod_bit_sizes={sizes!r} total {sum(sizes)} bits, over the 128-bit "
                f"security budget of {budget} bits for poly_modulus_degree={degree}; use fewer "
                "or smaller primes, or a larger poly_modulus_degree"
            )
        scale = self.global_scale_bits
        if not _is_int(scale) or not 21 <= scale <= 60:
            raise ValueError(
                f"global_scale_bits={scale!r} is out of range; use an integer in 21..60 "
                "(40 is the usual choice)"
            )
        data_bits = sum(sizes[:-1])
        if data_bits < scale + _HEADROOM_BITS:
            raise ValueError(
                f"global_scale_bits={scale} leaves too little room: the data primes "
                f"{sizes[:-1]!r} total {data_bits} bits but need at least "
                f"{scale + _HEADROOM_BITS}; lower global_scale_bits or add data primes"
            )
        if not _is_int(self.workers) or self.workers < 1:
            raise ValueError(f"workers={self.workers!r} is invalid; use an integer >= 1")


def generate_keys(params: CkksParams) -> tuple[bytes, bytes]:
    """Return (secret_context, public_context), both serialised.

    Only the public key is generated for export: relinearisation and Galois keys would let the
    coordinator multiply and rotate, which aggregation never needs, and they are large.
    """
    params.check()
    try:
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            n_threads=1,
        )
    except (ValueError, RuntimeError) as exc:
        raise ValueError(
            f"SEAL rejected coeff_mod_bit_sizes={params.coeff_mod_bit_sizes!r} for "
            f"poly_modulus_degree={params.poly_modulus_degree}: {exc}; pick other prime sizes"
        ) from exc
    context.global_scale = float(2**params.global_scale_bits)
    keep = {"save_public_key": True, "save_galois_keys": False, "save_relin_keys": False}
    secret = context.serialize(save_secret_key=True, **keep)
    public = context.serialize(save_secret_key=False, **keep)
    return secret, public


def public_fingerprint(public_context: bytes) -> str:
    """SHA-256 of the serialised public context, so a party can refuse a swapped-in key."""
    if not isinstance(public_context, bytes | bytearray | memoryview):
        raise TypeError("public_context must be bytes")
    return hashlib.sha256(public_context).hexdigest()


def encrypt_vector(public_context: bytes, values: np.ndarray, *, workers: int = 1) -> list[bytes]:
    """Encrypt a 1-D vector into serialised blocks of `slots` values (the last one partial).

    TenSEAL holds the GIL while it encrypts (threads give no speed-up), so parallelism uses
    processes started by forkserver (spawn where that is missing): forking a parent that runs
    TenSEAL, torch or ZenML threads can deadlock a child on a lock held at fork time. As with
    any non-fork start method, the caller's `__main__` must be safe to import. Worker start-up
    costs ~0.5 s, so vectors under `MIN_BLOCKS_PER_WORKER` blocks per worker stay serial.
    """
    if not _is_int(workers) or workers < 1:
        raise ValueError(f"workers={workers!r} is invalid; use an integer >= 1")
    flat = _check_values(values)
    context = _load_context(public_context, want_secret=False)
    slots = _slots(context)
    n_blocks = math.ceil(flat.size / slots)
    workers = min(workers, n_blocks // MIN_BLOCKS_PER_WORKER, _usable_cpus())
    if workers <= 1:
        return _encrypt_blocks(context, flat, slots)
    del context  # each worker loads its own; nothing here should outlive the pool
    n_tasks = min(n_blocks, workers * _TASKS_PER_WORKER)
    bounds = [slots * (n_blocks * i // n_tasks) for i in range(n_tasks + 1)]
    chunks = [flat[bounds[i] : bounds[i + 1]] for i in range(n_tasks)]
    methods = multiprocessing.get_all_start_methods()
    mp_context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=mp_context,
        initializer=_init_worker,
        initargs=(bytes(public_context),),
    ) as pool:
        parts = list(pool.map(_encrypt_in_worker, chunks))
    return [block for part in parts for block in part]


def add_encrypted(public_context: bytes, parties: Sequence[Sequence[bytes]]) -> list[bytes]:
    """Sum the parties' ciphertexts blockwise; needs (and accepts) only the public context.

    Every block is checked against the context (parameters, scale, size) before adding, because
    SEAL adds mismatched ciphertexts without complaint and the error would surface only as a
    wrong aggregate at the key party.
    """
    if len(parties) == 0:
        raise ValueError("parties is empty; pass at least one party's blocks")
    if len(parties) > MAX_PARTIES:
        raise ValueError(f"{len(parties)} parties exceed MAX_PARTIES={MAX_PARTIES}")
    n_blocks = len(parties[0])
    if n_blocks == 0 or any(len(blocks) != n_blocks for blocks in parties):
        raise ProtectionError("ckks ciphertext rejected: block count mismatch")
    context = _load_context(public_context, want_secret=False)
    slots = _slots(context)
    out: list[bytes] = []
    for index in range(n_blocks):
        total = _load_vector(context, parties[0][index], slots)
        for blocks in parties[1:]:
            vector = _load_vector(context, blocks[index], slots)
            if vector.size() != total.size():
                raise ProtectionError("ckks ciphertext rejected: block size mismatch")
            try:
                total.add_(vector)
            except (ValueError, RuntimeError, TypeError) as exc:
                raise ProtectionError("ckks ciphertext rejected: parameter mismatch") from exc
        out.append(total.serialize())
    return out


def decrypt_vector(
    secret_context: bytes, blocks: Sequence[bytes], length: int, *, rerandomize: bool = True
) -> np.ndarray:
    """Decrypt blocks into a float64 vector of `length` values.

    With `rerandomize` (the default), a fresh encryption of zero is added to every block first:
    the released value is then c0 + c1*s plus fresh encryption noise, one more RLWE sample to
    whoever holds the ciphertext, instead of the exact linear equation in the secret key that a
    plain decryption gives (Li and Micciancio 2021). This protects the key against an
    honest-but-curious holder of the summed ciphertext; it is not noise flooding, so it does not
    stop a malicious one that crafts the ciphertext it asks to have decrypted.

    The block layout must be exactly what `encrypt_vector` produces for `length`, and every
    value must be within the range a legitimate sum can reach: a ciphertext under another key
    decodes to values near 2**99 instead of failing, and that is the only sign of it.
    """
    if not _is_int(length) or length < 1:
        raise ValueError(f"length={length!r} is invalid; use the plaintext vector length (>= 1)")
    context = _load_context(secret_context, want_secret=True)
    slots = _slots(context)
    if len(blocks) != math.ceil(length / slots):
        raise ProtectionError("ckks ciphertext rejected: length mismatch")
    out = np.empty(length, dtype=np.float64)
    for index, blob in enumerate(blocks):
        start = index * slots
        want = min(slots, length - start)
        vector = _load_vector(context, blob, slots)
        if vector.size() != want:
            raise ProtectionError("ckks ciphertext rejected: length mismatch")
        try:
            if rerandomize:
                vector.add_(ts.ckks_vector(context, np.zeros(want)))
            out[start : start + want] = vector.decrypt()
        except (ValueError, RuntimeError, TypeError) as exc:
            raise ProtectionError("ckks ciphertext rejected: decryption failed") from exc
    if not np.all(np.abs(out) <= MAX_ABS_VALUE * MAX_PARTIES):
        raise ProtectionError("ckks ciphertext rejected: implausible plaintext (wrong key?)")
    return out


def pack_blocks(blocks: Sequence[bytes]) -> bytes:
    """Frame blocks as b"CFCKKS" | u8 version | u32 count | count x (u32 len | bytes)."""
    if not 1 <= len(blocks) <= MAX_BLOCKS:
        raise ValueError(f"{len(blocks)} blocks; pack between 1 and MAX_BLOCKS={MAX_BLOCKS}")
    parts = [_HEADER.pack(MAGIC, VERSION, len(blocks))]
    for block in blocks:
        if not 1 <= len(block) <= MAX_BLOCK_BYTES:
            raise ValueError(f"block of {len(block)} bytes; must be 1..{MAX_BLOCK_BYTES}")
        parts += [_U32.pack(len(block)), bytes(block)]
    return b"".join(parts)


def unpack_blocks(blob: bytes) -> list[bytes]:
    """Parse `pack_blocks` output strictly; the blocks go straight to a C++ parser."""
    view = memoryview(blob)
    try:
        magic, version, count = _HEADER.unpack_from(view, 0)
        if magic != MAGIC or version != VERSION:
            raise ValueError("bad magic")
        # Each block needs at least 5 bytes, so a count the blob cannot hold is rejected before
        # any allocation.
        if not 1 <= count <= MAX_BLOCKS or count * 5 > len(view) - _HEADER.size:
            raise ValueError("bad count")
        pos = _HEADER.size
        out: list[bytes] = []
        for _ in range(count):
            (size,) = _U32.unpack_from(view, pos)
            pos += _U32.size
            if not 1 <= size <= MAX_BLOCK_BYTES or pos + size > len(view):
                raise ValueError("bad block size")
            out.append(bytes(view[pos : pos + size]))
            pos += size
        if pos != len(view):
            raise ValueError("trailing bytes")
    except (ValueError, struct.error) as exc:
        raise ProtectionError("ckks blocks rejected: malformed") from exc
    return out


def tolerance(params: CkksParams, parties: int, max_abs: float) -> float:
    """Absolute error bound per value for the decrypted sum of `parties` vectors, |x| <= max_abs.

    The decoding error of a fresh ciphertext is encoding rounding plus encryption noise, both
    fixed in coefficient units, so in value units they scale as N / 2**scale_bits (the noise
    polynomial's size grows with N; the scale divides it out). Measured, the maximum over a
    block is 1 to 1.4 x N / 2**scale_bits (7.4e-9 for N=8192, scale 40; likewise for degrees
    4096..32768 and scales 25..60). The bound allows 64 * N / 2**scale_bits per party, 45-130x
    that maximum; it is linear in `parties` although independent noises grow only
    ~sqrt(parties), and the factor (1 + max_abs) covers float64 rounding in encoding and
    decoding, which is relative to the magnitude (measured 1e-15 * max_abs). The tests check
    that the observed error stays at least 20x below the bound.
    """
    params.check()
    if not _is_int(parties) or not 1 <= parties <= MAX_PARTIES:
        raise ValueError(f"parties={parties!r} is invalid; use an integer in 1..{MAX_PARTIES}")
    if not (math.isfinite(max_abs) and 0 <= max_abs <= MAX_ABS_VALUE):
        raise ValueError(f"max_abs={max_abs!r} is invalid; use a number in 0..{MAX_ABS_VALUE}")
    per_party = 64.0 * params.poly_modulus_degree * 2.0**-params.global_scale_bits
    return parties * (1.0 + max_abs) * per_party


# --- internals ------------------------------------------------------------------------------

_worker_context: ts.Context | None = None


def _init_worker(public_context: bytes) -> None:
    """Load the context once per worker process rather than once per task."""
    global _worker_context
    _worker_context = _load_context(public_context, want_secret=False)


def _encrypt_in_worker(values: np.ndarray) -> list[bytes]:
    if _worker_context is None:
        raise RuntimeError("worker was started without _init_worker")
    return _encrypt_blocks(_worker_context, values, _slots(_worker_context))


def _encrypt_blocks(context: ts.Context, values: np.ndarray, slots: int) -> list[bytes]:
    return [
        ts.ckks_vector(context, values[start : start + slots]).serialize()
        for start in range(0, values.size, slots)
    ]


def _usable_cpus() -> int:
    """More processes than cores only adds start-up and contention: encryption is CPU-bound."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_values(values: np.ndarray) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"values has shape {array.shape}; pass a non-empty 1-D vector (flatten the update)"
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"values has dtype {array.dtype}; pass real numbers")
    flat = np.ascontiguousarray(array, dtype=np.float64)
    if not np.all(np.isfinite(flat)):
        raise ValueError("values contains NaN or infinity; fix the update before encrypting")
    if np.max(np.abs(flat)) > MAX_ABS_VALUE:
        raise ValueError(
            f"values exceed |x| <= {MAX_ABS_VALUE:g} (MAX_ABS_VALUE); scale the update down"
        )
    return flat


def _load_context(blob: bytes, *, want_secret: bool) -> ts.Context:
    """Deserialise a CKKS context and insist on the key material the caller's role implies.

    The coordinator and the encrypting parties get a context without the secret key, so a
    secret context handed to them is a configuration mistake that would defeat the trust model.
    """
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise ProtectionError("ckks context rejected: malformed")
    try:
        context = ts.context_from(bytes(blob), n_threads=1)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ProtectionError("ckks context rejected: malformed") from exc
    seal_context = context.seal_context().data
    parms = seal_context.first_context_data().parms()
    if (
        parms.scheme() != ts.SCHEME_TYPE.CKKS.value
        or parms.poly_modulus_degree() not in SECURITY_BUDGET_BITS
        or not seal_context.parameters_set()
    ):
        raise ProtectionError("ckks context rejected: unsupported parameters")
    if want_secret and not context.is_private():
        raise ProtectionError("ckks context rejected: no secret key")
    if not want_secret and context.is_private():
        raise ProtectionError("ckks context rejected: secret key in public context")
    if not context.has_public_key():
        raise ProtectionError("ckks context rejected: no public key")
    return context


def _slots(context: ts.Context) -> int:
    return context.seal_context().data.first_context_data().parms().poly_modulus_degree() // 2


def _load_vector(context: ts.Context, blob: bytes, slots: int) -> ts.CKKSVector:
    """Deserialise one block and check the metadata SEAL's ciphertext check does not cover.

    TenSEAL parses the vector's size and metadata separately from the SEAL ciphertext, and its
    protobuf framing is not self-delimiting: an empty stream loads as a 0-value vector, and a
    stream missing its trailing plain-operation scale loads too (harmlessly: additions and
    decryption use the SEAL ciphertext's own scale, checked here). So size, scale, level and
    component count are checked against the context; integrity is the envelope's job.
    """
    if (
        not isinstance(blob, bytes | bytearray | memoryview)
        or not 1 <= len(blob) <= MAX_BLOCK_BYTES
    ):
        raise ProtectionError("ckks ciphertext rejected: malformed")
    try:
        vector = ts.ckks_vector_from(context, bytes(blob))
        size = vector.size()
        ciphertexts = vector.data.ciphertext()
        if len(ciphertexts) != 1:
            raise ValueError("not one ciphertext")
        (ciphertext,) = ciphertexts
        scale = ciphertext.scale
        components = ciphertext.size()
        level_ok = ciphertext.parms_id() == context.seal_context().data.first_parms_id()
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ProtectionError("ckks ciphertext rejected: malformed") from exc
    if not 1 <= size <= slots or components != 2 or not level_ok:
        raise ProtectionError("ckks ciphertext rejected: malformed")
    if scale != context.global_scale:
        raise ProtectionError("ckks ciphertext rejected: scale mismatch")
    return vector
