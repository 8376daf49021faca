"""A party's secure-aggregation stages: advertise, share its keys, reveal shares for survivors.

Each function is one ZenML step's body: it reads what the coordinator published (rosters signed
by the pinned coordinator key), does its stage of the protocol in `cloudfed.protection`, and puts
one signed or sealed message on the exchange. A party reveals shares only for a sum it would
accept itself: enough survivors, no thin rank band.
"""

from __future__ import annotations

import dataclasses
import json
import time

from cloudfed.aggregation.ranks import band_shortfall
from cloudfed.artifacts import FederationPlan, LocalUpdateRef, SecAggRoster, StageRef
from cloudfed.errors import ProtectionError
from cloudfed.exchange import (
    federation_exchange,
    secagg_advert_key,
    secagg_reveal_key,
    secagg_share_key,
)
from cloudfed.federation import FederationConfig, PartyConfig
from cloudfed.keys import follow_rotations
from cloudfed.keys.rotation import pending_fingerprint
from cloudfed.locations import AnyPath
from cloudfed.party.admission import consent, simulated_dropout
from cloudfed.party.stages import (
    check_members,
    party_record,
    secret_path,
    stage_ref,
    write_owner_only,
)
from cloudfed.party_policy import ConsentError, LoadedPolicy, required_survivors
from cloudfed.protection import open_sealed_with_metadata, seal
from cloudfed.protection.envelope import sign_public
from cloudfed.protection.messages import (
    ADVERT,
    REVEAL,
    SHARE,
    coordinator_bundle,
    peer_bundle,
    read_roster,
    sha256,
    stage_context,
)
from cloudfed.protection.secagg import protocol


def load_secrets(party: PartyConfig, round: int, run_id: str) -> protocol.PartySecrets:
    path = secret_path(party, round, run_id, "secrets")
    if not path.exists():
        raise ProtectionError(f"{party.name} has no secure-aggregation secrets for round {round}")
    return protocol.PartySecrets.from_bytes(path.read_bytes())


def _own_view(
    cfg: FederationConfig, loaded: LoadedPolicy, setup: protocol.RoundSetup
) -> protocol.RoundSetup:
    """The roster's setup with the survivors' minimum this party requires, not the roster's."""
    need = max(setup.min_survivors, required_survivors(cfg, loaded))
    return dataclasses.replace(setup, min_survivors=need)


def advertise(
    cfg: FederationConfig, party: PartyConfig, local: LocalUpdateRef, plan: FederationPlan
) -> StageRef:
    """Stage 1: fresh per-round mask key and seed; publish the public key and a commitment."""
    simulated_dropout(cfg, party.name, "advertise", local.round)
    start = time.perf_counter()
    exchange = federation_exchange(cfg)
    keys, loaded = consent(cfg, party, plan)
    secrets = protocol.PartySecrets.generate()
    write_owner_only(secret_path(party, local.round, plan.run_id, "secrets"), secrets.to_bytes())
    context = stage_context(cfg, local.round, party.name, ADVERT, run_id=plan.run_id)
    advert = secrets.advertisement(rotate_to=pending_fingerprint(cfg, party, loaded))
    blob = sign_public(advert.model_dump_json().encode(), context=context, sender=keys)
    key = secagg_advert_key(plan.run_id, local.round, party.name)
    exchange.put_bytes(key, blob)
    return stage_ref(party.name, local.round, "advertise", key, blob, keys, start)


def share_keys(
    cfg: FederationConfig, party: PartyConfig, roster: SecAggRoster, plan: FederationPlan
) -> StageRef:
    """Stage 2: Shamir shares of seed and mask key, each sealed to one holder."""
    simulated_dropout(cfg, party.name, "share_keys", roster.round)
    start = time.perf_counter()
    exchange = federation_exchange(cfg)
    keys, loaded = consent(cfg, party, plan)
    doc, setup = read_roster(cfg, exchange, plan, roster, "keys")
    keys, loaded = follow_rotations(cfg, party, loaded, keys, doc, exchange)
    check_members(loaded, doc)
    if party.name not in setup.parties:
        raise ProtectionError(f"{party.name} is not in this round's secure-aggregation roster")
    secrets = load_secrets(party, roster.round, plan.run_id)
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
            recipient=peer_bundle(exchange, doc, holder)
            if holder != party.name
            else keys.public_bundle(),
        )
        exchange.put_bytes(secagg_share_key(plan.run_id, roster.round, holder, party.name), blob)
        total += len(blob)
    marker = json.dumps({"holders": list(setup.holders(party.name)), "bytes": total}).encode()
    return stage_ref(
        party.name,
        roster.round,
        "shares",
        secagg_share_key(plan.run_id, roster.round, party.name, party.name),
        marker,
        keys,
        start,
    )


def reveal_shares(
    cfg: FederationConfig, party: PartyConfig, roster: SecAggRoster, plan: FederationPlan
) -> StageRef:
    """Stage 4: per owner, one share (seed if it uploaded, key if it dropped), once per round."""
    simulated_dropout(cfg, party.name, "unmask", roster.round)
    start = time.perf_counter()
    exchange = federation_exchange(cfg)
    keys, loaded = consent(cfg, party, plan)
    doc, setup = read_roster(cfg, exchange, plan, roster, "inputs")
    keys, loaded = follow_rotations(cfg, party, loaded, keys, doc, exchange)
    check_members(loaded, doc)
    # Survivors checked against this party's own minimum (distributed DP: min_contributors),
    # also per SecAgg+ component: the roster's min_survivors is the coordinator's word only.
    setup = _own_view(cfg, loaded, setup)
    shared, uploaded = doc["shared"], doc["uploaded"]
    if (thin := band_shortfall(cfg, uploaded, setup.min_survivors)) is not None:
        raise ConsentError(f"{party.name} reveals no shares for round {roster.round}: {thin}")
    answered = party_record(loaded, plan.run_id, roster.round, "revealed")
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
        sender = keys.public_bundle() if owner == party.name else peer_bundle(exchange, doc, owner)
        opened = open_sealed_with_metadata(
            exchange.get_bytes(secagg_share_key(plan.run_id, roster.round, party.name, owner)),
            context=context,
            recipient=keys,
            sender=sender,
        )
        share = protocol.Share.model_validate_json(opened.payload)
        protocol.check_share(setup, share, owner=owner, holder=party.name)
        held[owner] = share
    across = _reveal_across_runs(loaded, plan, roster.round, uploaded)
    reveals = protocol.reveal(setup, party.name, held, shared, uploaded)
    if across is not None:
        write_owner_only(across, json.dumps(sorted(uploaded)).encode())
    write_owner_only(answered, view)
    body = json.dumps({o: r.model_dump() for o, r in reveals.items()}).encode()
    context = stage_context(cfg, roster.round, party.name, REVEAL, run_id=plan.run_id)
    blob = seal(body, context=context, sender=keys, recipient=coordinator_bundle(exchange, plan))
    key = secagg_reveal_key(plan.run_id, roster.round, party.name)
    exchange.put_bytes(key, blob)
    return stage_ref(party.name, roster.round, "unmask", key, blob, keys, start)


def _reveal_across_runs(
    loaded: LoadedPolicy, plan: FederationPlan, round: int, uploaded: list[str]
) -> AnyPath | None:
    """Where this party records whom it unmasked a round for, across every run that retries it.

    A round retried from the same global adapter sends the same updates again (seeded training,
    or DP-SGD handing back the update it paid for). Two opened sums over different survivor sets
    would then difference to the missing parties' updates exactly, so a party unmasks a round of
    one base adapter for one survivor set only. The record lives in the party's own state (its
    policy's `state_dir`), not in `parties[].storage`: the launcher names that, and a fresh one
    would forget it.
    """
    name = loaded.policy.party
    base_file = party_record(loaded, plan.run_id, round, "base")
    if not base_file.exists():  # no update of ours in this round: nothing of ours repeats
        return None
    base = base_file.read_text(encoding="utf-8")
    path = (  # party_record made the state folder owner-only
        loaded.state_dir
        / "secagg"
        / "revealed"
        / loaded.policy.federation_id
        / f"g{plan.generation:04d}-r{round:04d}-{base[:16]}.json"
    )
    if path.exists() and json.loads(path.read_text(encoding="utf-8")) != sorted(uploaded):
        raise ProtectionError(
            f"{name} already unmasked round {round} from this global adapter for "
            f"survivors {json.loads(path.read_text(encoding='utf-8'))}, in an earlier run; "
            f"unmasking it for {sorted(uploaded)} would let the two sums be differenced to an "
            "update. It reveals nothing for this attempt"
        )
    return path
