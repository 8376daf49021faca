"""What a party does in its own cloud: train on its rows, seal its update, evaluate the global.

Every function here reads raw or harmonised rows only from the party's own storage and returns
references and numbers. The plaintext update is written to the party's storage and leaves it only
through `cloudfed.secure_party.upload`, protected per the policy and sealed to the coordinator.

Every party function first checks the run configuration against the party's own policy
(`cloudfed.party_policy`) and the keys it meets against the party's pins. Under any DP, what it
returns follows the release rules (README, Privacy budgets): no example count, no per-party
metric, keyed digests instead of hashes of its data.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from cloudfed.artifacts import (
    EvalRelease,
    FederationPlan,
    GlobalAdapterRef,
    LocalUpdateRef,
    PartyEval,
)
from cloudfed.data.ref import DatasetRef, redact, unavailable
from cloudfed.data.tokens import TokenCounter
from cloudfed.errors import CloudfedError, DataError, ProtectionError, SimulatedDropout
from cloudfed.exchange import (
    Exchange,
    federation_exchange,
    fetch_public_keys,
    metrics_key,
    publish_public_keys,
)
from cloudfed.federation import FederationConfig, PartyConfig
from cloudfed.party_policy import ConsentError, LoadedPolicy, check_pin, enforce, required_survivors
from cloudfed.protection import KeyPairs, SealContext, load_or_create_keys, seal
from cloudfed.protection.commitments import keyed_digest, matches
from cloudfed.training.adapter_io import state_from_bytes, state_to_bytes
from cloudfed.training.model import resolve_base_model

COORDINATOR = "coordinator"
# Released under DP: what a party's DP-SGD ledger says, nothing about its data or training.
RELEASED_UNDER_DP = ("dp_sgd_epsilon", "dp_sgd_delta")
# How far below its floor a party accepts the ledger's charged noise multiplier: the rounding
# slack of secure aggregation (about 1e-7) and CKKS grids (about 1e-3), not coarse settings.
CHARGED_SLACK = 0.01
# The metrics a party puts into the round's secure sum, in order. Training loss is not among
# them: it is an un-noised function of the training records that DP-SGD's epsilon does not cover.
METRIC_SLOTS = ("eval_nll", "eval_tokens")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_verified(path: Path, sha256: str, what: str, keys: KeyPairs | None = None) -> bytes:
    """Refuse to train or evaluate on a file that changed since it was registered.

    With `keys`, `sha256` is the party's keyed digest of the file (a redacted reference).
    """
    data = path.read_bytes()
    ok = matches(keys, data, what, sha256) if keys is not None else _sha256(data) == sha256
    if not ok:
        raise DataError(
            f"{path}: {what} changed since it was recorded (sha256 mismatch). Fix: re-run the "
            "pipeline so harmonisation and training see the same file."
        )
    return data


def load_global(exchange: Exchange, ref: GlobalAdapterRef) -> dict[str, np.ndarray]:
    """The global adapter, checked against the hash the coordinator recorded in its artifact."""
    data = exchange.get_bytes(ref.key)
    if _sha256(data) != ref.sha256:
        raise ProtectionError("global adapter rejected: hash mismatch")
    return state_from_bytes(data)


def read_rows(uri: str, sha256: str, keys: KeyPairs | None = None) -> pd.DataFrame:
    import io

    data = read_verified(Path(uri), sha256, "harmonised data", keys)
    rows = pd.read_parquet(io.BytesIO(data))
    if rows.empty:
        raise DataError(
            f"{uri}: no rows left after harmonisation. Fix: check the party's raw export and its "
            "quarantine file, or raise the contract's minimum row count so this is caught earlier."
        )
    return rows


def _rows(data: DatasetRef, split: str, keys: KeyPairs) -> pd.DataFrame:
    uri, digest = (
        (data.train_uri, data.train_sha256)
        if split == "train"
        else (data.eval_uri, data.eval_sha256)
    )
    return read_rows(uri, digest, keys if data.redacted else None)


def simulated_dropout(cfg: FederationConfig, party: str, stage: str, round: int) -> None:
    if cfg.simulate_dropouts.get(party) == stage:
        raise SimulatedDropout(f"{party} left round {round} at {stage} (simulate_dropouts)")


def party_keys(party: PartyConfig, exchange: Exchange) -> KeyPairs:
    """Generate the party's identity once, keep it in its storage, publish the public half."""
    keys = load_or_create_keys("party", party.name, Path(party.storage) / "keys")
    publish_public_keys(exchange, keys.public_bundle())
    return keys


def consent(
    cfg: FederationConfig, party: PartyConfig, plan: FederationPlan | None = None
) -> tuple[KeyPairs, LoadedPolicy]:
    """The party's keys and policy, once the round is no weaker than the policy and pins hold."""
    loaded = enforce(cfg, party.name)
    keys = load_or_create_keys("party", party.name, Path(party.storage) / "keys")
    check_pin(loaded, "party", party.name, keys.public_bundle().fingerprint)  # before publishing
    publish_public_keys(federation_exchange(cfg), keys.public_bundle())
    if plan is not None:
        check_pin(loaded, COORDINATOR, COORDINATOR, plan.coordinator_fingerprint)
    return keys, loaded


def release_dataset(cfg: FederationConfig, party: PartyConfig, ref: DatasetRef) -> DatasetRef:
    """The harmonise step's output: the full reference without DP, a redacted one with DP."""
    if not cfg.privacy.protects_records:
        return ref
    keys, _ = consent(cfg, party)
    return redact(
        ref,
        keyed_digest(keys, ref.train_sha256, "harmonised data"),
        keyed_digest(keys, ref.eval_sha256, "harmonised data"),
    )


def prepare_dataset(
    cfg: FederationConfig,
    party: PartyConfig,
    plan: FederationPlan | None,
    *,
    root: Path,
    run_id: str,
    count_tokens: TokenCounter,
) -> DatasetRef:
    """Consent, check the source as preflight does, harmonise, release: the outcome as a status.

    A missing file or a mapping that does not fit is a configuration error, found by the same
    check preflight runs (so the message is the same) and reported before a row is harmonised;
    rows failing their contract are a data outcome. Only the status tells the two apart once the
    step has run on a remote step operator, so nothing here raises them.
    """
    from cloudfed.data.harmonize import harmonize_party
    from cloudfed.preflight import check_party_source

    private = cfg.privacy.protects_records
    try:
        consent(cfg, party, plan)  # before reading a row: is this round acceptable?
    except ConsentError as exc:
        return unavailable(party.name, "refused", str(exc))
    try:
        check_party_source(cfg, party, root, private=private)
    except CloudfedError as exc:
        return unavailable(party.name, "config-error", str(exc))
    try:
        ref = harmonize_party(
            party,
            root=root,
            contracts_dir=Path(cfg.contracts_dir),
            count_tokens=count_tokens,
            run_id=run_id,
            private=private,
        )
    except DataError as exc:
        return unavailable(party.name, "data-failed", str(exc))
    return release_dataset(cfg, party, ref)


class LocalUpdateRecord(BaseModel):
    """The party's own record of an update; stays in its storage next to the update.

    A DP-SGD round whose Poisson batches all came out empty has no training loss (NaN): kept as
    NaN through JSON, not turned into a null that will not load.
    """

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    party: str
    round: int
    run_id: str
    uri: str
    sha256: str
    base_sha256: str
    examples: int
    train: dict[str, float | int | str]
    # The global version trained from: a buffered round's staleness is (round - 1) - base_round.
    base_round: int | None = None


def _record_path(uri: str) -> Path:
    return Path(uri).with_suffix(".json")


def load_local_update(
    party: PartyConfig, local: LocalUpdateRef, keys: KeyPairs
) -> tuple[LocalUpdateRecord, bytes]:
    """The party's record behind a reference, and the update's bytes checked against its digest."""
    record = LocalUpdateRecord.model_validate_json(_record_path(local.uri).read_bytes())
    if record.party != party.name or record.round != local.round:
        raise DataError(f"{local.uri}: the update record is not {party.name}'s of this round")
    return record, read_verified(Path(record.uri), local.sha256, "local update", keys)


def training_seed(seed: int, party: str, round: int) -> int:
    """One party's torch seed for one round: distinct per party and round, fixed by the config."""
    return seed * 1_000_003 + round * 7919 + int(_sha256(party.encode())[:6], 16)


def train_round(
    cfg: FederationConfig,
    party: PartyConfig,
    round: int,
    data: DatasetRef,
    global_ref: GlobalAdapterRef,
    plan: FederationPlan | None = None,
) -> LocalUpdateRef:
    from cloudfed.training.local import train_local

    simulated_dropout(cfg, party.name, "train", round)
    keys, loaded = consent(cfg, party, plan)
    exchange = federation_exchange(cfg)
    if cfg.privacy.enabled and plan is not None:
        _check_party_level_budget(cfg, loaded, exchange, plan, round)
    global_state = load_global(exchange, global_ref)
    rows = _rows(data, "train", keys)
    model_path = resolve_base_model(cfg.base_model, cache_dir=Path(cfg.model_cache), seed=cfg.seed)
    seed = training_seed(cfg.seed, party.name, round)
    path = Path(party.storage) / "updates" / f"r{round:04d}.safetensors"
    if party.name in cfg.privacy.dp_sgd:
        rounds_this_run = cfg.rounds - (plan.start_round if plan is not None else 0)
        return _train_dp_sgd(
            cfg,
            party,
            loaded,
            keys,
            round,
            rows,
            global_ref,
            global_state,
            model_path,
            seed,
            rounds_this_run,
            plan.run_id if plan is not None else "no-run",
        )
    delta, metrics = train_local(
        model_path,
        global_state,
        rows,
        training=cfg.training,
        lora=cfg.lora,
        seed=seed,
        proximal_mu=cfg.aggregation.proximal_mu,
        desc=f"{party.name} r{round}",
        rank=party.lora_rank,
    )
    return _keep_update(
        cfg, party, keys, round, path, delta, global_ref, metrics.examples, metrics.as_dict()
    )


def _check_party_level_budget(
    cfg: FederationConfig,
    loaded: LoadedPolicy,
    exchange: Exchange,
    plan: FederationPlan,
    round: int,
) -> None:
    """Party side of the budget: the round is reserved, and the party's own cap holds."""
    from cloudfed.party_policy import party_level_cap
    from cloudfed.privacy.ledger import verified_for_party

    coordinator = fetch_public_keys(
        exchange, "coordinator", COORDINATOR, fingerprint=loaded.policy.pins.coordinator
    )
    ledger = verified_for_party(
        exchange,
        coordinator,
        federation_id=cfg.federation_id,
        head_file=loaded.state_dir / "ledger_head.json",
    )
    entry = ledger.entry(f"{plan.run_id}/r{round:04d}")
    if entry is None or loaded.policy.party not in entry.parties:
        raise ConsentError(
            f"{loaded.policy.party} refuses round {round}: the privacy ledger holds no reservation "
            f"of it for {loaded.policy.party}"
            + (f" (only for {sorted(entry.parties)})" if entry is not None else "")
            + ", so its spend would go unaccounted"
        )
    floor = loaded.policy.privacy.min_noise_multiplier
    if floor is not None and entry.noise_multiplier < floor * (1 - CHARGED_SLACK):
        raise ConsentError(
            f"{loaded.policy.party} refuses round {round}: the ledger charges it at noise "
            f"multiplier {entry.noise_multiplier:.6g}, below privacy.min_noise_multiplier="
            f"{floor:g} in {loaded.path} (rounding slack beyond {CHARGED_SLACK:.0%}: coarse "
            "protection.secagg.bits or CKKS scale)"
        )
    cap = party_level_cap(cfg, loaded)
    spent = ledger.epsilon(party=loaded.policy.party)
    if cap is not None and spent > cap + 1e-9:
        raise ConsentError(
            f"{loaded.policy.party} refuses round {round}: its party-level epsilon would reach "
            f"{spent:.4g}, above {cap:g} (the stricter of privacy.max_epsilon and "
            f"privacy.max_epsilon in {loaded.path})"
        )


def _keep_update(
    cfg: FederationConfig,
    party: PartyConfig,
    keys: KeyPairs,
    round: int,
    path: Path,
    delta: dict[str, np.ndarray],
    global_ref: GlobalAdapterRef,
    examples: int,
    train: dict[str, float | int | str],
) -> LocalUpdateRef:
    payload = state_to_bytes(delta)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    record = LocalUpdateRecord(
        party=party.name,
        round=round,
        run_id=global_ref.run_id,
        uri=str(path),
        sha256=_sha256(payload),
        base_sha256=global_ref.sha256,
        examples=examples,
        train=train,
        base_round=global_ref.round,
    )
    _record_path(str(path)).write_text(record.model_dump_json(), encoding="utf-8")
    return _released(cfg, keys, record)


def _released(cfg: FederationConfig, keys: KeyPairs, record: LocalUpdateRecord) -> LocalUpdateRef:
    train = record.train
    if cfg.privacy.protects_records:
        train = {k: v for k, v in train.items() if k in RELEASED_UNDER_DP}
    return LocalUpdateRef(
        party=record.party,
        round=record.round,
        uri=record.uri,
        sha256=keyed_digest(keys, record.sha256, "local update"),
        base_sha256=record.base_sha256,
        train=train,
    )


def _train_dp_sgd(
    cfg: FederationConfig,
    party: PartyConfig,
    loaded: LoadedPolicy,
    keys: KeyPairs,
    round: int,
    rows: pd.DataFrame,
    global_ref: GlobalAdapterRef,
    global_state: dict[str, np.ndarray],
    model_path: str,
    seed: int,
    rounds_this_run: int,
    plan_run_id: str,
) -> LocalUpdateRef:
    """DP-SGD under the party's own ledger: charged before training, never twice per round.

    The ledger sits in the party's state folder (from its policy, not the run config) and counts
    every run and federation on the party's data; the cap is the stricter of the run config's and
    the policy's.
    """
    from cloudfed.party_policy import dp_sgd_cap
    from cloudfed.privacy import party_ledger
    from cloudfed.privacy.accountant import GaussianEvent, epsilon, noise_for_target
    from cloudfed.training.dp_sgd import train_local_dp

    dp = cfg.privacy.dp_sgd[party.name]
    sample_rate = dp.sample_rate or min(1.0, cfg.training.batch_size / len(rows))
    z = dp.noise_multiplier or noise_for_target(
        dp.target_epsilon or 0.0,
        dp.delta,
        sample_rate=sample_rate,
        steps=cfg.training.local_steps * cfg.rounds,
        accountant="rdp",
        what=f"privacy.dp_sgd.{party.name}.target_epsilon",
    )
    floor = loaded.policy.dp_sgd.min_noise_multiplier if loaded.policy.dp_sgd else None
    if floor is not None and z < floor:
        raise ConsentError(
            f"{party.name} refuses to train: DP-SGD noise multiplier {z:.4g} (from "
            f"privacy.dp_sgd.{party.name}) is below dp_sgd.min_noise_multiplier={floor:g} in "
            f"{loaded.path}"
        )
    event = GaussianEvent(z, sample_rate, cfg.training.local_steps)
    per_run = loaded.policy.dp_sgd.max_epsilon_per_run if loaded.policy.dp_sgd else None
    planned = epsilon([event] * rounds_this_run, dp.delta, "rdp")
    if per_run is not None and planned > per_run * (1 + 1e-9):
        raise ConsentError(
            f"{party.name} refuses to train: this run's {rounds_this_run} round(s) would spend "
            f"epsilon={planned:.4g} of its record-level budget, above "
            f"dp_sgd.max_epsilon_per_run={per_run:g} in {loaded.path}"
        )
    base_id = f"{cfg.federation_id}/{global_ref.run_id or 'no-run'}/r{round:04d}"
    ledger_file = party_ledger.ledger_path(loaded.state_dir)

    def update_path(entry_id: str) -> Path:  # one file per attempt: no attempt overwrites another
        return Path(party.storage) / "updates" / f"r{round:04d}-{_sha256(entry_id.encode())[:12]}"

    def kept(entry: Any) -> bool:
        record_file = update_path(entry.id).with_suffix(".json")
        if not record_file.exists():
            return False
        record = LocalUpdateRecord.model_validate_json(record_file.read_text(encoding="utf-8"))
        return record.base_sha256 == global_ref.sha256 and record.train.get("dp_sgd_entry") == (
            entry.id
        )

    with party_ledger.training_lock(loaded.state_dir, party.name):
        ledger, entry, hand_back = party_ledger.attempt(
            ledger_file,
            party=party.name,
            delta=dp.delta,
            max_epsilon=dp_sgd_cap(cfg, loaded),
            base_id=base_id,
            run_id=plan_run_id,
            round=round,
            event=event,
            kept=kept,
        )
        path = update_path(entry.id).with_suffix(".safetensors")
        if hand_back:  # a retry from the same adapter: the update already paid for, unchanged
            record = LocalUpdateRecord.model_validate_json(
                path.with_suffix(".json").read_text(encoding="utf-8")
            )
            return _released(cfg, keys, record)
        delta, metrics, run = train_local_dp(
            model_path,
            global_state,
            rows,
            training=cfg.training,
            lora=cfg.lora,
            seed=seed,
            noise_multiplier=z,
            max_grad_norm=dp.max_grad_norm,
            sample_rate=sample_rate,
            proximal_mu=cfg.aggregation.proximal_mu,
            desc=f"{party.name} r{round} DP-SGD",
            rank=party.lora_rank,
        )
        party_ledger.mark_spent(ledger_file, ledger, entry.id)
        train = {
            **metrics.as_dict(),
            "dp_sgd_entry": entry.id,
            "dp_sgd_epsilon": ledger.epsilon(),
            "dp_sgd_delta": dp.delta,
            "dp_sgd_noise_multiplier": z,
            "dp_sgd_sample_rate": sample_rate,
            "dp_sgd_max_grad_norm": dp.max_grad_norm,
            "dp_sgd_empty_batches": run.empty_batches,
        }
        return _keep_update(
            cfg, party, keys, round, path, delta, global_ref, metrics.examples, train
        )


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
    rows = _rows(data, "eval", keys)
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
    own = Path(party.storage) / "evals" / (global_ref.run_id or "no-run")
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
        sealed_sha256=_sha256(blob),
        fingerprint=keys.public_bundle().fingerprint,
    )


def metrics_context(
    cfg: FederationConfig,
    plan: FederationPlan,
    model: GlobalAdapterRef,
    party: str,
    evaluators: list[str],
) -> SealContext:
    """What a party's masked metrics are bound to; both ends build it the same way."""
    return SealContext(
        federation_id=cfg.federation_id,
        round=model.round,
        party=party,
        kind="metrics",
        metadata={"run_id": plan.run_id, "model_sha256": model.sha256, "evaluators": evaluators},
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
