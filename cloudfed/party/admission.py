"""Whether a party takes part at all: its identity keys, its policy and pins, simulated dropouts.

Every party stage starts here, so a run weaker than the party's own policy, or a coordinator key
other than the pinned one, stops the party before it reads a row or publishes anything.
"""

from __future__ import annotations

import logging
import os
import time

from cloudfed.artifacts import FederationPlan
from cloudfed.errors import ConfigError, SimulatedDropout
from cloudfed.exchange import Exchange, federation_exchange, publish_public_keys
from cloudfed.federation import FederationConfig, PartyConfig
from cloudfed.keys import load_party_keys
from cloudfed.keys.sources import refuse_coordinator_location
from cloudfed.party_policy import LoadedPolicy, check_pin, enforce, load_policy, policy_path
from cloudfed.protection import KeyPairs
from cloudfed.protection.messages import COORDINATOR
from cloudfed.storage import is_inside

logger = logging.getLogger(__name__)

# Fault injection, for tests of the stage deadlines: `party:stage:seconds[,party:stage:seconds]`
# makes that party's step sleep before it does that stage's work. Read from the environment of
# the process the party step runs in (the party's own runtime), never from the run
# configuration: party steps refuse a run configuration that sets any CLOUDFED_* variable
# (steps/_party.py), and a delay only makes the party late, which the coordinator treats as a
# dropout: it cannot weaken any check.
FAULT_DELAY_ENV = "CLOUDFED_FAULT_DELAY"


def simulated_dropout(cfg: FederationConfig, party: str, stage: str, round: int) -> None:
    injected_delay(party, stage, round)
    if cfg.simulate_dropouts.get(party) == stage:
        raise SimulatedDropout(f"{party} left round {round} at {stage} (simulate_dropouts)")


def injected_delay(party: str, stage: str, round: int) -> float:
    """Sleep as `CLOUDFED_FAULT_DELAY` asks for this party and stage (test hook); seconds slept."""
    spec = os.environ.get(FAULT_DELAY_ENV, "")
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, rest = item.partition(":")
        at, _, seconds = rest.partition(":")
        if name == party and at == stage:
            try:
                delay = float(seconds)
            except ValueError:
                raise ValueError(
                    f"{FAULT_DELAY_ENV}={spec!r}: {item!r} is not party:stage:seconds"
                ) from None
            logger.warning(
                "%s sleeps %g s at %s, round %d (%s)", party, delay, stage, round, FAULT_DELAY_ENV
            )
            time.sleep(delay)
            return delay
    return 0.0


def party_keys(
    party: PartyConfig, exchange: Exchange, cfg: FederationConfig | None = None
) -> KeyPairs:
    """The party's identity from the source its policy names (made once), public half published.

    `cfg` lets the source refuse a key folder inside the coordinator's storage or the exchange;
    `consent` always passes it.
    """
    if cfg is not None:
        refuse_coordinator_locations(cfg, party)
    loaded = load_policy(party.name) if policy_path(party.name).is_file() else None
    pinned = loaded is not None and party.name in loaded.policy.pins.parties
    keys = load_party_keys(cfg, party, loaded, create=not pinned)
    publish_public_keys(exchange, keys.public_bundle())
    return keys


def refuse_coordinator_locations(cfg: FederationConfig, party: PartyConfig) -> None:
    """The party's storage and raw exports never overlap where the coordinator reads.

    Its plaintext updates, mask secrets and (by default) keys live in its storage, its records
    in its raw exports: neither may equal or lie inside `coordinator_storage` or the exchange,
    however the launcher spells the location (file:// or a path, s3a:// or s3://, '//', '..').
    Nor may those lie inside the party's storage, where the party writes `updates/`, `secagg/`
    and `keys/` below it. Checked before any I/O, so a refusal has written nothing.
    """
    field = f"parameters.federation.parties[{party.name}]"
    storage = str(party.storage)
    refuse_coordinator_location(cfg, party.name, storage, f"{field}.storage")
    for split in ("train", "eval"):
        raw = getattr(party.raw, split)
        refuse_coordinator_location(cfg, party.name, raw, f"{field}.raw.{split}")
    for what, inner in (
        ("coordinator_storage", str(cfg.coordinator_storage)),
        ("exchange", str(cfg.exchange)),
    ):
        if is_inside(inner, storage):
            raise ConfigError(
                f"{party.name}: parameters.federation.{what}={inner} lies inside {field}.storage="
                f"{storage}, below which the party writes its plaintext updates, mask secrets and "
                f"keys. Fix: point {field}.storage at a location that neither contains nor lies "
                f"inside {what}"
            )


def consent(
    cfg: FederationConfig, party: PartyConfig, plan: FederationPlan | None = None
) -> tuple[KeyPairs, LoadedPolicy]:
    """The party's keys and policy, once the round is no weaker than the policy and pins hold."""
    refuse_coordinator_locations(cfg, party)
    loaded = enforce(cfg, party.name)
    # A pinned party never makes a key inside a round: only provisioning does.
    pinned = party.name in loaded.policy.pins.parties
    keys = load_party_keys(cfg, party, loaded, create=not pinned)
    check_pin(loaded, "party", party.name, keys.public_bundle().fingerprint)  # before publishing
    publish_public_keys(federation_exchange(cfg), keys.public_bundle())
    if plan is not None:
        check_pin(loaded, COORDINATOR, COORDINATOR, plan.coordinator_fingerprint)
    return keys, loaded
