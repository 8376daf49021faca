"""A round's evaluation as the coordinator may log it: per party without DP, else only the sum.

Under DP it opens the evaluators' secure sum of metrics, refuses any per-party metric, and
withholds a round whose evaluators do not all report, rather than log a partial sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cloudfed.artifacts import EvalRelease, FederationPlan, GlobalAdapterRef, PartyEval
from cloudfed.coordinator.plan import coordinator_keys
from cloudfed.errors import ProtectionError
from cloudfed.exchange import federation_exchange, fetch_public_keys, metrics_key
from cloudfed.federation import FederationConfig
from cloudfed.protection.messages import METRIC_SLOTS, metrics_context


@dataclass(frozen=True)
class RoundEval:
    """A round's held-out (and training) metrics as the release rules let the coordinator see them.

    `released` is "per-party" without DP, "secure-sum" when every evaluator's masked share came
    in, "withheld" when one did not (the masks cannot be removed without it).
    """

    released: str
    loss: float = float("nan")
    tokens: float = 0.0
    evaluators: tuple[str, ...] = ()
    per_party: tuple[PartyEval, ...] = ()
    note: str = ""


def round_eval(
    cfg: FederationConfig,
    plan: FederationPlan,
    model: GlobalAdapterRef,
    releases: Sequence[EvalRelease],
) -> RoundEval:
    """Per-party metrics as released, or the unmasked sum of every evaluator's share."""
    evals = [r.metrics for r in releases if r.metrics is not None]
    if not cfg.privacy.protects_records:
        tokens = sum(e.tokens for e in evals)
        loss = sum(e.loss * e.tokens for e in evals) / tokens if tokens else float("nan")
        return RoundEval(
            "per-party",
            loss=loss,
            tokens=tokens,
            evaluators=tuple(sorted(e.party for e in evals)),
            per_party=tuple(evals),
        )
    if evals:
        raise ProtectionError("a party released per-party metrics under DP; refusing to log them")
    return _open_metrics_sum(cfg, plan, model, releases)


def _open_metrics_sum(
    cfg: FederationConfig,
    plan: FederationPlan,
    model: GlobalAdapterRef,
    releases: Sequence[EvalRelease],
) -> RoundEval:
    from cloudfed.protection import metrics_sum, open_sealed_with_metadata

    if not releases:
        return RoundEval("withheld", note="no party evaluated")
    expected = sorted(releases[0].evaluators)
    reported = sorted(r.party for r in releases)
    if reported != expected or any(sorted(r.evaluators) != expected for r in releases):
        missing = sorted(set(expected) - set(reported))
        return RoundEval(
            "withheld",
            evaluators=tuple(expected),
            note=f"not every evaluator reported (missing {missing}): the sum stays masked",
        )
    exchange = federation_exchange(cfg)
    keys = coordinator_keys(cfg, exchange)
    vectors = []
    for r in sorted(releases, key=lambda r: r.party):
        if (
            r.sealed_key != metrics_key(plan.run_id, model.round, r.party)
            or r.model_sha256 != model.sha256
        ):
            raise ProtectionError(f"metrics of {r.party} are not about this round's model")
        sender = fetch_public_keys(exchange, "party", r.party, fingerprint=r.fingerprint)
        context = metrics_context(cfg, plan, model, r.party, expected)
        opened = open_sealed_with_metadata(
            exchange.get_bytes(r.sealed_key), context=context, recipient=keys, sender=sender
        )
        vectors.append(opened.payload)
    total = dict(
        zip(METRIC_SLOTS, metrics_sum.unmasked_sum(vectors, len(METRIC_SLOTS)), strict=True)
    )
    return RoundEval(
        "secure-sum",
        loss=total["eval_nll"] / total["eval_tokens"] if total["eval_tokens"] > 0 else float("nan"),
        tokens=total["eval_tokens"],
        evaluators=tuple(expected),
    )
