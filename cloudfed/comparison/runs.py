"""One arm on one split with one seed: a federation in-process, or a baseline on the same rows."""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, ConfigDict

from cloudfed.artifacts import PartyEval
from cloudfed.comparison.data import policies_in
from cloudfed.comparison.spec import (
    ArmKind,
    ArmSpec,
    ComparisonSpec,
    SplitName,
    deep_merge,
    federation_for,
)
from cloudfed.data.ref import DatasetRef
from cloudfed.federation import parse_federation
from cloudfed.simulation import RoundResult

POOLED = "pooled"  # the centralised trainer's key in per-trainer token counts


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
    fed = federation_for(spec, fed_id, run_dir, **deep_merge(arm.overrides, {"seed": seed}))
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

    overrides = deep_merge(arm.overrides, {"seed": seed})
    fed = federation_for(spec, "baseline", Path("unused"), **overrides)  # settings only
    cfg = parse_federation(fed, source=f"comparison arm {arm.name}")
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
