"""Whether a party takes part at all: its identity keys, its policy and pins, simulated dropouts.

Every party stage starts here, so a run weaker than the party's own policy, or a coordinator key
other than the pinned one, stops the party before it reads a row or publishes anything.
"""

from __future__ import annotations

from cloudfed.artifacts import FederationPlan
from cloudfed.errors import SimulatedDropout
from cloudfed.exchange import Exchange, federation_exchange, publish_public_keys
from cloudfed.federation import FederationConfig, PartyConfig
from cloudfed.locations import on_disk, party_root
from cloudfed.party_policy import LoadedPolicy, check_pin, enforce
from cloudfed.protection import KeyPairs, load_or_create_keys
from cloudfed.protection.messages import COORDINATOR


def simulated_dropout(cfg: FederationConfig, party: str, stage: str, round: int) -> None:
    if cfg.simulate_dropouts.get(party) == stage:
        raise SimulatedDropout(f"{party} left round {round} at {stage} (simulate_dropouts)")


def party_identity(party: PartyConfig) -> KeyPairs:
    """The party's key pair from `<storage>/keys`; from an object store via a 0700 temp folder."""
    with on_disk(party_root(party) / "keys") as key_dir:
        return load_or_create_keys("party", party.name, key_dir)


def party_keys(party: PartyConfig, exchange: Exchange) -> KeyPairs:
    """Generate the party's identity once, keep it in its storage, publish the public half."""
    keys = party_identity(party)
    publish_public_keys(exchange, keys.public_bundle())
    return keys


def consent(
    cfg: FederationConfig, party: PartyConfig, plan: FederationPlan | None = None
) -> tuple[KeyPairs, LoadedPolicy]:
    """The party's keys and policy, once the round is no weaker than the policy and pins hold."""
    loaded = enforce(cfg, party.name)
    keys = party_identity(party)
    check_pin(loaded, "party", party.name, keys.public_bundle().fingerprint)  # before publishing
    publish_public_keys(federation_exchange(cfg), keys.public_bundle())
    if plan is not None:
        check_pin(loaded, COORDINATOR, COORDINATOR, plan.coordinator_fingerprint)
    return keys, loaded
