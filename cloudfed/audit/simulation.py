"""A small in-process federation, trained once per audit arm, without ZenML.

Every round each party trains from the current global adapter and the coordinator adds the mean
of the deltas. Plain FedAvg is enough here: secure aggregation and CKKS return this same mean up
to quantisation, so they change nothing a memorisation audit measures. Arms differ only in how
the canary party trains (plain AdamW, or DP-SGD at a target epsilon); the other parties get the
same seeds in every arm, so a difference in exposure comes from the canary party's training.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cloudfed.audit.config import AuditConfig
from cloudfed.errors import ConfigError
from cloudfed.privacy.accountant import GaussianEvent, epsilon, noise_for_target
from cloudfed.training.dp_sgd import train_local_dp
from cloudfed.training.local import train_local
from cloudfed.training.lora import add


@dataclass(frozen=True)
class Arm:
    name: str
    target_epsilon: float | None = None
    noise_multiplier: float | None = None

    @property
    def dp(self) -> bool:
        return self.noise_multiplier is not None


@dataclass
class ArmResult:
    arm: Arm
    adapter: dict[str, np.ndarray]
    seconds: float
    events: list[GaussianEvent] = field(default_factory=list)
    epsilon: float | None = None
    train_loss: dict[str, float] = field(default_factory=dict)
    empty_batches: int = 0


def arm_name(target_epsilon: float | None) -> str:
    return "no_dp" if target_epsilon is None else f"dp_eps{target_epsilon:g}"


def plan_arms(cfg: AuditConfig, canary_records: int, *, source: str) -> list[Arm]:
    """The no-DP arm, then one DP-SGD arm per target, with the noise that meets it exactly."""
    delta = cfg.dp.delta
    if delta >= 1.0 / canary_records:
        raise ConfigError(
            f"{source}: dp.delta={delta} is not below 1/records = 1/{canary_records}, so it "
            "would allow one record to leak outright. Fix: use a smaller delta such as 1e-5."
        )
    sample_rate = min(1.0, cfg.training.batch_size / canary_records)
    steps = cfg.training.local_steps * cfg.rounds
    arms = [Arm(arm_name(None))]
    for target in cfg.dp.target_epsilons:
        noise = noise_for_target(
            target,
            delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=cfg.dp.accountant,
            what=f"{source}: dp.target_epsilons",
        )
        arms.append(Arm(arm_name(target), target, noise))
    return arms


def _mean(deltas: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.mean([d[k] for d in deltas], axis=0).astype(np.float32) for k in deltas[0]}


# Opacus's per-sample hooks on a model whose inputs need no gradient: expected, and harmless.
_OPACUS_HOOK_WARNING = "Full backward hook is firing when gradients are computed"


def _train_party(
    cfg: AuditConfig,
    arm: Arm,
    party: str,
    result: ArmResult,
    *,
    model_path: str,
    rows: pd.DataFrame,
    seed: int,
    desc: str,
) -> dict[str, np.ndarray]:
    """One party's delta from the current global; DP-SGD only for the canary party of a DP arm."""
    if arm.noise_multiplier is None or party != cfg.data.canary_party:
        delta, metrics = train_local(
            model_path,
            result.adapter,
            rows,
            training=cfg.training,
            lora=cfg.lora,
            seed=seed,
            desc=desc,
        )
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_OPACUS_HOOK_WARNING)
            delta, metrics, run = train_local_dp(
                model_path,
                result.adapter,
                rows,
                training=cfg.training,
                lora=cfg.lora,
                seed=seed,
                noise_multiplier=arm.noise_multiplier,
                max_grad_norm=cfg.dp.max_grad_norm,
                desc=f"{desc} (DP-SGD)",
            )
        result.events.append(run.event)
        result.empty_batches += run.empty_batches
    result.train_loss[party] = metrics.loss_last
    return delta


def run_arm(
    cfg: AuditConfig,
    arm: Arm,
    *,
    model_path: str,
    initial: Mapping[str, np.ndarray],
    rows: Mapping[str, pd.DataFrame],
) -> ArmResult:
    """FedAvg over `rounds` rounds; the result carries the final global adapter and the spend."""
    start = time.perf_counter()
    result = ArmResult(arm=arm, adapter=dict(initial), seconds=0.0)
    for rnd in tqdm(range(1, cfg.rounds + 1), desc=f"{arm.name}: rounds", unit="round"):
        deltas = [
            _train_party(
                cfg,
                arm,
                party,
                result,
                model_path=model_path,
                rows=rows[party],
                seed=cfg.seed * 10_000 + rnd * 100 + index,
                desc=f"{arm.name} r{rnd} {party}",
            )
            for index, party in enumerate(cfg.data.parties)
        ]
        result.adapter = add(result.adapter, _mean(deltas))
    if result.events:
        result.epsilon = epsilon(result.events, cfg.dp.delta, cfg.dp.accountant)
    result.seconds = time.perf_counter() - start
    return result
