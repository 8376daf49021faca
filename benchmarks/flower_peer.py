"""Benchmark peer: time Flower's own SecAgg+ masking primitives for a side-by-side comparison.

Why this exists: we compare our secure-aggregation masking with Flower's SecAgg+. To be fair,
this peer imports and times flwr's real functions (``quantize``, ``pseudo_rand_gen``,
``generate_shared_key``, the ``parameters_*`` helpers and the client mod's own masking stage
``_collect_masked_vectors``); it never re-implements them. flwr's pins conflict with the project,
so it runs in its own venv and only prints one JSON object to stdout:

    .venv-flwr/bin/python benchmarks/flower_peer.py --sizes 1000000 16000000 --neighbours 2 4 6

Imports only flwr, numpy and the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import numpy as np
from flwr.app import ConfigRecord
from flwr.client.mod.secure_aggregation.secaggplus_mod import (
    SecAggPlusState,
    _collect_masked_vectors,
)
from flwr.common import ndarray_to_bytes, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.common.secure_aggregation.secaggplus_utils import (
    pseudo_rand_gen,
    share_keys_plaintext_concat,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

# flwr's SecAggPlusWorkflow default max_weight; we train with num_examples == max_weight so the
# weighting factor is exactly 1 (q_ratio == target_range, dq_ratio == 1.0), as in flwr's client.
MAX_WEIGHT = 1000.0
NUM_EXAMPLES = 1000


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """Run ``fn`` ``repeats`` times; return (median seconds, all seconds). Results are dropped."""
    times: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return statistics.median(times), times


def _peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Client:
    """One SecAgg+ client with k neighbours, with flwr-generated key material.

    Mirrors the state flwr's client mod holds when it reaches the collect-masked-vectors stage:
    its own SECP384R1 key pairs (sk1 for pairwise masks, sk2 for share encryption), the
    neighbours' public keys, a 32-byte private-mask seed, and one encrypted share message per
    neighbour (as the server would forward them).
    """

    def __init__(self, k: int, clip: float, target_range: int, mod_range: int) -> None:
        self.nid = k // 2 + 1  # node ids 1..k+1; mid id => both "+" and "-" pairwise masks
        ids = list(range(1, k + 2))
        keys = {nid: (generate_key_pairs(), generate_key_pairs()) for nid in ids}
        pub = {
            nid: (public_key_to_bytes(kp1[1]), public_key_to_bytes(kp2[1]))
            for nid, (kp1, kp2) in keys.items()
        }
        (sk1, _), (sk2, _) = keys[self.nid]
        self.sk1 = private_key_to_bytes(sk1)
        self.sk2 = private_key_to_bytes(sk2)
        self.public_keys = pub
        self.neighbours = [nid for nid in ids if nid != self.nid]
        self.rd_seed = os.urandom(32)
        self.clip, self.target_range, self.mod_range = clip, target_range, mod_range
        threshold = max(2, (k + 1) // 2 + 1)
        self.threshold = threshold
        # Share messages the server forwards to us: encrypted with the sk2/pk2 ECDH key.
        self.ss2: dict[int, bytes] = {}
        self.srcs: list[int] = []
        self.ctxts: list[bytes] = []
        for src in self.neighbours:
            src_sk2 = keys[src][1][0]
            key = generate_shared_key(src_sk2, bytes_to_public_key(pub[self.nid][1]))
            self.ss2[src] = generate_shared_key(
                bytes_to_private_key(self.sk2), bytes_to_public_key(pub[src][1])
            )
            b_share = create_shares(os.urandom(32), threshold, k + 1)[self.nid - 1]
            sk_share = create_shares(private_key_to_bytes(keys[src][0][0]), threshold, k + 1)[
                self.nid - 1
            ]
            plaintext = share_keys_plaintext_concat(src, self.nid, b_share, sk_share)
            self.srcs.append(src)
            self.ctxts.append(encrypt(key, plaintext))

    def flwr_state(self) -> SecAggPlusState:
        """A fresh flwr SecAggPlusState at the start of the collect-masked-vectors stage."""
        st = SecAggPlusState()
        st.nid = self.nid
        st.sample_num = len(self.public_keys)
        st.share_num = len(self.public_keys)
        st.threshold = self.threshold
        st.clipping_range = self.clip
        st.target_range = self.target_range
        st.mod_range = self.mod_range
        st.max_weight = MAX_WEIGHT
        st.sk1, st.sk2 = self.sk1, self.sk2
        st.rd_seed = self.rd_seed
        st.rd_seed_share_dict = {}
        st.sk1_share_dict = {}
        st.ss2_dict = dict(self.ss2)
        st.public_keys_dict = dict(self.public_keys)
        return st

    def mask_composed(self, params: list[np.ndarray]) -> list[np.ndarray]:
        """The arithmetic block of flwr's ``_collect_masked_vectors``, via flwr's own functions.

        Same call sequence as flwr 1.42 (weight factor, quantize, factor_combine, private mask,
        one pairwise mask per neighbour seeded by ECDH+HKDF, final mod), minus the share
        decryption and (de)serialisation, so it isolates the masking cost.
        """
        ratio = NUM_EXAMPLES / MAX_WEIGHT
        q_ratio = round(ratio * self.target_range)
        dq_ratio = q_ratio / self.target_range
        p = parameters_multiply(params, dq_ratio)
        q = quantize(p, self.clip, self.target_range)
        del p
        q = factor_combine(q_ratio, q)
        dims = [a.shape for a in q]
        q = parameters_addition(q, pseudo_rand_gen(self.rd_seed, self.mod_range, dims))
        sk1 = bytes_to_private_key(self.sk1)
        for nid in self.neighbours:
            seed = generate_shared_key(sk1, bytes_to_public_key(self.public_keys[nid][0]))
            mask = pseudo_rand_gen(seed, self.mod_range, dims)
            if self.nid > nid:
                q = parameters_addition(q, mask)
            else:
                q = parameters_subtraction(q, mask)
            del mask
        return parameters_mod(q, self.mod_range)

    def mask_flwr_stage(self, parameters: Any) -> list[bytes]:
        """Call flwr's real client-mod stage ``_collect_masked_vectors``; returns its payload."""
        configs = ConfigRecord({Key.CIPHERTEXT_LIST: self.ctxts, Key.SOURCE_LIST: self.srcs})
        res = _collect_masked_vectors(self.flwr_state(), configs, NUM_EXAMPLES, parameters)
        return list(res[Key.MASKED_PARAMETERS])  # type: ignore[arg-type]


def bench_size(
    d: int, ks: list[int], clip: float, bits: int, mod_bits: int, repeats: int, seed: int
) -> dict[str, Any]:
    """All measurements for one vector size ``d``."""
    target_range, mod_range = 2**bits, 2**mod_bits
    rng = np.random.default_rng(seed)
    x = rng.uniform(-clip, clip, d).astype(np.float32)
    out: dict[str, Any] = {"d": d, "repeats": repeats, "raw_fp32_bytes": 4 * d}

    np.random.seed(seed)  # flwr's stochastic rounding draws from numpy's global RandomState
    q_med, q_all = _median_time(lambda: quantize([x], clip, target_range), repeats)
    np.random.seed(seed)
    q0 = quantize([x], clip, target_range)[0]
    np.random.seed(seed + 1)
    q1 = quantize([x], clip, target_range)[0]
    out["quantize"] = {
        "median_s": q_med,
        "all_s": q_all,
        "out_dtype": str(q0.dtype),
        # Entries whose stochastic rounding changed with the global numpy seed; 0 means the
        # rounding was a no-op for these inputs (fp32 mantissa already on the integer grid).
        "stochastic_rounding_seed_dependent_entries": int(np.count_nonzero(q0 != q1)),
    }
    del q0, q1

    seeds = [rng.bytes(32) for _ in range(repeats)]
    it = iter(seeds)
    prg_med, prg_all = _median_time(lambda: pseudo_rand_gen(next(it), mod_range, [(d,)]), repeats)
    m0 = pseudo_rand_gen(seeds[0], mod_range, [(d,)])[0]
    out["pseudo_rand_gen_per_neighbour"] = {
        "median_s": prg_med,
        "all_s": prg_all,
        "out_dtype": str(m0.dtype),
        "max_value_seen": int(m0.max()),
    }
    del m0

    params = [x]
    parameters = ndarrays_to_parameters(params)  # what the ClientApp's fit hands the mod
    per_k: dict[str, Any] = {}
    for k in ks:
        client = Client(k, clip, target_range, mod_range)
        # Fidelity check (untimed, also warm-up): the composed path must be bit-identical to
        # flwr's real client-mod stage given the same keys, seeds and rounding randomness.
        np.random.seed(seed)
        composed = client.mask_composed(params)
        np.random.seed(seed)
        payload = client.mask_flwr_stage(parameters)
        identical = [ndarray_to_bytes(a) for a in composed] == payload
        masked_dtype = str(composed[-1].dtype)
        masked_nbytes = int(sum(a.nbytes for a in composed))
        wire_bytes = int(sum(len(b) for b in payload))
        max_val = int(composed[-1].max())
        del composed, payload

        mask_med, mask_all = _median_time(lambda c=client: c.mask_composed(params), repeats)
        masked = client.mask_composed(params)
        ser_med, ser_all = _median_time(lambda m=masked: [ndarray_to_bytes(a) for a in m], repeats)
        del masked
        stage_med, stage_all = _median_time(lambda c=client: c.mask_flwr_stage(parameters), repeats)
        per_k[str(k)] = {
            "mask_s": mask_med,
            "mask_all_s": mask_all,
            "serialize_s": ser_med,
            "flwr_stage_s": stage_med,
            "flwr_stage_all_s": stage_all,
            "composed_equals_flwr_stage": identical,
            "masked_dtype": masked_dtype,
            "masked_max_value": max_val,
            "masked_nbytes": masked_nbytes,
            "masked_nbytes_over_fp32": masked_nbytes / (4 * d),
            "wire_bytes": wire_bytes,
            "wire_bytes_over_fp32": wire_bytes / (4 * d),
        }
    out["full_client_masking"] = per_k
    out["peak_rss_mib_so_far"] = _peak_rss_mb()
    return out


def bench_key_agreement(repeats: int) -> dict[str, Any]:
    """Per-neighbour seed derivation (ECDH SECP384R1 + HKDF-SHA256), independent of d."""
    (sk, _), (_, pk) = generate_key_pairs(), generate_key_pairs()
    sk_b, pk_b = private_key_to_bytes(sk), public_key_to_bytes(pk)
    n = max(repeats, 20)
    med, _ = _median_time(
        lambda: generate_shared_key(bytes_to_private_key(sk_b), bytes_to_public_key(pk_b)), n
    )
    seed = generate_shared_key(sk, pk)
    return {"median_s": med, "calls": n, "seed_len_bytes": len(seed)}


def main(argv: list[str] | None = None) -> None:
    """Parse the CLI, run every measurement, print one JSON object."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 16_000_000])
    ap.add_argument("--neighbours", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--clip", type=float, default=0.5)
    ap.add_argument("--bits", type=int, default=26, help="quantisation: target_range = 2**bits")
    ap.add_argument(
        "--mod-bits", type=int, default=32, help="mask modulus 2**mod_bits (flwr default 2**32)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="seconds: d=5000, k=2, one repeat (tests)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.sizes, args.neighbours, args.repeats = [5000], [2], 1
    if args.mod_bits > 32 or args.mod_bits <= args.bits:
        ap.error("flwr needs bits < mod-bits <= 32 (RandomState seeds / its workflow checks)")

    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "tool": "flower_peer",
        "flwr_version": version("flwr"),
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "params": {
            "clip": args.clip,
            "bits": args.bits,
            "target_range": 2**args.bits,
            "mod_range": 2**args.mod_bits,
            "repeats": args.repeats,
            "seed": args.seed,
            "max_weight": MAX_WEIGHT,
            "num_examples": NUM_EXAMPLES,
        },
        "notes": [
            "median of repeats; each size times every step with the same repeat count",
            "mask_s: flwr 1.42 _collect_masked_vectors arithmetic via flwr's own functions "
            "(weight multiply, quantize, factor_combine, private mask, per-neighbour "
            "ECDH+HKDF seed + pseudo_rand_gen, add/sub, parameters_mod); no serialisation",
            "flwr_stage_s: flwr's real client-mod stage _collect_masked_vectors end to end "
            "(decrypt k share ciphertexts, np.load params, mask, np.save payload)",
            "masked vector = [factor (1,) int64, update (d,) int64]; wire bytes include 2 .npy "
            "headers",
            "the 1-D vector is a single ndarray; real models send one masked array per layer",
        ],
        "key_agreement_per_neighbour": bench_key_agreement(args.repeats),
        "sizes": [],
    }
    for d in args.sizes:
        result["sizes"].append(
            bench_size(
                d, args.neighbours, args.clip, args.bits, args.mod_bits, args.repeats, args.seed
            )
        )
    result["peak_rss_mib"] = _peak_rss_mb()
    result["total_wall_s"] = time.perf_counter() - t0
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
