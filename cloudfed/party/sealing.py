"""The only way a party's update leaves its cloud: clipped, checked, protected, sealed, uploaded.

The update is routed per the protection policy (masked for secure aggregation, encrypted under
CKKS, in the clear only for tensors the config lists as public) and sealed to the coordinator,
bound to the round, the run and the rosters the party verified.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from cloudfed.aggregation.fedbuff import update_staleness
from cloudfed.aggregation.guard import MAX_ABS_UPDATE, check_update, clip_to_norm
from cloudfed.aggregation.strategy import PartyStats, RoundInfo
from cloudfed.artifacts import (
    CkksKeyRef,
    FederationPlan,
    LocalUpdateRef,
    SealedUpdateRef,
    SecAggRoster,
)
from cloudfed.errors import DataError, ProtectionError
from cloudfed.exchange import Exchange, federation_exchange, update_key
from cloudfed.federation import FederationConfig, PartyConfig
from cloudfed.keys import follow_rotations
from cloudfed.locations import AnyPath, party_root, write_private
from cloudfed.party.admission import consent, simulated_dropout
from cloudfed.party.secagg import load_secrets
from cloudfed.party.stages import check_members, party_record, secret_path, write_owner_only
from cloudfed.party.training import load_local_update
from cloudfed.party_policy import LoadedPolicy, check_pin
from cloudfed.privacy.party_level import calibration, ckks_grid, clip_update
from cloudfed.protection import payload as container
from cloudfed.protection import seal, secure_sum
from cloudfed.protection.commitments import keyed_seed
from cloudfed.protection.keys import KeyPairs
from cloudfed.protection.messages import (
    ckks_public_context,
    coordinator_bundle,
    layout_for,
    read_roster,
    stage_context,
    strategy_of,
    verified_advert,
)
from cloudfed.protection.policy import Layout
from cloudfed.protection.secagg import protocol
from cloudfed.training.adapter_io import state_from_bytes


def upload(
    cfg: FederationConfig,
    party: PartyConfig,
    local: LocalUpdateRef,
    plan: FederationPlan,
    rosters: list[SecAggRoster],
    ckks_keys: list[CkksKeyRef],
) -> SealedUpdateRef:
    """Stage 3: the update, each tensor under its mode, sealed to the coordinator, once a round.

    A retried upload for the same round hands back the very same sealed bytes: a second masked
    vector under the same masks (fresh dither, fresh noise) would let the coordinator difference
    the two. Asked again under another roster or key, the party refuses.
    """
    simulated_dropout(cfg, party.name, "upload", local.round)
    start = time.perf_counter()
    exchange = federation_exchange(cfg)
    keys, loaded = consent(cfg, party, plan)
    layout = layout_for(cfg, exchange, plan)
    view = json.dumps(
        {
            "local": local.sha256,
            "rosters": [r.sha256 for r in rosters],
            "ckks": [k.sha256 for k in ckks_keys],
        },
        sort_keys=True,
    ).encode()
    # The sealed bytes may be large: they stay in the party's storage. Which view they were
    # sealed under is the once-only record: it lives in the party's own state, so a launcher
    # that removes the bytes or points the party at a fresh storage gets a refusal, not a
    # second sealing under the same masks.
    kept = secret_path(party, local.round, plan.run_id, "upload")
    kept_view = party_record(loaded, plan.run_id, local.round, "upload-view")
    if kept_view.exists():
        if kept_view.read_bytes() != view:
            raise ProtectionError(
                f"{party.name} already uploaded its update for round {local.round} under another "
                "roster or key; a second upload could be differenced against the first"
            )
        if not kept.exists():
            raise ProtectionError(
                f"{party.name} already sealed its update for round {local.round}, but the sealed "
                f"bytes are gone from its storage ({kept}); sealing again could be differenced "
                "against the first. Fix: restore parties[].storage, or start a new run"
            )
        blob = kept.read_bytes()
    else:
        blob = _sealed_update(
            cfg, party, local, plan, rosters, ckks_keys, keys, loaded, exchange, layout
        )
        write_owner_only(kept, blob)
        write_owner_only(
            party_record(loaded, plan.run_id, local.round, "base"), local.base_sha256.encode()
        )
        write_owner_only(kept_view, view)  # last: a crash before it leaves nothing sent
    key = update_key(plan.run_id, local.round, party.name)
    exchange.put_bytes(key, blob)
    return SealedUpdateRef(
        party=party.name,
        round=local.round,
        key=key,
        bytes_sent=len(blob),
        plaintext_bytes=4 * sum(s.size for s in layout.segments),
        seal_seconds=time.perf_counter() - start,
        sender_fingerprint=keys.public_bundle().fingerprint,
    )


def _sealed_update(
    cfg: FederationConfig,
    party: PartyConfig,
    local: LocalUpdateRef,
    plan: FederationPlan,
    rosters: list[SecAggRoster],
    ckks_keys: list[CkksKeyRef],
    keys: KeyPairs,
    loaded: LoadedPolicy,
    exchange: Exchange,
    layout: Layout,
) -> bytes:
    from cloudfed.protection import ckks

    record, data = load_local_update(party, local, keys)
    update = state_from_bytes(data)
    shapes = {n: s for seg in layout.segments for n, s in seg.tensors}
    reason = check_update(update, shapes, max_abs=MAX_ABS_UPDATE)
    if reason:  # masked or encrypted, nobody downstream could see what is wrong with it
        raise DataError(
            f"{party.name}: the local update of round {local.round} is invalid ({reason}); it is "
            "not uploaded. Fix: check this party's training logs (learning rate, data)"
        )
    # Inside the encryption: what the coordinator checks. Under any DP nothing data-dependent.
    meta: dict[str, Any] = {}
    private = cfg.privacy.protects_records
    update, _ = clip_to_norm(update, cfg.aggregation.max_update_norm)
    if cfg.privacy.enabled:  # party-level DP: clip first, equal weights (see privacy.party_level)
        update, _, _ = clip_update(update, cfg.privacy.clip)
        cal = calibration(cfg)
        meta.update(dp_mode=cal.mode, dp_clip=cal.clip)
        if cal.mode == "distributed":
            meta["dp_party_std"] = cal.party_std
    # Under any DP, weights use public inputs only: an example count would make a party's
    # influence on the sum data-dependent, and a co-contributor in a two-party round would read
    # its peer's count off the weight sum (see cloudfed.aggregation.weights).
    strategy = strategy_of(cfg, layout)
    loss = record.train.get("loss_mean")
    stats = PartyStats(
        examples=record.examples,
        loss=float(loss) if isinstance(loss, int | float) else None,
        rank=party.lora_rank or cfg.lora.rank,
        bandwidth_mbps=party.bandwidth_mbps,
        staleness=update_staleness(cfg, local.round, record.base_round),
    )
    contribution = strategy.contribution(update, stats, RoundInfo(local.round, private=private))
    noise = secure_sum.NO_NOISE
    if cfg.privacy.mode == "distributed":  # this party's share of the noise
        noise = secure_sum.Noise(party_std=cal.party_std, grid=ckks_grid(cfg))
    mask: secure_sum.Masker | None = None
    encrypt: secure_sum.Encryptor | None = None
    specs, rng = None, None
    if layout.segment("secagg") is not None:
        if len(rosters) != 1:
            raise ProtectionError("secure aggregation needs the coordinator's shares roster")
        doc, setup = read_roster(cfg, exchange, plan, rosters[0], "shares")
        keys, loaded = follow_rotations(cfg, party, loaded, keys, doc, exchange)
        check_members(loaded, doc)
        secrets = load_secrets(party, local.round, plan.run_id)
        adverts = {
            v: verified_advert(cfg, exchange, doc, local.round, v) for v in setup.graph[party.name]
        }
        specs = secure_sum.secagg_specs(cfg, len(setup.parties))
        # Rounding coins fixed by the update itself (see dither_seed): the same value always
        # rounds the same way, and different values get independent coins.
        seed = dither_seed(
            party_root(party)
            / "secagg"
            / "dither"
            / f"{cfg.federation_id}-r{local.round:04d}-{record.sha256}.seed",
            keys,
            f"{cfg.federation_id}:{local.round}:{record.sha256}",
        )
        rng = np.random.Generator(np.random.PCG64(seed))

        def masked(words: np.ndarray) -> np.ndarray:
            return protocol.masked_input(setup, party.name, secrets, words, adverts, doc["shared"])

        mask = masked

    if layout.segment("ckks") is not None:
        if len(ckks_keys) != 1:
            raise ProtectionError("CKKS needs the key party's public context")
        if ckks_keys[0].round != local.round:
            raise ProtectionError("CKKS keys are for another round")
        check_pin(loaded, "party", ckks_keys[0].party, ckks_keys[0].fingerprint)
        public = ckks_public_context(cfg, exchange, plan, ckks_keys[0])

        def encrypted(vector: np.ndarray) -> bytes:
            blocks = ckks.encrypt_vector(public, vector, workers=cfg.protection.ckks.workers)
            return ckks.pack_blocks(blocks)

        encrypt = encrypted

    sections, clipped = secure_sum.encode(
        layout,
        contribution.tensors,
        contribution.weights,
        specs=specs,
        rng=rng,
        mask=mask,
        encrypt=encrypt,
        noise=noise,
    )
    if not private:
        meta["clipped"] = clipped
    sections["meta"] = json.dumps(meta, sort_keys=True).encode()
    payload = container.pack(sections)
    context = stage_context(
        cfg,
        local.round,
        party.name,
        "update",
        run_id=plan.run_id,
        base_sha256=local.base_sha256,
        policy_sha256=layout.policy_sha256,
    )
    return seal(payload, context=context, sender=keys, recipient=coordinator_bundle(exchange, plan))


def dither_seed(path: AnyPath, keys: KeyPairs, context: str) -> int:
    """The rounding coins' seed of one (round, update), kept in the party's storage on first use.

    A round retried from the same global adapter must round its update exactly as the first
    attempt did (two independent roundings of one value average to a finer one). Keeping the
    seed, rather than re-deriving it from the commitment key, keeps that true across a key
    rotation, which draws a new commitment key.
    """
    if path.exists():
        text = path.read_text(encoding="utf-8").strip()
        if not text.isdigit():
            raise ProtectionError(f"{path}: not a rounding seed; restore it from backup")
        return int(text)
    seed = keyed_seed(keys, "secagg-dither", context)
    write_private(path, str(seed).encode())
    return seed
