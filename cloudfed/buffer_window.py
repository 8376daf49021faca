"""Which global adapters a buffered round accepts updates from: the coordinator's side.

A synchronous round accepts only updates trained from the current adapter. A buffered round
(`aggregation.buffer`) accepts one trained from any adapter this federation published in this
generation within the last `max_staleness` versions. The signed round records
(cloudfed.federation_state) are the list: the exchange is untrusted, so an adapter only counts if
the coordinator's own signature says it published it, and a continued run sees the versions
earlier runs published.
"""

from __future__ import annotations

from collections.abc import Mapping

from cloudfed.artifacts import FederationPlan, GlobalAdapterRef
from cloudfed.exchange import Exchange
from cloudfed.federation import FederationConfig
from cloudfed.protection.keys import KeyPairs


def published_versions(
    cfg: FederationConfig,
    exchange: Exchange,
    keys: KeyPairs,
    plan: FederationPlan,
    current: GlobalAdapterRef,
) -> dict[str, int]:
    """sha256 -> version of every adapter published in the plan's generation up to `current`."""
    from cloudfed.federation_state import history_of

    history = history_of(cfg, exchange, keys)
    versions = {current.sha256: current.round}
    for v in range(current.round - 1, -1, -1):
        try:
            record, _ = history.read(plan.generation, v)
        except FileNotFoundError:
            break
        versions.setdefault(record.global_adapter.sha256, v)
    return versions


def base_refusal(
    cfg: FederationConfig, base_sha256: object, versions: Mapping[str, int], round: int
) -> str | None:
    """Why an update trained from `base_sha256` may not join round `round`, or None."""
    buffer = cfg.aggregation.buffer
    assert buffer is not None
    version = versions.get(base_sha256) if isinstance(base_sha256, str) else None
    if version is None:
        return (
            "update was trained from a global adapter this federation did not publish in this "
            "generation (replayed, or another federation's)"
        )
    tau = (round - 1) - version
    if tau > buffer.max_staleness:
        return (
            f"update was trained from global version {version}: staleness {tau} exceeds "
            f"aggregation.buffer.max_staleness={buffer.max_staleness} (too stale, dropped)"
        )
    return None
