"""What may travel in the clear in a sealed or signed message's header, per message kind.

The exchange is readable by anyone with access to its bucket, so a header may carry routing and
binding only: which run, round, party and stage a message belongs to, which global adapter and
protection policy it was made under, who holds a share, who is in a sum. Anything that depends on
a party's data (clipping, counts, losses, noise levels) goes inside the encryption. The allow-list
is enforced where envelopes are made, so a new field cannot leak by accident: it must be added
here, with a reason, first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from cloudfed.federation import PARTY_NAME_PATTERN

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_NAME = re.compile(PARTY_NAME_PATTERN)
_STAGE = re.compile(r"^[a-z]{1,16}$")


def _is(pattern: re.Pattern[str]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and pattern.fullmatch(v) is not None


def _names(value: Any) -> bool:
    """A list of distinct party names (a repeated name would pad a count)."""
    return (
        isinstance(value, list)
        and all(_is(_NAME)(v) for v in value)
        and len(set(value)) == len(value)
    )


def _version(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# Key -> check of its value. Every value is public routing or a hash of something public.
_FIELDS: dict[str, Callable[[Any], bool]] = {
    "run_id": _is(_RUN_ID),  # the pipeline run: binds a message to one run (no replays)
    "base_sha256": _is(_HEX64),  # the published global adapter an update was trained from
    "policy_sha256": _is(_HEX64),  # the protection policy (layout) an update was made under
    "model_sha256": _is(_HEX64),  # the published global adapter a metrics release is about
    "adapter_sha256": _is(_HEX64),  # the global adapter a server state belongs to
    "stage": _is(_STAGE),  # which roster of a secure-aggregation round
    "holder": _is(_NAME),  # whose inbox a share is in
    "parties": _names,  # who is in a CKKS sum (the key party refuses too few)
    "evaluators": _names,  # who is in a metrics secure sum (each refuses too few)
    "version": _version,  # a ledger version, for the parties' anti-rollback check
}

ALLOWED: dict[str, frozenset[str]] = {
    "update": frozenset({"run_id", "base_sha256", "policy_sha256"}),
    "secagg-advert": frozenset({"run_id"}),
    "secagg-roster": frozenset({"run_id", "stage"}),
    "secagg-share": frozenset({"run_id", "holder"}),
    "secagg-reveal": frozenset({"run_id"}),
    "ckks-context": frozenset({"run_id"}),
    "ckks-sum": frozenset({"run_id", "parties"}),
    "ckks-plain-sum": frozenset({"run_id", "parties"}),
    "metrics": frozenset({"run_id", "model_sha256", "evaluators"}),
    "privacy-ledger": frozenset({"version"}),
    "round-record": frozenset(),
    "server-state": frozenset({"adapter_sha256"}),
}


def check_public_metadata(kind: str, metadata: Mapping[str, Any]) -> None:
    """Refuse a header field the kind does not allow, or an allowed one that is not routing."""
    allowed = ALLOWED.get(kind)
    if allowed is None:
        raise ValueError(
            f"message kind {kind!r} has no header allow-list; add it to "
            "cloudfed.protection.headers.ALLOWED with the routing fields it needs"
        )
    extra = sorted(set(metadata) - allowed)
    if extra:
        raise ValueError(
            f"{kind} message: header field(s) {extra} are not routing or binding and would be "
            "readable on the exchange; put them inside the encryption"
        )
    bad = sorted(k for k, v in metadata.items() if not _FIELDS[k](v))
    if bad:
        raise ValueError(f"{kind} message: header field(s) {bad} do not have a routing value")
