"""The canary audit end to end: plant, train every arm, rank, report, log to MLflow.

Scoring uses the final global adapter, the model every party and the coordinator end up with,
so the exposure is what any participant of the federation could extract, not only the canary
party itself.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cloudfed.audit.canaries import Canary, insert_canaries, make_canaries, reference_secrets
from cloudfed.audit.config import AuditConfig
from cloudfed.audit.exposure import (
    chance_exposure,
    exposure_bits,
    max_exposure,
    rank,
    summarise,
)
from cloudfed.audit.parties import demo_rows
from cloudfed.audit.report import write_report
from cloudfed.audit.scoring import CanaryScorer
from cloudfed.audit.simulation import ArmResult, plan_arms, run_arm
from cloudfed.audit.tracking import log_audit
from cloudfed.training.local import evaluate, initial_adapter
from cloudfed.training.model import resolve_base_model


@dataclass(frozen=True)
class AuditOutcome:
    report: dict[str, Any]
    out_dir: Path
    run_id: str


def _score(
    cfg: AuditConfig,
    result: ArmResult,
    *,
    model_path: str,
    canaries: list[Canary],
    references: list[str],
) -> list[dict[str, Any]]:
    scorer = CanaryScorer(
        model_path,
        result.adapter,
        lora=cfg.lora,
        max_seq_len=cfg.training.max_seq_len,
        seed=cfg.seed,
    )
    out = []
    for canary in tqdm(canaries, desc=f"{result.arm.name}: ranking canaries", leave=False):
        losses = scorer.losses(canary, references)
        r = rank(float(losses[0]), losses[1:])
        out.append(
            {
                "name": canary.name,
                "secret": canary.secret,
                "repeats": canary.repeats,
                "loss": float(losses[0]),
                "reference_loss_median": float(np.median(losses[1:])),
                "rank": r,
                "exposure_bits": exposure_bits(r, len(references)),
            }
        )
    return out


def _arm_report(
    cfg: AuditConfig, result: ArmResult, scores: list[dict[str, Any]], eval_loss: float
) -> dict[str, Any]:
    levels = summarise(
        [s["repeats"] for s in scores],
        [s["exposure_bits"] for s in scores],
        [s["rank"] for s in scores],
    )
    return {
        "name": result.arm.name,
        "dp_sgd": result.arm.dp,
        "target_epsilon": result.arm.target_epsilon,
        "epsilon_spent": result.epsilon,
        "delta": cfg.dp.delta if result.arm.dp else None,
        "noise_multiplier": result.arm.noise_multiplier,
        "max_grad_norm": cfg.dp.max_grad_norm if result.arm.dp else None,
        "empty_batches": result.empty_batches,
        "eval_loss": eval_loss,
        "train_loss_last": result.train_loss,
        "seconds": result.seconds,
        "exposure": [level.as_dict() for level in levels],
        "canaries": scores,
    }


def run_canary_audit(cfg: AuditConfig, *, source: str, out_dir: Path | None = None) -> AuditOutcome:
    """Run every arm and write report.json/report.md/exposure.png; log them to MLflow."""
    start = time.perf_counter()
    out = Path(out_dir if out_dir is not None else cfg.out_dir)
    model_path = resolve_base_model(cfg.model, cache_dir=Path(cfg.model_cache), seed=cfg.seed)
    parties = demo_rows(
        cfg.data.parties,
        seed=cfg.seed,
        train_rows=cfg.data.train_rows,
        eval_rows=cfg.data.eval_rows,
    )
    canaries = make_canaries(cfg.canaries, seed=cfg.seed)
    references = reference_secrets(cfg.canaries, canaries, seed=cfg.seed)
    train = insert_canaries(
        {p: r.train for p, r in parties.items()}, cfg.data.canary_party, canaries, seed=cfg.seed
    )
    held_out = pd.concat([r.eval for r in parties.values()], ignore_index=True)
    canary_records = len(train[cfg.data.canary_party])
    arms = plan_arms(cfg, canary_records, source=source)
    initial = initial_adapter(model_path, cfg.lora, seed=cfg.seed)
    _check_canaries_fit(cfg, model_path, initial, canaries, references)
    base_eval = _eval_loss(cfg, model_path, initial, held_out)
    arm_reports = []
    for arm in arms:
        result = run_arm(cfg, arm, model_path=model_path, initial=initial, rows=train)
        scores = _score(
            cfg, result, model_path=model_path, canaries=canaries, references=references
        )
        eval_loss = _eval_loss(cfg, model_path, result.adapter, held_out)
        arm_reports.append(_arm_report(cfg, result, scores, eval_loss))
    report: dict[str, Any] = {
        "audit": "canary exposure (Carlini et al. 2019, 'The Secret Sharer')",
        "config_source": source,
        "config": cfg.model_dump(mode="json"),
        "model_path": model_path,
        "canary_party": cfg.data.canary_party,
        "party_rows": {p: len(df) for p, df in train.items()},
        "canary_rows": cfg.canaries.inserted_rows,
        "canaries_per_level": cfg.canaries.per_repeat,
        "repeats": list(cfg.canaries.repeats),
        "randomness_space": 10**cfg.canaries.secret_digits,
        "references": len(references),
        "max_exposure_bits": max_exposure(len(references)),
        "chance_exposure_bits": chance_exposure(len(references)),
        "base_eval_loss": base_eval,
        "arms": arm_reports,
    }
    report["seconds"] = time.perf_counter() - start
    files = write_report(report, out)
    run_id = log_audit(cfg, report, files)
    return AuditOutcome(report=report, out_dir=out, run_id=run_id)


def _check_canaries_fit(
    cfg: AuditConfig,
    model_path: str,
    initial: Mapping[str, np.ndarray],
    canaries: list[Canary],
    references: list[str],
) -> None:
    """Refuse a max_seq_len that cuts the longest canary before minutes of training, not after."""
    longest = max(canaries, key=lambda c: len(c.response()))
    scorer = CanaryScorer(
        model_path, initial, lora=cfg.lora, max_seq_len=cfg.training.max_seq_len, seed=cfg.seed
    )
    scorer.losses(longest, references[:10])


def _eval_loss(
    cfg: AuditConfig, model_path: str, adapter: Mapping[str, np.ndarray], rows: pd.DataFrame
) -> float:
    return evaluate(
        model_path, adapter, rows, training=cfg.training, lora=cfg.lora, seed=cfg.seed
    ).loss
