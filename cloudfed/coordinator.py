"""What the coordinator does: fix the plan, open and check sealed updates, publish the aggregate.

The coordinator is honest-but-curious. What it may learn of a round is decided by the protection
policy, in `cloudfed.secure_coordinator`: under secure aggregation or CKKS only the aggregate.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cloudfed.aggregation.fedavg import shapes_of
from cloudfed.artifacts import (
    FederationPlan,
    GlobalAdapterRef,
)
from cloudfed.exchange import (
    Exchange,
    federation_exchange,
    global_adapter_key,
    publish_public_keys,
)
from cloudfed.federation import FederationConfig
from cloudfed.protection import (
    KeyPairs,
    load_or_create_keys,
)
from cloudfed.protection.policy import route
from cloudfed.training.adapter_io import sha256_bytes, state_to_bytes
from cloudfed.training.model import resolve_base_model

logger = logging.getLogger(__name__)
COORDINATOR = "coordinator"
# A LoRA delta this large after a few local steps is a bug or an attack, not training.
MAX_ABS_UPDATE = 1e3


def coordinator_keys(cfg: FederationConfig, exchange: Exchange) -> KeyPairs:
    keys = load_or_create_keys("coordinator", COORDINATOR, Path(cfg.coordinator_storage) / "keys")
    publish_public_keys(exchange, keys.public_bundle())
    return keys


def publish_global(
    exchange: Exchange, round: int, state: Mapping[str, np.ndarray], run_id: str = ""
) -> GlobalAdapterRef:
    data = state_to_bytes(state, metadata={"round": str(round)})
    key = global_adapter_key(round)
    exchange.put_bytes(key, data)
    return GlobalAdapterRef(
        round=round, key=key, sha256=sha256_bytes(data), bytes=len(data), run_id=run_id
    )


def prepare(cfg: FederationConfig) -> FederationPlan:
    """Keys, base model and the round-0 adapter that every party starts from."""
    from cloudfed.training.local import initial_adapter

    exchange = federation_exchange(cfg)
    keys = coordinator_keys(cfg, exchange)
    model_path = resolve_base_model(cfg.base_model, cache_dir=Path(cfg.model_cache), seed=cfg.seed)
    state = initial_adapter(model_path, cfg.lora, seed=cfg.seed)
    layout = route(cfg.protection, shapes_of(state))
    run_id = secrets.token_hex(16)
    return FederationPlan(
        federation_id=cfg.federation_id,
        run_id=run_id,
        fingerprint=cfg.fingerprint(),
        parties=[p.name for p in cfg.active_parties],
        rounds=cfg.rounds,
        min_parties=cfg.min_parties,
        base_model=cfg.base_model,
        coordinator_fingerprint=keys.public_bundle().fingerprint,
        initial_adapter=publish_global(exchange, 0, state, run_id),
        adapter_parameters=int(sum(v.size for v in state.values())),
        protection=layout.summary(),
    )
