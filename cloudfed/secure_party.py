"""A party's side of the protection stages of a round, in its own cloud.

Each function is one ZenML step's body: it reads what the coordinator published (rosters signed by
the pinned coordinator key), does its stage of the protocol in `cloudfed.protection`, and puts one
sealed or signed message on the exchange. Per-round secrets (the mask key and self-mask seed) stay
in the party's storage, owner-only, between stages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from cloudfed.aggregation.composed import Strategy, strategy_for
from cloudfed.aggregation.fedbuff import update_staleness
from cloudfed.aggregation.guard import MAX_ABS_UPDATE, check_update, clip_to_norm
from cloudfed.aggregation.ranks import band_shortfall
from cloudfed.aggregation.strategy import PartyStats, RoundInfo
from cloudfed.artifacts import (
    CkksKeyRef,
    FederationPlan,
    LocalUpdateRef,
    SealedUpdateRef,
    SecAggRoster,
    StageRef,
)
from cloudfed.errors import DataError, ProtectionError
from cloudfed.exchange import (
    Exchange,
    ckks_plain_sum_key,
    ckks_public_key,
    ckks_sum_key,
    federation_exchange,
    fetch_public_keys,
    secagg_advert_key,
    secagg_reveal_key,
    secagg_share_key,
    update_key,
)
from cloudfed.federation import FederationConfig, PartyConfig
from cloudfed.party import (
    COORDINATOR,
    consent,
    load_global,
    load_local_update,
    simulated_dropout,
)
from cloudfed.party_policy import ConsentError, LoadedPolicy, check_pin, required_survivors
from cloudfed.privacy.party_level import calibration, ckks_grid, clip_update
from cloudfed.protection import SealContext, open_sealed_with_metadata, seal, secure_sum
from cloudfed.protection import payload as container
from cloudfed.protection.commitments import keyed_seed
from cloudfed.protection.envelope import open_public, sign_public
from cloudfed.protection.keys import KeyPairs, PublicKeyBundle
from cloudfed.protection.policy import Layout, route
from cloudfed.protection.secagg import protocol
from cloudfed.training.adapter_io import state_from_bytes

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


def _secret_path(party: PartyConfig, round: int, run_id: str, what: str) -> Path:
    return Path(party.storage) / "secagg" / run_id / f"r{round:04d}.{what}"


def _write_owner_only(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


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


def check_members(loaded: LoadedPolicy, doc: dict[str, Any]) -> None:
    """Every member of a roster must carry the key this party pinned for it."""
    for name, fingerprint in doc["members"].items():
        check_pin(loaded, "party", name, fingerprint)


def _own_view(
    cfg: FederationConfig, loaded: LoadedPolicy, setup: protocol.RoundSetup
) -> protocol.RoundSetup:
    """The roster's setup with the survivors' minimum this party requires, not the roster's."""
    need = max(setup.min_survivors, required_survivors(cfg, loaded))
    return dataclasses.replace(setup, min_survivors=need)


def _peer(exchange: Exchange, doc: dict[str, Any], name: str) -> PublicKeyBundle:
    return fetch_public_keys(exchange, "party", name, fingerprint=doc["members"][name])


def verified_advert(
    cfg: FederationConfig, exchange: Exchange, doc: dict[str, Any], round: int, name: str
) -> protocol.Advertisement:
    """A neighbour's advertisement, checked end to end with its own signature."""
    blob = exchange.get_bytes(secagg_advert_key(doc["setup"]["run_id"], round, name))
    if sha256(blob) != doc["adverts"][name]:
        raise ProtectionError(f"secagg advertisement of {name} differs from the roster's")
    context = stage_context(cfg, round, name, ADVERT, run_id=doc["setup"]["run_id"])
    opened = open_public(blob, context=context, sender=_peer(exchange, doc, name))
    return protocol.Advertisement.model_validate_json(opened.payload)


def _stage_ref(
    party: str, round: int, stage: str, key: str, blob: bytes, keys: KeyPairs, start: float
) -> StageRef:
    return StageRef(
        party=party,
        round=round,
        stage=stage,
        key=key,
        sha256=sha256(blob),
        bytes=len(blob),
        fingerprint=keys.public_bundle().fingerprint,
        seconds=time.perf_counter() - start,
    )


def advertise(
    cfg: FederationConfig, party: PartyConfig, local: LocalUpdateRef, plan: FederationPlan
) -> StageRef:
    """Stage 1: fresh per-round mask key and seed; publish the public key and a commitment."""
    simulated_dropout(cfg, party.name, "advertise", local.round)
    start = time.perf_counter()
    exchange = federation_exchange(cfg)
    keys, _ = consent(cfg, party, plan)
    secrets = protocol.PartySecrets.generate()
    _write_owner_only(_secret_path(party, local.round, plan.run_id, "secrets"), secrets.to_bytes())
    context = stage_context(cfg, local.round, party.name, ADVERT, run_id=plan.run_id)
    blob = sign_public(
        secrets.advertisement().model_dump_json().encode(), context=context, sender=keys
    )
    key = secagg_advert_key(plan.run_id, local.round, party.name)
    exchange.put_bytes(key, blob)
    return _stage_ref(party.name, local.round, "advertise", key, blob, keys, start)


def _load_secrets(party: PartyConfig, round: int, run_id: str) -> protocol.PartySecrets:
    path = _secret_path(party, round, run_id, "secrets")
    if not path.exists():
        raise ProtectionError(f"{party.name} has no secure-aggregation secrets for round {round}")
    return protocol.PartySecrets.from_bytes(path.read_bytes())


def share_keys(
    cfg: FederationConfig, party: PartyConfig, roster: SecAggRoster, plan: FederationPlan
) -> StageRef:
    """Stage 2: Shamir shares of seed and mask key, each sealed to one holder."""
    simulated_dropout(cfg, party.name, "share_keys", roster.round)
    start = time.perf_counter()
    exchange = federation_exchange(cfg)
    keys, loaded = consent(cfg, party, plan)
    doc, setup = read_roster(cfg, exchange, plan, roster, "keys")
    check_members(loaded, doc)
    if party.name not in setup.parties:
        raise ProtectionError(f"{party.name} is not in this round's secure-aggregation roster")
    secrets = _load_secrets(party, roster.round, plan.run_id)
    own = doc["adverts"][party.name]
    if own != sha256(exchange.get_bytes(secagg_advert_key(plan.run_id, roster.round, party.name))):
        raise ProtectionError("secagg roster rejected: it lists another advertisement of ours")
    total = 0
    for holder, share in protocol.make_shares(setup, party.name, secrets).items():
        context = stage_context(
            cfg, roster.round, party.name, SHARE, run_id=plan.run_id, holder=holder
        )
        blob = seal(
            share.model_dump_json().encode(),
            context=context,
            sender=keys,
            recipient=_peer(exchange, doc, holder)
            if holder != party.name
            else keys.public_bundle(),
        )
        exchange.put_bytes(secagg_share_key(plan.run_id, roster.round, holder, party.name), blob)
        total += len(blob)
    marker = json.dumps({"holders": list(setup.holders(party.name)), "bytes": total}).encode()
    return _stage_ref(
        party.name,
        roster.round,
        "shares",
        secagg_share_key(plan.run_id, roster.round, party.name, party.name),
        marker,
        keys,
        start,
    )


def ckks_public_context(
    cfg: FederationConfig, exchange: Exchange, plan: FederationPlan, ref: CkksKeyRef
) -> bytes:
    blob = exchange.get_bytes(ref.key)
    if sha256(blob) != ref.sha256:
        raise ProtectionError("ckks public context rejected: hash mismatch")
    sender = fetch_public_keys(exchange, "party", ref.party, fingerprint=ref.fingerprint)
    context = stage_context(cfg, ref.round, ref.party, CKKS_CONTEXT, run_id=plan.run_id)
    return open_public(blob, context=context, sender=sender).payload


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
    kept, kept_view = (
        _secret_path(party, local.round, plan.run_id, "upload"),
        _secret_path(party, local.round, plan.run_id, "upload-view"),
    )
    if kept.exists() and kept_view.exists():
        if kept_view.read_bytes() != view:
            raise ProtectionError(
                f"{party.name} already uploaded its update for round {local.round} under another "
                "roster or key; a second upload could be differenced against the first"
            )
        blob = kept.read_bytes()
    else:
        blob = _sealed_update(
            cfg, party, local, plan, rosters, ckks_keys, keys, loaded, exchange, layout
        )
        _write_owner_only(kept, blob)
        _write_owner_only(kept_view, view)
        _write_owner_only(
            _secret_path(party, local.round, plan.run_id, "base"), local.base_sha256.encode()
        )
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
        check_members(loaded, doc)
        secrets = _load_secrets(party, local.round, plan.run_id)
        adverts = {
            v: verified_advert(cfg, exchange, doc, local.round, v) for v in setup.graph[party.name]
        }
        specs = secure_sum.secagg_specs(cfg, len(setup.parties))
        # Rounding coins fixed by the update itself (see keyed_seed): the same value always rounds
        # the same way, and different values get independent coins.
        seed = keyed_seed(
            keys, "secagg-dither", f"{cfg.federation_id}:{local.round}:{record.sha256}"
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


def reveal_shares(
    cfg: FederationConfig, party: PartyConfig, roster: SecAggRoster, plan: FederationPlan
) -> StageRef:
    """Stage 4: per owner, one share (seed if it uploaded, key if it dropped), once per round."""
    simulated_dropout(cfg, party.name, "unmask", roster.round)
    start = time.perf_counter()
    exchange = federation_exchange(cfg)
    keys, loaded = consent(cfg, party, plan)
    doc, setup = read_roster(cfg, exchange, plan, roster, "inputs")
    check_members(loaded, doc)
    # Survivors checked against this party's own minimum (distributed DP: min_contributors),
    # also per SecAgg+ component: the roster's min_survivors is the coordinator's word only.
    setup = _own_view(cfg, loaded, setup)
    shared, uploaded = doc["shared"], doc["uploaded"]
    if (thin := band_shortfall(cfg, uploaded, setup.min_survivors)) is not None:
        raise ConsentError(f"{party.name} reveals no shares for round {roster.round}: {thin}")
    answered = _secret_path(party, roster.round, plan.run_id, "revealed")
    view = json.dumps({"shared": shared, "uploaded": uploaded}).encode()
    if answered.exists() and answered.read_bytes() != view:
        raise ProtectionError(
            f"{party.name} already revealed shares for round {roster.round} under another view "
            "of who survived; answering again could expose a single update"
        )
    held: dict[str, protocol.Share] = {}
    for owner in setup.holders(party.name):  # symmetric graph: whoever I hold shares of
        if owner not in shared:
            continue
        context = stage_context(
            cfg, roster.round, owner, SHARE, run_id=plan.run_id, holder=party.name
        )
        sender = keys.public_bundle() if owner == party.name else _peer(exchange, doc, owner)
        opened = open_sealed_with_metadata(
            exchange.get_bytes(secagg_share_key(plan.run_id, roster.round, party.name, owner)),
            context=context,
            recipient=keys,
            sender=sender,
        )
        share = protocol.Share.model_validate_json(opened.payload)
        protocol.check_share(setup, share, owner=owner, holder=party.name)
        held[owner] = share
    across = _reveal_across_runs(cfg, party, plan, roster.round, uploaded)
    reveals = protocol.reveal(setup, party.name, held, shared, uploaded)
    if across is not None:
        _write_owner_only(across, json.dumps(sorted(uploaded)).encode())
    _write_owner_only(answered, view)
    body = json.dumps({o: r.model_dump() for o, r in reveals.items()}).encode()
    context = stage_context(cfg, roster.round, party.name, REVEAL, run_id=plan.run_id)
    blob = seal(body, context=context, sender=keys, recipient=coordinator_bundle(exchange, plan))
    key = secagg_reveal_key(plan.run_id, roster.round, party.name)
    exchange.put_bytes(key, blob)
    return _stage_ref(party.name, roster.round, "unmask", key, blob, keys, start)


def _reveal_across_runs(
    cfg: FederationConfig, party: PartyConfig, plan: FederationPlan, round: int, uploaded: list[str]
) -> Path | None:
    """Where this party records whom it unmasked a round for, across every run that retries it.

    A round retried from the same global adapter sends the same updates again (seeded training,
    or DP-SGD handing back the update it paid for). Two opened sums over different survivor sets
    would then difference to the missing parties' updates exactly, so a party unmasks a round of
    one base adapter for one survivor set only.
    """
    base_file = _secret_path(party, round, plan.run_id, "base")
    if not base_file.exists():  # no update of ours in this round: nothing of ours repeats
        return None
    base = base_file.read_text(encoding="utf-8")
    path = (
        Path(party.storage)
        / "secagg"
        / "revealed"
        / cfg.federation_id
        / f"g{plan.generation:04d}-r{round:04d}-{base[:16]}.json"
    )
    if path.exists() and json.loads(path.read_text(encoding="utf-8")) != sorted(uploaded):
        raise ProtectionError(
            f"{party.name} already unmasked round {round} from this global adapter for "
            f"survivors {json.loads(path.read_text(encoding='utf-8'))}, in an earlier run; "
            f"unmasking it for {sorted(uploaded)} would let the two sums be differenced to an "
            "update. It reveals nothing for this attempt"
        )
    return path


def _ckks_secret_path(party: PartyConfig, run_id: str, round: int) -> Path:
    return Path(party.storage) / "ckks" / run_id / f"r{round:04d}.secret-context"


def ckks_keygen(
    cfg: FederationConfig, party: PartyConfig, plan: FederationPlan, round: int
) -> CkksKeyRef:
    """The key party makes this round's CKKS keys; only the public context leaves its storage."""
    from cloudfed.protection import ckks

    exchange = federation_exchange(cfg)
    keys, _ = consent(cfg, party, plan)
    c = cfg.protection.ckks
    secret, public = ckks.generate_keys(
        ckks.CkksParams(
            poly_modulus_degree=c.poly_modulus_degree,
            coeff_mod_bit_sizes=tuple(c.coeff_mod_bit_sizes),
            global_scale_bits=c.global_scale_bits,
            workers=c.workers,
        )
    )
    _write_owner_only(_ckks_secret_path(party, plan.run_id, round), secret)
    context = stage_context(cfg, round, party.name, CKKS_CONTEXT, run_id=plan.run_id)
    blob = sign_public(public, context=context, sender=keys)
    exchange.put_bytes(ckks_public_key(plan.run_id, round), blob)
    return CkksKeyRef(
        party=party.name,
        round=round,
        key=ckks_public_key(plan.run_id, round),
        sha256=sha256(blob),
        fingerprint=keys.public_bundle().fingerprint,
        bytes=len(blob),
    )


def ckks_decrypt_sum(
    cfg: FederationConfig, party: PartyConfig, round: int, plan: FederationPlan, length: int
) -> StageRef:
    """Key party: decrypt the coordinator's summed ciphertext, once, and nothing else, for it.

    Refuses a sum that declares fewer contributors than this party's own minimum, or members it
    did not pin. Under distributed DP every contribution lay on the noise grid, so the decrypted
    sum is rounded back onto it: CKKS's approximation error (which depends on the plaintexts) is
    not released. The round's secret context is deleted once used; a retry with the same sum gets
    the same answer, another sum gets none.
    """
    from cloudfed.protection import ckks

    start = time.perf_counter()
    exchange = federation_exchange(cfg)
    keys, loaded = consent(cfg, party, plan)
    coordinator = coordinator_bundle(exchange, plan)
    incoming = exchange.get_bytes(ckks_sum_key(plan.run_id, round))
    answered = _ckks_secret_path(party, plan.run_id, round).with_suffix(".answered")
    answer = _ckks_secret_path(party, plan.run_id, round).with_suffix(".answer")
    key = ckks_plain_sum_key(plan.run_id, round)
    if answered.exists():
        if answered.read_bytes() != sha256(incoming).encode() or not answer.exists():
            raise ProtectionError(
                f"{party.name} already decrypted a CKKS sum for round {round}; it decrypts one "
                "sum per round and key"
            )
        blob = answer.read_bytes()
        exchange.put_bytes(key, blob)
        return _stage_ref(party.name, round, "ckks-decrypt", key, blob, keys, start)
    context = stage_context(cfg, round, COORDINATOR, CKKS_SUM)
    opened = open_sealed_with_metadata(
        incoming, context=context, recipient=keys, sender=coordinator
    )
    if opened.metadata.get("run_id") != plan.run_id:
        raise ProtectionError("ckks sum rejected: it belongs to another run (replay)")
    summed = opened.metadata.get("parties")
    need = required_survivors(cfg, loaded)
    if not isinstance(summed, list) or len(set(summed)) < need:
        raise ConsentError(
            f"{party.name} refuses to decrypt a CKKS sum of {summed!r}: fewer than {need} "
            "contributions (its own minimum) would expose too little noise or a single update"
        )
    for name in summed:
        if name not in loaded.policy.pins.parties:
            raise ConsentError(f"{party.name} refuses a CKKS sum that names unpinned {name!r}")
    if (thin := band_shortfall(cfg, summed, need)) is not None:
        raise ConsentError(f"{party.name} refuses to decrypt a CKKS sum: {thin}")
    secret_path = _ckks_secret_path(party, plan.run_id, round)
    if not secret_path.exists():
        raise ProtectionError(f"{party.name} holds no CKKS secret key for round {round}")
    values = ckks.decrypt_vector(
        secret_path.read_bytes(), ckks.unpack_blocks(opened.payload), length
    )
    _write_owner_only(answered, sha256(incoming).encode())
    secret_path.unlink()  # one decryption per round's key
    if cfg.privacy.mode == "distributed":
        values = back_onto_grid(values, ckks_grid(cfg), round)
    out = stage_context(cfg, round, party.name, CKKS_PLAIN, run_id=plan.run_id, parties=summed)
    # float32 is all the adapter keeps; fewer released bits of the decryption, too.
    blob = seal(values.astype("<f4").tobytes(), context=out, sender=keys, recipient=coordinator)
    _write_owner_only(answer, blob)
    exchange.put_bytes(key, blob)
    return _stage_ref(party.name, round, "ckks-decrypt", key, blob, keys, start)


def back_onto_grid(values: np.ndarray, grid: float, round: int) -> np.ndarray:
    """Exact multiples of the noise grid, or nothing if CKKS's error came near half a step."""
    scaled = values / grid
    ticks = np.rint(scaled)
    worst = float(np.max(np.abs(scaled - ticks))) if scaled.size else 0.0
    if worst > 0.25:
        raise ProtectionError(
            f"round {round}: the CKKS decryption error reached {worst:.2f} noise-grid steps; the "
            "sum is not released (raise protection.ckks.global_scale_bits)"
        )
    return ticks * grid
