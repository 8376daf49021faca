"""Coordinator and party exchange with real sealing: prepare, upload, aggregate, reject.

These run the protected round under the all-plaintext policy (every tensor declared public), so
the weighted mean is exact and the envelope-level checks are tested on their own; the secagg and
CKKS stages have their own tests (test_protected_round.py).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cloudfed import coordinator, party
from cloudfed.artifacts import FederationPlan, LocalUpdateRef, Rejection, SealedUpdateRef
from cloudfed.data.ref import DatasetRef, ValidationSummary
from cloudfed.errors import AggregationError, ConfigError, DataError
from cloudfed.exchange import (
    federation_exchange,
    global_adapter_key,
    public_key_key,
    update_key,
)
from cloudfed.federation import FederationConfig, parse_federation
from cloudfed.party import sealing
from cloudfed.party_policy import provision
from cloudfed.protection.messages import load_global
from cloudfed.run_lock import release
from cloudfed.training.adapter_io import state_from_bytes
from tests.protected_support import local_update

NAMES = ("alpha-aws", "beta-gcp", "gamma-azure")


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache per module, so the tiny model is built once here."""
    return tmp_path_factory.mktemp("models")


def make_cfg(tmp_path: Path, model_cache: Path, *, min_parties: int = 2) -> FederationConfig:
    return parse_federation(
        {
            "federation_id": "test-fed",
            "base_model": "builtin:tiny-llama",
            "model_cache": str(model_cache),
            "exchange": str(tmp_path / "exchange"),
            "coordinator_storage": str(tmp_path / "coordinator"),
            "rounds": 3,
            "min_parties": min_parties,
            "seed": 5,
            "training": {"local_steps": 1, "batch_size": 2, "max_seq_len": 64},
            "lora": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
            "protection": {"default": "plaintext", "public_tensors": ["*"]},
            "parties": [
                {
                    "name": name,
                    "raw": {"train": f"raw/{name}/train.csv", "eval": f"raw/{name}/eval.csv"},
                    "mapping": f"mappings/{name}.yaml",
                    "storage": str(tmp_path / "clouds" / name),
                }
                for name in NAMES
            ],
        }
    )


class Fed:
    """A prepared federation in tmp_path with helpers to publish known updates."""

    def __init__(self, tmp_path: Path, model_cache: Path, *, min_parties: int = 2) -> None:
        self.cfg = make_cfg(tmp_path, model_cache, min_parties=min_parties)
        provision(self.cfg, force=True)
        self.plan: FederationPlan = coordinator.prepare(self.cfg)
        release(federation_exchange(self.cfg), self.plan.run_id)  # no pipeline ends this run
        self.exchange = federation_exchange(self.cfg)
        self.initial = load_global(self.exchange, self.plan.initial_adapter)
        self.base = self.plan.initial_adapter.sha256  # what parties trained from

    def const(self, value: float) -> dict[str, np.ndarray]:
        return {k: np.full(v.shape, value, dtype=np.float32) for k, v in self.initial.items()}

    def local(
        self, name: str, round: int, state: dict[str, np.ndarray], examples: int
    ) -> LocalUpdateRef:
        return local_update(self.cfg, self.plan.run_id, self.base, name, round, state, examples)

    def export(
        self, name: str, round: int, state: dict[str, np.ndarray], examples: int
    ) -> SealedUpdateRef:
        return party.upload(
            self.cfg,
            self.cfg.party(name),
            self.local(name, round, state, examples),
            self.plan,
            [],
            [],
        )

    def aggregate(self, round: int, sealed: list[SealedUpdateRef], current, **kw):
        new_ref, report = coordinator.aggregate_protected(
            self.cfg, round, sealed, current, self.plan, **kw
        )
        self.base = new_ref.sha256
        return new_ref, report

    def standard_round(self, round: int = 1) -> list[SealedUpdateRef]:
        """Deltas 1, 2, 4 with example counts 1, 1, 2: weighted mean 11/4 = 2.75."""
        return [
            self.export(NAMES[0], round, self.const(1.0), 1),
            self.export(NAMES[1], round, self.const(2.0), 1),
            self.export(NAMES[2], round, self.const(4.0), 2),
        ]

    def expect_global(self, ref, delta: float) -> None:
        got = load_global(self.exchange, ref)
        assert sorted(got) == sorted(self.initial)
        for k, v in self.initial.items():
            # float32 of w * x on the wire: equal to a few ulps, not bit for bit
            np.testing.assert_allclose(got[k], v + np.float32(delta), rtol=2e-7, atol=1e-6)

    def flip_byte(self, key: str, where: int) -> None:
        blob = bytearray(self.exchange.get_bytes(key))
        blob[where] ^= 0x01
        self.exchange.put_bytes(key, bytes(blob))


@pytest.fixture
def fed(tmp_path: Path, model_cache: Path) -> Fed:
    return Fed(tmp_path, model_cache)


def reasons(report) -> dict[str, str]:
    return {r.party: r.reason for r in report.rejected}


# --- prepare ---------------------------------------------------------------------------------


def test_prepare_publishes_round_zero_adapter_and_keys(fed: Fed) -> None:
    plan = fed.plan
    ref = plan.initial_adapter
    assert ref.round == 0 and ref.key == global_adapter_key(fed.plan.run_id, 0)
    data = fed.exchange.get_bytes(ref.key)
    assert hashlib.sha256(data).hexdigest() == ref.sha256
    assert len(data) == ref.bytes
    state = state_from_bytes(data)
    assert plan.adapter_parameters == sum(v.size for v in state.values()) > 0
    assert all(not np.any(v) for k, v in state.items() if "lora_B" in k)
    assert plan.parties == list(NAMES)
    assert plan.fingerprint == fed.cfg.fingerprint()
    bundle_key = public_key_key("coordinator", "coordinator")
    assert fed.exchange.exists(bundle_key)
    assert plan.coordinator_fingerprint in fed.exchange.get_bytes(bundle_key).decode()


# --- aggregation -----------------------------------------------------------------------------


def test_aggregate_is_exact_weighted_mean(fed: Fed) -> None:
    sealed = fed.standard_round(1)
    new_ref, report = fed.aggregate(1, sealed, fed.plan.initial_adapter)
    assert new_ref.round == 1 and new_ref.key == global_adapter_key(fed.plan.run_id, 1)
    fed.expect_global(new_ref, 2.75)
    assert report.accepted == sorted(NAMES)
    assert report.rejected == []
    assert report.weights == pytest.approx({NAMES[0]: 0.25, NAMES[1]: 0.25, NAMES[2]: 0.5})
    assert sum(report.weights.values()) == pytest.approx(1.0)
    on_exchange = sum(len(fed.exchange.get_bytes(r.key)) for r in sealed)
    assert report.bytes_received == sum(r.bytes_sent for r in sealed) == on_exchange
    n = sum(v.size for v in fed.initial.values())
    assert report.update_norm == pytest.approx(2.75 * np.sqrt(n), rel=1e-6)


def test_sealed_updates_hide_the_plaintext(fed: Fed) -> None:
    marker = fed.const(123.5)
    ref = fed.export(NAMES[0], 1, marker, 3)
    blob = fed.exchange.get_bytes(ref.key)
    assert ref.plaintext_bytes == 4 * sum(v.size for v in marker.values())
    assert np.float32(123.5).tobytes() * 4 not in blob
    assert ref.sender_fingerprint != fed.plan.coordinator_fingerprint


def test_tampered_update_is_rejected_and_round_goes_on(fed: Fed) -> None:
    sealed = fed.standard_round(1)
    blob_len = len(fed.exchange.get_bytes(sealed[1].key))
    fed.flip_byte(sealed[1].key, blob_len // 2)
    new_ref, report = fed.aggregate(1, sealed, fed.plan.initial_adapter)
    assert report.accepted == [NAMES[0], NAMES[2]]
    assert set(reasons(report)) == {NAMES[1]}
    assert reasons(report)[NAMES[1]] == "sealed update rejected: signature invalid"
    # (1 * 1.0 + 2 * 4.0) / 3 = 3.0
    fed.expect_global(new_ref, 3.0)
    assert report.weights == pytest.approx({NAMES[0]: 1 / 3, NAMES[2]: 2 / 3})
    assert report.bytes_received == sealed[0].bytes_sent + sealed[2].bytes_sent


def test_too_few_valid_updates_publishes_nothing(fed: Fed) -> None:
    sealed = fed.standard_round(1)
    blob_len = len(fed.exchange.get_bytes(sealed[0].key))
    fed.flip_byte(sealed[0].key, blob_len - 3)
    wrong = sealed[1].model_copy(update={"sender_fingerprint": sealed[2].sender_fingerprint})
    with pytest.raises(AggregationError) as info:
        fed.aggregate(1, [sealed[0], wrong, sealed[2]], fed.plan.initial_adapter)
    message = str(info.value)
    assert NAMES[0] in message and NAMES[1] in message
    assert "No model was published" in message
    assert "min_parties=2" in message
    assert not fed.exchange.exists(global_adapter_key(fed.plan.run_id, 1))
    assert fed.exchange.list(f"runs/{fed.plan.run_id}/r0001/global") == []


def test_missing_sealed_update_is_rejected(fed: Fed) -> None:
    sealed = fed.standard_round(1)
    blob = Path(fed.exchange.root) / sealed[0].key
    blob.unlink()
    new_ref, report = fed.aggregate(1, sealed, fed.plan.initial_adapter)
    assert reasons(report) == {NAMES[0]: "sealed update missing"}
    fed.expect_global(new_ref, (2.0 + 2 * 4.0) / 3)


def test_ref_pointing_elsewhere_on_the_exchange_is_rejected(fed: Fed) -> None:
    sealed = fed.standard_round(1)
    moved = sealed[0].model_copy(update={"key": update_key(fed.plan.run_id, 1, NAMES[1])})
    _, report = fed.aggregate(1, [moved, sealed[1], sealed[2]], fed.plan.initial_adapter)
    assert reasons(report)[NAMES[0]].startswith("unexpected exchange key")


def test_replay_into_next_round_is_rejected(fed: Fed) -> None:
    round1 = fed.standard_round(1)
    ref1, _ = fed.aggregate(1, round1, fed.plan.initial_adapter)
    fresh = [
        fed.export(NAMES[0], 2, fed.const(1.0), 1),
        fed.export(NAMES[1], 2, fed.const(2.0), 1),
    ]
    old = round1[2]
    key2 = update_key(fed.plan.run_id, 2, NAMES[2])
    fed.exchange.put_bytes(key2, fed.exchange.get_bytes(old.key))
    replayed = old.model_copy(update={"round": 2, "key": key2})
    ref2, report = fed.aggregate(2, [*fresh, replayed], ref1)
    assert report.accepted == [NAMES[0], NAMES[1]]
    assert set(reasons(report)) == {NAMES[2]}
    assert reasons(report)[NAMES[2]] == "sealed update rejected: context mismatch"
    got = load_global(fed.exchange, ref2)
    for k, v in fed.initial.items():
        np.testing.assert_array_equal(got[k], (v + np.float32(2.75)) + np.float32(1.5))


def test_ref_for_another_round_is_rejected(fed: Fed) -> None:
    sealed = fed.standard_round(1)
    _, report = fed.aggregate(
        2,
        [fed.export(NAMES[0], 2, fed.const(1.0), 1), fed.export(NAMES[1], 2, fed.const(2.0), 1)]
        + [sealed[2]],
        fed.plan.initial_adapter,
    )
    assert reasons(report) == {NAMES[2]: "update is for round 1, not 2"}


def test_wrong_sender_fingerprint_is_rejected(fed: Fed) -> None:
    sealed = fed.standard_round(1)
    forged = sealed[0].model_copy(update={"sender_fingerprint": fed.plan.coordinator_fingerprint})
    new_ref, report = fed.aggregate(1, [forged, sealed[1], sealed[2]], fed.plan.initial_adapter)
    assert set(reasons(report)) == {NAMES[0]}
    assert "fingerprint mismatch" in reasons(report)[NAMES[0]]
    fed.expect_global(new_ref, (2.0 + 2 * 4.0) / 3)


def test_duplicate_update_is_rejected_and_counted_once(fed: Fed) -> None:
    sealed = fed.standard_round(1)
    new_ref, report = fed.aggregate(1, [*sealed, sealed[2]], fed.plan.initial_adapter)
    assert report.accepted == sorted(NAMES)
    assert [(r.party, r.reason) for r in report.rejected] == [
        (NAMES[2], "duplicate update for this round")
    ]
    fed.expect_global(new_ref, 2.75)
    assert report.weights[NAMES[2]] == pytest.approx(0.5)
    assert report.bytes_received == sum(s.bytes_sent for s in sealed)


def _bad_update(fed: Fed, kind: str) -> tuple[dict[str, np.ndarray], str]:
    names = sorted(fed.initial)
    bad = fed.const(1.0)
    if kind in ("nan", "inf"):
        bad[names[0]] = bad[names[0]].copy()
        bad[names[0]].flat[0] = np.nan if kind == "nan" else -np.inf
        return bad, f"non-finite values in {names[0]}"
    if kind == "shape":
        bad[names[1]] = np.ones((3, 3), dtype=np.float32)
        return bad, f"shape mismatch for {names[1]}: (3, 3) != "
    if kind == "magnitude":
        return fed.const(sealing.MAX_ABS_UPDATE * 10), "magnitude 1e+04 exceeds"
    del bad[names[-1]]
    return bad, f"missing tensor(s): {names[-1]}"


@pytest.mark.parametrize("kind", ["nan", "inf", "shape", "magnitude", "missing"])
def test_invalid_update_is_refused_by_its_party_and_round_goes_on(
    tmp_path: Path, model_cache: Path, kind: str
) -> None:
    """Under masks or encryption nobody else could inspect it, so the party checks its own."""
    fed = Fed(tmp_path, model_cache)
    bad, reason = _bad_update(fed, kind)
    with pytest.raises(DataError, match=re.escape(reason)):
        fed.export(NAMES[0], 1, bad, 1)
    assert not fed.exchange.exists(update_key(fed.plan.run_id, 1, NAMES[0]))
    sealed = [
        fed.export(NAMES[1], 1, fed.const(2.0), 1),
        fed.export(NAMES[2], 1, fed.const(4.0), 2),
    ]
    dropped = [Rejection(party=NAMES[0], reason="dropped at upload: invalid update")]
    new_ref, report = fed.aggregate(1, sealed, fed.plan.initial_adapter, dropped=dropped)
    assert report.accepted == sorted(NAMES[1:])
    assert reasons(report)[NAMES[0]].startswith("dropped at upload")
    fed.expect_global(new_ref, 10.0 / 3.0)


@pytest.mark.parametrize("kind", ["nan", "inf", "magnitude"])
def test_forged_public_values_are_rejected_by_the_coordinator(
    tmp_path: Path, model_cache: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A party that skips its own check is still caught where values are visible (plaintext)."""
    fed = Fed(tmp_path, model_cache)
    bad, _ = _bad_update(fed, kind)
    monkeypatch.setattr(sealing, "check_update", lambda *a, **k: None)
    sealed = [
        fed.export(NAMES[0], 1, bad, 1000),
        fed.export(NAMES[1], 1, fed.const(2.0), 1),
        fed.export(NAMES[2], 1, fed.const(4.0), 2),
    ]
    new_ref, report = fed.aggregate(1, sealed, fed.plan.initial_adapter)
    assert report.accepted == sorted(NAMES[1:])
    assert "in the public tensors" in reasons(report)[NAMES[0]]
    fed.expect_global(new_ref, 10.0 / 3.0)


def _with_norm_bound(fed: Fed, bound: float) -> None:
    fed.cfg = fed.cfg.model_copy(
        update={"aggregation": fed.cfg.aggregation.model_copy(update={"max_update_norm": bound})}
    )


def test_a_party_clips_its_own_update_to_the_norm_bound(tmp_path: Path, model_cache: Path) -> None:
    """Under masks nobody else could: a long update enters scaled to the bound, not as it is."""
    fed = Fed(tmp_path, model_cache)
    size = sum(v.size for v in fed.initial.values())
    bound = 0.5 * np.sqrt(size)  # the norm of a constant-0.5 update
    _with_norm_bound(fed, float(bound))
    sealed = [
        fed.export(NAMES[0], 1, fed.const(8.0), 1),  # norm 16x the bound: scaled to 0.5
        fed.export(NAMES[1], 1, fed.const(0.25), 1),  # inside the bound: as it is
    ]
    new_ref, report = fed.aggregate(1, sealed, fed.plan.initial_adapter)
    assert report.accepted == sorted(NAMES[:2])
    fed.expect_global(new_ref, (0.5 + 0.25) / 2)


def test_an_unclipped_public_update_is_rejected_by_the_coordinator(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A party that skips its clipping is caught where values are visible; the round goes on."""
    fed = Fed(tmp_path, model_cache)
    size = sum(v.size for v in fed.initial.values())
    _with_norm_bound(fed, float(np.sqrt(size)))  # the norm of a constant-1 update
    monkeypatch.setattr(sealing, "clip_to_norm", lambda update, bound: (update, False))
    sealed = [
        fed.export(NAMES[0], 1, fed.const(3.0), 1),
        fed.export(NAMES[1], 1, fed.const(1.0), 1),
        fed.export(NAMES[2], 1, fed.const(0.5), 1),
    ]
    new_ref, report = fed.aggregate(1, sealed, fed.plan.initial_adapter)
    assert report.accepted == sorted(NAMES[1:])
    assert "exceeds aggregation.max_update_norm" in reasons(report)[NAMES[0]]
    fed.expect_global(new_ref, 0.75)


def test_update_from_another_run_is_rejected(tmp_path: Path, model_cache: Path) -> None:
    fed = Fed(tmp_path, model_cache)
    sealed = fed.standard_round(1)
    other_run = coordinator.prepare(fed.cfg)  # a re-run: same keys, same round-0 adapter
    release(federation_exchange(fed.cfg), other_run.run_id)
    assert other_run.run_id != fed.plan.run_id
    assert other_run.initial_adapter.sha256 == fed.plan.initial_adapter.sha256
    with pytest.raises(AggregationError, match="another run"):
        coordinator.aggregate_protected(fed.cfg, 1, sealed, other_run.initial_adapter, other_run)


def test_min_parties_one_is_refused(tmp_path: Path, model_cache: Path) -> None:
    with pytest.raises(ConfigError, match="min_parties"):
        make_cfg(tmp_path, model_cache, min_parties=1)


# --- party side ------------------------------------------------------------------------------


def _dataset_ref(name: str, path: Path, sha: str) -> DatasetRef:
    return DatasetRef(
        party=name,
        train_uri=str(path),
        eval_uri=str(path),
        train_sha256=sha,
        eval_sha256=sha,
        rows_read=4,
        rows_accepted=4,
        rows_quarantined=0,
        rows_train=4,
        rows_eval=4,
        quarantine_uri=str(path.with_name("quarantine.parquet")),
        contract_sha256="0" * 64,
        validation=ValidationSummary(suite="s", success=True, evaluated=1, successful=1),
    )


def test_train_round_refuses_changed_parquet(fed: Fed) -> None:
    name = NAMES[0]
    storage = Path(fed.cfg.party(name).storage)
    storage.mkdir(parents=True, exist_ok=True)
    path = storage / "harmonised.parquet"
    pd.DataFrame(
        {"instruction": [f"q{i}" for i in range(4)], "response": [f"a{i}" for i in range(4)]}
    ).to_parquet(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    p = fed.cfg.party(name)

    bad = _dataset_ref(name, path, "f" * 64)
    with pytest.raises(DataError, match="sha256 mismatch"):
        party.train_round(fed.cfg, p, 1, bad, fed.plan.initial_adapter)
    assert not (storage / "updates").exists()

    # The same file with the recorded hash trains: the hash is what refused it above.
    local = party.train_round(
        fed.cfg, p, 1, _dataset_ref(name, path, sha), fed.plan.initial_adapter
    )
    assert local.party == name and local.round == 1
    assert "examples" not in local.model_dump()  # the count stays with the party
    update = state_from_bytes(Path(local.uri).read_bytes())
    assert sorted(update) == sorted(fed.initial)
    # The released digest is keyed: not the file's plain hash, which outsiders could test.
    plain = hashlib.sha256(Path(local.uri).read_bytes()).hexdigest()
    assert local.sha256 != plain
    record, _ = party.load_local_update(p, local, party.party_keys(p, fed.exchange))
    assert record.sha256 == plain and record.examples == 4


def test_empty_harmonised_split_is_a_data_error(fed: Fed) -> None:
    name = NAMES[1]
    storage = Path(fed.cfg.party(name).storage)
    storage.mkdir(parents=True, exist_ok=True)
    path = storage / "empty.parquet"
    empty = pd.Series([], dtype=str)
    pd.DataFrame({"instruction": empty, "response": empty}).to_parquet(path)
    ref = _dataset_ref(name, path, hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(DataError, match="no rows left after harmonisation"):
        party.evaluate_round(fed.cfg, fed.cfg.party(name), ref, fed.plan.initial_adapter)
