"""The signed rosters of the secure-aggregation stages: who advertised, shared, uploaded.

Each roster is signed with the coordinator's pinned key and fixes the round's members, so every
party checks the same list before it shares keys, uploads or reveals.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from cloudfed.artifacts import (
    FederationPlan,
    GlobalAdapterRef,
    Rejection,
    SealedUpdateRef,
    SecAggRoster,
    StageRef,
)
from cloudfed.coordinator.plan import coordinator_keys
from cloudfed.coordinator.uploads import verified_uploads
from cloudfed.errors import AggregationError, ProtectionError
from cloudfed.exchange import (
    Exchange,
    federation_exchange,
    fetch_public_keys,
    rotation_key,
    secagg_advert_key,
    secagg_roster_key,
    secagg_share_key,
)
from cloudfed.federation import FederationConfig
from cloudfed.locations import AnyPath, replace_bytes
from cloudfed.protection.envelope import open_public, read_public_header, sign_public
from cloudfed.protection.keys import KeyPairs
from cloudfed.protection.messages import (
    ADVERT,
    COORDINATOR,
    ROSTER,
    SHARE,
    layout_for,
    read_roster,
    sha256,
    stage_context,
)
from cloudfed.protection.rotation import RotationStatement, parse_rotation
from cloudfed.protection.secagg import protocol

logger = logging.getLogger(__name__)


def _sign_roster(
    cfg: FederationConfig,
    exchange: Exchange,
    keys: KeyPairs,
    run_id: str,
    stage: str,
    doc: dict[str, Any],
    setup: protocol.RoundSetup,
    rejected: list[Rejection],
) -> SecAggRoster:
    round = setup.round
    context = stage_context(cfg, round, COORDINATOR, ROSTER, run_id=run_id, stage=stage)
    blob = sign_public(json.dumps(doc, sort_keys=True).encode(), context=context, sender=keys)
    key = secagg_roster_key(run_id, round, stage)
    exchange.put_bytes(key, blob)
    return SecAggRoster(
        round=round,
        stage=stage,
        key=key,
        sha256=sha256(blob),
        parties=list(setup.parties),
        shared=list(doc.get("shared", [])),
        uploaded=list(doc.get("uploaded", [])),
        rejected=rejected,
        neighbours=setup.neighbours,
        threshold=setup.threshold,
    )


def keys_roster(
    cfg: FederationConfig, round: int, adverts: Sequence[StageRef], plan: FederationPlan
) -> SecAggRoster:
    """After stage 1: U1 = parties whose advertisement verified; fixes graph and threshold."""
    exchange = federation_exchange(cfg)
    keys = coordinator_keys(cfg, exchange)
    members, digests, intents, rejected = {}, {}, {}, []
    for ref in sorted(adverts, key=lambda r: r.party):
        try:
            blob = exchange.get_bytes(secagg_advert_key(plan.run_id, round, ref.party))
            sender = fetch_public_keys(exchange, "party", ref.party, fingerprint=ref.fingerprint)
            context = stage_context(cfg, round, ref.party, ADVERT, run_id=plan.run_id)
            advert = protocol.Advertisement.model_validate_json(
                open_public(blob, context=context, sender=sender).payload
            )
        except (ProtectionError, ValueError, FileNotFoundError) as exc:
            rejected.append(Rejection(party=ref.party, reason=f"advertisement rejected: {exc}"))
            continue
        members[ref.party] = ref.fingerprint
        digests[ref.party] = sha256(blob)
        intents[ref.party] = advert.rotate_to
    if len(members) < cfg.min_parties:
        raise AggregationError(
            f"round {round}: {len(members)} party(ies) advertised secure-aggregation keys, fewer "
            f"than min_parties={cfg.min_parties}; no model was published for this round"
        )
    sa = cfg.protection.secagg
    try:
        setup = protocol.setup_for(
            cfg.federation_id,
            plan.run_id,
            round,
            members,
            neighbours=sa.neighbours,
            threshold=sa.threshold,
            complete_up_to=sa.complete_graph_up_to,
            min_survivors=cfg.min_parties,
        )
    except ValueError as exc:
        raise AggregationError(
            f"round {round}: protection.secagg settings do not fit {len(members)} parties: {exc}"
        ) from None
    doc = {
        "setup": {**setup.binding(), "min_survivors": setup.min_survivors},
        "members": members,
        "adverts": digests,
        **_rotations(
            exchange,
            members,
            _ckks_key_party(cfg, plan),
            intents,
            rotation_chains_dir(cfg),
        ),
    }
    return _sign_roster(cfg, exchange, keys, plan.run_id, "keys", doc, setup, rejected)


def _ckks_key_party(cfg: FederationConfig, plan: FederationPlan) -> str | None:
    return cfg.ckks_key_party if "ckks" in plan.protection["tensors"] else None


def rotation_chains_dir(cfg: FederationConfig) -> AnyPath:
    """Where the coordinator keeps every rotation it approved, per member, in its own storage.

    The exchange holds one statement per party and anyone who can write it can delete it; a
    peer that missed several rotations catches up only along the chain kept here.
    """
    return cfg.coordinator_dir / "key_rotations"


def _chain(chains_dir: AnyPath, name: str) -> list[RotationStatement]:
    path = chains_dir / f"{name}.json"
    if not path.exists():
        return []
    chain = [parse_rotation(s) for s in json.loads(path.read_text(encoding="utf-8"))]
    for prev, nxt in zip(chain, chain[1:], strict=False):
        if prev.new.fingerprint != nxt.old.fingerprint or nxt.party != name:
            raise AggregationError(f"{path}: the approved key rotations of {name} do not chain")
    return chain


def _save_chain(chains_dir: AnyPath, name: str, chain: list[RotationStatement]) -> None:
    doc = [s.model_dump(mode="json") for s in chain]
    replace_bytes(chains_dir / f"{name}.json", json.dumps(doc, indent=1).encode())


def _rotations(
    exchange: Exchange,
    members: dict[str, str],
    ckks_key_party: str | None,
    intents: dict[str, str | None],
    chains_dir: AnyPath,
) -> dict[str, Any]:
    """Key rotations of members, for the keys roster; `members` moves to the new fingerprints.

    A statement on the exchange is approved only when signed by the key the member advertised
    with this round AND its new key is the one that advertisement names (`rotate_to`): a
    replayed statement of a rotation the party abandoned or cancelled names another key. An
    approved statement joins the member's chain in the coordinator's own storage; a member whose
    chain ends at the key it advertises with has the chain carried in `chains` (its last link in
    `rotations`), so a peer that missed any number of rotations catches up from its pin, whatever
    the exchange holds. Anything else is left out and named. The CKKS key party does not rotate
    in a round with CKKS tensors: its CKKS context was signed, and the encrypted sum is sealed,
    to the key it had before the roster.
    """
    rotations, chains, rotated, refused = {}, {}, {}, {}
    for name, advertised in sorted(members.items()):
        chain = _chain(chains_dir, name)
        try:
            blob = exchange.get_bytes(rotation_key(name))
        except FileNotFoundError:
            blob = None
        statement = None
        if blob is not None:
            try:
                statement = _fitting_statement(blob, name, advertised, intents.get(name))
            except ProtectionError as exc:
                refused[name] = str(exc)
                logger.warning("key rotation of %s left out of the roster: %s", name, exc)
        if statement is not None and statement.old.fingerprint == advertised:  # to approve
            if name == ckks_key_party:
                refused[name] = (
                    "deferred: the CKKS key party rotates in a round without CKKS tensors"
                )
            else:
                if chain and chain[-1].new.fingerprint != advertised:
                    chain = []  # re-pinned out of band since: a new genesis
                chain.append(statement)
                _save_chain(chains_dir, name, chain)
                rotated[name] = advertised
                members[name] = statement.new.fingerprint
        if chain and chain[-1].new.fingerprint == members[name]:
            rotations[name] = chain[-1].model_dump(mode="json")
            chains[name] = [s.model_dump(mode="json") for s in chain]
    out: dict[str, Any] = {}
    if rotations:
        out |= {"rotations": rotations, "chains": chains, "rotated": rotated}
    if refused:
        out["refused_rotations"] = refused
    return out


def _fitting_statement(
    blob: bytes, name: str, advertised: str, intent: str | None
) -> RotationStatement:
    """The member's verified statement if it fits this round; ProtectionError says why not.

    It must be the member's own and lead from the key it advertised with (a rotation to come) or
    to it (one approved earlier); a rotation to come must lead to the key the round
    advertisement names (`intent`).
    """
    statement = parse_rotation(blob)
    if statement.party != name:
        raise ProtectionError("rotation statement names another party")
    if advertised not in (statement.old.fingerprint, statement.new.fingerprint):
        raise ProtectionError("rotation statement not signed by the key the party advertised with")
    if statement.old.fingerprint == advertised and intent != statement.new.fingerprint:
        raise ProtectionError(
            "rotation statement to a key the party's round advertisement does not "
            "name (an abandoned or replayed rotation)"
        )
    return statement


def shares_roster(
    cfg: FederationConfig,
    round: int,
    shares: Sequence[StageRef],
    previous: SecAggRoster,
    plan: FederationPlan,
) -> SecAggRoster:
    """After stage 2: U2 = parties that put a signed share in every holder's inbox."""
    exchange = federation_exchange(cfg)
    keys = coordinator_keys(cfg, exchange)
    doc, setup = read_roster(cfg, exchange, plan, previous, "keys")
    shared, rejected = [], list(previous.rejected)  # a roster carries every exclusion so far
    for ref in sorted(shares, key=lambda r: r.party):
        if ref.party not in setup.parties:
            rejected.append(Rejection(party=ref.party, reason="shared keys without advertising"))
            continue
        missing = []
        for holder in setup.holders(ref.party):
            key = secagg_share_key(plan.run_id, round, holder, ref.party)
            try:
                header = read_public_header(exchange.get_bytes(key))
            except (FileNotFoundError, ProtectionError):
                missing.append(holder)
                continue
            ctx = header["context"]
            if (
                ctx.get("party") != ref.party
                or ctx.get("kind") != SHARE
                or ctx.get("round") != round
            ):
                missing.append(holder)
        if missing:
            rejected.append(Rejection(party=ref.party, reason=f"shares missing for {missing}"))
            continue
        shared.append(ref.party)
    for p in setup.parties:
        if p not in shared and not any(r.party == p for r in rejected):
            rejected.append(Rejection(party=p, reason="dropped before sharing keys"))
    if len(shared) < max(cfg.min_parties, setup.threshold):
        raise AggregationError(
            f"round {round}: {len(shared)} party(ies) shared their mask keys ({shared}), below "
            f"the threshold t={setup.threshold} / min_parties={cfg.min_parties}; the round is "
            "aborted and no model is published"
        )
    doc = {**doc, "shared": shared}
    return _sign_roster(cfg, exchange, keys, plan.run_id, "shares", doc, setup, rejected)


def inputs_roster(
    cfg: FederationConfig,
    round: int,
    sealed: Sequence[SealedUpdateRef],
    previous: SecAggRoster,
    current: GlobalAdapterRef,
    plan: FederationPlan,
) -> SecAggRoster:
    """After stage 3: U3 = parties whose masked upload verified; aborts if unmasking is unsafe."""
    exchange = federation_exchange(cfg)
    keys = coordinator_keys(cfg, exchange)
    doc, setup = read_roster(cfg, exchange, plan, previous, "shares")
    layout = layout_for(cfg, exchange, plan)
    rejected = list(previous.rejected)
    rejected += [
        Rejection(party=r.party, reason="uploaded without sharing keys")
        for r in sealed
        if r.party not in doc["shared"]
    ]
    uploads, bad = verified_uploads(
        cfg,
        exchange,
        keys,
        sealed,
        round=round,
        plan=plan,
        current=current,
        layout=layout,
        only=doc["shared"],
        consume=lambda upload: upload.sections.clear(),  # U3 needs who verified, not the words
    )
    rejected += bad
    uploaded = sorted(uploads)
    for p in doc["shared"]:
        if p not in uploaded and not any(r.party == p for r in rejected):
            rejected.append(Rejection(party=p, reason="dropped after sharing keys"))
    protocol.check_survivors(setup, doc["shared"], uploaded)
    doc = {**doc, "uploaded": uploaded}
    return _sign_roster(cfg, exchange, keys, plan.run_id, "inputs", doc, setup, rejected)
