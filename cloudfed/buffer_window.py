"""Which global adapters a buffered round accepts updates from: the coordinator's side.

A synchronous round accepts only updates trained from the current adapter. A buffered round
(`aggregation.buffer`) accepts one trained from any adapter this federation published in this
generation within the last `max_staleness` versions. The signed round records
(cloudfed.federation_state) are the list: the exchange is untrusted, so an adapter only counts if
the coordinator's own signature says it published it, and a continued run sees the versions
earlier runs published.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from cloudfed.aggregation.fedbuff import Schedule, schedule_for
from cloudfed.artifacts import FederationPlan, GlobalAdapterRef, Rejection
from cloudfed.exchange import Exchange
from cloudfed.federation import FederationConfig
from cloudfed.protection.keys import KeyPairs

logger = logging.getLogger(__name__)


def round_schedule(cfg: FederationConfig, start: int, parties: Sequence[str]) -> Schedule | None:
    """Buffered rounds' virtual clock over the parties that passed harmonisation; None if sync."""
    if cfg.aggregation.buffer is None:
        return None
    return schedule_for(cfg, start_round=start, parties=parties)


def senders(
    schedule: Schedule | None, r: int, parties: Sequence[str], dropped: list[Rejection]
) -> dict[str, int]:
    """Who sends an update in round r, by the global version it trains from.

    Synchronous: everyone, from r-1. Buffered: the event's arrivals; each trains at its event,
    from the version its virtual start saw (deterministic, so as if it had trained then), and
    updates staler than max_staleness are not trained at all (nothing spent on what would be
    refused): they are appended to `dropped`. The pipeline and `cloudfed.simulation` both call it.
    """
    if schedule is None:
        return {p: r - 1 for p in parties}
    event = schedule.event(r)
    for a in event.dropped:
        why = f"update from global version {a.base} would be {a.staleness} versions stale"
        logger.warning("round %d: %s dropped: %s (buffer.max_staleness)", r, a.party, why)
        dropped.append(Rejection(party=a.party, reason=f"{why}, above max_staleness; not sent"))
    return {a.party: a.base for a in event.arrivals}


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
