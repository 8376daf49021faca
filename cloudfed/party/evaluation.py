"""A party evaluates the global adapter on its own rows and releases what the privacy rules allow.

Without record-level DP a party reports its own loss and token count. Under DP its metrics go
only into a secure sum over the round's evaluators (masked words sealed to the coordinator), so
the coordinator learns the federation's metric and never one party's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cloudfed.artifacts import EvalRelease, FederationPlan, GlobalAdapterRef, PartyEval
from cloudfed.data.ref import DatasetRef
from cloudfed.exchange import federation_exchange, fetch_public_keys, metrics_key
from cloudfed.federation import FederationConfig, PartyConfig
from cloudfed.locations import party_root
from cloudfed.party.admission import consent
from cloudfed.party.data import split_rows
from cloudfed.party_policy import ConsentError, LoadedPolicy, required_survivors
from cloudfed.protection import KeyPairs, messages, seal
from cloudfed.protection.messages import COORDINATOR, METRIC_SLOTS, load_global, metrics_context
from cloudfed.training.model import resolve_base_model


def evaluate_round(
    cfg: FederationConfig,
    party: PartyConfig,
    data: DatasetRef,
    global_ref: GlobalAdapterRef,
    plan: FederationPlan | None = None,
    evaluators: list[str] | None = None,
) -> EvalRelease:
    """Held-out metrics of the global adapter: released per party without DP, else masked.

    Under DP the party puts its metrics (and its training metrics of this round) into the
    round's secure sum over `evaluators`, keeps its own copy in its storage, and releases nothing
    else about them.
    """
    from cloudfed.training.local import evaluate

    start = time.perf_counter()
    keys, loaded = consent(cfg, party, plan)
    adapter = load_global(federation_exchange(cfg), global_ref)
    rows = split_rows(data, "eval", keys, party.storage_options)
    model_path = resolve_base_model(cfg.base_model, cache_dir=Path(cfg.model_cache), seed=cfg.seed)
    m = evaluate(model_path, adapter, rows, training=cfg.training, lora=cfg.lora, seed=cfg.seed)
    metrics = PartyEval(
        party=party.name,
        round=global_ref.round,
        loss=m.loss,
        perplexity=m.perplexity,
        tokens=m.tokens,
        examples=m.examples,
        seconds=time.perf_counter() - start,
    )
    names = sorted(evaluators or [party.name])
    if len(set(names)) != len(names):
        raise ConsentError(f"{party.name} refuses an evaluator list with repeated names: {names}")
    if not cfg.privacy.protects_records:
        return EvalRelease(
            party=party.name,
            round=global_ref.round,
            model_sha256=global_ref.sha256,
            evaluators=names,
            seconds=metrics.seconds,
            metrics=metrics,
        )
    own = party_root(party) / "evals" / (global_ref.run_id or "no-run")
    own.mkdir(parents=True, exist_ok=True)
    (own / f"r{global_ref.round:04d}.json").write_text(metrics.model_dump_json(), encoding="utf-8")
    if plan is None:
        raise ConsentError(f"{party.name}: a metrics release under DP needs the federation plan")
    values = [m.loss * m.tokens, float(m.tokens)]
    key, blob = _release_metrics(
        cfg, party, keys, loaded, plan, global_ref, names, values, eval_split=data.eval_sha256
    )
    return EvalRelease(
        party=party.name,
        round=global_ref.round,
        model_sha256=global_ref.sha256,
        evaluators=names,
        seconds=0.0,  # evaluation time grows with the eval split: not released under DP
        sealed_key=key,
        sealed_sha256=messages.sha256(blob),
        fingerprint=keys.public_bundle().fingerprint,
    )


def _release_metrics(
    cfg: FederationConfig,
    party: PartyConfig,
    keys: KeyPairs,
    loaded: LoadedPolicy,
    plan: FederationPlan,
    model: GlobalAdapterRef,
    evaluators: list[str],
    values: list[float],
    *,
    eval_split: str,
) -> tuple[str, bytes]:
    """Masked and sealed, only ever in a sum over one evaluator list per eval split.

    Two sums over different lists (across rounds, runs or models that behave alike) would
    difference to the values of the parties in one list and not the other; with one list for
    the life of the party's eval split, every sum it joins covers the same parties. The list
    must hold at least `colluding` + 2 parties, so that colluders who subtract their own values
    still face a sum of two.
    """
    from cloudfed.protection import metrics_sum

    colluding = max(cfg.privacy.colluding, loaded.policy.privacy.min_colluding)
    need = max(required_survivors(cfg, loaded), colluding + 2)
    if party.name not in evaluators or len(set(evaluators)) < need:
        raise ConsentError(
            f"{party.name} refuses to release metrics in a sum over {evaluators}: it must be in "
            f"it and the sum must cover at least {need} parties (its own minimum, and two more "
            "than the colluding parties it allows for)"
        )
    exchange = federation_exchange(cfg)
    bundles = {}
    for name in evaluators:
        pinned = loaded.policy.pins.parties.get(name)
        if pinned is None:
            raise ConsentError(f"{party.name} refuses a metrics sum with unpinned {name!r}")
        bundles[name] = fetch_public_keys(exchange, "party", name, fingerprint=pinned)
    record_file = loaded.state_dir / "metrics_releases.json"
    released = json.loads(record_file.read_text()) if record_file.exists() else {}
    earlier = released.get(eval_split)
    if earlier is not None and earlier != evaluators:
        raise ConsentError(
            f"{party.name} already released metrics on this eval split in sums over {earlier}; "
            f"a sum over {evaluators} could be differenced against them, so it releases none "
            "(new eval data starts afresh)"
        )
    binding = {
        "federation_id": cfg.federation_id,
        "run_id": plan.run_id,
        "round": model.round,
        "model_sha256": model.sha256,
        "evaluators": evaluators,
        "slots": list(METRIC_SLOTS),
    }
    body = metrics_sum.masked(values, me=keys, evaluators=bundles, binding=binding)
    context = metrics_context(cfg, plan, model, party.name, evaluators)
    coordinator = fetch_public_keys(
        exchange, COORDINATOR, COORDINATOR, fingerprint=loaded.policy.pins.coordinator
    )
    blob = seal(body, context=context, sender=keys, recipient=coordinator)
    released[eval_split] = evaluators
    loaded.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    record_file.write_text(json.dumps(released, sort_keys=True), encoding="utf-8")
    key = metrics_key(plan.run_id, model.round, party.name)
    exchange.put_bytes(key, blob)
    return key, blob
