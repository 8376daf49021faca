"""Rotating a party's keys: a pending pair, a statement signed by the old key, pins that follow.

`rotate` leaves the old pair in use and publishes "X rotates from A to B" (signed by A and B) on
the exchange. The coordinator carries the statement in its next keys roster; every party checks
the old fingerprint against its own pin and records the rotation in its own state
(`key_rotations.json`), so its pin follows only a rotation signed by the key it trusted. The
rotating party, finding its own rotation approved, promotes the pending pair, which destroys the
old private keys, and from then on signs and opens with the new ones.
"""

from __future__ import annotations

import secrets
from typing import Any

from cloudfed.errors import ConfigError, ProtectionError
from cloudfed.exchange import Exchange, federation_exchange, publish_public_keys, rotation_key
from cloudfed.federation import FederationConfig, PartyConfig
from cloudfed.keys.sources import load_party_keys, party_key_source
from cloudfed.party_policy import (
    ConsentError,
    LoadedPolicy,
    check_pin,
    load_policy,
    record_rotation,
)
from cloudfed.protection.keys import KeyPairs, generate_keys
from cloudfed.protection.rotation import RotationStatement, parse_rotation, sign_rotation


def rotate(cfg: FederationConfig, name: str) -> RotationStatement:
    """Make (or keep) the pending pair and publish the rotation statement; the old pair stays."""
    party = cfg.party(name)
    loaded = load_policy(name)
    source = party_key_source(cfg, party, loaded)
    held = source.load()
    if held.current is None:
        raise ConfigError(f"{source.where}: {name} has no keys to rotate from")
    check_pin(loaded, "party", name, held.current.public_bundle().fingerprint)
    new = held.pending
    if new is None:  # a second `rotate` before approval republishes the same pending pair
        # A fresh commitment key: one carried over (or derived from the old private key) would
        # fall to whoever later gets a retired key. The old one moves to the party's state when
        # the rotation is approved, only to check digests made before it.
        new = generate_keys("party", name, commitment=secrets.token_bytes(32))
        source.save_pending(new)
    statement = sign_rotation(held.current, new)
    exchange = federation_exchange(cfg)
    exchange.put_bytes(rotation_key(name), statement.model_dump_json(indent=2).encode())
    return statement


def cancel_rotation(cfg: FederationConfig, name: str) -> None:
    """Drop the pending pair and empty the exchange slot (`rotate --cancel`).

    The party's next advertisement names no new key, so even a copy of the statement an
    attacker kept is never approved, and a later `rotate` draws a new pair.
    """
    party = cfg.party(name)
    source = party_key_source(cfg, party, load_policy(name))
    source.discard_pending()
    exchange = federation_exchange(cfg)
    if exchange.exists(rotation_key(name)):
        exchange.delete(rotation_key(name))


def pending_fingerprint(
    cfg: FederationConfig, party: PartyConfig, loaded: LoadedPolicy
) -> str | None:
    """The key this party intends to rotate to: what its round advertisement names."""
    pending = party_key_source(cfg, party, loaded).load().pending
    return None if pending is None else pending.public_bundle().fingerprint


def follow_rotations(
    cfg: FederationConfig,
    party: PartyConfig,
    loaded: LoadedPolicy,
    keys: KeyPairs,
    doc: dict[str, Any],
    exchange: Exchange,
) -> tuple[KeyPairs, LoadedPolicy]:
    """Accept the rotations a verified keys roster carries; ours promotes our pending pair.

    Each member's chain (`chains`, else its one statement) is walked from the fingerprint this
    party pins, whatever the coordinator says: every link must verify and start where the last
    ended, and a forged or foreign-signed rotation makes the party refuse the round. A link the
    roster approves in this very round moves the pin only if the member's advertisement of this
    round, signed by its old key, names the new key: a replayed rotation the member abandoned
    moves no pin, even if the coordinator carried it.
    """
    rotations = doc.get("rotations", {})
    for name in sorted(rotations):
        raw_chain = doc.get("chains", {}).get(name) or [rotations[name]]
        try:
            chain = [parse_rotation(s) for s in raw_chain]
            last = parse_rotation(rotations[name])
        except ProtectionError as exc:
            raise ConsentError(f"{party.name} refuses the roster: {exc}") from None
        if any(s.party != name for s in chain) or last.party != name:
            raise ConsentError(f"{party.name} refuses the roster: {name}'s rotation is another's")
        links = zip(chain, chain[1:], strict=False)
        if chain[-1] != last or any(a.new.fingerprint != b.old.fingerprint for a, b in links):
            raise ConsentError(f"{party.name} refuses the roster: {name}'s rotations do not chain")
        if name == party.name:
            _check_own(cfg, party, loaded, last)
        pinned = loaded.policy.pins.parties.get(name)
        start = next((i for i, s in enumerate(chain) if s.old.fingerprint == pinned), None)
        if start is None:  # not from our pin: refused (or already followed) by the record
            loaded = record_rotation(loaded, last)
            continue
        for statement in chain[start:]:
            if doc.get("rotated", {}).get(name) == statement.old.fingerprint:
                _check_intent(cfg, party, doc, exchange, statement)
            loaded = record_rotation(loaded, statement)
    if party.name in rotations:
        keys = load_party_keys(cfg, party, loaded, create=False)  # promotes the pending pair
        check_pin(loaded, "party", party.name, keys.public_bundle().fingerprint)
        publish_public_keys(exchange, keys.public_bundle())
    return keys, loaded


def _check_intent(
    cfg: FederationConfig,
    party: PartyConfig,
    doc: dict[str, Any],
    exchange: Exchange,
    statement: RotationStatement,
) -> None:
    """The member's round advertisement (signed by its old key) names this rotation's new key."""
    from cloudfed.protection.messages import verified_advert

    name = statement.party
    try:
        advert = verified_advert(cfg, exchange, doc, doc["setup"]["round"], name)
    except (KeyError, FileNotFoundError, ProtectionError, ValueError) as exc:
        raise ConsentError(
            f"{party.name} refuses the roster: it approves a rotation of {name} without {name}'s "
            f"round advertisement announcing it ({exc})"
        ) from None
    if advert.rotate_to != statement.new.fingerprint:
        raise ConsentError(
            f"{party.name} refuses the roster: it approves a rotation of {name} to key "
            f"{statement.new.fingerprint[:16]}..., which {name}'s round advertisement does not "
            "name (an abandoned or replayed rotation)"
        )


def _check_own(
    cfg: FederationConfig, party: PartyConfig, loaded: LoadedPolicy, statement: RotationStatement
) -> None:
    held = party_key_source(cfg, party, loaded).load()
    ours = {k.public_bundle().fingerprint for k in (held.current, held.pending) if k is not None}
    if statement.new.fingerprint not in ours:
        raise ConsentError(
            f"{party.name} refuses the roster: it approves a rotation of {party.name} to key "
            f"{statement.new.fingerprint[:16]}..., which {party.name} does not hold"
        )
