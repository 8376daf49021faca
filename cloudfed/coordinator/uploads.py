"""Opening what the parties uploaded: sealed, bound to this round, within the public bounds.

An upload that fails to open, is bound to another round or run, or breaks a public bound is
rejected with a reason, and the round goes on without it (or aborts below the minimum).

Each upload is opened once per round: the first stage that needs it (the inputs roster, or the
CKKS sum) verifies and decrypts it and keeps the opened sections, owner-only, in the
coordinator's own storage; later stages of the round read that copy instead of the exchange. The
coordinator's view of an upload is fixed when it first verified it: bytes put on the exchange
after that are never read. What is kept is what the coordinator sees anyway (masked words,
CKKS ciphertexts, tensors the policy declares public), and the round's copies are removed once
its aggregate is published.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloudfed import buffer_window
from cloudfed.aggregation.guard import MAX_ABS_UPDATE
from cloudfed.aggregation.strategy import mean_from_sums, norm
from cloudfed.artifacts import FederationPlan, GlobalAdapterRef, Rejection, SealedUpdateRef
from cloudfed.errors import ProtectionError
from cloudfed.exchange import Exchange, fetch_public_keys, update_key
from cloudfed.federation import FederationConfig
from cloudfed.locations import AnyPath, remove_tree, write_private
from cloudfed.privacy.party_level import calibration
from cloudfed.protection import open_sealed_with_metadata
from cloudfed.protection import payload as container
from cloudfed.protection.keys import KeyPairs
from cloudfed.protection.messages import stage_context, strategy_of
from cloudfed.protection.policy import Layout

logger = logging.getLogger(__name__)


@dataclass
class Upload:
    party: str
    sections: dict[str, bytes]
    clipped: int
    bytes: int


def open_upload(
    cfg: FederationConfig,
    exchange: Exchange,
    keys: KeyPairs,
    ref: SealedUpdateRef,
    *,
    round: int,
    run_id: str,
    base_sha256: str,
    layout: Layout,
    bases: Mapping[str, int] | None = None,
) -> Upload:
    """Open and check one party's upload; raises ValueError/ProtectionError with the reason.

    `bases` (buffered rounds): every adapter version the round accepts updates from.
    """
    if ref.round != round:
        raise ValueError(f"update is for round {ref.round}, not {round}")
    if ref.key != update_key(run_id, round, ref.party):
        raise ValueError(
            f"unexpected exchange key {ref.key!r}: not this run's upload for round {round} "
            "(another run's, or moved)"
        )
    sender = fetch_public_keys(exchange, "party", ref.party, fingerprint=ref.sender_fingerprint)
    opened = open_sealed_with_metadata(
        exchange.get_bytes(ref.key),
        context=stage_context(cfg, round, ref.party, "update"),
        recipient=keys,
        sender=sender,
    )
    meta = opened.metadata
    if meta.get("run_id") != run_id:
        raise ValueError("update belongs to another run of this federation (replay)")
    if bases is not None:
        why = buffer_window.base_refusal(cfg, meta.get("base_sha256"), bases, round)
        if why is not None:
            raise ValueError(why)
    elif meta.get("base_sha256") != base_sha256:
        raise ValueError("update was trained from another global adapter (stale or replayed)")
    if meta.get("policy_sha256") != layout.policy_sha256:
        raise ValueError("update was protected under another protection policy")
    sections = container.unpack(opened.payload)
    try:
        meta = json.loads(sections.pop("meta", b"{}"))
    except ValueError:
        raise ValueError("update metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise ValueError("update metadata is not a mapping")
    if set(sections) != set(layout.modes):
        raise ValueError(f"update carries sections {sorted(sections)}, not {list(layout.modes)}")
    slots = strategy_of(cfg, layout).n_slots
    if (seg := layout.segment("secagg")) is not None and len(sections["secagg"]) != 4 * (
        seg.size + slots
    ):
        raise ValueError("masked vector has the wrong length")
    if (seg := layout.segment("plaintext")) is not None:
        expected = seg.size + (slots if len(layout.segments) == 1 else 0)
        if len(sections["plaintext"]) != 4 * expected:
            raise ValueError("plaintext section has the wrong length")
        values = np.frombuffer(sections["plaintext"], dtype="<f4")
        if not np.all(np.isfinite(values)):
            raise ValueError("non-finite values in the public tensors")
        if values.size and float(np.max(np.abs(values))) > MAX_ABS_UPDATE:
            raise ValueError(f"magnitude above {MAX_ABS_UPDATE:.3g} in the public tensors")
        bound = cfg.aggregation.max_update_norm
        length = _public_norm(strategy_of(cfg, layout), seg, values, alone=expected > seg.size)
        if bound is not None and length > bound * (1 + 1e-5):
            raise ValueError(  # the party's norm itself stays out of the logged reason
                f"the public tensors' norm exceeds aggregation.max_update_norm {bound:.4g}; the "
                "party skipped its own clipping"
            )
    if cfg.privacy.enabled:  # the party must have clipped and noised as this round requires
        if meta.get("dp_mode") != cfg.privacy.mode or meta.get("dp_clip") != cfg.privacy.clip:
            raise ValueError(
                f"update was made under privacy mode {meta.get('dp_mode')!r} with clip "
                f"{meta.get('dp_clip')!r}, not {cfg.privacy.mode!r} with {cfg.privacy.clip!r}"
            )
        want = calibration(cfg).party_std if cfg.privacy.mode == "distributed" else None
        got = meta.get("dp_party_std")
        if want is not None and not (isinstance(got, float) and got >= want * (1 - 1e-9)):
            raise ValueError(
                f"update carries a noise share of std {got!r}, below this round's {want:.6g}; "
                "the sum would hold less noise than the ledger charges"
            )
    clipped = meta.get("clipped", 0)
    return Upload(
        ref.party,
        sections,
        int(clipped) if isinstance(clipped, int) else 0,
        len(opened.payload),
    )


def _public_norm(strategy: Any, seg: Any, values: np.ndarray, *, alone: bool) -> float:
    """The norm of the party's own update, where its weights travelled too (x = w x / w).

    Elsewhere only w x is visible, whose norm bounds the update's from below (weights <= 1).
    """
    weighted = seg.unflatten(values[: seg.size].astype(np.float64))
    if alone and np.all(values[seg.size :] > 0):
        weighted = mean_from_sums(weighted, values[seg.size :].astype(np.float64), strategy.slots)
    return norm(weighted)


def verified_uploads(
    cfg: FederationConfig,
    exchange: Exchange,
    keys: KeyPairs,
    sealed: Sequence[SealedUpdateRef],
    *,
    round: int,
    plan: FederationPlan,
    current: GlobalAdapterRef,
    layout: Layout,
    only: Sequence[str] | None,
    consume: Callable[[Upload], None] | None = None,
) -> tuple[dict[str, Upload], list[Rejection]]:
    """The round's uploads that verified, by party, and the rejected ones with their reasons.

    `consume` sees each verified upload as soon as it is opened and may take sections out of it
    (the running secure sum takes the masked words), so a round never holds n full updates.
    """
    out: dict[str, Upload] = {}
    rejected: list[Rejection] = []
    bases = (
        buffer_window.published_versions(cfg, exchange, keys, plan, current)
        if cfg.aggregation.buffer is not None
        else None
    )
    for ref in sorted(sealed, key=lambda r: r.party):
        if only is not None and ref.party not in only:
            continue
        if ref.party in out:
            rejected.append(Rejection(party=ref.party, reason="duplicate update for this round"))
            continue
        kept = opened_dir(cfg, plan.run_id, round) / f"{ref.party}.opened"
        if kept.exists():  # verified earlier this round: the coordinator's own copy
            out[ref.party] = _read_kept(kept, ref.party)
            if consume is not None:
                consume(out[ref.party])
            continue
        try:
            out[ref.party] = open_upload(
                cfg,
                exchange,
                keys,
                ref,
                round=round,
                run_id=plan.run_id,
                base_sha256=current.sha256,
                layout=layout,
                bases=bases,
            )
            _keep(kept, out[ref.party])
            if consume is not None:
                consume(out[ref.party])
        except (ProtectionError, ValueError, FileNotFoundError) as exc:
            reason = "sealed update missing" if isinstance(exc, FileNotFoundError) else str(exc)
            logger.warning("round %d: rejected update from %s: %s", round, ref.party, reason)
            rejected.append(Rejection(party=ref.party, reason=reason))
    return out, rejected


def opened_dir(cfg: FederationConfig, run_id: str, round: int) -> AnyPath:
    return cfg.coordinator_dir / "opened" / run_id / f"r{round:04d}"


def forget_opened(cfg: FederationConfig, run_id: str, round: int) -> None:
    """Once the round's aggregate is published, its opened uploads are of no further use."""
    remove_tree(opened_dir(cfg, run_id, round))


def _keep(path: AnyPath, upload: Upload) -> None:
    meta = json.dumps({"clipped": upload.clipped, "bytes": upload.bytes}).encode()
    write_private(path, container.pack({**upload.sections, "meta": meta}))


def _read_kept(path: AnyPath, party: str) -> Upload:
    sections = container.unpack(path.read_bytes())
    meta = json.loads(sections.pop("meta"))
    return Upload(party, sections, int(meta["clipped"]), int(meta["bytes"]))
