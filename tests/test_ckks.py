"""CKKS aggregation: sums within the documented bound, key separation, strict parsing."""

from __future__ import annotations

import struct
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import tenseal as ts

from cloudfed.errors import ProtectionError
from cloudfed.protection import ckks

PARAMS = ckks.CkksParams()
LENGTH = 10_000  # 3 blocks of 4096 slots, the last one partial


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return ckks.generate_keys(PARAMS)


@pytest.fixture(scope="module")
def other_keys() -> tuple[bytes, bytes]:
    return ckks.generate_keys(PARAMS)


def _vectors(parties: int, length: int, seed: int, max_abs: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-max_abs, max_abs, length) for _ in range(parties)]


@pytest.mark.parametrize("parties", [3, 10])
def test_sum_decrypts_within_tolerance(keys: tuple[bytes, bytes], parties: int) -> None:
    secret, public = keys
    xs = _vectors(parties, LENGTH, seed=parties)
    encrypted = [ckks.encrypt_vector(public, x) for x in xs]
    assert all(len(blocks) == 3 for blocks in encrypted)
    total = ckks.add_encrypted(public, encrypted)
    got = ckks.decrypt_vector(secret, total, LENGTH)
    assert got.dtype == np.float64 and got.shape == (LENGTH,)
    error = float(np.max(np.abs(got - np.sum(xs, axis=0))))
    bound = ckks.tolerance(PARAMS, parties, 1.0)
    assert error <= bound
    # The bound is meant to be safe, not tight: measured errors sit ~100-400x below it.
    assert error < bound / 20
    assert error > 0  # CKKS is approximate; an exact result would mean nothing was encrypted


def test_large_magnitudes_stay_within_tolerance(keys: tuple[bytes, bytes]) -> None:
    secret, public = keys
    for max_abs in (1e6, ckks.MAX_ABS_VALUE):
        xs = _vectors(3, 300, seed=7, max_abs=max_abs)
        total = ckks.add_encrypted(public, [ckks.encrypt_vector(public, x) for x in xs])
        error = float(np.max(np.abs(ckks.decrypt_vector(secret, total, 300) - np.sum(xs, axis=0))))
        assert error < ckks.tolerance(PARAMS, 3, max_abs) / 20


@pytest.mark.parametrize(
    "params",
    [
        ckks.CkksParams(4096, (40, 40, 29), 25),
        ckks.CkksParams(16384, (60, 40, 40, 40, 40, 60), 40),
    ],
    ids=["4096", "16384"],
)
def test_tolerance_holds_for_other_degrees(params: ckks.CkksParams) -> None:
    secret, public = ckks.generate_keys(params)
    xs = _vectors(3, params.slots, seed=11)
    total = ckks.add_encrypted(public, [ckks.encrypt_vector(public, x) for x in xs])
    got = ckks.decrypt_vector(secret, total, params.slots)
    error = float(np.max(np.abs(got - np.sum(xs, axis=0))))
    assert error < ckks.tolerance(params, 3, 1.0) / 20


class _RecordingPool(ProcessPoolExecutor):
    started: list[int] = []

    def __init__(self, *args: object, **kwargs: object) -> None:
        _RecordingPool.started.append(int(kwargs["max_workers"]))  # type: ignore[call-overload]
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def test_parallel_encryption_matches_serial(
    keys: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret, public = keys
    (x,) = _vectors(1, 5 * PARAMS.slots + 123, seed=3)
    monkeypatch.setattr(ckks, "MIN_BLOCKS_PER_WORKER", 1)
    monkeypatch.setattr(ckks, "_usable_cpus", lambda: 2)  # the worker path even on one core
    monkeypatch.setattr(ckks, "ProcessPoolExecutor", _RecordingPool)
    _RecordingPool.started.clear()
    parallel = ckks.encrypt_vector(public, x, workers=2)
    assert _RecordingPool.started == [2]  # the worker path really ran
    serial = ckks.encrypt_vector(public, x, workers=1)
    assert len(parallel) == len(serial) == 6
    got_parallel = ckks.decrypt_vector(secret, parallel, x.size)
    got_serial = ckks.decrypt_vector(secret, serial, x.size)
    bound = ckks.tolerance(PARAMS, 1, 1.0)
    assert np.max(np.abs(got_parallel - x)) < bound
    assert np.max(np.abs(got_parallel - got_serial)) < 2 * bound
    # Blocks from both paths are interchangeable in a sum.
    total = ckks.decrypt_vector(secret, ckks.add_encrypted(public, [parallel, serial]), x.size)
    assert np.max(np.abs(total - 2 * x)) < ckks.tolerance(PARAMS, 2, 1.0)


def test_small_vectors_stay_serial(
    keys: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, public = keys
    monkeypatch.setattr(ckks, "ProcessPoolExecutor", _RecordingPool)
    _RecordingPool.started.clear()
    blocks = ckks.encrypt_vector(public, np.zeros(LENGTH), workers=2)
    assert len(blocks) == 3 and _RecordingPool.started == []


def test_workers_capped_by_usable_cpus(
    keys: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, public = keys
    monkeypatch.setattr(ckks, "MIN_BLOCKS_PER_WORKER", 1)
    monkeypatch.setattr(ckks, "_usable_cpus", lambda: 1)
    monkeypatch.setattr(ckks, "ProcessPoolExecutor", _RecordingPool)
    _RecordingPool.started.clear()
    assert len(ckks.encrypt_vector(public, np.zeros(LENGTH), workers=8)) == 3
    assert _RecordingPool.started == []


def test_public_context_holds_no_secret(keys: tuple[bytes, bytes]) -> None:
    secret, public = keys
    loaded = ts.context_from(public)
    assert not loaded.is_private()
    assert not loaded.has_relin_keys() and not loaded.has_galois_keys()
    assert ts.context_from(secret).is_private()
    blocks = ckks.encrypt_vector(public, np.ones(10))
    with pytest.raises(ProtectionError, match="no secret key"):
        ckks.decrypt_vector(public, blocks, 10)


def test_secret_context_refused_where_only_public_belongs(keys: tuple[bytes, bytes]) -> None:
    secret, public = keys
    blocks = ckks.encrypt_vector(public, np.ones(10))
    with pytest.raises(ProtectionError, match="secret key in public context"):
        ckks.add_encrypted(secret, [blocks, blocks])
    with pytest.raises(ProtectionError, match="secret key in public context"):
        ckks.encrypt_vector(secret, np.ones(10))


def test_fingerprint_pins_the_context(
    keys: tuple[bytes, bytes], other_keys: tuple[bytes, bytes]
) -> None:
    fingerprint = ckks.public_fingerprint(keys[1])
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    assert fingerprint == ckks.public_fingerprint(bytes(keys[1]))
    assert fingerprint != ckks.public_fingerprint(other_keys[1])


def test_mismatched_block_counts_rejected(keys: tuple[bytes, bytes]) -> None:
    _, public = keys
    three = ckks.encrypt_vector(public, np.ones(LENGTH))
    one = ckks.encrypt_vector(public, np.ones(10))
    with pytest.raises(ProtectionError, match="block count mismatch"):
        ckks.add_encrypted(public, [three, one])
    with pytest.raises(ProtectionError, match="block count mismatch"):
        ckks.add_encrypted(public, [[], []])
    with pytest.raises(ValueError, match="parties"):
        ckks.add_encrypted(public, [])


def test_mismatched_block_sizes_rejected(keys: tuple[bytes, bytes]) -> None:
    secret, public = keys
    ten = ckks.encrypt_vector(public, np.ones(10))
    eleven = ckks.encrypt_vector(public, np.ones(11))
    with pytest.raises(ProtectionError, match="block size mismatch"):
        ckks.add_encrypted(public, [ten, eleven])
    with pytest.raises(ProtectionError, match="length mismatch"):
        ckks.decrypt_vector(secret, ten, 11)
    with pytest.raises(ProtectionError, match="length mismatch"):
        ckks.decrypt_vector(secret, ten + ten, 10)


def test_malformed_ciphertexts_rejected(keys: tuple[bytes, bytes]) -> None:
    secret, public = keys
    (good,) = ckks.encrypt_vector(public, np.full(PARAMS.slots, 0.5))
    for bad in [b"", b"garbage", good[:1000], good[: len(good) // 2], b"\x00" + good, public]:
        with pytest.raises(ProtectionError):
            ckks.add_encrypted(public, [[good], [bad]])
        with pytest.raises(ProtectionError):
            ckks.decrypt_vector(secret, [bad], PARAMS.slots)


def test_cut_or_padded_ciphertexts_never_decrypt_wrongly(keys: tuple[bytes, bytes]) -> None:
    """TenSEAL's protobuf framing is lax: dropping the trailing 9-byte plain-operation scale or
    appending what parses as an unknown field still loads. The SEAL ciphertext inside is then
    intact, so such a block must decrypt to the right values; every other mutation must fail."""
    secret, public = keys
    (good,) = ckks.encrypt_vector(public, np.full(PARAMS.slots, 0.5))
    bound = ckks.tolerance(PARAMS, 2, 1.0)
    mutants = [good[:-cut] for cut in [*range(1, 40), 100, 1000, len(good) - 1]]
    mutants += [good + suffix for suffix in (b"xx", b"\x00", b"\xff" * 8, good[:50])]
    loaded = 0
    for mutant in mutants:
        try:
            total = ckks.add_encrypted(public, [[good], [mutant]])
        except ProtectionError:
            continue
        loaded += 1
        got = ckks.decrypt_vector(secret, total, PARAMS.slots)
        assert np.max(np.abs(got - 1.0)) < bound
    assert 1 <= loaded <= 3  # the cut-off scale field at least; a jump means the checks loosened


def test_ciphertext_from_other_parameters_rejected(keys: tuple[bytes, bytes]) -> None:
    secret, public = keys
    _, small_public = ckks.generate_keys(ckks.CkksParams(8192, (60, 40, 60), 40))
    foreign = ckks.encrypt_vector(small_public, np.ones(10))
    own = ckks.encrypt_vector(public, np.ones(10))
    with pytest.raises(ProtectionError):
        ckks.add_encrypted(public, [own, foreign])
    with pytest.raises(ProtectionError):
        ckks.decrypt_vector(secret, foreign, 10)


def test_ciphertext_under_other_key_rejected_at_decryption(
    keys: tuple[bytes, bytes], other_keys: tuple[bytes, bytes]
) -> None:
    secret, _ = keys
    blocks = ckks.encrypt_vector(other_keys[1], np.ones(LENGTH))
    with pytest.raises(ProtectionError, match="implausible"):
        ckks.decrypt_vector(secret, blocks, LENGTH)


def test_malformed_contexts_rejected(keys: tuple[bytes, bytes]) -> None:
    _, public = keys
    for bad in (b"", b"garbage", public[:1000], public + b"x"):
        with pytest.raises(ProtectionError, match="context rejected"):
            ckks.encrypt_vector(bad, np.ones(3))
    bfv = ts.context(ts.SCHEME_TYPE.BFV, 8192, plain_modulus=1032193).serialize(
        save_secret_key=False
    )
    with pytest.raises(ProtectionError, match="unsupported parameters"):
        ckks.encrypt_vector(bfv, np.ones(3))


def test_pack_roundtrip_and_format(keys: tuple[bytes, bytes]) -> None:
    _, public = keys
    blocks = ckks.encrypt_vector(public, np.ones(LENGTH))
    blob = ckks.pack_blocks(blocks)
    assert blob[:6] == b"CFCKKS" and blob[6] == 1
    assert struct.unpack(">I", blob[7:11]) == (3,)
    assert struct.unpack(">I", blob[11:15]) == (len(blocks[0]),)
    assert len(blob) == 11 + sum(4 + len(b) for b in blocks)
    assert ckks.unpack_blocks(blob) == blocks


def test_unpack_rejects_malformed() -> None:
    blob = ckks.pack_blocks([b"abc", b"de"])
    header = b"CFCKKS\x01"
    bad = [
        b"",
        b"garbage",
        blob[:5],
        blob[:10],
        blob[:-1],
        blob[:14],
        blob + b"\x00",  # trailing bytes
        b"XFCKKS" + blob[6:],  # magic
        blob[:6] + b"\x02" + blob[7:],  # version
        header + struct.pack(">I", 0),  # no blocks
        header + struct.pack(">I", ckks.MAX_BLOCKS + 1) + b"\x00" * 64,
        header + struct.pack(">I", 1000) + struct.pack(">I", 1) + b"a",  # count beyond the blob
        header + struct.pack(">I", 1) + struct.pack(">I", 0),  # empty block
        header + struct.pack(">I", 1) + struct.pack(">I", 5) + b"abc",  # block past the end
    ]
    for item in bad:
        with pytest.raises(ProtectionError, match="malformed"):
            ckks.unpack_blocks(item)
    with pytest.raises(ValueError):
        ckks.pack_blocks([])
    with pytest.raises(ValueError):
        ckks.pack_blocks([b""])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"poly_modulus_degree": 2048}, "poly_modulus_degree"),
        ({"poly_modulus_degree": 6000}, "poly_modulus_degree"),
        ({"poly_modulus_degree": 65536}, "poly_modulus_degree"),
        ({"poly_modulus_degree": 4096}, "security budget"),  # default primes total 200 > 109
        ({"coeff_mod_bit_sizes": (60, 60, 60, 60)}, "security budget"),  # 240 > 218
        ({"coeff_mod_bit_sizes": (60,)}, "coeff_mod_bit_sizes"),
        ({"coeff_mod_bit_sizes": (60, 70, 60)}, "coeff_mod_bit_sizes"),
        ({"coeff_mod_bit_sizes": [60, 40, 40, 60]}, "coeff_mod_bit_sizes"),
        ({"global_scale_bits": 20}, "global_scale_bits"),
        ({"global_scale_bits": 61}, "global_scale_bits"),
        ({"coeff_mod_bit_sizes": (60, 60), "global_scale_bits": 40}, "too little room"),
        ({"workers": 0}, "workers"),
        ({"workers": True}, "workers"),
    ],
)
def test_params_check_rejects(kwargs: dict[str, object], field: str) -> None:
    params = ckks.CkksParams(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        params.check()
    with pytest.raises(ValueError):
        ckks.generate_keys(params)


def test_params_accepts_defaults_and_larger_degrees() -> None:
    assert PARAMS.slots == 4096
    PARAMS.check()
    ckks.CkksParams(16384, (60, 40, 40, 40, 40, 60), 40, workers=4).check()
    ckks.CkksParams(32768, (60,) * 14, 50).check()


def test_bad_arguments_raise_value_error(keys: tuple[bytes, bytes]) -> None:
    secret, public = keys
    for values in (np.ones((2, 3)), np.array([]), np.array([1.0, np.nan]), np.array(["a"])):
        with pytest.raises(ValueError, match="values"):
            ckks.encrypt_vector(public, values)
    with pytest.raises(ValueError, match="MAX_ABS_VALUE"):
        ckks.encrypt_vector(public, np.array([ckks.MAX_ABS_VALUE * 2]))
    with pytest.raises(ValueError, match="workers"):
        ckks.encrypt_vector(public, np.ones(3), workers=0)
    with pytest.raises(ValueError, match="length"):
        ckks.decrypt_vector(secret, [], 0)
    with pytest.raises(ValueError, match="parties"):
        ckks.tolerance(PARAMS, 0, 1.0)
    with pytest.raises(ValueError, match="max_abs"):
        ckks.tolerance(PARAMS, 3, float("inf"))


def test_ciphertext_expansion(
    keys: tuple[bytes, bytes], record_property: Callable[[str, object], None]
) -> None:
    _, public = keys
    blocks = ckks.encrypt_vector(public, np.ones(4 * PARAMS.slots))
    per_value = sum(map(len, blocks)) / (4 * PARAMS.slots)
    record_property("ckks_bytes_per_value", per_value)
    # Two polynomials x 8192 coefficients x 3 data primes x 8 bytes, compressed: ~81 bytes per
    # value, ~10x a float64. More than 100 would mean keys or extra moduli leaked into blocks.
    assert 60 < per_value < 100
    # Summing does not grow ciphertexts.
    total = ckks.add_encrypted(public, [blocks, blocks, blocks])
    assert sum(map(len, total)) <= 1.02 * sum(map(len, blocks))
