"""Check a run configuration and every party's raw source before anything runs.

`python -m cloudfed.preflight configs/local.yaml` exits 0 when the federation can start, 2 with
a message naming the file, the field and the fix when it cannot. `make run` calls it first so a
typo costs seconds, not a pipeline run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cloudfed.errors import CloudfedError, ConfigError
from cloudfed.federation import FederationConfig, load_run_config


def check(cfg: FederationConfig, root: Path) -> list[str]:
    from cloudfed.data.contracts import suite_path
    from cloudfed.data.mapping import check_source

    suite = suite_path(root / cfg.contracts_dir)
    if not suite.is_file():
        raise ConfigError(
            f"contracts_dir: {suite} not found. Fix: point contracts_dir at the folder holding "
            "canonical/ (data_contracts in this repository)."
        )
    lines = []
    for party in cfg.active_parties:
        check_source(party, root)
        lines.append(f"ok  {party.name}: {party.raw.train}, {party.raw.eval} via {party.mapping}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m cloudfed.preflight CONFIG.yaml", file=sys.stderr)
        return 2
    try:
        cfg = load_run_config(args[0])
        for line in check(cfg, Path.cwd()):
            print(line)
    except CloudfedError as exc:
        print(f"cloudfed: {exc}", file=sys.stderr)
        return 2
    print(f"ok  {args[0]}: {len(cfg.active_parties)} parties, {cfg.rounds} rounds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
