"""Run protected rounds in-process, stage by stage, in the order `cloudfed.simulation` defines."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cloudfed import coordinator
from cloudfed.artifacts import FederationPlan, GlobalAdapterRef, LocalUpdateRef
from cloudfed.exchange import federation_exchange
from cloudfed.federation import FederationConfig, parse_federation
from cloudfed.party import LocalUpdateRecord, party_keys
from cloudfed.party_policy import provision
from cloudfed.protection.commitments import keyed_digest
from cloudfed.protection.messages import load_global
from cloudfed.protection.stages import protection_stages
from cloudfed.run_lock import release
from cloudfed.simulation import RoundState, run_stages
from cloudfed.training.adapter_io import state_to_bytes

Hook = Callable[[str, "Federation"], None]


def federation_dict(
    tmp_path: Path, model_cache: Path, names: Sequence[str], **overrides: Any
) -> dict[str, Any]:
    fed: dict[str, Any] = {
        "federation_id": "test-fed",
        "base_model": "builtin:tiny-llama",
        "model_cache": str(model_cache),
        "exchange": str(tmp_path / "exchange"),
        "coordinator_storage": str(tmp_path / "coordinator"),
        "rounds": 3,
        "min_parties": 2,
        "seed": 5,
        "training": {"local_steps": 1, "batch_size": 2, "max_seq_len": 64},
        "lora": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "parties": [
            {
                "name": name,
                "raw": {"train": f"raw/{name}/train.csv", "eval": f"raw/{name}/eval.csv"},
                "mapping": f"mappings/{name}.yaml",
                "storage": str(tmp_path / "clouds" / name),
            }
            for name in names
        ],
    }
    fed.update(overrides)
    return fed


def local_update(
    cfg: FederationConfig,
    run_id: str,
    base_sha256: str,
    name: str,
    round: int,
    state: dict[str, np.ndarray],
    examples: int,
    loss: float = 1.0,
    base_round: int | None = None,
) -> LocalUpdateRef:
    """What train_round leaves: the update and its record in party storage, a keyed ref."""
    payload = state_to_bytes(state)
    path = Path(cfg.party(name).storage) / "updates" / f"r{round:04d}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    record = LocalUpdateRecord(
        party=name,
        round=round,
        run_id=run_id,
        uri=str(path),
        sha256=sha,
        base_sha256=base_sha256,
        examples=examples,
        train={"loss_mean": loss},
        base_round=base_round,
    )
    path.with_suffix(".json").write_text(record.model_dump_json())
    keys = party_keys(cfg.party(name), federation_exchange(cfg))
    return LocalUpdateRef(
        party=name,
        round=round,
        uri=str(path),
        sha256=keyed_digest(keys, sha, "local update"),
        base_sha256=base_sha256,
        train={"loss_mean": loss},
    )


class Federation:
    """A prepared federation; `round()` runs every protection stage of one round."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.cfg: FederationConfig = parse_federation(raw)
        provision(self.cfg, force=True)  # every party accepts exactly this config, keys pinned
        self.plan: FederationPlan = coordinator.prepare(self.cfg)
        release(federation_exchange(self.cfg), self.plan.run_id)  # no pipeline ends this run
        self.exchange = federation_exchange(self.cfg)
        self.current: GlobalAdapterRef = self.plan.initial_adapter
        self.initial = load_global(self.exchange, self.current)
        self.losses: dict[str, float] = {}  # each party's training loss_mean (default 1.0)
        self.versions: dict[int, GlobalAdapterRef] = {self.current.round: self.current}

    def const(self, value: float) -> dict[str, np.ndarray]:
        return {k: np.full(v.shape, value, dtype=np.float32) for k, v in self.initial.items()}

    def local(
        self,
        name: str,
        round: int,
        state: dict[str, np.ndarray],
        examples: int,
        base: GlobalAdapterRef | None = None,
    ):
        """`base`: the adapter trained from (buffered rounds); the current one by default."""
        base = base or self.current
        return local_update(
            self.cfg,
            self.plan.run_id,
            base.sha256,
            name,
            round,
            state,
            examples,
            self.losses.get(name, 1.0),
            base.round,
        )

    def round(
        self,
        round: int,
        updates: dict[str, tuple[dict[str, np.ndarray], int]],
        *,
        drop: dict[str, str] | None = None,
        hook: Hook | None = None,
        bases: dict[str, int] | None = None,
    ):
        """Run one round's protection stages (`cloudfed.simulation`'s order) on given updates.

        `drop` maps party -> stage at which it silently stops; `hook(stage, fed)` runs after
        every stage, so a test can tamper with the exchange between two of them. `bases`
        (buffered rounds): party -> the published version its update was trained from.
        """
        bases = bases or {}
        local = {
            p: self.local(p, round, s, n, self.versions[bases[p]] if p in bases else None)
            for p, (s, n) in updates.items()
        }
        self.last_local = local
        state = RoundState(
            self.cfg,
            self.plan,
            self.exchange,
            round,
            self.current,
            list(local),
            drop=drop or {},
            local=local,
        )
        after = (lambda stage: hook(stage.value, self)) if hook else None
        run_stages(state, protection_stages(self.plan.protection["tensors"]), after=after)
        self.last_upload_rosters = state.upload_rosters
        assert state.new_ref is not None and state.report is not None
        new_ref, report = state.new_ref, state.report
        if self.cfg.aggregation.buffer is not None:  # later rounds accept updates from it
            self._publish(new_ref, report)
        self.current = self.versions[round] = new_ref
        return new_ref, report, state.sealed

    def _publish(self, new_ref: GlobalAdapterRef, report: Any) -> None:
        """The aggregate step's round record, under the run lock as in a pipeline."""
        from cloudfed import run_lock
        from cloudfed.federation_state import publish_round

        run_lock.acquire(self.exchange, self.plan.run_id, federation_id="f", timeout_minutes=60)
        try:
            publish_round(self.cfg, self.plan, new_ref, report.policy_sha256, report.aggregation)
        finally:
            release(self.exchange, self.plan.run_id)

    def global_state(self) -> dict[str, np.ndarray]:
        return load_global(self.exchange, self.current)

    def moved(self, **first_party: Any) -> FederationConfig:
        """This federation's config with fields of its first party changed, as a launcher could
        rewrite the run configuration (its storage or raw exports pointed elsewhere)."""
        raw = self.cfg.model_dump(mode="json")
        raw["parties"][0].update(first_party)
        return parse_federation(raw)


def random_updates(
    fed: Federation, examples: dict[str, int], seed: int = 0
) -> dict[str, tuple[dict[str, np.ndarray], int]]:
    """Distinct, random-looking updates (normal(0, 0.01)) per party and tensor, each with its
    party's example count; `seed` draws another set (another round, another run)."""
    out = {}
    for k, p in enumerate(examples):
        rng = np.random.default_rng(1000 * seed + k)
        state = {
            n: rng.normal(0.0, 0.01, fed.initial[n].shape).astype(np.float32)
            for n in sorted(fed.initial)
        }
        out[p] = (state, examples[p])
    return out


def accept_exactly(cfg: FederationConfig, party: str) -> Path:
    """Rewrite one party's policy so that it accepts exactly `cfg` (keys pinned as they are)."""
    import yaml

    from cloudfed.coordinator import coordinator_keys
    from cloudfed.party_policy import policy_for, policy_path

    exchange = federation_exchange(cfg)
    prints = {"coordinator": coordinator_keys(cfg, exchange).public_bundle().fingerprint}
    for p in cfg.active_parties:
        prints[p.name] = party_keys(p, exchange).public_bundle().fingerprint
    path = policy_path(party)
    doc = policy_for(cfg, party, prints).model_dump(mode="json", exclude_none=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def accept_anything(cfg: FederationConfig, party: str) -> Path:
    """A party whose policy accepts any privacy setting (its keys still pinned): lets a test reach
    the coordinator's own checks with an upload the party made under other settings."""
    import yaml

    from cloudfed.party_policy import PartyLevelFloor, load_policy

    path = accept_exactly(cfg, party)
    policy = load_policy(party).policy.model_copy(
        update={"privacy": PartyLevelFloor(max_delta=0.5), "dp_sgd": None}
    )
    path.write_text(yaml.safe_dump(policy.model_dump(mode="json", exclude_none=True)))
    return path
