"""The coordinator's side of a protected round: the CKKS sum, unmasking, the aggregate, publishing.

The coordinator is honest-but-curious. Under `secagg` it only ever holds masked words until the
survivors' shares let it remove the masks from their sum; under `ckks` it only adds ciphertexts
and receives the decrypted sum from the key party; it sees a party's values only for tensors the
config lists as public (`plaintext`). A round below `min_parties` or below the threshold aborts
before anything is published.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from cloudfed import server_state
from cloudfed.aggregation.guard import shapes_of
from cloudfed.aggregation.ranks import band_shortfall
from cloudfed.aggregation.strategy import norm
from cloudfed.artifacts import (
    AggregateReport,
    CkksKeyRef,
    FederationPlan,
    GlobalAdapterRef,
    Rejection,
    SealedUpdateRef,
    SecAggRoster,
    StageRef,
)
from cloudfed.coordinator.plan import coordinator_keys, publish_global
from cloudfed.coordinator.uploads import Upload, forget_opened, verified_uploads
from cloudfed.errors import AggregationError, ProtectionError
from cloudfed.exchange import (
    Exchange,
    ckks_sum_key,
    federation_exchange,
    fetch_public_keys,
    secagg_reveal_key,
)
from cloudfed.federation import FederationConfig
from cloudfed.privacy.budget import commit_round, entry_id, load_ledger
from cloudfed.privacy.ledger import LedgerEntry
from cloudfed.privacy.party_level import calibration
from cloudfed.protection import open_sealed_with_metadata, seal, secure_sum
from cloudfed.protection.keys import KeyPairs
from cloudfed.protection.messages import (
    CKKS_PLAIN,
    CKKS_SUM,
    COORDINATOR,
    REVEAL,
    ckks_public_context,
    layout_for,
    load_global,
    read_roster,
    sha256,
    stage_context,
    strategy_of,
    verified_advert,
)
from cloudfed.protection.secagg import protocol

logger = logging.getLogger(__name__)


class _RunningSum:
    """The survivors' masked words summed as each upload is opened (mod 2^32, order-free).

    Each upload's masked vector is added and dropped at once: the coordinator holds one sum,
    never n updates, and only ever masked words.
    """

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.parties: list[str] = []

    def add(self, upload: Upload) -> None:
        words = np.frombuffer(upload.sections.pop("secagg"), dtype="<u4")
        if self.total is None:
            self.total = words.copy()
        elif words.shape != self.total.shape:  # open_upload checked the length: a bug if seen
            raise AggregationError("secagg inputs differ in length; the round is aborted")
        else:
            np.add(self.total, words, out=self.total)
        self.parties.append(upload.party)


def _survivors(rosters: Sequence[SecAggRoster]) -> list[str] | None:
    return list(rosters[0].uploaded) if rosters else None


def ckks_sum(
    cfg: FederationConfig,
    round: int,
    sealed: Sequence[SealedUpdateRef],
    rosters: Sequence[SecAggRoster],
    current: GlobalAdapterRef,
    plan: FederationPlan,
    ckks_key: CkksKeyRef,
) -> StageRef:
    """Add the parties' CKKS ciphertexts; seal the sum to the key party (never decrypted here)."""
    from cloudfed.protection import ckks

    start = time.perf_counter()
    exchange = federation_exchange(cfg)
    keys = coordinator_keys(cfg, exchange)
    layout = layout_for(cfg, exchange, plan)
    uploads, _ = verified_uploads(
        cfg,
        exchange,
        keys,
        sealed,
        round=round,
        plan=plan,
        current=current,
        layout=layout,
        only=_survivors(rosters),
    )
    needed = cfg.min_contributors if cfg.privacy.mode == "distributed" else cfg.min_parties
    if len(uploads) < needed:
        raise AggregationError(
            f"round {round}: {len(uploads)} valid CKKS upload(s), fewer than the {needed} this "
            "round needs (min_parties, or privacy.min_contributors under distributed DP); no "
            "model was published for this round"
        )
    parties = sorted(uploads)
    public = ckks_public_context(cfg, exchange, plan, ckks_key)
    total = ckks.add_encrypted(
        public, [ckks.unpack_blocks(uploads[p].sections["ckks"]) for p in parties]
    )
    key_party = fetch_public_keys(
        exchange, "party", ckks_key.party, fingerprint=ckks_key.fingerprint
    )
    context = stage_context(cfg, round, COORDINATOR, CKKS_SUM, run_id=plan.run_id, parties=parties)
    blob = seal(ckks.pack_blocks(total), context=context, sender=keys, recipient=key_party)
    exchange.put_bytes(ckks_sum_key(plan.run_id, round), blob)
    return StageRef(
        party=COORDINATOR,
        round=round,
        stage="ckks-sum",
        key=ckks_sum_key(plan.run_id, round),
        sha256=sha256(blob),
        bytes=len(blob),
        fingerprint=keys.public_bundle().fingerprint,
        seconds=time.perf_counter() - start,
    )


def _open_reveals(
    cfg: FederationConfig,
    exchange: Exchange,
    keys: KeyPairs,
    refs: Sequence[StageRef],
    round: int,
    plan: FederationPlan,
    members: dict[str, str],
) -> tuple[dict[str, dict[str, protocol.Reveal]], list[Rejection]]:
    responses: dict[str, dict[str, protocol.Reveal]] = {}
    rejected: list[Rejection] = []
    for ref in sorted(refs, key=lambda r: r.party):
        try:
            if ref.party not in members or ref.key != secagg_reveal_key(
                plan.run_id, round, ref.party
            ):
                raise ValueError("not a member of this round")
            sender = fetch_public_keys(exchange, "party", ref.party, fingerprint=members[ref.party])
            opened = open_sealed_with_metadata(
                exchange.get_bytes(ref.key),
                context=stage_context(cfg, round, ref.party, REVEAL, run_id=plan.run_id),
                recipient=keys,
                sender=sender,
            )
            body = json.loads(opened.payload)
            responses[ref.party] = {o: protocol.Reveal.model_validate(r) for o, r in body.items()}
        except (ProtectionError, ValueError, FileNotFoundError) as exc:
            rejected.append(Rejection(party=ref.party, reason=f"unmask response rejected: {exc}"))
    return responses, rejected


def aggregate_protected(
    cfg: FederationConfig,
    round: int,
    sealed: Sequence[SealedUpdateRef],
    current: GlobalAdapterRef,
    plan: FederationPlan,
    *,
    dropped: Sequence[Rejection] = (),
    rosters: Sequence[SecAggRoster] = (),
    reveals: Sequence[StageRef] = (),
    ckks_plain: Sequence[StageRef] = (),
) -> tuple[GlobalAdapterRef, AggregateReport]:
    """Weighted mean of the survivors' updates, each tensor from its own protection mode."""
    start = time.perf_counter()
    exchange = federation_exchange(cfg)
    keys = coordinator_keys(cfg, exchange)
    global_state = load_global(exchange, current)
    layout = layout_for(cfg, exchange, plan)
    if shapes_of(global_state) != {n: s for seg in layout.segments for n, s in seg.tensors}:
        raise AggregationError(f"round {round}: the global adapter no longer fits the layout")
    rejected = list(dropped)
    secagg_stats: dict[str, float] = {}
    survivors: list[str] | None = None
    if layout.segment("secagg") is not None:
        if len(rosters) != 1:
            raise AggregationError(f"round {round}: the secure-aggregation roster is missing")
        doc, setup = read_roster(cfg, exchange, plan, rosters[0], "inputs")
        survivors = list(doc["uploaded"])
        rejected += rosters[0].rejected
    running = _RunningSum()
    uploads, bad = verified_uploads(
        cfg,
        exchange,
        keys,
        sealed,
        round=round,
        plan=plan,
        current=current,
        layout=layout,
        only=survivors,
        consume=running.add if layout.segment("secagg") is not None else None,
    )
    if survivors is not None and sorted(uploads) != sorted(survivors):
        raise AggregationError(
            f"round {round}: uploads changed after the coordinator fixed the survivors "
            f"({sorted(uploads)} != {sorted(survivors)}); the round is aborted"
        )
    rejected += bad
    parties = sorted(uploads)
    if cfg.privacy.enabled:
        reservation = _reservation(cfg, exchange, keys, plan, round)
        unreserved = sorted(set(parties) - set(reservation.parties))
        if unreserved:
            raise AggregationError(
                f"round {round}: {unreserved} contributed but the privacy ledger reserved the "
                f"round for {reservation.parties} only; nothing is released"
            )
    needed = cfg.min_contributors if cfg.privacy.mode == "distributed" else cfg.min_parties
    if len(parties) < needed:
        raise AggregationError(
            f"round {round}: only {len(parties)} valid update(s) ({parties}), fewer than "
            f"{'privacy.min_contributors' if needed != cfg.min_parties else 'min_parties'}"
            f"={needed}; rejected: "
            + "; ".join(f"{r.party}: {r.reason}" for r in rejected)
            + ". No model was published for this round. Fix: check the rejected parties' logs, "
            "or lower min_parties."
        )
    if (thin := band_shortfall(cfg, parties, needed)) is not None:
        raise AggregationError(f"round {round}: {thin}. No model was published for this round")
    strategy = strategy_of(cfg, layout)
    slots = strategy.n_slots
    noise = secure_sum.NO_NOISE
    if cfg.privacy.mode == "central":  # trusted with the sum, not the release: noise first
        noise = secure_sum.Noise(sum_std=calibration(cfg).sum_std)
    words, specs = None, None
    if (seg := layout.segment("secagg")) is not None:
        responses, bad = _open_reveals(cfg, exchange, keys, reveals, round, plan, doc["members"])
        rejected += bad
        for p in parties:
            if p not in responses:
                rejected.append(Rejection(party=p, reason="dropped during unmasking (input kept)"))
        unmask_start = time.perf_counter()
        adverts = {p: verified_advert(cfg, exchange, doc, round, p) for p in doc["shared"]}
        if running.total is None or sorted(running.parties) != parties:
            raise AggregationError(f"round {round}: the secure sum does not cover {parties}")
        words = protocol.remove_masks(
            setup, adverts, doc["shared"], parties, running.total, responses
        )
        specs = secure_sum.secagg_specs(cfg, len(setup.parties))
        secagg_stats = {
            "advertised": len(setup.parties),
            "shared": len(doc["shared"]),
            "uploaded": len(parties),
            "revealed": len(responses),
            "neighbours": setup.neighbours,
            "threshold": setup.threshold,
            "bits": specs[0].bits,
            "quantisation_error_bound": specs[0].sum_error_bound(len(parties)),
            "seconds_unmask": time.perf_counter() - unmask_start,
        }
    ckks_stats: dict[str, float] = {}
    vector = None
    if (seg := layout.segment("ckks")) is not None:
        vector = _open_ckks_plain(cfg, exchange, keys, ckks_plain, round, plan, parties)
        values = float(seg.size + slots)
        per_block = cfg.protection.ckks.poly_modulus_degree // 2
        ckks_stats = {"blocks": float(-(-int(values) // per_block)), "values": values}
    try:
        opened = secure_sum.decode(
            layout,
            slots,
            secagg_words=words,
            specs=specs,
            summed=len(parties),
            ckks_vector=vector,
            plaintext={p: uploads[p].sections["plaintext"] for p in parties}
            if layout.segment("plaintext") is not None
            else None,
            noise=noise,
        )
    except ValueError as exc:
        raise AggregationError(f"round {round}: {exc}") from None
    sums, weight_sums, public_weights = opened.sums, opened.weight_sums, opened.public_weights
    if not np.all(np.isfinite(weight_sums)) or not np.any(weight_sums > 0):
        raise AggregationError(f"round {round}: the aggregated weights are {weight_sums}, not > 0")
    weight_sum = float(weight_sums[0])
    rejected = list({r.party: r for r in reversed(rejected)}.values())[::-1]  # first reason wins
    state = server_state.load(exchange, keys, cfg.federation_id, current)
    if state is None:
        if current.round > 0 and strategy.name != "fedavg":
            # Deleting the state would silently reset the optimiser's moments.
            raise AggregationError(
                f"round {round}: the {strategy.name} server state beside the round-"
                f"{current.round} adapter is missing ({server_state.state_key(current)}); no "
                "model is published. Fix: restore it, or start_over: true to begin afresh"
            )
        state = strategy.init(global_state)
    state, new_global, diagnostics = strategy.apply(state, global_state, sums, weight_sums)
    new_ref = publish_global(exchange, round, new_global, plan.run_id)
    forget_opened(cfg, plan.run_id, round)
    aggregation = {
        "strategy": state.strategy,
        "version": state.version,
        "state": server_state.store(exchange, keys, cfg.federation_id, new_ref, state),
        "diagnostics": diagnostics,
    }
    privacy: dict[str, Any] = {}
    if cfg.privacy.enabled:
        privacy = _commit_privacy(
            cfg, exchange, keys, plan, round, parties, uploads, reservation, new_ref
        )
    return new_ref, AggregateReport(
        round=round,
        accepted=parties,
        rejected=rejected,
        weights={p: w / weight_sum for p, w in public_weights.items()},
        bytes_received=sum(
            {
                r.party: r.bytes_sent for r in sealed if r.party in uploads and r.round == round
            }.values()
        ),
        seconds=time.perf_counter() - start,
        update_norm=norm({n: new_global[n] - global_state[n] for n in new_global}),
        protection_mode=layout.label,
        policy_sha256=layout.policy_sha256,
        weight_sum=weight_sum,
        clipped_values=sum(u.clipped for u in uploads.values()),
        secagg=secagg_stats,
        ckks=ckks_stats,
        privacy=privacy,
        aggregation=aggregation,
    )


def _reservation(
    cfg: FederationConfig, exchange: Exchange, keys: KeyPairs, plan: FederationPlan, round: int
) -> LedgerEntry:
    """Nothing is released for a round the ledger has not been charged for."""
    entry = load_ledger(cfg, exchange, keys).entry(entry_id(plan.run_id, round))
    if entry is None:
        raise AggregationError(
            f"round {round}: no privacy-budget reservation in the ledger; nothing is released. "
            "Fix: run rounds through the pipeline, which reserves each round before it starts"
        )
    return entry


def _commit_privacy(
    cfg: FederationConfig,
    exchange: Exchange,
    keys: KeyPairs,
    plan: FederationPlan,
    round: int,
    parties: list[str],
    uploads: dict[str, Upload],
    reservation: LedgerEntry,
    new_ref: GlobalAdapterRef,
) -> dict[str, Any]:
    """Mark the round spent by its contributors; what MLflow shows of the round's privacy."""
    cal = calibration(cfg)
    effective = cal.effective_multiplier(len(parties))
    ledger = commit_round(cfg, exchange, keys, plan, round, parties, effective, new_ref.sha256)
    return {
        "mode": cfg.privacy.mode,
        "noise_multiplier": reservation.noise_multiplier,
        # Against `colluding` co-contributors who subtract their own shares (the worst case)...
        "effective_noise_multiplier": effective,
        # ... and against the coordinator alone, which knows no share.
        "effective_noise_multiplier_vs_coordinator": cal.effective_multiplier_vs_coordinator(
            len(parties)
        ),
        "colluding": cal.colluding,
        "contributors": len(parties),
        "noise_std": cal.sum_std,
        "clip": cal.clip,
        "delta": cfg.privacy.delta,
        "epsilon": ledger.epsilon(),
        "party_epsilon": {p: ledger.epsilon(party=p) for p in ledger.parties()},
        "ledger_rounds": len(ledger.entries),
    }


def _open_ckks_plain(
    cfg: FederationConfig,
    exchange: Exchange,
    keys: KeyPairs,
    refs: Sequence[StageRef],
    round: int,
    plan: FederationPlan,
    parties: list[str],
) -> np.ndarray:
    if len(refs) != 1:
        raise AggregationError(f"round {round}: the key party's decrypted CKKS sum is missing")
    ref = refs[0]
    sender = fetch_public_keys(exchange, "party", ref.party, fingerprint=ref.fingerprint)
    if ref.party != cfg.ckks_key_party:
        raise AggregationError(
            f"round {round}: CKKS sum decrypted by {ref.party}, not the key party"
        )
    opened = open_sealed_with_metadata(
        exchange.get_bytes(ref.key),
        context=stage_context(
            cfg, round, ref.party, CKKS_PLAIN, run_id=plan.run_id, parties=parties
        ),
        recipient=keys,
        sender=sender,
    )
    return np.frombuffer(opened.payload, dtype="<f4").astype(np.float64)
