"""What both roles know about a round's messages: their kinds, what they are bound to, reading them.

A party and the coordinator must build the same seal context, read the same signed roster and
derive the same layout and strategy, or a round fails closed; written once here, below both
roles, neither role imports the other.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from cloudfed.aggregation.composed import Strategy, strategy_for
from cloudfed.artifacts import CkksKeyRef, FederationPlan, GlobalAdapterRef, SecAggRoster
from cloudfed.errors import ProtectionError
from cloudfed.exchange import Exchange, fetch_public_keys, secagg_advert_key
from cloudfed.federation import FederationConfig
from cloudfed.protection import SealContext
from cloudfed.protection.envelope import open_public
from cloudfed.protection.keys import PublicKeyBundle
from cloudfed.protection.policy import Layout, route
from cloudfed.protection.rotation import RotationStatement, parse_rotation
from cloudfed.protection.secagg import protocol
from cloudfed.training.adapter_io import state_from_bytes

COORDINATOR = "coordinator"
ADVERT, ROSTER, SHARE, REVEAL = "secagg-advert", "secagg-roster", "secagg-share", "secagg-reveal"
CKKS_CONTEXT, CKKS_SUM, CKKS_PLAIN = "ckks-context", "ckks-sum", "ckks-plain-sum"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def layout_for(cfg: FederationConfig, exchange: Exchange, plan: FederationPlan) -> Layout:
    """Everyone derives the routing from the config and the round-0 adapter's shapes."""
    state = load_global(exchange, plan.initial_adapter)
    return route(cfg.protection, {k: tuple(v.shape) for k, v in state.items()})


def strategy_of(cfg: FederationConfig, layout: Layout) -> Strategy:
    """The round's strategy over the layout's tensors; both roles build the same one."""
    return strategy_for(cfg, {n: s for seg in layout.segments for n, s in seg.tensors})


def coordinator_bundle(exchange: Exchange, plan: FederationPlan) -> PublicKeyBundle:
    return fetch_public_keys(
        exchange, "coordinator", COORDINATOR, fingerprint=plan.coordinator_fingerprint
    )


def stage_context(
    cfg: FederationConfig, round: int, party: str, kind: str, **meta: Any
) -> SealContext:
    """What a stage message is bound to; both ends build it the same way."""
    return SealContext(
        federation_id=cfg.federation_id, round=round, party=party, kind=kind, metadata=meta
    )


def read_roster(
    cfg: FederationConfig,
    exchange: Exchange,
    plan: FederationPlan,
    ref: SecAggRoster,
    stage: str,
) -> tuple[dict[str, Any], protocol.RoundSetup]:
    """The roster, verified against the coordinator's pinned key and the artifact's hash."""
    blob = exchange.get_bytes(ref.key)
    if sha256(blob) != ref.sha256 or ref.stage != stage:
        raise ProtectionError(f"secagg roster rejected: not the {stage} roster of this round")
    context = stage_context(cfg, ref.round, COORDINATOR, ROSTER, run_id=plan.run_id, stage=stage)
    doc = json.loads(
        open_public(blob, context=context, sender=coordinator_bundle(exchange, plan)).payload
    )
    s = doc["setup"]
    setup = protocol.RoundSetup(
        federation_id=s["federation_id"],
        run_id=s["run_id"],
        round=s["round"],
        parties=tuple(s["parties"]),
        neighbours=s["neighbours"],
        threshold=s["threshold"],
        min_survivors=s["min_survivors"],
    )
    if setup.run_id != plan.run_id or setup.round != ref.round:
        raise ProtectionError("secagg roster rejected: wrong run or round")
    return doc, setup


def roster_rotation(doc: dict[str, Any], name: str) -> RotationStatement | None:
    """A member's key rotation the roster carries, verified (its pin is the reader's check)."""
    raw = doc.get("rotations", {}).get(name)
    return None if raw is None else parse_rotation(raw)


def peer_bundle(exchange: Exchange, doc: dict[str, Any], name: str) -> PublicKeyBundle:
    """The member's key the roster names; a rotating member's new bundle rides in the roster."""
    want = doc["members"][name]
    rotation = roster_rotation(doc, name)
    if rotation is not None and rotation.new.fingerprint == want:
        return rotation.new
    return fetch_public_keys(exchange, "party", name, fingerprint=want)


def advert_sender(exchange: Exchange, doc: dict[str, Any], name: str) -> PublicKeyBundle:
    """Who signed a member's advertisement: its old key if it rotates in this very round."""
    old = doc.get("rotated", {}).get(name)
    if old is None:
        return peer_bundle(exchange, doc, name)
    rotation = roster_rotation(doc, name)
    if rotation is None or rotation.old.fingerprint != old:
        raise ProtectionError(f"secagg roster rejected: {name}'s rotation does not match")
    return rotation.old


def verified_advert(
    cfg: FederationConfig, exchange: Exchange, doc: dict[str, Any], round: int, name: str
) -> protocol.Advertisement:
    """A neighbour's advertisement, checked end to end with its own signature."""
    blob = exchange.get_bytes(secagg_advert_key(doc["setup"]["run_id"], round, name))
    if sha256(blob) != doc["adverts"][name]:
        raise ProtectionError(f"secagg advertisement of {name} differs from the roster's")
    context = stage_context(cfg, round, name, ADVERT, run_id=doc["setup"]["run_id"])
    opened = open_public(blob, context=context, sender=advert_sender(exchange, doc, name))
    return protocol.Advertisement.model_validate_json(opened.payload)


def ckks_public_context(
    cfg: FederationConfig, exchange: Exchange, plan: FederationPlan, ref: CkksKeyRef
) -> bytes:
    blob = exchange.get_bytes(ref.key)
    if sha256(blob) != ref.sha256:
        raise ProtectionError("ckks public context rejected: hash mismatch")
    sender = fetch_public_keys(exchange, "party", ref.party, fingerprint=ref.fingerprint)
    context = stage_context(cfg, ref.round, ref.party, CKKS_CONTEXT, run_id=plan.run_id)
    return open_public(blob, context=context, sender=sender).payload


def load_global(exchange: Exchange, ref: GlobalAdapterRef) -> dict[str, np.ndarray]:
    """The global adapter, checked against the hash the coordinator recorded in its artifact."""
    data = exchange.get_bytes(ref.key)
    if sha256(data) != ref.sha256:
        raise ProtectionError("global adapter rejected: hash mismatch")
    return state_from_bytes(data)


# The metrics a party puts into the round's secure sum, in order. Training loss is not among
# them: it is an un-noised function of the training records that DP-SGD's epsilon does not cover.
METRIC_SLOTS = ("eval_nll", "eval_tokens")


def metrics_context(
    cfg: FederationConfig,
    plan: FederationPlan,
    model: GlobalAdapterRef,
    party: str,
    evaluators: list[str],
) -> SealContext:
    """What a party's masked metrics are bound to; both ends build it the same way."""
    return SealContext(
        federation_id=cfg.federation_id,
        round=model.round,
        party=party,
        kind="metrics",
        metadata={"run_id": plan.run_id, "model_sha256": model.sha256, "evaluators": evaluators},
    )
