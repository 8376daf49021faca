"""`cloudfed.locations`: configured locations as paths, over the one storage API.

A `StorePath` is exercised over a local Store here (the same code path an object store takes);
the S3 federation test runs it against moto.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cloudfed.federation import PartyConfig
from cloudfed.locations import (
    StorePath,
    fetched,
    is_remote,
    join,
    location,
    on_disk,
    raw_on_disk,
    remove_tree,
    replace_bytes,
    uri_path,
    write_private,
)
from cloudfed.privacy import party_ledger
from cloudfed.storage import open_store


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def bucket(tmp_path: Path) -> StorePath:
    """A StorePath whose backend happens to be a folder, so the test needs no server."""
    return StorePath(open_store(str(tmp_path / "bucket")))


def test_plain_paths_and_file_urls_stay_paths(tmp_path: Path) -> None:
    assert location("a/b") == Path("a/b")
    assert location(f"file://{tmp_path}") == tmp_path
    assert isinstance(location("memory://x"), StorePath)
    assert [is_remote(u) for u in ("s3://b/k", "gs://b", "abfs://c/d", "file:///x", "x/y")] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert join("s3://b/storage/", "harmonised/train.parquet") == (
        "s3://b/storage/harmonised/train.parquet"
    )
    assert join("clouds/a/storage", "updates/r0001.json") == "clouds/a/storage/updates/r0001.json"


def test_store_path_reads_writes_lists_and_deletes(bucket: StorePath) -> None:
    update = bucket / "updates" / "r0001.safetensors"
    assert not update.exists() and not (bucket / "updates").exists()
    update.write_bytes(b"delta")
    update.with_suffix(".json").write_text('{"a": 1}')
    assert update.read_bytes() == b"delta" and update.is_file()
    assert (bucket / "updates").exists() and not (bucket / "updates").is_file()
    assert [p.name for p in (bucket / "updates").iterdir()] == ["r0001.json", "r0001.safetensors"]
    assert update.parent == bucket / "updates" and update.suffix == ".safetensors"
    assert uri_path(str(update)).read_bytes() == b"delta"  # a recorded URI reads back
    update.unlink()
    with pytest.raises(FileNotFoundError):
        update.unlink()
    remove_tree(bucket / "updates")
    assert list(bucket.iterdir()) == []


def test_private_writes_are_owner_only_locally(tmp_path: Path, bucket: StorePath) -> None:
    secret = tmp_path / "secagg" / "run" / "r0001.secrets"
    write_private(secret, b"mask seed")
    assert _mode(secret) == 0o600 and _mode(secret.parent) == 0o700
    write_private(bucket / "secagg" / "r0001.secrets", b"mask seed")
    assert (bucket / "secagg" / "r0001.secrets").read_bytes() == b"mask seed"
    replace_bytes(tmp_path / "head.json", b"1")
    replace_bytes(tmp_path / "head.json", b"2")
    assert (tmp_path / "head.json").read_bytes() == b"2"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_on_disk_is_a_private_folder_uploaded_afterwards(bucket: StorePath) -> None:
    (bucket / "keys" / "party-a.x25519.pem").write_bytes(b"old key")
    with on_disk(bucket / "keys") as folder:
        assert _mode(folder) == 0o700
        kept = folder / "party-a.x25519.pem"
        assert kept.read_bytes() == b"old key" and _mode(kept) == 0o600
        (folder / "party-a.ed25519.pem").write_bytes(b"new key")
        (folder / ".party-a.tmp").write_bytes(b"temp")
    assert not folder.exists()
    assert sorted(p.name for p in (bucket / "keys").iterdir()) == [
        "party-a.ed25519.pem",
        "party-a.x25519.pem",
    ]
    with pytest.raises(RuntimeError), on_disk(bucket / "docs", download=False) as folder:
        (folder / "quarantine.jsonl").write_text("why")
        raise RuntimeError("the contract blocks")
    assert (bucket / "docs" / "quarantine.jsonl").read_text() == "why"  # uploaded anyway


def test_a_local_location_is_used_in_place(tmp_path: Path) -> None:
    with on_disk(tmp_path / "keys") as folder:
        assert folder == tmp_path / "keys"
    with fetched(str(tmp_path / "x.csv")) as path:
        assert path == tmp_path / "x.csv"


def test_raw_urls_become_private_local_copies() -> None:
    memory = open_store("memory://raw-test")
    memory.put_bytes("train.csv", b"t")
    memory.put_bytes("eval.csv", b"e")
    party = PartyConfig(
        name="p",
        raw={"train": "memory://raw-test/train.csv", "eval": "memory://raw-test/eval.csv"},
        mapping="m.yaml",
        storage="s",
    )
    with raw_on_disk(party) as local:
        train = Path(local.raw.train)
        assert train.read_bytes() == b"t" and _mode(train) == 0o600
        assert _mode(train.parent) == 0o700 and Path(local.raw.eval).read_bytes() == b"e"
        assert train.name == "train.csv"  # the loaders read the format from the suffix
    assert not train.exists()


def test_missing_raw_url_names_the_field() -> None:
    from cloudfed.errors import ConfigError

    party = PartyConfig(
        name="p",
        raw={"train": "memory://nothing-here/train.csv", "eval": "memory://nothing-here/e.csv"},
        mapping="m.yaml",
        storage="s",
    )
    with pytest.raises(ConfigError, match=r"parties\[p\]\.raw\.train"):
        with raw_on_disk(party):
            pass


def test_party_state_in_an_object_store_locks_with_a_conditional_put(bucket: StorePath) -> None:
    from cloudfed.party_policy import ConsentError

    with party_ledger.training_lock(bucket, "p"):
        assert (bucket / "dp_sgd.lock").is_file()
        with pytest.raises(ConsentError, match="dp_sgd.lock"):
            with party_ledger.training_lock(bucket, "p"):
                pass
    assert not (bucket / "dp_sgd.lock").exists()
    path = party_ledger.ledger_path(bucket)
    ledger = party_ledger.load(path, party="p", delta=1e-5)
    party_ledger.save(path, ledger)
    assert party_ledger.load(path, party="p", delta=1e-5) == ledger


def test_the_coordinators_ledger_copy_in_an_object_store(tmp_path: Path) -> None:
    """The copy that survives a wiped exchange is one PUT in the coordinator's bucket."""
    from cloudfed.exchange import Exchange
    from cloudfed.privacy.ledger import LEDGER_KEY, LedgerStore, reserve
    from cloudfed.protection import load_or_create_keys

    exchange = Exchange(str(tmp_path / "exchange"))
    keys = load_or_create_keys("coordinator", "coordinator", tmp_path / "keys")
    url = f"memory://coordinator-{tmp_path.name}"

    def store() -> LedgerStore:
        return LedgerStore(exchange, keys, federation_id="fed", coordinator_storage=url)

    for round in (1, 2):
        reserve(
            store(),
            delta=1e-5,
            accountant="rdp",
            max_epsilon=1e6,
            run_id="run-a",
            round=round,
            mode="central",
            noise_multiplier=2.0,
            parties=["a", "b"],
        )
    copy = StorePath(open_store(url)) / "fed" / "privacy" / "ledger.json"
    assert store().local == copy and copy.is_file()
    exchange.delete(LEDGER_KEY)  # the untrusted exchange loses its copy...
    ledger = store().load(delta=1e-5, accountant="rdp")
    assert [e.id for e in ledger.entries] == ["run-a/r0001", "run-a/r0002"]  # ...the spend stays
