"""The coordinator's budget gate: reserve a round before it starts, commit it once published."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cloudfed.artifacts import FederationPlan
from cloudfed.exchange import Exchange
from cloudfed.federation import FederationConfig
from cloudfed.privacy.ledger import Ledger, LedgerStore, Reservation, commit, reserve
from cloudfed.privacy.party_level import charged_multiplier
from cloudfed.protection.keys import KeyPairs

logger = logging.getLogger(__name__)


def entry_id(run_id: str, round: int) -> str:
    return f"{run_id}/r{round:04d}"


def ledger_store(cfg: FederationConfig, exchange: Exchange, keys: KeyPairs) -> LedgerStore:
    return LedgerStore(
        exchange,
        keys,
        federation_id=cfg.federation_id,
        coordinator_storage=cfg.coordinator_storage,
        coordinator_options=cfg.coordinator_storage_options,
    )


def load_ledger(cfg: FederationConfig, exchange: Exchange, keys: KeyPairs) -> Ledger:
    p = cfg.privacy
    return ledger_store(cfg, exchange, keys).load(delta=p.delta, accountant=p.accountant)


def charged_for(cfg: FederationConfig, plan: FederationPlan) -> float:
    """What one round is charged: worst case over every planned party advertising."""
    values = {k: int(v) for k, v in plan.protection.get("values", {}).items()}
    return charged_multiplier(cfg, len(plan.parties), values)


def reserve_round(
    cfg: FederationConfig,
    exchange: Exchange,
    keys: KeyPairs,
    plan: FederationPlan,
    round: int,
    parties: Sequence[str],
) -> Reservation:
    p = cfg.privacy
    assert p.max_epsilon is not None  # validated: DP modes need a budget
    return reserve(
        ledger_store(cfg, exchange, keys),
        delta=p.delta,
        accountant=p.accountant,
        max_epsilon=p.max_epsilon,
        run_id=plan.run_id,
        round=round,
        mode=p.mode,
        noise_multiplier=charged_for(cfg, plan),
        parties=parties,
    )


def commit_round(
    cfg: FederationConfig,
    exchange: Exchange,
    keys: KeyPairs,
    plan: FederationPlan,
    round: int,
    contributors: Sequence[str],
    effective: float,
    global_sha256: str,
) -> Ledger:
    p = cfg.privacy
    return commit(
        ledger_store(cfg, exchange, keys),
        delta=p.delta,
        accountant=p.accountant,
        entry_id=entry_id(plan.run_id, round),
        contributors=contributors,
        effective_noise_multiplier=effective,
        global_sha256=global_sha256,
    )


def reserve_for_round(
    cfg: FederationConfig, plan: FederationPlan, round: int, parties: Sequence[str]
) -> tuple[Reservation, Ledger]:
    """The pipeline's gate: reserve, say why if refused; the ledger after it, for MLflow."""
    from cloudfed.coordinator import coordinator_keys
    from cloudfed.exchange import federation_exchange

    exchange = federation_exchange(cfg)
    keys = coordinator_keys(cfg, exchange)
    reservation = reserve_round(cfg, exchange, keys, plan, round, parties)
    if not reservation.granted:
        logger.warning("cloudfed: %s", reservation.message)
    return reservation, load_ledger(cfg, exchange, keys)
