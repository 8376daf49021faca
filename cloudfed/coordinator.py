"""What the coordinator does: fix the plan, open and check sealed updates, publish the aggregate.

The coordinator is honest-but-curious. It holds the key that opens sealed updates, so in this
plain-FedAvg mode it sees each update in memory while aggregating; it never writes one to a store
or a log. (Secure aggregation, which removes even that, is the protection layer's job.)
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloudfed.aggregation.fedavg import check_update, shapes_of, weighted_mean
from cloudfed.artifacts import (
    AggregateReport,
    FederationPlan,
    GlobalAdapterRef,
    Rejection,
    SealedUpdateRef,
)
from cloudfed.errors import AggregationError, ProtectionError
from cloudfed.exchange import (
    Exchange,
    federation_exchange,
    fetch_public_keys,
    global_adapter_key,
    publish_public_keys,
    update_key,
)
from cloudfed.federation import FederationConfig
from cloudfed.protection import (
    KeyPairs,
    SealContext,
    load_or_create_keys,
    open_sealed_with_metadata,
)
from cloudfed.protection.policy import route
from cloudfed.training.adapter_io import sha256_bytes, state_from_bytes, state_to_bytes
from cloudfed.training.lora import add
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
    exchange: Exchange, round: int, state: Mapping[str, np.ndarray]
) -> GlobalAdapterRef:
    data = state_to_bytes(state, metadata={"round": str(round)})
    key = global_adapter_key(round)
    exchange.put_bytes(key, data)
    return GlobalAdapterRef(round=round, key=key, sha256=sha256_bytes(data), bytes=len(data))


def prepare(cfg: FederationConfig) -> FederationPlan:
    """Keys, base model and the round-0 adapter that every party starts from."""
    from cloudfed.training.local import initial_adapter

    exchange = federation_exchange(cfg)
    keys = coordinator_keys(cfg, exchange)
    model_path = resolve_base_model(cfg.base_model, cache_dir=Path(cfg.model_cache), seed=cfg.seed)
    state = initial_adapter(model_path, cfg.lora, seed=cfg.seed)
    layout = route(cfg.protection, shapes_of(state))
    return FederationPlan(
        federation_id=cfg.federation_id,
        run_id=secrets.token_hex(16),
        fingerprint=cfg.fingerprint(),
        parties=[p.name for p in cfg.active_parties],
        rounds=cfg.rounds,
        min_parties=cfg.min_parties,
        base_model=cfg.base_model,
        coordinator_fingerprint=keys.public_bundle().fingerprint,
        initial_adapter=publish_global(exchange, 0, state),
        adapter_parameters=int(sum(v.size for v in state.values())),
        protection=layout.summary(),
    )


@dataclass(frozen=True)
class _Expected:
    """What every update of this round must be bound to."""

    federation_id: str
    round: int
    run_id: str
    base_sha256: str
    shapes: Mapping[str, tuple[int, ...]]


def _open_one(
    exchange: Exchange, keys: KeyPairs, ref: SealedUpdateRef, expected: _Expected
) -> tuple[dict[str, np.ndarray], float]:
    """Return (update, weight) or raise ValueError / ProtectionError with the rejection reason."""
    if ref.round != expected.round:
        raise ValueError(f"update is for round {ref.round}, not {expected.round}")
    if ref.key != update_key(expected.round, ref.party):
        raise ValueError(f"unexpected exchange key {ref.key!r}")
    sender = fetch_public_keys(exchange, "party", ref.party, fingerprint=ref.sender_fingerprint)
    context = SealContext(
        federation_id=expected.federation_id, round=expected.round, party=ref.party
    )
    opened = open_sealed_with_metadata(
        exchange.get_bytes(ref.key), context=context, recipient=keys, sender=sender
    )
    meta = opened.metadata
    if meta.get("run_id") != expected.run_id:
        raise ValueError("update belongs to another run of this federation (replay)")
    if meta.get("base_sha256") != expected.base_sha256:
        raise ValueError("update was trained from another global adapter (stale or replayed)")
    update = state_from_bytes(opened.payload)
    reason = check_update(update, expected.shapes, max_abs=MAX_ABS_UPDATE)
    if reason:
        raise ValueError(reason)
    examples = meta.get("examples")
    if not isinstance(examples, int) or examples <= 0:
        raise ValueError(f"example count {examples!r} is not a positive integer")
    return update, float(examples)


def aggregate_round(
    cfg: FederationConfig,
    round: int,
    sealed: Sequence[SealedUpdateRef],
    current: GlobalAdapterRef,
    *,
    run_id: str,
    dropped: Sequence[Rejection] = (),
) -> tuple[GlobalAdapterRef, AggregateReport]:
    """Weighted FedAvg of the updates that verify; below `min_parties` the round is refused."""
    from cloudfed.party import load_global

    start = time.perf_counter()
    exchange = federation_exchange(cfg)
    keys = coordinator_keys(cfg, exchange)
    global_state = load_global(exchange, current)
    expected = _Expected(cfg.federation_id, round, run_id, current.sha256, shapes_of(global_state))
    updates: list[dict[str, np.ndarray]] = []
    weights: dict[str, float] = {}
    bytes_received = 0
    rejected = list(dropped)
    for ref in sorted(sealed, key=lambda r: r.party):
        if ref.party in weights:
            rejected.append(Rejection(party=ref.party, reason="duplicate update for this round"))
            continue
        try:
            update, weight = _open_one(exchange, keys, ref, expected)
        except (ProtectionError, ValueError, FileNotFoundError) as exc:
            reason = str(exc) if not isinstance(exc, FileNotFoundError) else "sealed update missing"
            logger.warning("round %d: rejected update from %s: %s", round, ref.party, reason)
            rejected.append(Rejection(party=ref.party, reason=reason))
            continue
        updates.append(update)
        weights[ref.party] = weight
        bytes_received += ref.bytes_sent
    if len(updates) < cfg.min_parties:
        raise AggregationError(
            f"round {round}: only {len(updates)} valid update(s) ({sorted(weights)}), fewer than "
            f"min_parties={cfg.min_parties}; rejected: "
            + "; ".join(f"{r.party}: {r.reason}" for r in rejected)
            + ". No model was published for this round. Fix: check the rejected parties' logs, "
            "or lower min_parties."
        )
    delta = weighted_mean(updates, list(weights.values()))
    new_ref = publish_global(exchange, round, add(global_state, delta))
    total = sum(weights.values())
    report = AggregateReport(
        round=round,
        accepted=sorted(weights),
        rejected=rejected,
        weights={p: w / total for p, w in weights.items()},
        bytes_received=bytes_received,
        seconds=time.perf_counter() - start,
        update_norm=float(
            np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values()))
        ),
    )
    return new_ref, report
