"""Check a run configuration and every party's raw source before anything runs.

`python -m cloudfed.preflight configs/local.yaml` exits 0 when the federation can start, 2 with
a message naming the file, the field and the fix when it cannot. `make run` calls it first so a
typo costs seconds, not a pipeline run. The pipeline refuses the same configurations with the same
messages, through the same functions: `check_config` in its body before any step, and
`check_party_source` in each party's harmonise step, in the party's own cloud.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from cloudfed.errors import CloudfedError, ConfigError
from cloudfed.federation import FederationConfig, PartyConfig, load_run_config
from cloudfed.party_policy import enforce


def check_config(cfg: FederationConfig, source: str, root: Path | None = None) -> None:
    """What needs no party's data: the base model loads, and the budget affords one round.

    Both would otherwise surface only after the pipeline has started: an unloadable model in the
    first step that loads it, a budget below one round as a run that ends without training.
    """
    from cloudfed.training.model import base_model_problem

    problem = base_model_problem(cfg.base_model, root=root or Path.cwd())
    if problem:
        raise ConfigError(f"{source}: parameters.federation.base_model: {problem}.")
    _check_budgets(cfg, source)


def _check_budgets(cfg: FederationConfig, source: str) -> None:
    """A budget smaller than one round's spend can never be met; say what a round costs.

    Checked where the spend follows from the configuration alone: party-level DP with a fixed
    noise multiplier (a target is met over the rounds, so one round costs less than the target,
    which the schema keeps within the budget), and DP-SGD with a fixed noise multiplier and a
    fixed sample_rate (without it the rate is batch_size / records, known only to the party,
    which then refuses to train itself).
    """
    from cloudfed.privacy.accountant import GaussianEvent, epsilon

    p = cfg.privacy
    if p.enabled and p.noise_multiplier is not None and p.max_epsilon is not None:
        spend = epsilon([GaussianEvent(p.noise_multiplier, 1.0, 1)], p.delta, p.accountant)
        if spend > p.max_epsilon:
            raise ConfigError(
                f"{source}: parameters.federation.privacy.max_epsilon: {p.max_epsilon:g} is "
                f"smaller than one round's spend: one round at privacy.noise_multiplier "
                f"{p.noise_multiplier:g} costs epsilon {spend:.4g} (delta {p.delta:g}, "
                f"{p.accountant} accountant), so no round could start. Fix: raise "
                f"privacy.max_epsilon to at least {spend:.4g}, or raise privacy.noise_multiplier."
            )
    steps = cfg.training.local_steps
    for party in cfg.active_parties:
        dp = p.dp_sgd.get(party.name)
        if dp is None or dp.noise_multiplier is None or dp.sample_rate is None:
            continue
        event = GaussianEvent(dp.noise_multiplier, dp.sample_rate, steps)
        spend = epsilon([event], dp.delta, "rdp")
        if spend > dp.max_epsilon:
            field = f"privacy.dp_sgd.{party.name}"
            raise ConfigError(
                f"{source}: parameters.federation.{field}.max_epsilon: {dp.max_epsilon:g} is "
                f"smaller than one round's spend: {steps} DP-SGD steps (training.local_steps) at "
                f"noise_multiplier {dp.noise_multiplier:g} and sample_rate {dp.sample_rate:g} "
                f"cost epsilon {spend:.4g} (delta {dp.delta:g}, rdp accountant), so "
                f"{party.name} could train in no round. Fix: raise {field}.max_epsilon to at "
                f"least {spend:.4g}, or raise its noise_multiplier, or lower its sample_rate or "
                "training.local_steps."
            )


def check_party_source(
    cfg: FederationConfig, party: PartyConfig, root: Path, *, private: bool = False
) -> None:
    """The configuration errors of one party's source: contracts, mapping, raw files, columns.

    Each party runs this in its own cloud, where its files are. `private` (any DP): a problem
    found by reading the first rows is reported without its details (column names, counts),
    because the message reaches the coordinator; the party sees them by running preflight there.
    """
    from cloudfed.data.contracts import suite_path
    from cloudfed.data.mapping import check_source_files, check_source_rows
    from cloudfed.locations import raw_on_disk

    suite = suite_path(root / cfg.contracts_dir)
    if not suite.is_file():
        raise ConfigError(
            f"contracts_dir: {suite} not found. Fix: point contracts_dir at the folder holding "
            "canonical/ (data_contracts in this repository)."
        )
    with raw_on_disk(party) as local_party:  # raw URLs: private temp copies
        mapping = check_source_files(local_party, root)
        try:
            check_source_rows(local_party, root, mapping)
        except CloudfedError:
            if not private:
                raise
            raise ConfigError(
                f"party {party.name!r}: the first rows of its raw files ({party.raw.train}, "
                f"{party.raw.eval}) do not fit its source mapping {party.mapping}; under DP the "
                "details stay in the party's cloud. Fix: run `python -m cloudfed.preflight` on the "
                "run configuration there and correct the mapping or the export."
            ) from None


def check(cfg: FederationConfig, root: Path, source: str = "the run configuration") -> list[str]:
    check_config(cfg, source, root)
    lines = []
    for party in cfg.active_parties:
        check_party_source(cfg, party, root)
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
        for line in check(cfg, Path.cwd(), source=args[0]):
            print(line)
    except CloudfedError as exc:
        print(f"cloudfed: {exc}", file=sys.stderr)
        return 2
    print(f"ok  {args[0]}: {len(cfg.active_parties)} parties, {cfg.rounds} rounds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
