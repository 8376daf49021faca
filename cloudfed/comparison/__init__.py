"""The paper's comparison table, made by us: same data, model, seeds and training tokens per arm.

arXiv 2503.12226 claims its hybrid scheme beats traditional federated learning on efficiency,
privacy and accuracy. Each arm here is its own federation (own id, exchange, coordinator, party
storage, policies and privacy ledgers) run in-process through the real stages
(`cloudfed.simulation`), or one of two simulation-only baselines that train with the same
`train_local`: every party alone (`local-only`) and one trainer on the pooled rows
(`centralised`, an upper bound no real federation may build). Arms are data: a name, a kind and
overrides merged into the federation config (`configs/compare.yaml`), so a new arm is an edit.

    python -m cloudfed.comparison configs/compare.yaml --tracking-uri sqlite:///mlflow.db

Every (arm, split, seed) runs the same number of optimiser steps at the same batch size, so the
training-token budgets match up to sampling; the table reports the tokens each one actually used.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cloudfed.comparison.data import data_from_json, data_to_json, iid_split, prepare_data
from cloudfed.comparison.runs import RunResult, run_arm
from cloudfed.comparison.spec import ArmSpec, ComparisonSpec, load_spec, parse_spec
from cloudfed.errors import ConfigError, DataError

__all__ = [
    "ArmSpec",
    "ComparisonSpec",
    "RunResult",
    "data_from_json",
    "data_to_json",
    "finish",
    "iid_split",
    "load_spec",
    "parse_spec",
    "prepare_data",
    "run_arm",
    "run_comparison",
]


def arm_notes(spec: ComparisonSpec) -> list[str]:
    """What the report says besides the numbers: each arm's own caveat."""
    return [f"{a.name}: {a.note}" for a in spec.arms if a.note]


def finish(
    spec: ComparisonSpec,
    results: Sequence[RunResult],
    root: Path,
    *,
    tracking_uri: str | None = None,
) -> dict[str, Path]:
    """Write the table, CSV, chart and raw results; log them to MLflow when given a store."""
    from cloudfed.comparison.report import log_to_mlflow, write_report

    files = write_report(spec, results, root / spec.out_dir, arm_notes(spec))
    if tracking_uri is not None:
        log_to_mlflow(spec, results, files, tracking_uri=tracking_uri)
    return files


def run_comparison(
    spec: ComparisonSpec, root: Path, *, tracking_uri: str | None = None
) -> tuple[list[RunResult], dict[str, Path]]:
    """Every arm on every split and seed, in-process, then the report."""
    data = prepare_data(spec, root)
    results = [r for arm in spec.arms for r in run_arm(spec, arm, data, root)]
    return results, finish(spec, results, root, tracking_uri=tracking_uri)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloudfed.comparison", description=__doc__)
    parser.add_argument("config", help="run configuration with parameters.comparison")
    parser.add_argument("--tracking-uri", help="MLflow database store, e.g. sqlite:///mlflow.db")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="paths are relative to it")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        spec = load_spec(args.config)
        if args.tracking_uri is not None:
            from cloudfed.comparison.report import check_tracking_uri

            check_tracking_uri(args.tracking_uri)
        _, files = run_comparison(spec, args.root, tracking_uri=args.tracking_uri)
    except (ConfigError, DataError) as exc:
        print(f"cloudfed: {exc}", file=sys.stderr)
        return 2
    print(files["markdown"].read_text(encoding="utf-8"))
    print(f"wall time {time.perf_counter() - start:.0f} s; files in {files['markdown'].parent}")
    return 0
