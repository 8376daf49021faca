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
import copy
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field

from cloudfed.artifacts import PartyEval
from cloudfed.data.ref import DatasetRef
from cloudfed.errors import ConfigError, DataError
from cloudfed.federation import PARTY_NAME_PATTERN, FederationConfig, parse_federation
from cloudfed.simulation import RoundResult

SplitName = Literal["non-iid", "iid"]
ArmKind = Literal["federated", "local-only", "centralised"]
POOLED = "pooled"  # the centralised trainer's key in per-trainer token counts


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArmSpec(_Strict):
    """One method of the table.

    `requires` names FederationConfig fields the arm needs: an arm whose field the code does not
    have yet is left out with a note, not failed.
    """

    name: str = Field(pattern=PARTY_NAME_PATTERN)
    kind: ArmKind = "federated"
    overrides: dict[str, Any] = Field(default_factory=dict)
    requires: list[str] = Field(default_factory=list)
    note: str = ""


class DemoData(_Strict):
    """Where `cloudfed.data.demo` writes the raw exports when a party's file is missing."""

    out: str = ".cloudfed/clouds"
    seed: int = 0
    train_rows: int = 240
    eval_rows: int = 60


class Targets(_Strict):
    """The issue's claims, as ratios."""

    iid_vs_centralised: float = 1.05  # federated / centralised eval loss on IID, at most
    protected_vs_plaintext: float = 0.97  # best cloudfed arm / fedavg-plaintext, non-IID, at most
    local_improvement: float = 0.10  # federated vs local-only, lower eval loss per party, at least


class ComparisonSpec(_Strict):
    """The `comparison` parameter of `configs/compare.yaml`."""

    federation: dict[str, Any]
    arms: list[ArmSpec] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    splits: list[SplitName] = Field(default_factory=lambda: ["non-iid", "iid"], min_length=1)
    iid_seed: int = 0
    work_dir: str = ".cloudfed/comparison/work"
    out_dir: str = ".cloudfed/comparison"
    experiment: str = "cloudfed-comparison"
    demo_data: DemoData | None = None
    plaintext_arm: str = "fedavg-plaintext"  # the traditional-FL reference of the targets
    cloudfed_prefix: str = "cloudfed-"  # arms that count as "cloudfed configurations"
    targets: Targets = Targets()

    def active_arms(self) -> tuple[list[ArmSpec], list[str]]:
        """The arms this code can run, and a note for each one left out."""
        have = set(FederationConfig.model_fields)
        active, skipped = [], []
        for arm in self.arms:
            missing = sorted(set(arm.requires) - have)
            if missing:
                skipped.append(f"{arm.name}: not run, FederationConfig has no {missing} yet")
            else:
                active.append(arm)
        return active, skipped

    def arm(self, name: str) -> ArmSpec:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f"comparison: no arm named {name!r}")


def parse_spec(raw: Any, *, source: str = "the run configuration") -> ComparisonSpec:
    """Validate `parameters.comparison`, every arm's federation config included, up front.

    A misspelt override would otherwise fail only when its arm's turn comes, minutes in.
    """
    from pydantic import ValidationError

    from cloudfed.federation import format_validation_error

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: parameters.comparison is missing (see configs/compare.yaml)")
    try:
        spec = ComparisonSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            format_validation_error(exc, source=source, prefix="parameters.comparison")
        ) from None
    active, _ = spec.active_arms()
    for arm in active:
        fed = _federation(spec, "check", Path("."), **arm.overrides)
        parse_federation(fed, source=source, prefix=f"arms[{arm.name}].overrides")
    return spec


def load_spec(path: str | Path) -> ComparisonSpec:
    """Read `parameters.comparison` of a run configuration."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: run configuration not found. Fix: pass an existing file.")
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return parse_spec((doc.get("parameters") or {}).get("comparison"), source=str(path))


def data_to_json(data: Mapping[str, Mapping[str, DatasetRef]]) -> dict[str, Any]:
    """The harmonised references as plain JSON (a step output: paths, digests, counts only)."""
    return {s: {p: r.model_dump(mode="json") for p, r in refs.items()} for s, refs in data.items()}


def data_from_json(doc: Mapping[str, Any]) -> dict[str, dict[str, DatasetRef]]:
    return {
        s: {p: DatasetRef.model_validate(r) for p, r in refs.items()} for s, refs in doc.items()
    }


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`overrides` onto `base`; mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@contextmanager
def policies_in(folder: Path) -> Iterator[None]:
    """The parties' policies (and DP-SGD ledgers beside them) for one arm only.

    Policies normally live where each party's runtime says; one process playing every party of
    many federations points them at a folder per federation, so no arm spends another's budget.
    """
    from cloudfed.party_policy import POLICY_DIR_ENV

    before = os.environ.get(POLICY_DIR_ENV)
    os.environ[POLICY_DIR_ENV] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(POLICY_DIR_ENV, None)
        else:
            os.environ[POLICY_DIR_ENV] = before


def _federation(spec: ComparisonSpec, fed_id: str, run_dir: Path, **overrides: Any) -> dict:
    """The base federation, isolated under `run_dir`: its own exchange, coordinator, storage."""
    fed = deep_merge(spec.federation, overrides)
    fed.update(
        federation_id=fed_id,
        exchange=str(run_dir / "exchange"),
        coordinator_storage=str(run_dir / "coordinator"),
        parties=[
            {**p, "storage": str(run_dir / "clouds" / p["name"])} for p in fed.get("parties", [])
        ],
    )
    return fed


# --- data: harmonised once, the same rows for every arm ----------------------------------------


def _ensure_demo_data(spec: ComparisonSpec, root: Path) -> None:
    parties = spec.federation.get("parties", [])
    missing = [p for p in parties if not all((root / f).exists() for f in p["raw"].values())]
    if missing and spec.demo_data is not None:
        from cloudfed.data.demo import generate_demo

        d = spec.demo_data
        generate_demo(root / d.out, seed=d.seed, train_rows=d.train_rows, eval_rows=d.eval_rows)


def _write_rows(rows: pd.DataFrame, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(path, index=False)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def iid_split(refs: Mapping[str, DatasetRef], out_dir: Path, *, seed: int) -> dict[str, DatasetRef]:
    """Every party's harmonised train rows pooled and dealt out again uniformly at random.

    Each party keeps its row count and its own eval split; only the training rows lose their
    domain skew. A seeded numpy shuffle is right for data (not for masks or noise).
    """
    from cloudfed.party import read_rows

    names = sorted(refs)
    frames = [read_rows(refs[p].train_uri, refs[p].train_sha256) for p in names]
    pooled = pd.concat(frames, ignore_index=True)
    order = np.random.default_rng(seed).permutation(len(pooled))
    out, at = {}, 0
    for p, frame in zip(names, frames, strict=True):
        rows = pooled.iloc[order[at : at + len(frame)]].reset_index(drop=True)
        at += len(frame)
        path = out_dir / p / "train.parquet"
        sha = _write_rows(rows, path)
        out[p] = refs[p].model_copy(
            update={"train_uri": str(path), "train_sha256": sha, "rows_train": len(rows)}
        )
    return out


def prepare_data(spec: ComparisonSpec, root: Path) -> dict[str, dict[str, DatasetRef]]:
    """Harmonise each party once (the harmonize step's `party.prepare_dataset`), then split."""
    from cloudfed.data.tokens import counter_for
    from cloudfed.party import prepare_dataset
    from cloudfed.party_policy import provision

    _ensure_demo_data(spec, root)
    data_dir = root / spec.work_dir / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    fed = _federation(spec, "comparison-data", data_dir, privacy={"mode": "off", "dp_sgd": {}})
    cfg = parse_federation(fed, source="comparison data")
    refs: dict[str, DatasetRef] = {}
    with policies_in(data_dir / "party-policies"):
        provision(cfg, force=True)
        for party in cfg.active_parties:
            ref = prepare_dataset(
                cfg,
                party,
                None,
                root=root,
                run_id="comparison",
                count_tokens=counter_for(cfg.base_model),
            )
            if not ref.ok:
                raise DataError(f"comparison: {party.name} has no usable data: {ref.message}")
            refs[party.name] = ref
    out: dict[str, dict[str, DatasetRef]] = {}
    for split in spec.splits:
        out[split] = (
            refs if split == "non-iid" else iid_split(refs, data_dir / "iid", seed=spec.iid_seed)
        )
    return out


# --- one run of one arm ------------------------------------------------------------------------


class RunResult(BaseModel):
    """One arm on one split with one seed: its rounds and where its federation lived."""

    model_config = ConfigDict(frozen=True)

    arm: str
    kind: ArmKind
    split: SplitName
    seed: int
    federation_id: str = ""  # baselines are no federation
    ledger: str = ""  # the coordinator's folder (privacy ledger, round records)
    epsilon_unit: str = ""  # party-level | record-level | ""
    wall_seconds: float
    rounds: list[RoundResult]

    @property
    def final(self) -> RoundResult:
        return self.rounds[-1]

    @property
    def tokens(self) -> int:
        return sum(sum(r.party_tokens.values()) for r in self.rounds)

    @property
    def samples(self) -> int:
        return sum(sum(r.party_samples.values()) for r in self.rounds)

    @property
    def bytes_sent(self) -> int:
        return sum(r.bytes_sent for r in self.rounds)


def _run_federated(
    spec: ComparisonSpec,
    arm: ArmSpec,
    split: SplitName,
    seed: int,
    data: Mapping[str, DatasetRef],
    run_dir: Path,
) -> RunResult:
    from cloudfed.party_policy import provision
    from cloudfed.simulation import Simulation

    fed_id = f"cmp-{arm.name}-{split}-s{seed}"[:63].rstrip("-")
    fed = _federation(spec, fed_id, run_dir, **deep_merge(arm.overrides, {"seed": seed}))
    cfg = parse_federation(fed, source=f"comparison arm {arm.name}")
    start = time.perf_counter()
    with policies_in(run_dir / "party-policies"):
        provision(cfg, force=True)
        rounds = Simulation(cfg, data).run()
    unit = "party-level" if cfg.privacy.enabled else "record-level" if cfg.privacy.dp_sgd else ""
    return RunResult(
        arm=arm.name,
        kind=arm.kind,
        split=split,
        seed=seed,
        federation_id=cfg.federation_id,
        ledger=str(cfg.coordinator_dir),
        epsilon_unit=unit,
        wall_seconds=time.perf_counter() - start,
        rounds=rounds,
    )


def _loss(evals: Sequence[PartyEval]) -> float:
    from cloudfed.tracking import overall_loss

    return overall_loss(evals)


def _run_baseline(
    spec: ComparisonSpec, arm: ArmSpec, split: SplitName, seed: int, data: Mapping[str, DatasetRef]
) -> RunResult:
    """`local-only` (each party alone) or `centralised` (pooled rows), on the federation's steps.

    A party alone trains what it trains per round in the federation; the pooled trainer trains
    every party's steps, at the same batch size.
    """
    from cloudfed.party import read_rows, training_seed
    from cloudfed.training.local import evaluate, initial_adapter, train_local
    from cloudfed.training.lora import add
    from cloudfed.training.model import resolve_base_model

    cfg = parse_federation(
        _federation(spec, "baseline", Path("unused"), **deep_merge(arm.overrides, {"seed": seed})),
        source=f"comparison arm {arm.name}",
    )
    start = time.perf_counter()
    names = [p.name for p in cfg.active_parties if p.name in data]
    model = resolve_base_model(cfg.base_model, cache_dir=Path(cfg.model_cache), seed=seed)
    train = {p: read_rows(data[p].train_uri, data[p].train_sha256) for p in names}
    held_out = {p: read_rows(data[p].eval_uri, data[p].eval_sha256) for p in names}
    if arm.kind == "centralised":
        train = {POOLED: pd.concat([train[p] for p in names], ignore_index=True)}
    training = cfg.training
    if arm.kind == "centralised":
        training = training.model_copy(update={"local_steps": training.local_steps * len(names)})
    init = initial_adapter(model, cfg.lora, seed=seed)
    states = {t: init for t in train}

    def evals(r: int) -> list[PartyEval]:
        out = []
        for p in names:
            state = states[POOLED if arm.kind == "centralised" else p]
            m = evaluate(model, state, held_out[p], training=training, lora=cfg.lora, seed=seed)
            out.append(
                PartyEval(
                    party=p,
                    round=r,
                    loss=m.loss,
                    perplexity=m.perplexity,
                    tokens=m.tokens,
                    examples=m.examples,
                    seconds=0.0,
                )
            )
        return out

    def result(r: int, ev: list[PartyEval], tokens: dict, samples: dict, t0: float) -> RoundResult:
        return RoundResult(
            round=r,
            eval_loss=_loss(ev),
            party_loss={e.party: e.loss for e in ev},
            party_tokens=tokens,
            party_samples=samples,
            bytes_sent=0,
            epsilon=None,
            seconds=time.perf_counter() - t0,
        )

    rounds = [result(0, evals(0), {}, {}, start)]
    for r in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        tokens, samples = {}, {}
        for t, rows in train.items():
            delta, m = train_local(
                model,
                states[t],
                rows,
                training=training,
                lora=cfg.lora,
                seed=training_seed(seed, t, r),
                desc=f"{arm.name} {t} r{r}",
            )
            states[t] = add(states[t], delta)
            tokens[t], samples[t] = m.tokens, m.samples_seen
        rounds.append(result(r, evals(r), tokens, samples, t0))
    return RunResult(
        arm=arm.name,
        kind=arm.kind,
        split=split,
        seed=seed,
        wall_seconds=time.perf_counter() - start,
        rounds=rounds,
    )


def run_arm(
    spec: ComparisonSpec, arm: ArmSpec, data: Mapping[str, Mapping[str, DatasetRef]], root: Path
) -> list[RunResult]:
    """Every split and seed of one arm, each a fresh federation (its folder wiped first)."""
    out = []
    for split in spec.splits:
        for seed in spec.seeds:
            run_dir = root / spec.work_dir / "runs" / arm.name / split / f"s{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)  # a federation would continue otherwise
            if arm.kind == "federated":
                result = _run_federated(spec, arm, split, seed, data[split], run_dir)
            else:
                result = _run_baseline(spec, arm, split, seed, data[split])
            out.append(result)
            # Always shown: a full comparison takes long enough that its progress must be seen.
            print(
                f"cloudfed: comparison {arm.name} {split} seed {seed}: eval loss "
                f"{result.final.eval_loss:.4f} after round {result.final.round} "
                f"({result.wall_seconds:.0f} s)",
                flush=True,
            )
    return out


# --- the whole comparison ----------------------------------------------------------------------


def arm_notes(spec: ComparisonSpec) -> list[str]:
    """What the report says besides the numbers: arms left out, and each arm's own caveat."""
    _, skipped = spec.active_arms()
    return skipped + [f"{a.name}: {a.note}" for a in spec.arms if a.note]


def finish(
    spec: ComparisonSpec,
    results: Sequence[RunResult],
    root: Path,
    *,
    tracking_uri: str | None = None,
) -> dict[str, Path]:
    """Write the table, CSV, chart and raw results; log them to MLflow when given a store."""
    from cloudfed.comparison_report import log_to_mlflow, write_report

    files = write_report(spec, results, root / spec.out_dir, arm_notes(spec))
    if tracking_uri is not None:
        log_to_mlflow(spec, results, files, tracking_uri=tracking_uri)
    return files


def run_comparison(
    spec: ComparisonSpec, root: Path, *, tracking_uri: str | None = None
) -> tuple[list[RunResult], dict[str, Path]]:
    """Every active arm on every split and seed, in-process, then the report."""
    active, _ = spec.active_arms()
    data = prepare_data(spec, root)
    results = [r for arm in active for r in run_arm(spec, arm, data, root)]
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
            from cloudfed.comparison_report import check_tracking_uri

            check_tracking_uri(args.tracking_uri)
        _, files = run_comparison(spec, args.root, tracking_uri=args.tracking_uri)
    except (ConfigError, DataError) as exc:
        print(f"cloudfed: {exc}", file=sys.stderr)
        return 2
    print(files["markdown"].read_text(encoding="utf-8"))
    print(f"wall time {time.perf_counter() - start:.0f} s; files in {files['markdown'].parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
