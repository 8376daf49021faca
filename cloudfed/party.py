"""What a party does in its own cloud: train on its rows, seal its update, evaluate the global.

Every function here reads raw or harmonised rows only from the party's own storage and returns
references and numbers. The plaintext update is written to the party's storage and leaves it only
through `cloudfed.secure_party.upload`, protected per the policy and sealed to the coordinator.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cloudfed.artifacts import GlobalAdapterRef, LocalUpdateRef, PartyEval
from cloudfed.data.ref import DatasetRef
from cloudfed.errors import DataError, ProtectionError, SimulatedDropout
from cloudfed.exchange import (
    Exchange,
    federation_exchange,
    publish_public_keys,
)
from cloudfed.federation import FederationConfig, PartyConfig
from cloudfed.protection import load_or_create_keys
from cloudfed.training.adapter_io import state_from_bytes, state_to_bytes
from cloudfed.training.model import resolve_base_model

COORDINATOR = "coordinator"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_verified(path: Path, sha256: str, what: str) -> bytes:
    """Refuse to train or evaluate on a file that changed since it was registered."""
    data = path.read_bytes()
    if _sha256(data) != sha256:
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


def read_rows(uri: str, sha256: str) -> pd.DataFrame:
    import io

    rows = pd.read_parquet(io.BytesIO(read_verified(Path(uri), sha256, "harmonised data")))
    if rows.empty:
        raise DataError(
            f"{uri}: no rows left after harmonisation. Fix: check the party's raw export and its "
            "quarantine file, or raise the contract's minimum row count so this is caught earlier."
        )
    return rows


def simulated_dropout(cfg: FederationConfig, party: str, stage: str, round: int) -> None:
    if cfg.simulate_dropouts.get(party) == stage:
        raise SimulatedDropout(f"{party} left round {round} at {stage} (simulate_dropouts)")


def party_keys(party: PartyConfig, exchange: Exchange):
    """Generate the party's identity once, keep it in its storage, publish the public half."""
    keys = load_or_create_keys("party", party.name, Path(party.storage) / "keys")
    publish_public_keys(exchange, keys.public_bundle())
    return keys


def train_round(
    cfg: FederationConfig,
    party: PartyConfig,
    round: int,
    data: DatasetRef,
    global_ref: GlobalAdapterRef,
) -> LocalUpdateRef:
    from cloudfed.training.local import train_local

    simulated_dropout(cfg, party.name, "train", round)
    exchange = federation_exchange(cfg)
    global_state = load_global(exchange, global_ref)
    rows = read_rows(data.train_uri, data.train_sha256)
    model_path = resolve_base_model(cfg.base_model, cache_dir=Path(cfg.model_cache), seed=cfg.seed)
    seed = cfg.seed * 1_000_003 + round * 7919 + int(_sha256(party.name.encode())[:6], 16)
    path = Path(party.storage) / "updates" / f"r{round:04d}.safetensors"
    if party.name in cfg.privacy.dp_sgd:
        return _train_dp_sgd(cfg, party, round, rows, global_ref, global_state, model_path, seed)
    delta, metrics = train_local(
        model_path,
        global_state,
        rows,
        training=cfg.training,
        lora=cfg.lora,
        seed=seed,
        desc=f"{party.name} r{round}",
    )
    return _keep_update(party, round, path, delta, global_ref, metrics.examples, metrics.as_dict())


def _keep_update(
    party: PartyConfig,
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
    ref = LocalUpdateRef(
        party=party.name,
        round=round,
        uri=str(path),
        sha256=_sha256(payload),
        base_sha256=global_ref.sha256,
        examples=examples,
        train=train,
    )
    path.with_suffix(".json").write_text(ref.model_dump_json(), encoding="utf-8")
    return ref


def _train_dp_sgd(
    cfg: FederationConfig,
    party: PartyConfig,
    round: int,
    rows: pd.DataFrame,
    global_ref: GlobalAdapterRef,
    global_state: dict[str, np.ndarray],
    model_path: str,
    seed: int,
) -> LocalUpdateRef:
    """DP-SGD under the party's own ledger: charged before training, never twice per round."""
    from cloudfed.privacy import party_ledger
    from cloudfed.privacy.accountant import GaussianEvent, noise_for_target
    from cloudfed.training.dp_sgd import train_local_dp

    dp = cfg.privacy.dp_sgd[party.name]
    sample_rate = min(1.0, cfg.training.batch_size / len(rows))
    z = dp.noise_multiplier or noise_for_target(
        dp.target_epsilon or 0.0,
        dp.delta,
        sample_rate=sample_rate,
        steps=cfg.training.local_steps * cfg.rounds,
        accountant="rdp",
        what=f"privacy.dp_sgd.{party.name}.target_epsilon",
    )
    event = GaussianEvent(z, sample_rate, cfg.training.local_steps)
    entry_id = f"{global_ref.run_id or 'no-run'}/r{round:04d}"
    path = Path(party.storage) / "updates" / f"r{round:04d}.safetensors"
    ledger_file = party_ledger.ledger_path(party.storage)
    ledger, charged = party_ledger.reserve(
        ledger_file,
        party=party.name,
        federation_id=cfg.federation_id,
        settings=dp,
        entry_id=entry_id,
        round=round,
        event=event,
    )
    kept = path.with_suffix(".json")
    if charged and kept.exists():  # a retried step: hand back the update already paid for
        ref = LocalUpdateRef.model_validate_json(kept.read_text(encoding="utf-8"))
        if ref.base_sha256 == global_ref.sha256 and ref.train.get("dp_sgd_entry") == entry_id:
            return ref
    delta, metrics, run = train_local_dp(
        model_path,
        global_state,
        rows,
        training=cfg.training,
        lora=cfg.lora,
        seed=seed,
        noise_multiplier=z,
        max_grad_norm=dp.max_grad_norm,
        desc=f"{party.name} r{round} DP-SGD",
    )
    party_ledger.mark_spent(ledger_file, ledger, entry_id)
    train = {
        **metrics.as_dict(),
        "dp_sgd_entry": entry_id,
        "dp_sgd_epsilon": ledger.epsilon(),
        "dp_sgd_delta": dp.delta,
        "dp_sgd_noise_multiplier": z,
        "dp_sgd_sample_rate": sample_rate,
        "dp_sgd_max_grad_norm": dp.max_grad_norm,
        "dp_sgd_empty_batches": run.empty_batches,
    }
    return _keep_update(party, round, path, delta, global_ref, metrics.examples, train)


def evaluate_round(
    cfg: FederationConfig, party: PartyConfig, data: DatasetRef, global_ref: GlobalAdapterRef
) -> PartyEval:
    from cloudfed.training.local import evaluate

    start = time.perf_counter()
    adapter = load_global(federation_exchange(cfg), global_ref)
    rows = read_rows(data.eval_uri, data.eval_sha256)
    model_path = resolve_base_model(cfg.base_model, cache_dir=Path(cfg.model_cache), seed=cfg.seed)
    m = evaluate(model_path, adapter, rows, training=cfg.training, lora=cfg.lora, seed=cfg.seed)
    return PartyEval(
        party=party.name,
        round=global_ref.round,
        loss=m.loss,
        perplexity=m.perplexity,
        tokens=m.tokens,
        examples=m.examples,
        seconds=time.perf_counter() - start,
    )
