"""Check a run configuration and every party's raw source before anything runs.

`python -m cloudfed.preflight configs/local.yaml` exits 0 when the federation can start, 2 with
a message naming the file, the field and the fix when it cannot. `make run` calls it first so a
typo costs seconds, not a pipeline run.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from cloudfed.errors import CloudfedError, ConfigError
from cloudfed.federation import FederationConfig, load_run_config
from cloudfed.party_policy import enforce


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
    for party in cfg.active_parties:
        loaded = enforce(cfg, party.name)
        lines.append(f"ok  {party.name} accepts this run under its policy {loaded.path}")
    lines += [f"warning: {w}" for w in privacy_warnings(cfg)]
    return lines


def privacy_warnings(cfg: FederationConfig, adapter_values: int | None = None) -> list[str]:
    """Party-level DP among few parties: the noise swamps the signal; say so with the estimate.

    The noise on the sum has L2 norm about z*C*sqrt(d), the signal at most n*C (n updates of
    norm <= C), so the signal-to-noise ratio of a round is at most n / (z*sqrt(d)).
    """
    from cloudfed.privacy.party_level import round_noise_multiplier

    if not cfg.privacy.enabled:
        return []
    d = adapter_values if adapter_values is not None else _adapter_values(cfg)
    n = len(cfg.active_parties)
    z = round_noise_multiplier(cfg)
    snr = n / (z * math.sqrt(d))
    if snr >= 1.0:
        return []
    return [
        f"privacy.mode={cfg.privacy.mode} with {n} parties: the noise on each round's sum is "
        f"about z*clip*sqrt(d) = {z:.3g}*clip*sqrt({d}) against a signal of at most n*clip, a "
        f"signal-to-noise ratio of at most n/(z*sqrt(d)) = {snr:.3g} per round; the model will "
        "barely learn. Party-level DP needs hundreds of parties per round; with a handful, use "
        "record-level DP-SGD (privacy.dp_sgd) instead"
    ]


def _adapter_values(cfg: FederationConfig) -> int:
    from cloudfed.training.local import initial_adapter
    from cloudfed.training.model import resolve_base_model

    path = resolve_base_model(cfg.base_model, cache_dir=Path(cfg.model_cache), seed=cfg.seed)
    return int(sum(v.size for v in initial_adapter(path, cfg.lora, seed=cfg.seed).values()))


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
