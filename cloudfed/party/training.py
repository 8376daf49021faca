"""A party's local round: train on its own rows and keep the plaintext update in its storage.

The update never leaves here unprotected: it is recorded, hash-checked, for `sealing.upload`.
Under DP-SGD and party-level DP the party checks the ledger's charges against its own floors
before it trains, and what it returns says nothing about its data beyond the DP release.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from cloudfed.artifacts import FederationPlan, GlobalAdapterRef, LocalUpdateRef
from cloudfed.data.ref import DatasetRef
from cloudfed.errors import DataError
from cloudfed.exchange import Exchange, federation_exchange, fetch_public_keys
from cloudfed.federation import FederationConfig, PartyConfig
from cloudfed.locations import AnyPath, party_root, uri_path
from cloudfed.party.admission import consent, simulated_dropout
from cloudfed.party.data import read_verified, split_rows
from cloudfed.party_policy import ConsentError, LoadedPolicy
from cloudfed.protection import KeyPairs, messages
from cloudfed.protection.commitments import keyed_digest
from cloudfed.protection.messages import COORDINATOR, load_global
from cloudfed.training.adapter_io import state_to_bytes
from cloudfed.training.model import resolve_base_model

# Released under DP: what a party's DP-SGD ledger says, nothing about its data or training.
RELEASED_UNDER_DP = ("dp_sgd_epsilon", "dp_sgd_delta")


# How far below its floor a party accepts the ledger's charged noise multiplier: the rounding
# slack of secure aggregation (about 1e-7) and CKKS grids (about 1e-3), not coarse settings.
CHARGED_SLACK = 0.01


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


def _record_path(uri: str, party: PartyConfig) -> AnyPath:
    return uri_path(uri, party.storage_options).with_suffix(".json")


def load_local_update(
    party: PartyConfig, local: LocalUpdateRef, keys: KeyPairs
) -> tuple[LocalUpdateRecord, bytes]:
    """The party's record behind a reference, and the update's bytes checked against its digest."""
    record = LocalUpdateRecord.model_validate_json(_record_path(local.uri, party).read_bytes())
    if record.party != party.name or record.round != local.round:
        raise DataError(f"{local.uri}: the update record is not {party.name}'s of this round")
    update = uri_path(record.uri, party.storage_options)
    return record, read_verified(update, local.sha256, "local update", keys)


def training_seed(seed: int, party: str, round: int) -> int:
    """One party's torch seed for one round: distinct per party and round, fixed by the config."""
    return seed * 1_000_003 + round * 7919 + int(messages.sha256(party.encode())[:6], 16)


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
    rows = split_rows(data, "train", keys, party.storage_options)
    model_path = resolve_base_model(cfg.base_model, cache_dir=Path(cfg.model_cache), seed=cfg.seed)
    seed = training_seed(cfg.seed, party.name, round)
    path = party_root(party) / "updates" / f"r{round:04d}.safetensors"
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
    path: AnyPath,
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
        sha256=messages.sha256(payload),
        base_sha256=global_ref.sha256,
        examples=examples,
        train=train,
        base_round=global_ref.round,
    )
    path.with_suffix(".json").write_text(record.model_dump_json(), encoding="utf-8")
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

    def update_path(entry_id: str) -> AnyPath:  # one file per attempt: none overwrites another
        return (
            party_root(party)
            / "updates"
            / f"r{round:04d}-{messages.sha256(entry_id.encode())[:12]}"
        )

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
