"""Where a run starts: the coordinator's keys, the run lock, the plan, and publishing a global.

A run continues only from the state it last published and the privacy ledger it recorded; a
changed config, a moved ledger or a deleted server state stops it here, before any round.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cloudfed.aggregation.guard import shapes_of
from cloudfed.artifacts import FederationPlan, GlobalAdapterRef
from cloudfed.errors import ProtectionError
from cloudfed.exchange import Exchange, federation_exchange, global_adapter_key, publish_public_keys
from cloudfed.federation import FederationConfig
from cloudfed.locations import on_disk
from cloudfed.protection import KeyPairs, load_or_create_keys
from cloudfed.protection.messages import COORDINATOR
from cloudfed.protection.policy import route
from cloudfed.training.adapter_io import sha256_bytes, state_to_bytes
from cloudfed.training.model import resolve_base_model

if TYPE_CHECKING:  # federation_state imports this module
    from cloudfed.federation_state import RoundRecord

logger = logging.getLogger(__name__)


def coordinator_keys(cfg: FederationConfig, exchange: Exchange) -> KeyPairs:
    with on_disk(cfg.coordinator_root / "keys") as key_dir:
        keys = load_or_create_keys("coordinator", COORDINATOR, key_dir)
    publish_public_keys(exchange, keys.public_bundle())
    return keys


def publish_global(
    exchange: Exchange, round: int, state: Mapping[str, np.ndarray], run_id: str = ""
) -> GlobalAdapterRef:
    data = state_to_bytes(state, metadata={"round": str(round)})
    key = global_adapter_key(run_id, round)
    exchange.put_bytes(key, data)
    return GlobalAdapterRef(
        round=round, key=key, sha256=sha256_bytes(data), bytes=len(data), run_id=run_id
    )


def prepare(cfg: FederationConfig, *, source: str = "the run configuration") -> FederationPlan:
    """Keys, the run lock, and where this run starts: the last published round, or round 0.

    A new federation (or `start_over`) publishes the base model's adapter as round 0 of a new
    generation; otherwise the run continues from the last round record (see
    `cloudfed.federation_state`), after checking that nothing defining the model changed.
    """
    from cloudfed import run_lock
    from cloudfed.federation_state import Lineage, RoundRecord, check_continues, history_of
    from cloudfed.training.local import initial_adapter

    exchange = federation_exchange(cfg)
    keys = coordinator_keys(cfg, exchange)
    run_id = secrets.token_hex(16)
    run_lock.acquire(
        exchange, run_id, federation_id=cfg.federation_id, timeout_minutes=cfg.lock_timeout_minutes
    )
    try:
        model_path = resolve_base_model(
            cfg.base_model, cache_dir=Path(cfg.model_cache), seed=cfg.seed
        )
        state = initial_adapter(model_path, cfg.lora, seed=cfg.seed)
        layout = route(cfg.protection, shapes_of(state))
        lineage = Lineage.of(cfg, layout.policy_sha256)
        history = history_of(cfg, exchange, keys)
        last = None if cfg.start_over else history.latest()
        if last is not None and last.round == 0 and last.lineage != lineage:
            # Nothing was trained in that generation (its first run stopped before round 1, e.g.
            # on a config error): a fixed config starts afresh instead of being refused.
            _say(
                f"cloudfed: federation {cfg.federation_id} has no trained round in generation "
                f"{last.generation}, and this config defines another model: starting anew"
            )
            last = None
        if last is None:
            start = publish_global(exchange, 0, state, run_id)
            generation = history.next_generation()
            history.publish(
                RoundRecord(
                    federation_id=cfg.federation_id,
                    generation=generation,
                    round=0,
                    run_id=run_id,
                    global_adapter=start,
                    lineage=lineage,
                    **ledger_head(cfg, exchange, keys),
                )
            )
            verb = "starting over:" if cfg.start_over and generation > 1 else "starting"
            _say(
                f"cloudfed: {verb} federation {cfg.federation_id} (generation {generation}) from "
                f"the base model; rounds 1-{cfg.rounds}"
            )
        else:
            check_continues(last, lineage, federation_id=cfg.federation_id, source=source)
            _check_continuation(cfg, exchange, keys, last)
            start, generation = last.global_adapter, last.generation
            if last.round < cfg.rounds:
                _say(
                    f"cloudfed: continuing federation {cfg.federation_id} at round "
                    f"{last.round + 1} from global adapter sha256 {start.sha256[:12]}… (round "
                    f"{last.round}, published by run {last.run_id[:8]}); rounds is the "
                    f"federation's total: this run trains rounds {last.round + 1}-{cfg.rounds}"
                )
    except BaseException:
        run_lock.release(exchange, run_id)
        raise
    return FederationPlan(
        federation_id=cfg.federation_id,
        run_id=run_id,
        fingerprint=cfg.fingerprint(),
        parties=[p.name for p in cfg.active_parties],
        rounds=cfg.rounds,
        min_parties=cfg.min_parties,
        base_model=cfg.base_model,
        coordinator_fingerprint=keys.public_bundle().fingerprint,
        initial_adapter=start,
        start_round=start.round,
        generation=generation,
        adapter_parameters=int(sum(v.size for v in state.values())),
        protection=layout.summary(),
    )


def _say(message: str) -> None:
    """Shown in the run's output whatever the log level: the user must know where a run starts."""
    print(message, flush=True)


def ledger_head(cfg: FederationConfig, exchange: Exchange, keys: KeyPairs) -> dict[str, object]:
    """The privacy ledger's version and head as a round record names them (none without DP)."""
    if not cfg.privacy.enabled:
        return {}
    from cloudfed.privacy.budget import load_ledger

    ledger = load_ledger(cfg, exchange, keys)
    return {"ledger_version": ledger.version, "ledger_head": ledger.head()}


def _check_continuation(
    cfg: FederationConfig, exchange: Exchange, keys: KeyPairs, last: RoundRecord
) -> None:
    """The adapter a record names is there, unchanged, and the budget was not rolled back."""
    from cloudfed.federation_state import check_ledger

    ref = last.global_adapter
    try:
        data = exchange.get_bytes(ref.key)
    except FileNotFoundError:
        raise ProtectionError(
            f"{exchange.url(ref.key)}: the adapter of round {last.round} is missing from the "
            "exchange, so the federation cannot continue. Fix: restore it, or start over with "
            "`start_over: true`"
        ) from None
    if sha256_bytes(data) != ref.sha256:
        raise ProtectionError(f"{exchange.url(ref.key)}: the adapter of round {last.round} changed")
    if last.ledger_version is not None and cfg.privacy.enabled:
        from cloudfed.privacy.budget import load_ledger

        check_ledger(last, load_ledger(cfg, exchange, keys))
