"""Rotating a party's keys: a pending pair, a statement signed by the old key, pins that follow.

`rotate` leaves the old pair in use and publishes "X rotates from A to B" (signed by A and B) on
the exchange. The coordinator carries the statement in its next keys roster; every party checks
the old fingerprint against its own pin and records the rotation in its own state
(`key_rotations.json`), so its pin follows only a rotation signed by the key it trusted. The
rotating party, finding its own rotation approved, promotes the pending pair, which destroys the
old private keys, and from then on signs and opens with the new ones.
"""

from __future__ import annotations

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
from cloudfed.protection.commitments import commitment_key
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
        new = generate_keys("party", name, commitment=commitment_key(held.current))
        source.save_pending(new)
    statement = sign_rotation(held.current, new)
    exchange = federation_exchange(cfg)
    exchange.put_bytes(rotation_key(name), statement.model_dump_json(indent=2).encode())
    return statement


def follow_rotations(
    cfg: FederationConfig,
    party: PartyConfig,
    loaded: LoadedPolicy,
    keys: KeyPairs,
    doc: dict[str, Any],
    exchange: Exchange,
) -> tuple[KeyPairs, LoadedPolicy]:
    """Accept the rotations a verified keys roster carries; ours promotes our pending pair.

    Each statement must verify and start from the fingerprint this party pins, whatever the
    coordinator says: a forged or foreign-signed rotation makes the party refuse the round.
    """
    rotations = doc.get("rotations", {})
    for name in sorted(rotations):
        try:
            statement = parse_rotation(rotations[name])
        except ProtectionError as exc:
            raise ConsentError(f"{party.name} refuses the roster: {exc}") from None
        if statement.party != name:
            raise ConsentError(f"{party.name} refuses the roster: {name}'s rotation is another's")
        if name == party.name:
            _check_own(cfg, party, loaded, statement)
        loaded = record_rotation(loaded, statement)
    if party.name in rotations:
        keys = load_party_keys(cfg, party, loaded, create=False)  # promotes the pending pair
        check_pin(loaded, "party", party.name, keys.public_bundle().fingerprint)
        publish_public_keys(exchange, keys.public_bundle())
    return keys, loaded


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
