"""cloudfed.storage against real servers: a local folder, S3 (moto), GCS (gcp-storage-emulator),
Azure (Azurite), all on 127.0.0.1; and the same clients through a proxy that injects faults.

What the emulators do not honour is marked, not faked: gcp-storage-emulator ignores
`ifGenerationMatch`, so on GCS the tests check that the condition is sent and that a dropped
upload still ends with one object, and the conflict tests are strict xfails that start passing
the day the emulator honours it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from fsspec.asyn import sync

from cloudfed import storage
from cloudfed.errors import ProtectionError, StorageIntegrityError
from cloudfed.storage import RetryPolicy, Store, is_transient, open_store
from tests.storage_servers import (  # noqa: F401  (fixtures)
    Backend,
    Fault,
    FaultProxy,
    azure_server,
    fault_proxy,
    gcs_server,
    s3_server,
)

CLOUDS = ["s3", "gcs", "azure"]
GCS_IGNORES_CONDITIONS = pytest.mark.xfail(
    strict=True,
    raises=pytest.fail.Exception,
    reason="gcp-storage-emulator 2026.7.19 ignores ifGenerationMatch=0 (overwrites)",
)
FAST = RetryPolicy(attempts=4, total_s=20, attempt_timeout_s=5, base_delay_s=0.05, max_delay_s=0.2)


def _backend(request: pytest.FixtureRequest, name: str) -> Backend:
    return request.getfixturevalue(f"{name}_server")


def _store(request: pytest.FixtureRequest, name: str, tmp_path: Path) -> Store:
    if name == "local":
        return open_store(str(tmp_path / "store"), retry=FAST)
    root, options = _backend(request, name).root_and_options()
    return open_store(root, options, retry=FAST)


def _rewrite(store: Store, key: str, data: bytes, digest: str | None) -> None:
    """Change an object behind the store's back: new bytes, and `digest` (None: no digest)."""
    path = store._path(key)
    if store._backend == "s3":
        meta = {"Metadata": {"cloudfed-sha256": digest}} if digest else {}
        store.fs.pipe_file(path, data, **meta)
    elif store._backend == "gcs":
        store.fs.pipe_file(path, data, metadata={"cloudfed-sha256": digest} if digest else None)
    elif store._backend == "azure":
        if digest:
            sync(store.fs.loop, storage._azure_put, store.fs, path, data, digest, False)
        else:
            store.fs.pipe_file(path, data)
    else:
        Path(path).write_bytes(data)
        side = Path(store._sidecar(path))
        side.write_text(digest) if digest else side.unlink()


def _is_write(method: str, path: str) -> bool:
    return method in ("PUT", "POST")


def _writes(proxy: FaultProxy) -> list[tuple[str, str, str]]:
    return [s for s in proxy.seen if _is_write(s[0], s[1])]


def _is_read(method: str, path: str) -> bool:
    """An object's bytes being read: not a listing, not GCS's metadata GET (/storage/v1/...)."""
    return method == "GET" and "prefix=" not in path and not path.startswith("/storage/v1/")


# -- the same behaviour on every backend ---------------------------------------------------


@pytest.mark.parametrize("name", ["local", *CLOUDS])
def test_round_trip_with_a_digest(
    request: pytest.FixtureRequest, tmp_path: Path, name: str
) -> None:
    store = _store(request, name, tmp_path)
    payload = bytes(range(256)) * 40
    store.put_bytes("runs/r1/a.bin", payload)
    assert store.exists("runs/r1/a.bin") and not store.exists("runs/r1/b.bin")
    assert store.get_bytes("runs/r1/a.bin") == payload
    assert store._get(store._path("runs/r1/a.bin"))[1] == hashlib.sha256(payload).hexdigest()
    store.put_bytes("runs/r1/a.bin", b"second")  # an overwrite carries its own digest
    assert store.get_bytes("runs/r1/a.bin") == b"second"
    store.put_bytes("runs/r1/empty.bin", b"", exclusive=True)
    assert store.get_bytes("runs/r1/empty.bin") == b""
    with pytest.raises(FileNotFoundError):
        store.get_bytes("runs/r1/absent.bin")


@pytest.mark.parametrize(
    "name", ["local", "s3", pytest.param("gcs", marks=GCS_IGNORES_CONDITIONS), "azure"]
)
def test_an_exclusive_write_happens_once(
    request: pytest.FixtureRequest, tmp_path: Path, name: str
) -> None:
    store = _store(request, name, tmp_path)
    store.put_bytes("history/r0001.signed", b"first", exclusive=True)
    store.put_bytes("history/r0001.signed", b"first", exclusive=True)  # own retry: done
    with pytest.raises(FileExistsError, match="already exists"):
        store.put_bytes("history/r0001.signed", b"second", exclusive=True)
    assert store.get_bytes("history/r0001.signed") == b"first"


@pytest.mark.parametrize("name", ["local", *CLOUDS])
def test_list_and_delete(request: pytest.FixtureRequest, tmp_path: Path, name: str) -> None:
    store = _store(request, name, tmp_path)
    for key in ("u/b.sealed", "u/a.sealed", "v/c.sealed"):
        store.put_bytes(key, key.encode())
    assert store.list("u") == ["u/a.sealed", "u/b.sealed"]  # digests are not keys
    assert store.list() == ["u/a.sealed", "u/b.sealed", "v/c.sealed"]
    assert store.list("w") == []
    store.delete("u/a.sealed")
    store.delete("u/a.sealed")  # absent: nothing to do
    assert store.list() == ["u/b.sealed", "v/c.sealed"]
    assert not store.exists("u/a.sealed")
    with pytest.raises(FileNotFoundError):
        store.get_bytes("u/a.sealed")
    store.put_bytes("u/a.sealed", b"again", exclusive=True)  # its digest went with it
    assert store.get_bytes("u/a.sealed") == b"again"


@pytest.mark.parametrize("name", ["local", *CLOUDS])
def test_a_truncated_or_altered_object_is_refused(
    request: pytest.FixtureRequest, tmp_path: Path, name: str
) -> None:
    store = _store(request, name, tmp_path)
    payload = b"adapter bytes " * 100
    digest = hashlib.sha256(payload).hexdigest()
    store.put_bytes("g/adapter.safetensors", payload)
    url = re.escape(store.url("g/adapter.safetensors"))
    _rewrite(store, "g/adapter.safetensors", payload[:-7], digest)  # truncated
    with pytest.raises(StorageIntegrityError, match=f"^{url}: the stored bytes do not match"):
        store.get_bytes("g/adapter.safetensors")
    _rewrite(store, "g/adapter.safetensors", payload.replace(b"r", b"R"), digest)  # altered
    with pytest.raises(ProtectionError, match="truncated or altered"):
        store.get_bytes("g/adapter.safetensors")
    _rewrite(store, "g/adapter.safetensors", payload, None)  # another tool wrote it
    with pytest.raises(StorageIntegrityError, match=f"^{url}: no sha256 is stored"):
        store.get_bytes("g/adapter.safetensors")
    # a reader that pins the digest itself (GlobalAdapterRef) reads such an object
    assert store.get_bytes("g/adapter.safetensors", expected_sha256=digest) == payload
    with pytest.raises(StorageIntegrityError, match="do not match"):
        store.get_bytes("g/adapter.safetensors", expected_sha256="0" * 64)


class _Killed(BaseException):
    """The writing process dies here: nothing after it runs."""


def _kill_when_writing(monkeypatch: pytest.MonkeyPatch, store: Store, target: str | None) -> None:
    """The store's writer dies as it starts writing `target` (None: at no write), on a local
    folder or through fsspec alike."""
    write_local, pipe, strip = (
        storage._atomic_local_write,
        store.fs.pipe_file,
        store.fs._strip_protocol,
    )

    def local(p: str, data: bytes, *, exclusive: bool) -> None:
        if p == target:
            raise _Killed
        write_local(p, data, exclusive=exclusive)

    def remote(p: str, data: bytes, **kw: object) -> None:
        if strip(p) == strip(target or ""):
            raise _Killed
        pipe(p, data, **kw)

    monkeypatch.setattr(storage, "_atomic_local_write", local)
    monkeypatch.setattr(store.fs, "pipe_file", remote)


@pytest.mark.parametrize("dies_before", ["object", "digest", "withdrawal"])
@pytest.mark.parametrize("root", ["local", "memory"])
def test_a_writer_killed_between_object_and_digest_leaves_a_readable_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies_before: str, root: str
) -> None:
    """Where the digest is a separate file: a kill between the two writes is not a corruption.

    Before the digest was announced, a kill after the object and before its digest left the
    new bytes under the old digest, and every later reader refused them as altered (the
    privacy ledger's exchange copy after a SIGKILL, found in CI).
    """
    url = str(tmp_path / "store") if root == "local" else f"memory://{tmp_path.name}/store"
    store = open_store(url)
    store.put_bytes("ledger.signed", b"version 1")
    path = store._path("ledger.signed")
    target = {"object": path, "digest": store._sidecar(path), "withdrawal": None}[dies_before]

    def remove(_: str) -> None:
        raise _Killed

    _kill_when_writing(monkeypatch, store, target)
    if dies_before == "withdrawal":
        monkeypatch.setattr(store, "_remove", remove)
    with pytest.raises(_Killed):
        store.put_bytes("ledger.signed", b"version 2")
    monkeypatch.undo()
    again = open_store(url)  # the re-run
    want = b"version 1" if dies_before == "object" else b"version 2"
    assert again.get_bytes("ledger.signed") == want
    assert again.list() == ["ledger.signed"]  # the announcement is no key
    again.put_bytes("ledger.signed", b"version 3")
    assert again.get_bytes("ledger.signed") == b"version 3"
    assert not again.fs.exists(again._pending(path))  # withdrawn once written
    # An announcement vouches only for the bytes it names: other bytes are still refused.
    again.fs.pipe_file(path, b"version 4")  # behind the store's back: digest of version 3
    again._write_sidecar(path, hashlib.sha256(b"version 5").hexdigest(), pending=True)
    with pytest.raises(StorageIntegrityError, match="do not match"):
        again.get_bytes("ledger.signed")


@pytest.mark.parametrize("root", ["local", "memory"])
def test_a_write_once_object_killed_before_its_digest_survives_the_next_taker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root: str
) -> None:
    """A round record or lock whose writer died before the digest: a rerun's exclusive write of
    other bytes (a new nonce) is refused and must not spoil the first writer's announcement."""
    url = str(tmp_path / "store") if root == "local" else f"memory://{tmp_path.name}/once"
    store = open_store(url)
    path = store._path("history/r1.signed")
    _kill_when_writing(monkeypatch, store, store.fs._strip_protocol(store._sidecar(path)))
    with pytest.raises(_Killed):
        store.put_bytes("history/r1.signed", b"first taker, nonce 1", exclusive=True)
    monkeypatch.undo()
    rerun = open_store(url)
    with pytest.raises(FileExistsError, match="written once"):
        rerun.put_bytes("history/r1.signed", b"second taker, nonce 2", exclusive=True)
    assert rerun.get_bytes("history/r1.signed") == b"first taker, nonce 1"
    # the first taker retrying its own bytes counts as done, and completes the digest
    rerun.put_bytes("history/r1.signed", b"first taker, nonce 1", exclusive=True)
    assert rerun._get(path)[1] == hashlib.sha256(b"first taker, nonce 1").hexdigest()
    assert not rerun.fs.exists(rerun._pending(path))
    rerun.delete("history/r1.signed")
    assert not rerun.fs.exists(rerun._pending(path)) and not rerun.fs.exists(rerun._sidecar(path))


def test_a_pinned_read_never_takes_an_announced_digest(tmp_path: Path) -> None:
    """A reader that pins the digest (a GlobalAdapterRef) accepts only those bytes."""
    store = open_store(str(tmp_path / "store"))
    good = b"the adapter the round record names"
    store.put_bytes("g/adapter.safetensors", good)
    path = store._path("g/adapter.safetensors")
    bad = b"another adapter"
    store.fs.pipe_file(path, bad)
    store._write_sidecar(path, hashlib.sha256(bad).hexdigest(), pending=True)
    assert store.get_bytes("g/adapter.safetensors") == bad  # unpinned: as its writer announced
    with pytest.raises(StorageIntegrityError, match="do not match"):
        store.get_bytes("g/adapter.safetensors", expected_sha256=hashlib.sha256(good).hexdigest())


# -- faults between client and server ------------------------------------------------------


def _proxied(
    request: pytest.FixtureRequest,
    name: str,
    fault_proxy: Callable[[Backend], FaultProxy],  # noqa: F811
    retry: RetryPolicy = FAST,
) -> tuple[Store, Store, FaultProxy]:
    """A store through a fresh proxy and one straight to the server, on the same prefix."""
    backend = _backend(request, name)
    proxy = fault_proxy(backend)
    root, direct_options = backend.root_and_options()
    _, proxied_options = backend.make(proxy.port)
    return open_store(root, proxied_options, retry=retry), open_store(root, direct_options), proxy


@pytest.mark.parametrize("name", CLOUDS)
def test_server_errors_are_retried_and_logged_without_payload(
    request: pytest.FixtureRequest,
    fault_proxy: Callable[[Backend], FaultProxy],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    name: str,
) -> None:
    store, direct, proxy = _proxied(request, name, fault_proxy)
    secret = b"SECRET-PAYLOAD-" * 20
    proxy.add(Fault("500", _is_write, times=2))
    with caplog.at_level(logging.WARNING, logger="cloudfed.storage"):
        store.put_bytes("x/update.sealed", secret, exclusive=True)
        proxy.add(Fault("500", _is_read, times=2))
        assert store.get_bytes("x/update.sealed") == secret
    assert [s[2] for s in proxy.seen].count("500") == 4
    assert direct.get_bytes("x/update.sealed") == secret
    assert direct.list("x") == ["x/update.sealed"]
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    for record in retries:
        assert store.url("x/update.sealed") in record.getMessage()
        assert "HTTP 500" in record.getMessage() or "Error" in record.getMessage()
    assert "SECRET-PAYLOAD" not in caplog.text
    if name == "azure":  # the SDK's own retries are off there: each 500 is one of ours
        assert len(retries) == 4


@pytest.mark.parametrize("name", CLOUDS)
def test_a_slow_response_times_out_and_is_retried(
    request: pytest.FixtureRequest,
    fault_proxy: Callable[[Backend], FaultProxy],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    name: str,
) -> None:
    # a retry must beat attempt_timeout_s: loose enough for a loaded machine, below the delay
    policy = RetryPolicy(attempts=4, total_s=60, attempt_timeout_s=3.0, base_delay_s=0.05)
    store, _, proxy = _proxied(request, name, fault_proxy, policy)
    store.put_bytes("s/a.bin", b"slow")
    proxy.add(Fault("delay", _is_read, times=1, delay_s=8.0))
    with caplog.at_level(logging.WARNING, logger="cloudfed.storage"):
        assert store.get_bytes("s/a.bin") == b"slow"
    assert [s[2] for s in proxy.seen].count("delay") == 1, proxy.seen
    assert any("TimeoutError" in r.getMessage() for r in caplog.records), proxy.seen


@pytest.mark.parametrize("name", CLOUDS)
def test_an_upload_dropped_after_the_server_stored_it_is_not_a_conflict(
    request: pytest.FixtureRequest,
    fault_proxy: Callable[[Backend], FaultProxy],  # noqa: F811
    name: str,
) -> None:
    store, direct, proxy = _proxied(request, name, fault_proxy)
    proxy.add(Fault("drop", _is_write, times=1))
    store.put_bytes("d/r0001.signed", b"published once", exclusive=True)
    assert direct.list("d") == ["d/r0001.signed"]
    assert direct.get_bytes("d/r0001.signed") == b"published once"
    writes = _writes(proxy)
    assert writes[0][2] == "drop" and len(writes) >= 2  # the retry met the stored object
    if name == "gcs":  # the condition was sent, even though this emulator ignores it
        assert all("ifGenerationMatch=0" in path for _, path, _ in writes)


@pytest.mark.parametrize("name", ["s3", pytest.param("gcs", marks=GCS_IGNORES_CONDITIONS), "azure"])
def test_another_writers_object_is_a_conflict_and_not_retried(
    request: pytest.FixtureRequest,
    fault_proxy: Callable[[Backend], FaultProxy],  # noqa: F811
    name: str,
) -> None:
    store, direct, proxy = _proxied(request, name, fault_proxy)
    direct.put_bytes("c/lock.json", b'{"run": "other"}', exclusive=True)
    with pytest.raises(FileExistsError):
        store.put_bytes("c/lock.json", b'{"run": "mine"}', exclusive=True)
    assert len(_writes(proxy)) == 1  # one conditional PUT, refused, not retried
    assert direct.get_bytes("c/lock.json") == b'{"run": "other"}'


def test_retries_stop_at_the_attempt_bound(
    request: pytest.FixtureRequest,
    fault_proxy: Callable[[Backend], FaultProxy],  # noqa: F811
) -> None:
    store, direct, proxy = _proxied(request, "azure", fault_proxy)
    proxy.add(Fault("500", _is_write, times=100))
    with pytest.raises(Exception) as err:
        store.put_bytes("b/x.bin", b"never", exclusive=True)
    assert is_transient(err.value)
    assert len(_writes(proxy)) == FAST.attempts
    assert direct.list("b") == []


def test_retries_stop_at_the_time_bound(
    request: pytest.FixtureRequest,
    fault_proxy: Callable[[Backend], FaultProxy],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(storage, "random", __import__("random").Random(7))  # seeded jitter
    # several attempts fit in total_s even when one takes a second on a loaded machine
    policy = RetryPolicy(attempts=100, total_s=5.0, base_delay_s=0.2, max_delay_s=0.2)
    store, _, proxy = _proxied(request, "azure", fault_proxy, policy)
    proxy.add(Fault("500", _is_write, times=1000))
    with pytest.raises(Exception) as err:
        store.put_bytes("t/x.bin", b"never")
    assert is_transient(err.value)
    assert 1 < len(_writes(proxy)) < 100  # stopped by the deadline, long before 100 attempts


def test_transient_and_permanent_errors_are_told_apart() -> None:
    class HttpError(Exception):
        def __init__(self, code: int) -> None:
            self.code = code

    assert is_transient(HttpError(503)) and is_transient(HttpError(429))
    assert not is_transient(HttpError(403)) and not is_transient(HttpError(404))
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert not is_transient(FileNotFoundError()) and not is_transient(PermissionError())
    wrapped = OSError(5, "InternalError")
    wrapped.__cause__ = HttpError(500)
    assert is_transient(wrapped)
    exists = FileExistsError("x")
    exists.__cause__ = HttpError(412)
    assert not is_transient(exists)


def test_retry_policy_from_the_storage_options(tmp_path: Path) -> None:
    store = Store("memory://cloudfed-retry-options", {"retry": {"attempts": 8, "total_s": 30}})
    assert store.retry == RetryPolicy(attempts=8, total_s=30)
    assert store.fs.storage_options == {}  # cloudfed's key does not reach fsspec
    with pytest.raises(ValueError, match="retry must be a mapping with keys among"):
        Store(str(tmp_path), {"retry": {"tries": 3}})
    with pytest.raises(ValueError, match="attempts >= 1"):
        Store(str(tmp_path), {"retry": {"attempts": 0}})


def test_objects_from_before_digests_can_be_vouched_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = open_store(str(tmp_path))
    store.put_bytes("history/g0001/r0001.signed", b"kept")
    (tmp_path / "history" / "g0001" / "r0002.signed").write_bytes(b"older")  # no digest
    with pytest.raises(StorageIntegrityError, match="python -m cloudfed.storage add-digests"):
        store.get_bytes("history/g0001/r0002.signed")
    assert storage.main(["add-digests", str(tmp_path)]) == 0
    assert "1 digests added" in capsys.readouterr().out
    assert store.get_bytes("history/g0001/r0002.signed") == b"older"
    assert store.add_missing_digests() == []


def test_objects_other_tools_write_are_read_without_a_digest_but_checked_with_one(
    tmp_path: Path,
) -> None:
    store = open_store(str(tmp_path))
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "train.csv").write_bytes(b"q,a\n1,2\n")  # an export, not ours
    assert store.get_bytes("raw/train.csv", require_digest=False) == b"q,a\n1,2\n"
    with pytest.raises(StorageIntegrityError, match="no sha256 is stored"):
        store.get_bytes("raw/train.csv")
    store.put_bytes("raw/eval.csv", b"q,a\n3,4\n")
    (tmp_path / "raw" / "eval.csv").write_bytes(b"q,a\n3,")  # truncated after it was written
    with pytest.raises(StorageIntegrityError, match="do not match"):
        store.get_bytes("raw/eval.csv", require_digest=False)
