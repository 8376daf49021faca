"""Protection cost, side by side with Flower's SecAgg+ primitives and raw AES-GCM, in one run.

    .venv/bin/python benchmarks/protection.py [--sizes 1000000 16000000] [--parties 3 10 50]
                                              [--no-flower] [--no-e2e]
    .venv/bin/python benchmarks/protection.py --tiny    # seconds, small vectors, no e2e (a test)

For each LoRA update size and party count n (and 2n, for the scaling ratio), on the same vectors:
- party: quantise + self mask + one pairwise mask per SecAgg+ neighbour + seal to the coordinator
  (seconds, and bytes uploaded over raw fp32 bytes);
- coordinator: open every upload and add it to a running sum, then remove the masks with the
  survivors' Shamir shares (seconds), also with 10% of parties dropping after sharing keys;
- Flower 1.42 (its own venv, `.venv-flwr`, `make bench-env`): `quantize` and one `pseudo_rand_gen`
  per neighbour, and its whole client masking at the same k, via benchmarks/flower_peer.py;
- raw chunked AES-256-GCM from `cryptography` over the same bytes: the physical reference;
- CKKS (TenSEAL) at the smaller size: encrypt (parallel blocks), add, decrypt, bytes, against the
  plaintext sum; and, unless --no-e2e, the demo pipeline end to end under plaintext, secagg and
  ckks policies (the anchor: NVFlare's HE example runs 2.7x slower end to end).
Targets: bytes <= 1.05 x fp32; masking >= 3x faster than Flower per neighbour; per-neighbour mask
throughput >= 0.3 of raw AES-GCM; time(2n)/time(n) <= 2.2 with the SecAgg+ graph. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloudfed.protection import SealContext, open_sealed, seal  # noqa: E402
from cloudfed.protection.hazmat import masks  # noqa: E402
from cloudfed.protection.hazmat.quantize import QuantSpec, dequantize_sum, quantize  # noqa: E402
from cloudfed.protection.keys import load_or_create_keys  # noqa: E402
from cloudfed.protection.secagg import protocol  # noqa: E402
from cloudfed.protection.secagg.graph import default_neighbours  # noqa: E402

CLIP = 0.5
COMPLETE_UP_TO = 10
TARGETS = {
    "bytes_over_fp32_max": 1.05,
    "mask_speedup_vs_flower_min": 3.0,
    "mask_over_raw_aes_min": 0.3,
    "time_2n_over_n_max": 2.2,
    "nvflare_he_end_to_end_anchor": 2.7,
}


def _median(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def raw_aes_gcm(nbytes: int, repeats: int) -> dict[str, float]:
    """Chunked AES-256-GCM (1 MiB chunks) over `nbytes`: what sealing alone costs at best."""
    aead, chunk = AESGCM(os.urandom(32)), bytes(1 << 20)
    count = max(1, nbytes // len(chunk))

    def run() -> None:
        for i in range(count):
            aead.encrypt(i.to_bytes(12, "big"), chunk, None)

    seconds = _median(run, repeats) * nbytes / (count * len(chunk))
    return {"seconds": seconds, "gb_per_s": nbytes / seconds / 1e9}


def mask_per_neighbour(d: int, repeats: int) -> float:
    acc = np.zeros(d, dtype="<u4")
    masks.apply_mask(acc, os.urandom(32))  # fault the pages in first
    return _median(lambda: masks.apply_mask(acc, os.urandom(32)), repeats)


class Keys:
    """Long-term identities for the sealing step, made once per benchmark run."""

    def __init__(self, folder: Path) -> None:
        self.coordinator = load_or_create_keys("coordinator", "coordinator", folder)
        self.party = load_or_create_keys("party", "bench-party", folder)


def secagg_round(
    d: int, n: int, keys: Keys, *, drop_fraction: float = 0.0, party_samples: int = 3
) -> dict[str, Any]:
    """One full round of n parties on d-parameter updates; parties are simulated in turn."""
    names = [f"p{i:03d}" for i in range(n)]
    setup = protocol.setup_for(
        "bench",
        "run",
        1,
        names,
        neighbours=None,
        threshold=None,
        complete_up_to=COMPLETE_UP_TO,
        min_survivors=2,
    )
    dropped = set(names[1 : 1 + int(drop_fraction * n)])
    secrets = {p: protocol.PartySecrets.generate() for p in names}
    adverts = {p: s.advertisement() for p, s in secrets.items()}
    inbox: dict[str, dict[str, protocol.Share]] = {p: {} for p in names}
    for p in names:
        for holder, share in protocol.make_shares(setup, p, secrets[p]).items():
            inbox[holder][p] = share
    spec = QuantSpec.for_parties(CLIP, n)
    rng = np.random.default_rng(d + n)
    total = np.zeros(d, dtype="<u4")
    truth = np.zeros(d, dtype=np.float64)
    party_s, coord_open_s, sent = [], 0.0, 0
    uploaded = [p for p in names if p not in dropped]
    pub = keys.coordinator.public_bundle()
    for i, p in enumerate(uploaded):
        x = rng.normal(0.0, 0.05, d).astype(np.float32)
        truth += x
        start = time.perf_counter()
        words, _ = quantize(x, spec)
        y = protocol.masked_input(setup, p, secrets[p], words, adverts, names)
        ctx = SealContext(federation_id="bench", round=1, party=keys.party.name)
        blob = seal(y.tobytes(), context=ctx, sender=keys.party, recipient=pub)
        elapsed = time.perf_counter() - start
        if i < party_samples:
            party_s.append(elapsed)
        sent = len(blob)
        start = time.perf_counter()
        opened = open_sealed(
            blob, context=ctx, recipient=keys.coordinator, sender=keys.party.public_bundle()
        )
        np.add(total, np.frombuffer(opened, dtype="<u4"), out=total)
        coord_open_s += time.perf_counter() - start
        del blob, opened, y, words
    responses = {h: protocol.reveal(setup, h, inbox[h], names, uploaded) for h in uploaded}
    start = time.perf_counter()
    protocol.remove_masks(setup, adverts, names, uploaded, total, responses)
    unmask_s = time.perf_counter() - start
    error = float(np.max(np.abs(dequantize_sum(total, spec, len(uploaded)) - truth)))
    return {
        "n": n,
        "neighbours": setup.neighbours,
        "threshold": setup.threshold,
        "dropped_after_sharing": len(dropped),
        "bits": spec.bits,
        "party_mask_seal_s": statistics.median(party_s),
        "coordinator_open_sum_s": coord_open_s,
        "coordinator_unmask_s": unmask_s,
        "coordinator_total_s": coord_open_s + unmask_s,
        "bytes_uploaded": sent,
        "bytes_over_fp32": sent / (4 * d),
        "max_abs_error": error,
        "error_bound": spec.sum_error_bound(len(uploaded)),
    }


def flower(sizes: list[int], ks: list[int], repeats: int) -> dict[str, Any] | None:
    python = ROOT / ".venv-flwr" / "bin" / "python"
    if not python.exists():
        return None
    cmd = [str(python), str(ROOT / "benchmarks" / "flower_peer.py"), "--sizes", *map(str, sizes)]
    cmd += ["--neighbours", *map(str, ks), "--clip", str(CLIP), "--repeats", str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)


def ours_client_masking(d: int, k: int, n: int, repeats: int) -> float:
    """Quantise + self mask + k pairwise masks, the part Flower's client masking also does."""
    x = np.random.default_rng(1).normal(0.0, 0.05, d).astype(np.float32)
    spec = QuantSpec.for_parties(CLIP, n)
    keys_ = [os.urandom(32) for _ in range(k + 1)]

    def run() -> None:
        words, _ = quantize(x, spec)
        for i, key in enumerate(keys_):
            masks.apply_mask(words, key, subtract=bool(i % 2))

    run()
    return _median(run, repeats)


def ckks_bench(d: int, n: int, workers: int) -> dict[str, Any]:
    from cloudfed.protection import ckks

    params = ckks.CkksParams(workers=workers)
    secret, public = ckks.generate_keys(params)
    rng = np.random.default_rng(3)
    xs = [rng.normal(0.0, 0.05, d) for _ in range(n)]
    start = time.perf_counter()
    enc = [ckks.encrypt_vector(public, x, workers=workers) for x in xs]
    encrypt_s = (time.perf_counter() - start) / n
    start = time.perf_counter()
    total = ckks.add_encrypted(public, enc)
    add_s = time.perf_counter() - start
    start = time.perf_counter()
    out = ckks.decrypt_vector(secret, total, d)
    decrypt_s = time.perf_counter() - start
    start = time.perf_counter()
    plain = np.sum([x.astype(np.float32) for x in xs], axis=0)
    plain_s = time.perf_counter() - start
    nbytes = len(ckks.pack_blocks(enc[0]))
    return {
        "d": d,
        "n": n,
        "workers": workers,
        "party_encrypt_s": encrypt_s,
        "coordinator_add_s": add_s,
        "key_party_decrypt_s": decrypt_s,
        "plaintext_sum_s": plain_s,
        "bytes_over_fp32": nbytes / (4 * d),
        "max_abs_error": float(np.max(np.abs(out - plain))),
        "tolerance": ckks.tolerance(params, n, float(max(np.max(np.abs(x)) for x in xs))),
    }


def e2e(policies: list[str]) -> dict[str, Any]:
    """The demo pipeline under each policy; wall time and bytes from benchmarks/demo_run.py."""
    import yaml

    base = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    out: dict[str, Any] = {}
    for policy in policies:
        cfg = json.loads(json.dumps(base))
        prot = {"default": policy}
        if policy == "plaintext":
            prot["public_tensors"] = ["*"]
        cfg["parameters"]["federation"]["protection"] = prot
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=ROOT, delete=False) as fh:
            yaml.safe_dump(cfg, fh)
        try:
            proc = subprocess.run(
                [sys.executable, str(ROOT / "benchmarks" / "demo_run.py"), "--config", fh.name],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
        finally:
            os.unlink(fh.name)
        if proc.returncode != 0:
            out[policy] = {"error": proc.stderr[-2000:]}
            continue
        out[policy] = json.loads(proc.stdout)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 16_000_000])
    parser.add_argument("--parties", type=int, nargs="+", default=[3, 10, 50])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ckks-size", type=int, default=1_000_000)
    parser.add_argument("--no-flower", action="store_true")
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="seconds: small vectors, no e2e")
    args = parser.parse_args()
    if args.tiny:
        args.sizes, args.parties, args.repeats, args.ckks_size = [20_000], [3], 1, 8_192
        args.no_e2e = True
    started = time.perf_counter()
    ks = sorted({default_neighbours(n, COMPLETE_UP_TO) for n in args.parties})
    report: dict[str, Any] = {"targets": TARGETS, "clip": CLIP, "cpu_count": os.cpu_count()}
    peer = None if args.no_flower else flower(args.sizes, ks, args.repeats)
    report["flower"] = peer or "not run: create .venv-flwr with `make bench-env`"
    with tempfile.TemporaryDirectory() as tmp:
        keys = Keys(Path(tmp))
        results = []
        for d in args.sizes:
            aes = raw_aes_gcm(4 * d, args.repeats)
            per_neighbour = mask_per_neighbour(d, args.repeats)
            row: dict[str, Any] = {
                "d": d,
                "raw_fp32_bytes": 4 * d,
                "raw_aes_gcm": aes,
                "mask_per_neighbour_s": per_neighbour,
                "mask_gb_per_s": 4 * d / per_neighbour / 1e9,
                "mask_over_raw_aes": aes["seconds"] / per_neighbour,
                "rounds": [],
            }
            flower_size = next((s for s in peer["sizes"] if s["d"] == d), None) if peer else None
            if flower_size:
                f_mask = flower_size["pseudo_rand_gen_per_neighbour"]["median_s"]
                row["flower_mask_per_neighbour_s"] = f_mask
                row["mask_speedup_vs_flower"] = f_mask / per_neighbour
                row["flower_quantize_s"] = flower_size["quantize"]["median_s"]
            for n in args.parties:
                at_n = secagg_round(d, n, keys)
                at_2n = secagg_round(d, 2 * n, keys)
                dropout = secagg_round(d, n, keys, drop_fraction=0.1) if n >= 10 else None
                k = at_n["neighbours"]
                entry = {
                    **at_n,
                    "party_time_2n_over_n": at_2n["party_mask_seal_s"] / at_n["party_mask_seal_s"],
                    "coordinator_time_2n_over_n": at_2n["coordinator_total_s"]
                    / at_n["coordinator_total_s"],
                    "at_2n": at_2n,
                    "with_10pct_dropouts": dropout,
                    "client_masking_s": ours_client_masking(d, k, n, args.repeats),
                }
                if flower_size and str(k) in flower_size["full_client_masking"]:
                    f = flower_size["full_client_masking"][str(k)]
                    entry["flower_client_masking_s"] = f["mask_s"]
                    entry["client_masking_speedup_vs_flower"] = (
                        f["mask_s"] / entry["client_masking_s"]
                    )
                    entry["flower_bytes_over_fp32"] = f["wire_bytes_over_fp32"]
                row["rounds"].append(entry)
                print(f"d={d} n={n} done ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
            results.append(row)
        report["secagg"] = results
    report["ckks"] = ckks_bench(args.ckks_size, 3, workers=2)
    if not args.no_e2e:
        runs = e2e(["plaintext", "secagg", "ckks"])
        plain = runs.get("plaintext", {}).get("pipeline_seconds")
        report["end_to_end"] = {
            p: {
                "pipeline_seconds": r.get("pipeline_seconds"),
                "over_plaintext": (r["pipeline_seconds"] / plain)
                if plain and "pipeline_seconds" in r
                else None,
                "error": r.get("error"),
            }
            for p, r in runs.items()
        }
    report["total_seconds"] = time.perf_counter() - started
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
