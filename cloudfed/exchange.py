"""The exchange: where sealed updates, public keys and global adapters travel between clouds.

It is a folder locally and an object store prefix in clouds (s3://, gs://, abfs:// once the user
installs the matching fsspec backend). Nothing on it is trusted: payloads are sealed and public
keys are pinned by fingerprint, so this module only moves bytes and keeps keys inside the root.
"""

from __future__ import annotations

import re

from cloudfed.errors import ProtectionError
from cloudfed.federation import PARTY_NAME_PATTERN, FederationConfig
from cloudfed.protection.keys import ROLES, PublicKeyBundle
from cloudfed.storage import Store, validate_key

__all__ = ["Exchange", "Store", "validate_key"]


def _name(value: str, what: str) -> str:
    if not re.fullmatch(PARTY_NAME_PATTERN, value):
        raise ValueError(f"{what} {value!r} must match {PARTY_NAME_PATTERN}")
    return value


def _round_dir(run_id: str, round: int) -> str:
    """One folder per run and round.

    A round retried by a later run never meets the first attempt's messages, so nothing on the
    exchange is ever overwritten.
    """
    if round < 0:
        raise ValueError("round must be >= 0")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", run_id):
        raise ValueError(f"run id {run_id!r} must be 1-64 letters, digits, '-' or '_'")
    return f"runs/{run_id}/r{round:04d}"


def update_key(run_id: str, round: int, party: str) -> str:
    return f"{_round_dir(run_id, round)}/updates/{_name(party, 'party')}.sealed"


def global_adapter_key(run_id: str, round: int) -> str:
    return f"{_round_dir(run_id, round)}/global/adapter.safetensors"


def public_key_key(role: str, name: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return f"keys/{role}/{_name(name, 'name')}.json"


def federation_exchange(cfg: FederationConfig) -> Exchange:
    """Each federation gets its own prefix, so federations sharing an exchange never collide."""
    return Exchange(f"{str(cfg.exchange).rstrip('/')}/{cfg.federation_id}", cfg.exchange_options)


class Exchange(Store):
    """The federation's shared store: untrusted, so everything on it is sealed or pinned."""


def publish_public_keys(exchange: Exchange, bundle: PublicKeyBundle) -> str:
    key = public_key_key(bundle.role, bundle.name)
    exchange.put_bytes(key, bundle.model_dump_json(indent=2).encode())
    return key


def fetch_public_keys(
    exchange: Exchange, role: str, name: str, *, fingerprint: str | None = None
) -> PublicKeyBundle:
    """Pinning by `fingerprint` is what stops a swapped bundle on the untrusted exchange."""
    try:
        bundle = PublicKeyBundle.model_validate_json(exchange.get_bytes(public_key_key(role, name)))
    except ValueError as exc:
        raise ProtectionError("public key bundle rejected: malformed") from exc
    if bundle.role != role or bundle.name != name:
        raise ProtectionError("public key bundle rejected: owner mismatch")
    if fingerprint is not None and bundle.fingerprint != fingerprint:
        raise ProtectionError("public key bundle rejected: fingerprint mismatch")
    return bundle


def rotation_key(party: str) -> str:
    """One slot per party: its latest rotation statement, until a keys roster approves it."""
    return f"keys/rotations/party/{_name(party, 'party')}.json"


def secagg_advert_key(run_id: str, round: int, party: str) -> str:
    return f"{_round_dir(run_id, round)}/secagg/advertise/{_name(party, 'party')}.signed"


def secagg_roster_key(run_id: str, round: int, stage: str) -> str:
    return f"{_round_dir(run_id, round)}/secagg/roster-{_name(stage, 'stage')}.signed"


def secagg_share_key(run_id: str, round: int, holder: str, owner: str) -> str:
    """Shares sit in the holder's inbox; only the holder's key opens them."""
    inbox = f"{_round_dir(run_id, round)}/secagg/shares/{_name(holder, 'holder')}"
    return f"{inbox}/{_name(owner, 'owner')}.sealed"


def secagg_reveal_key(run_id: str, round: int, party: str) -> str:
    return f"{_round_dir(run_id, round)}/secagg/unmask/{_name(party, 'party')}.sealed"


def ckks_public_key(run_id: str, round: int) -> str:
    """Fresh CKKS keys every round: whatever one round's decryption leaks ends with the round."""
    return f"{_round_dir(run_id, round)}/ckks/public-context.signed"


def ckks_sum_key(run_id: str, round: int) -> str:
    return f"{_round_dir(run_id, round)}/ckks/sum.sealed"


def ckks_plain_sum_key(run_id: str, round: int) -> str:
    return f"{_round_dir(run_id, round)}/ckks/decrypted-sum.sealed"


def metrics_key(run_id: str, round: int, party: str) -> str:
    """A party's masked metrics about the global adapter of `round` (0 = the base model)."""
    return f"{_round_dir(run_id, round)}/metrics/{_name(party, 'party')}.sealed"
