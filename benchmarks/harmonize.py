"""Harmonisation speed and memory: load + map + clean + rows suite + dedup + write, per format.

    python benchmarks/harmonize.py [--rows 200000] [--small 50000]
    python benchmarks/harmonize.py --tiny      # one format, a few hundred rows: seconds (a test)

Generates demo-schema exports (CSV, nested JSON Lines, Parquet) of ``--small`` and ``--rows``
train rows, harmonises each in a fresh subprocess (so peak RSS is that run's alone) and prints
JSON: rows/s of wall time, rows per CPU-second (the per-core figure: the work is one thread),
and the peak RSS above the interpreter's baseline after imports, at both sizes. Flat memory
means the large file's peak is close to the small one's, not 4x it.

Targets (issue 3): >= 50,000 rows/s per core; peak memory independent of the file's length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTIES = {"hospital-aws": "csv", "bank-gcp": "jsonl", "insurer-azure": "parquet"}
TARGET_ROWS_PER_CORE_S = 50_000


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_kib() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) and return the current RSS.

    ru_maxrss would not do: it survives exec, so a child would report its parent's peak.
    """
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def _child(root: str, party: str, chunk_rows: int) -> None:
    """Harmonise one party's train split; print timings and peak RSS as JSON."""
    sys.path.insert(0, str(REPO))
    from cloudfed.data.contracts import load_contract
    from cloudfed.data.dedup import DedupIndex
    from cloudfed.data.harmonize import harmonise_split
    from cloudfed.data.mapping import load_mapping

    base = Path(root)
    mapping = load_mapping(REPO / f"data_contracts/sources/{party}.yaml")
    contract = load_contract(
        REPO / "data_contracts",
        mapping_file=REPO / f"data_contracts/sources/{party}.yaml",
        party=party,
    )
    raw = base / party / "raw" / f"train.{PARTIES[party]}"
    out = base / party / "bench"
    # Warm GX and the regex/Arrow kernels on a tiny sample so the timing is the steady state.
    warm = base / party / "raw" / f"eval.{PARTIES[party]}"
    harmonise_split(
        warm,
        split="eval",
        mapping=mapping,
        contract=contract,
        dedup=DedupIndex(),
        out_path=out / "warm.parquet",
        quarantine_path=out / "warm.jsonl",
    )
    baseline_kib = _reset_peak_kib()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    res = harmonise_split(
        raw,
        split="train",
        mapping=mapping,
        contract=contract,
        dedup=DedupIndex(),
        out_path=out / "train.parquet",
        quarantine_path=out / "train.jsonl",
        chunk_rows=chunk_rows,
    )
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    peak_kib = _status_kib("VmHWM")
    print(
        json.dumps(
            {
                "rows": res.rows_read,
                "accepted": res.accepted,
                "quarantined": res.quarantined,
                "reasons": dict(res.reasons),
                "pii": dict(res.pii),
                "wall_s": round(wall, 3),
                "cpu_s": round(cpu, 3),
                "rows_per_s": round(res.rows_read / wall),
                "rows_per_cpu_s": round(res.rows_read / cpu),
                "baseline_rss_mib": round(baseline_kib / 1024, 1),
                "peak_above_baseline_mib": round((peak_kib - baseline_kib) / 1024, 1),
            }
        )
    )


def _measure(root: Path, party: str, chunk_rows: int) -> dict[str, object]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ARROW_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(root), party, str(chunk_rows)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--small", type=int, default=50_000)
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    parser.add_argument("--parties", nargs="+", choices=list(PARTIES), default=list(PARTIES))
    parser.add_argument("--tiny", action="store_true", help="seconds: one format, small files")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return
    if args.tiny:
        args.rows, args.small, args.chunk_rows, args.parties = 600, 300, 200, ["hospital-aws"]
    parties = {p: PARTIES[p] for p in args.parties}
    sys.path.insert(0, str(REPO))
    from cloudfed.data.demo import generate_demo

    report: dict[str, object] = {"chunk_rows": args.chunk_rows, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="cloudfed-bench-") as tmp:
        results: dict[str, dict[str, object]] = {}
        for size in (args.small, args.rows):
            root = Path(tmp) / str(size)
            t0 = time.perf_counter()
            generate_demo(root, seed=0, train_rows=size, eval_rows=200)
            gen = time.perf_counter() - t0
            for party, fmt in parties.items():
                m = _measure(root, party, args.chunk_rows)
                m["generate_s"] = round(gen, 1)
                results[f"{fmt}@{size}"] = m
        report["runs"] = results
        big = [results[f"{fmt}@{args.rows}"] for fmt in parties.values()]
        small = [results[f"{fmt}@{args.small}"] for fmt in parties.values()]
        rows_per_core = min(int(r["rows_per_cpu_s"]) for r in big)  # type: ignore[call-overload]
        report["summary"] = {
            "min_rows_per_cpu_s_at_large": rows_per_core,
            "target_rows_per_core_s": TARGET_ROWS_PER_CORE_S,
            "meets_speed_target": rows_per_core >= TARGET_ROWS_PER_CORE_S,
            "peak_mib_small_vs_large": {
                fmt: [s["peak_above_baseline_mib"], b["peak_above_baseline_mib"]]
                for fmt, s, b in zip(parties.values(), small, big, strict=True)
            },
            "rows_ratio": args.rows / args.small,
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
