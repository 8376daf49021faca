"""`python -m cloudfed.audit canaries -c configs/audit.yaml [--out DIR]`.

A configuration mistake prints its message (file, field, fix) and exits 2, without a traceback,
because the person running an audit should fix the YAML, not read pydantic internals.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cloudfed.errors import CloudfedError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cloudfed.audit",
        description="Empirical privacy audits of the federation.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    canaries = sub.add_parser(
        "canaries",
        help="canary exposure test (Carlini et al. 2019): with and without DP-SGD",
    )
    canaries.add_argument("-c", "--config", type=Path, required=True, help="audit YAML file")
    canaries.add_argument(
        "--out", type=Path, default=None, help="report folder (default: out_dir of the config)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from cloudfed.audit.config import load_audit_config
    from cloudfed.audit.report import summary_text
    from cloudfed.audit.run import run_canary_audit

    try:
        cfg = load_audit_config(args.config)
        outcome = run_canary_audit(cfg, source=str(args.config), out_dir=args.out)
    except CloudfedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_text(outcome.report))
    print(f"report: {outcome.out_dir / 'report.md'} (and report.json, exposure.png)")
    print(
        f"MLflow run {outcome.run_id} in experiment {cfg.mlflow.experiment!r} at "
        f"{cfg.mlflow.tracking_uri}; browse with: mlflow ui --backend-store-uri "
        f"{cfg.mlflow.tracking_uri}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
