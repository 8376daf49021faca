"""Round records and the run lock, without a pipeline: what continuing a federation rests on."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cloudfed import coordinator, run_lock
from cloudfed.errors import ConfigError, ProtectionError, StorageIntegrityError
from cloudfed.exchange import Exchange, federation_exchange
from cloudfed.federation import parse_federation
from cloudfed.federation_state import History, Lineage, check_continues, publish_round, record_key
from cloudfed.protection import load_or_create_keys
from tests.protected_support import federation_dict

NAMES = ("alpha-aws", "beta-gcp", "gamma-azure")


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def _cfg(tmp_path: Path, model_cache: Path, **overrides: Any):
    return parse_federation(federation_dict(tmp_path, model_cache, NAMES, **overrides))


def _prepare(cfg) -> Any:
    plan = coordinator.prepare(cfg)
    run_lock.release(federation_exchange(cfg), plan.run_id)
    return plan


def _publish(cfg, plan, round: int) -> None:
    """What the aggregate step does after a round: the adapter, then its record."""
    from cloudfed.coordinator import publish_global
    from cloudfed.protection.messages import load_global

    exchange = federation_exchange(cfg)
    state = load_global(exchange, plan.initial_adapter)
    new = publish_global(exchange, round, {k: v + round for k, v in state.items()}, plan.run_id)
    run_lock.acquire(exchange, plan.run_id, federation_id="f", timeout_minutes=60)
    try:  # as in a pipeline: the run holds the lock while it publishes
        publish_round(cfg, plan, new, plan.protection["policy_sha256"])
    finally:
        run_lock.release(exchange, plan.run_id)


def test_a_new_federation_starts_at_round_zero_and_a_rerun_continues(
    tmp_path: Path, model_cache: Path
) -> None:
    cfg = _cfg(tmp_path, model_cache, rounds=3)
    first = _prepare(cfg)
    assert (first.start_round, first.generation) == (0, 1)
    _publish(cfg, first, 1)
    _publish(cfg, first, 2)
    second = _prepare(cfg)
    assert (second.start_round, second.generation) == (2, 1)
    assert second.initial_adapter.key.startswith(f"runs/{first.run_id}/r0002/")
    assert second.run_id != first.run_id


def test_start_over_opens_a_new_generation_from_the_base_model(
    tmp_path: Path, model_cache: Path
) -> None:
    cfg = _cfg(tmp_path, model_cache)
    first = _prepare(cfg)
    _publish(cfg, first, 1)
    again = _prepare(_cfg(tmp_path, model_cache, start_over=True))
    assert (again.start_round, again.generation) == (0, 2)
    assert again.initial_adapter.sha256 == first.initial_adapter.sha256  # the same base adapter
    after = _prepare(cfg)  # a later plain run continues the new generation
    assert (after.start_round, after.generation) == (0, 2)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"lora": {"rank": 8, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}}, "lora.rank"),
        ({"lora": {"rank": 2, "alpha": 4, "target_modules": ["q_proj"]}}, "lora.target_modules"),
        ({"protection": {"default": "plaintext", "public_tensors": ["*"]}}, "protection"),
    ],
    ids=["lora-rank", "lora-targets", "protection"],
)
def test_continuing_refuses_a_changed_model_definition_naming_the_field(
    tmp_path: Path, model_cache: Path, change: dict[str, Any], field: str
) -> None:
    cfg = _cfg(tmp_path, model_cache)
    _publish(cfg, _prepare(cfg), 1)
    changed = _cfg(tmp_path, model_cache, **change)
    with pytest.raises(ConfigError, match=rf"trained with {field}") as info:
        coordinator.prepare(changed)
    assert "start_over: true" in str(info.value)
    # The refused run left no lock behind.
    assert run_lock.read_lock(federation_exchange(cfg)) is None


@pytest.mark.parametrize(
    "field, value, named",
    [("base_model", "org/other-model", "base_model"), ("aggregation", "fedadam", "aggregation")],
)
def test_every_lineage_field_names_its_config_field(field: str, value: str, named: str) -> None:
    before = Lineage(
        base_model="builtin:tiny-llama",
        lora_rank=4,
        lora_alpha=8.0,
        lora_target_modules=["q_proj"],
        parties=["a", "b"],
        protection="0" * 64,
        aggregation="fedavg",
    )
    from cloudfed.artifacts import GlobalAdapterRef
    from cloudfed.federation_state import RoundRecord

    last = RoundRecord(
        federation_id="f",
        generation=1,
        round=4,
        run_id="c" * 32,
        global_adapter=GlobalAdapterRef(round=4, key="k", sha256="0" * 64, bytes=1),
        lineage=before,
    )
    with pytest.raises(ConfigError, match=rf"at round 4, trained with {named} = "):
        check_continues(
            last, before.model_copy(update={field: value}), federation_id="f", source="x.yaml"
        )
    check_continues(last, before, federation_id="f", source="x.yaml")  # unchanged: continues


def test_continuing_refuses_changed_parties(tmp_path: Path, model_cache: Path) -> None:
    cfg = _cfg(tmp_path, model_cache)
    _publish(cfg, _prepare(cfg), 1)
    fewer = _cfg(tmp_path, model_cache, participants=[p.name for p in cfg.parties][:2])
    with pytest.raises(ConfigError, match=r"trained with parties"):
        coordinator.prepare(fewer)


def test_a_round_is_published_once(tmp_path: Path, model_cache: Path) -> None:
    cfg = _cfg(tmp_path, model_cache)
    plan = _prepare(cfg)
    _publish(cfg, plan, 1)
    with pytest.raises(ProtectionError, match="already published"):
        _publish(cfg, plan, 1)


def _forge(exchange: Exchange, key: str, data: bytes) -> None:
    """Write an object the way an adversary on the exchange would: bytes and their digest."""
    (Path(exchange.root) / key).write_bytes(data)
    (Path(exchange.root) / ".sha256" / key).write_text(hashlib.sha256(data).hexdigest())


def test_a_tampered_or_removed_record_is_refused(tmp_path: Path, model_cache: Path) -> None:
    cfg = _cfg(tmp_path, model_cache)
    plan = _prepare(cfg)
    _publish(cfg, plan, 1)
    _publish(cfg, plan, 2)
    exchange = federation_exchange(cfg)
    path = Path(exchange.root) / record_key(1, 2)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))  # a careless edit: the store's digest no longer matches
    with pytest.raises(StorageIntegrityError, match="do not match their sha256"):
        coordinator.prepare(cfg)
    _forge(
        exchange, record_key(1, 2), bytes(blob)
    )  # an adversary rewrites the digest too: the signature stops it
    with pytest.raises(ProtectionError, match="not signed by this coordinator"):
        coordinator.prepare(cfg)
    path.unlink()
    (Path(exchange.root) / record_key(1, 1)).unlink()
    _forge(exchange, record_key(1, 2), b"")  # a gap: round 1 removed
    with pytest.raises(ProtectionError, match="without gaps"):
        coordinator.prepare(cfg)


def test_a_record_signed_by_another_coordinator_is_refused(
    tmp_path: Path, model_cache: Path
) -> None:
    cfg = _cfg(tmp_path, model_cache)
    _publish(cfg, _prepare(cfg), 1)
    other = load_or_create_keys("coordinator", "coordinator", tmp_path / "other-keys")
    with pytest.raises(ProtectionError, match="not signed by this coordinator"):
        History(federation_exchange(cfg), other, cfg.federation_id).latest()


def test_a_changed_adapter_is_refused(tmp_path: Path, model_cache: Path) -> None:
    cfg = _cfg(tmp_path, model_cache)
    plan = _prepare(cfg)
    _publish(cfg, plan, 1)
    exchange = federation_exchange(cfg)
    key = f"runs/{plan.run_id}/r0001/global/adapter.safetensors"
    exchange.put_bytes(key, exchange.get_bytes(key) + b" ")
    with pytest.raises(ProtectionError, match="adapter of round 1 changed"):
        coordinator.prepare(cfg)


def test_the_coordinators_files_are_kept_per_federation(tmp_path: Path, model_cache: Path) -> None:
    a = _cfg(tmp_path, model_cache)
    b = _cfg(tmp_path, model_cache, federation_id="other-federation")
    assert a.coordinator_dir != b.coordinator_dir
    assert a.coordinator_dir.parent == b.coordinator_dir.parent
    assert (_prepare(a).start_round, _prepare(b).start_round) == (0, 0)


# --- the lock ------------------------------------------------------------------------------------


def _holder(pid: int, run_id: str = "b" * 32, **extra: Any) -> bytes:
    doc = {
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": pid,
        "started_at": "2026-01-01T00:00:00+00:00",
        "heartbeat_at": "2099-01-01T00:00:00+00:00",
    }
    return json.dumps(doc | extra).encode()


def test_a_live_holder_keeps_the_lock(tmp_path: Path) -> None:
    ex = Exchange(str(tmp_path))
    run_lock.acquire(ex, "a" * 32, federation_id="f", timeout_minutes=60)
    with pytest.raises(ConfigError, match=r"is being run by run a{32} .*make unlock"):
        run_lock.acquire(ex, "c" * 32, federation_id="f", timeout_minutes=60)
    run_lock.acquire(ex, "a" * 32, federation_id="f", timeout_minutes=60)  # its own: fine
    run_lock.release(ex, "c" * 32)  # another run's release touches nothing
    assert run_lock.read_lock(ex).run_id == "a" * 32
    run_lock.release(ex, "a" * 32)
    assert run_lock.read_lock(ex) is None


def test_a_killed_holders_lock_is_taken_over(tmp_path: Path, caplog) -> None:
    ex = Exchange(str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ex.put_bytes(run_lock.LOCK_KEY, _holder(dead.pid))
    with caplog.at_level("WARNING"):
        run_lock.acquire(ex, "a" * 32, federation_id="f", timeout_minutes=60)
    assert run_lock.read_lock(ex).run_id == "a" * 32
    assert f"its process {dead.pid}" in caplog.text and "no longer runs" in caplog.text


def test_a_reused_pid_is_not_the_holder(tmp_path: Path) -> None:
    """The pid is alive (ours) but started at another time: the holder is gone."""
    ex = Exchange(str(tmp_path))
    ex.put_bytes(run_lock.LOCK_KEY, _holder(os.getpid(), process_start="1"))
    run_lock.acquire(ex, "a" * 32, federation_id="f", timeout_minutes=60)
    assert run_lock.read_lock(ex).run_id == "a" * 32


def test_a_remote_holder_is_taken_over_only_after_its_heartbeat_expires(tmp_path: Path) -> None:
    ex = Exchange(str(tmp_path))
    ex.put_bytes(run_lock.LOCK_KEY, _holder(1, host="elsewhere"))
    with pytest.raises(ConfigError, match="is being run"):
        run_lock.acquire(ex, "a" * 32, federation_id="f", timeout_minutes=60)
    ex.put_bytes(
        run_lock.LOCK_KEY, _holder(1, host="elsewhere", heartbeat_at="2020-01-01T00:00:00+00:00")
    )
    run_lock.acquire(ex, "a" * 32, federation_id="f", timeout_minutes=60)
    assert run_lock.read_lock(ex).run_id == "a" * 32


def test_the_status_command_says_where_the_federation_stands(
    tmp_path: Path, model_cache: Path, capsys
) -> None:
    import yaml

    from cloudfed.federation_state import main

    raw = federation_dict(tmp_path, model_cache, NAMES, rounds=3)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"parameters": {"federation": raw}}))
    cfg = parse_federation(raw)
    plan = _prepare(cfg)
    _publish(cfg, plan, 1)
    assert main(["status", str(config)]) == 0
    out = capsys.readouterr().out
    assert "at round 1 (generation 1)" in out and "2 left for the next run" in out
    assert "lock: free" in out
    run_lock.acquire(federation_exchange(cfg), "d" * 32, federation_id="x", timeout_minutes=1)
    assert main(["status", str(config)]) == 0
    assert f"lock: held by run {'d' * 32}" in capsys.readouterr().out
    assert main(["unlock", str(config)]) == 0
    assert run_lock.read_lock(federation_exchange(cfg)) is None
    out = tmp_path / "start-over.yaml"
    assert main(["start-over-config", str(config), "--out", str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["parameters"]["federation"]["start_over"] is True
    assert doc["parameters"]["federation"]["rounds"] == 3


def test_a_retried_round_rounds_its_update_with_the_same_coins(tmp_path: Path) -> None:
    """Two attempts at one round must not give two independent roundings of one update."""
    import numpy as np

    from cloudfed.protection.commitments import keyed_seed
    from cloudfed.protection.hazmat.quantize import QuantSpec, quantize

    keys = load_or_create_keys("party", "alpha-aws", tmp_path / "a")
    other = load_or_create_keys("party", "beta-gcp", tmp_path / "b")
    spec = QuantSpec.for_parties(1.0, 3, 16)
    x = np.linspace(-0.9, 0.9, 1001)

    def words(k, context: str) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(keyed_seed(k, "secagg-dither", context)))
        return quantize(x, spec, rng)[0]

    assert np.array_equal(words(keys, "1:abc"), words(keys, "1:abc"))
    assert not np.array_equal(words(keys, "1:abc"), words(keys, "2:abc"))
    assert not np.array_equal(words(keys, "1:abc"), words(other, "1:abc"))


def test_the_exchange_cannot_roll_the_history_back(tmp_path: Path, model_cache: Path) -> None:
    """Adversary: the untrusted exchange, deleting the newest record or a whole generation."""
    cfg = _cfg(tmp_path, model_cache)
    plan = _prepare(cfg)
    _publish(cfg, plan, 1)
    _publish(cfg, plan, 2)
    root = Path(federation_exchange(cfg).root)
    newest = root / record_key(1, 2)
    kept = newest.read_bytes()
    newest.unlink()  # the tail: the federation would "continue" at round 2 again
    with pytest.raises(ProtectionError, match="rolled back"):
        coordinator.prepare(cfg)
    newest.write_bytes(kept)
    assert _prepare(cfg).start_round == 2
    again = _prepare(_cfg(tmp_path, model_cache, start_over=True))
    assert again.generation == 2
    for p in (root / "history" / "g0002").iterdir():  # a whole newer generation removed
        p.unlink()
    (root / "history" / "g0002").rmdir()
    with pytest.raises(ProtectionError, match="rolled back"):
        coordinator.prepare(cfg)


def test_a_round_is_not_published_twice_even_after_its_record_vanished(
    tmp_path: Path, model_cache: Path
) -> None:
    cfg = _cfg(tmp_path, model_cache)
    plan = _prepare(cfg)
    _publish(cfg, plan, 1)
    (Path(federation_exchange(cfg).root) / record_key(1, 1)).unlink()
    with pytest.raises(ProtectionError, match="does not publish round 1 of generation 1 again"):
        _publish(cfg, plan, 1)


def test_a_live_local_holder_is_never_taken_over_and_a_displaced_run_stops(tmp_path: Path) -> None:
    """Adversary: a launcher setting a tiny lock_timeout_minutes to run twice at once."""
    ex = Exchange(str(tmp_path))
    ex.put_bytes(run_lock.LOCK_KEY, _holder(os.getpid(), heartbeat_at="2020-01-01T00:00:00+00:00"))
    with pytest.raises(ConfigError, match="is being run"):
        run_lock.acquire(ex, "a" * 32, federation_id="f", timeout_minutes=0.001)
    ex.put_bytes(run_lock.LOCK_KEY, b"\x00garbage")  # the exchange cannot hold it hostage
    run_lock.acquire(ex, "a" * 32, federation_id="f", timeout_minutes=60)
    run_lock.heartbeat(ex, "a" * 32)
    ex.delete(run_lock.LOCK_KEY)  # removed by hand (make unlock) while the run goes on
    with pytest.raises(run_lock.LockLost, match="no longer holds"):
        run_lock.heartbeat(ex, "a" * 32)


def test_a_generation_with_no_trained_round_does_not_bind_a_fixed_config(
    tmp_path: Path, model_cache: Path
) -> None:
    """A first run that stopped before round 1 (say, on a typo) must not pin its settings."""
    cfg = _cfg(tmp_path, model_cache)
    assert _prepare(cfg).generation == 1  # round 0 only
    fixed = _cfg(tmp_path, model_cache, lora={"rank": 8, "alpha": 4, "target_modules": ["q_proj"]})
    plan = _prepare(fixed)
    assert (plan.generation, plan.start_round) == (2, 0)
    _publish(fixed, plan, 1)
    with pytest.raises(ConfigError, match="trained with lora.rank"):  # now it is bound
        coordinator.prepare(cfg)


@pytest.mark.parametrize("committed", [False, True])
def test_a_run_killed_after_charging_round_1_but_before_publishing_it_can_be_rerun(
    tmp_path: Path, model_cache: Path, committed: bool
) -> None:
    """The kill point between the ledger's charge (or commit) of round 1 and round 1's record:
    the last record is round 0, published with the never-saved ledger (version 0), which no saved
    version's chain names. The rerun must continue, charging nothing twice, not call it a fork."""
    from cloudfed.coordinator import coordinator_keys
    from cloudfed.privacy.budget import commit_round, load_ledger, reserve_round

    privacy = {"mode": "distributed", "clip": 0.1, "noise_multiplier": 1.0, "max_epsilon": 50.0}
    cfg = _cfg(tmp_path, model_cache, privacy=privacy)
    first = _prepare(cfg)
    exchange = federation_exchange(cfg)
    keys = coordinator_keys(cfg, exchange)
    parties = [p.name for p in cfg.active_parties]
    reserve_round(cfg, exchange, keys, first, 1, parties)
    if committed:
        commit_round(cfg, exchange, keys, first, 1, parties, 1.0, "0" * 64)
    charged = load_ledger(cfg, exchange, keys)
    assert charged.version == (2 if committed else 1)
    again = _prepare(cfg)  # raised "forked" (version 2) or IndexError (version 1) before
    assert again.start_round == 0 and again.generation == first.generation
    assert load_ledger(cfg, exchange, keys) == charged  # nothing charged or lost by the rerun


def test_a_forked_or_foreign_ledger_is_refused_at_every_recorded_version() -> None:
    """The coordinator's own check, played by whoever swaps both ledger copies: a ledger that
    does not pass through the head a round recorded (or another federation's empty ledger)."""
    from types import SimpleNamespace

    from cloudfed.federation_state import check_ledger
    from cloudfed.privacy.ledger import Ledger, LedgerEntry

    def entry(r: int) -> LedgerEntry:
        return LedgerEntry(
            id=f"run/r{r:04d}",
            run_id="run",
            round=r,
            mode="distributed",
            noise_multiplier=1.0,
            parties=["a", "b"],
            epsilon_after=1.0,
            at="now",
        )

    empty = Ledger(federation_id="f", delta=1e-5, accountant="rdp")
    v1 = Ledger(**{**empty.model_dump(), "entries": [entry(1)], "version": 1})
    v2 = Ledger(
        **{**v1.model_dump(), "entries": [entry(1), entry(2)], "version": 2, "chain": [v1.head()]}
    )
    at = lambda ledger, r: SimpleNamespace(  # noqa: E731
        round=r, ledger_version=ledger.version, ledger_head=ledger.head()
    )
    for record in (at(empty, 0), at(v1, 1), at(v2, 2)):
        check_ledger(record, v2)  # the honest history passes every recorded version
    fork = Ledger(**{**v2.model_dump(), "chain": ["f" * 64]})
    with pytest.raises(ProtectionError, match="forked"):
        check_ledger(at(v1, 1), fork)
    with pytest.raises(ProtectionError, match="rolled back"):
        check_ledger(at(v2, 2), v1)
    foreign = Ledger(federation_id="other", delta=1e-5, accountant="rdp")
    with pytest.raises(ProtectionError, match="another empty ledger"):
        check_ledger(at(foreign, 0), v2)
