"""Where cloudfed keeps bytes: a local folder or an fsspec URL (s3://, gs://, abfs://, file://).

One small module so that every configured location (the exchange, each party's storage, the
coordinator's storage, raw sources) is read and written the same way:

- keys are validated so nothing escapes the root;
- writes that must happen once are conditional on the server (S3 `If-None-Match: *`, GCS
  `ifGenerationMatch=0`, Azure `If-None-Match: *`, a hard link locally), so two runs cannot both
  make them;
- readers never see a half-written object, and every object carries the sha256 of its bytes
  (object metadata in the same request on S3, GCS and Azure; elsewhere a file of the same
  key under the root's hidden `.sha256/` tree), checked on every read, so a truncated or
  altered object is an error naming it; where the digest is a separate file, the writer
  announces it under `.sha256/.next/` before writing the object, so a writer killed between
  the object and its digest leaves an object that still reads as what it wrote;
- transient failures (5xx, 429, timeouts, dropped connections) are retried with exponential
  backoff and full jitter, within a bound on attempts and on total time; permanent ones (absent,
  already there, forbidden) are not.

The digest detects accidents and foreign writers, not an adversary (who can rewrite the digest
too): payloads that cross trust boundaries are still authenticated by their envelopes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import fsspec
from fsspec.asyn import sync
from fsspec.core import split_protocol
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import get_filesystem_class

from cloudfed.errors import StorageIntegrityError

log = logging.getLogger(__name__)

_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
T = TypeVar("T")

# Where each backend keeps the digest: S3 and GCS metadata keys allow '-', Azure's must be
# identifiers. adlfs marks its files with is_directory=false; keeping it keeps adlfs listings right.
_S3_DIGEST = "cloudfed-sha256"
_GCS_DIGEST = "cloudfed-sha256"
_AZURE_DIGEST = "cloudfed_sha256"
_BACKENDS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "abfs": "azure", "az": "azure"}
_BACKENDS["abfss"] = "azure"

# A read whose digest does not match is read again this many times before it is an error: an
# overwrite racing the read (digest of one version, bytes of the other) settles within them.
_SETTLE_READS = 3


def validate_key(key: str) -> str:
    """Reject anything that could escape the root or collide with temp files (hidden names)."""
    if not key or key.startswith("/") or "\\" in key or ":" in key:
        raise ValueError(f"invalid storage key {key!r}: must be a relative path")
    if not all(_SEGMENT.match(part) for part in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}: empty, hidden or '..' segment")
    return key


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a store tries before a transient failure becomes the caller's error.

    `attempt_timeout_s` cancels one request to a remote store (a hung connection is the commonest
    cross-cloud failure, and backends' own timeouts are minutes): raise it for objects that take
    longer than that to move. No retry starts after `total_s`, so a caller waits at most
    `total_s` plus one attempt. The SDKs' own retries (botocore, gcsfs) run inside one attempt;
    Azure's are switched off for puts and gets, whose default backoff starts at 15 s.
    """

    attempts: int = 5
    total_s: float = 300.0
    attempt_timeout_s: float = 120.0
    base_delay_s: float = 0.5
    max_delay_s: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.total_s <= 0 or self.attempt_timeout_s <= 0:
            raise ValueError("RetryPolicy: attempts >= 1, total_s > 0 and attempt_timeout_s > 0")
        if self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError("RetryPolicy: 0 <= base_delay_s <= max_delay_s")


def _policy(options: Any, root: str) -> RetryPolicy:
    if options is None:
        return RetryPolicy()
    fields = set(RetryPolicy.__dataclass_fields__)
    if not isinstance(options, Mapping) or set(options) - fields:
        raise ValueError(
            f"storage options of {root}: retry must be a mapping with keys among "
            f"{', '.join(sorted(fields))} (got {options!r}). Fix: e.g. retry: {{attempts: 8}}"
        )
    return RetryPolicy(**options)


_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Class names (anywhere in the MRO or the cause chain) of the SDKs' connection-level failures;
# matched by name so that this module imports no cloud SDK.
_TRANSIENT_NAMES = frozenset(
    {
        "ConnectionError",
        "TimeoutError",
        "ServiceRequestError",
        "ServiceResponseError",
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ClientConnectionError",
        "IncompleteRead",
        "IncompleteReadError",
        "ProxyError",
        "ChunkedEncodingError",
        "ResponseParserError",
        "HTTPClientError",
    }
)
_PERMANENT = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    StorageIntegrityError,
    ValueError,
    TypeError,
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _status(exc: BaseException) -> int | None:
    for attr in ("status_code", "status", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code if isinstance(code, int) else None
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether trying again could succeed: server trouble or the network, not the request.

    The outermost exception decides when it says enough (absent, exists, forbidden, a status);
    SDKs wrap connection failures (adlfs in RuntimeError, s3fs in OSError), so causes are looked at.
    """
    for err in _chain(exc):
        if isinstance(err, _PERMANENT):
            return False
        status = _status(err)
        if status is not None:
            return status in _TRANSIENT_STATUS
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(err).__mro__):
            return True
    return False


def _reason(exc: BaseException) -> str:
    """A short, payload-free description of a failure for the retry log."""
    status = next((s for s in map(_status, _chain(exc)) if s is not None), None)
    text = " ".join(str(exc).split())[:160]
    return f"{type(exc).__name__}{f' HTTP {status}' if status else ''}: {text}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Store:
    """Byte store rooted at a local path or fsspec URL; every key is validated first."""

    def __init__(
        self,
        root: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        retry: RetryPolicy | None = None,
    ) -> None:
        """`storage_options` go to the fsspec backend (an S3-compatible store's endpoint_url).

        Their one key of cloudfed's own, `retry` (a mapping of RetryPolicy fields), tunes the
        retries from a run configuration (`exchange_options: {retry: {attempts: 8}}`); it is
        taken out before the rest reach fsspec. An explicit `retry` argument wins.
        """
        options = dict(storage_options or {})
        retry_options = options.pop("retry", None)
        self.fs, path = fsspec.core.url_to_fs(str(root), **options)
        self.root = path.rstrip("/")
        self.retry = retry or _policy(retry_options, root)
        self._local = isinstance(self.fs, LocalFileSystem)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self._backend = next((_BACKENDS[p] for p in protocols if p in _BACKENDS), "other")
        if self._local:
            self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, key: str) -> str:
        return f"{self.root}/{validate_key(key)}"

    def url(self, key: str) -> str:
        return self.fs.unstrip_protocol(self._path(key))

    def _sidecar(self, path: str) -> str:
        """The digest's place where a backend has no object metadata: a hidden parallel tree.

        The same key under the root's `.sha256/`, so folders of objects hold only objects.
        """
        return f"{self.root}/{_DIGESTS}/{path[len(self.root) + 1 :]}"

    def _pending(self, path: str) -> str:
        """Where a separate digest is announced before its object is written (`.sha256/.next/`).

        A writer stopped between writing an object and its digest would otherwise leave an
        object that fails its check until written again (a process killed mid-save, then a
        re-run that reads it). No key's digest can live there: a key's segments never start
        with a dot.
        """
        return f"{self.root}/{_DIGESTS}/{_PENDING}/{path[len(self.root) + 1 :]}"

    def _write_sidecar(self, path: str, digest: str, *, pending: bool = False) -> None:
        side = self._pending(path) if pending else self._sidecar(path)
        if self._local:
            _atomic_local_write(side, f"{digest}\n".encode(), exclusive=False)
        else:
            self._call("pipe_file", side, f"{digest}\n".encode())

    def _read_digest(self, side: str) -> str | None:
        try:
            return self._call("cat_file", side).decode("ascii", "replace").strip()
        except FileNotFoundError:
            return None

    # -- retries ---------------------------------------------------------------------------

    def _retrying(self, what: str, url: str, op: Callable[[], T]) -> T:
        policy = self.retry
        deadline = time.monotonic() + policy.total_s
        for attempt in range(1, policy.attempts + 1):
            try:
                return op()
            except Exception as exc:
                if not is_transient(exc) or attempt == policy.attempts:
                    raise
                cap = min(policy.max_delay_s, policy.base_delay_s * 2 ** (attempt - 1))
                delay = random.uniform(0, cap)  # full jitter: retrying clients spread out
                if time.monotonic() + delay >= deadline:
                    raise
                log.warning(
                    "storage %s %s failed (attempt %d of %d: %s); retrying in %.2f s",
                    what,
                    url,
                    attempt,
                    policy.attempts,
                    _reason(exc),
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One request; on an async backend cancelled after `attempt_timeout_s`."""
        if getattr(self.fs, "async_impl", False):
            fn = getattr(self.fs, f"_{method}")
            return sync(self.fs.loop, fn, *args, timeout=self.retry.attempt_timeout_s, **kwargs)
        return getattr(self.fs, method)(*args, **kwargs)

    def _run(self, coro_fn: Callable[..., Any], *args: Any) -> Any:
        return sync(self.fs.loop, coro_fn, *args, timeout=self.retry.attempt_timeout_s)

    # -- writes ----------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        """Store `data` under `key` with its sha256; readers never see a half-written object.

        `exclusive` writes only if the key is absent (FileExistsError otherwise): what must happen
        once, such as publishing a round, cannot be done twice by two runs. If the key already
        holds exactly these bytes the write counts as done: a retried request whose first attempt
        was stored before its connection dropped meets its own object, and cannot tell it from
        an identical one (identical bytes are the same outcome). So an object used as a lock must
        hold something unique to its writer (a run id, a nonce), or a second taker "succeeds".
        """
        path, url, data = self._path(key), self.url(key), bytes(data)
        digest = sha256_hex(data)
        try:
            self._retrying("put", url, lambda: self._put(path, data, digest, exclusive))
        except FileExistsError:
            if not exclusive or not self._holds(path, url, data, digest):
                raise FileExistsError(
                    f"{url} already exists (written once, by another writer)"
                ) from None
            log.info("storage put %s: already holds these bytes (an earlier attempt)", url)

    def _put(self, path: str, data: bytes, digest: str, exclusive: bool) -> None:
        mode = "create" if exclusive else "overwrite"
        if self._backend == "s3":
            self._call("pipe_file", path, data, mode=mode, Metadata={_S3_DIGEST: digest})
        elif self._backend == "gcs":
            self._call("pipe_file", path, data, mode=mode, metadata={_GCS_DIGEST: digest})
        elif self._backend == "azure":
            self._run(_azure_put, self.fs, path, data, digest, exclusive)
        else:  # a separate digest: announced, object, digest, announcement withdrawn
            if exclusive and self._call("exists", path):
                # Taken: announcing would overwrite the announcement of the writer who took it,
                # whose object may still need it (killed before its digest).
                raise FileExistsError(path)
            self._write_sidecar(path, digest, pending=True)
            try:
                if self._local:
                    _atomic_local_write(path, data, exclusive=exclusive)
                else:
                    self._call("pipe_file", path, data, mode=mode)
            except FileExistsError:  # taken since: withdraw ours if it is still ours
                if self._read_digest(self._pending(path)) == digest:
                    self._withdraw(path)
                raise
            self._write_sidecar(path, digest)
            self._withdraw(path)

    def _withdraw(self, path: str) -> None:
        """Remove the announcement; one left behind is harmless (it vouches for these bytes)."""
        try:
            self._remove(self._pending(path))
        except Exception as exc:  # a writer allowed to put but not to delete
            log.warning("storage: left %s (%s)", self._pending(path), _reason(exc))

    def _remove(self, target: str) -> None:
        try:
            self._call("rm_file", target)
        except FileNotFoundError:
            pass

    def _holds(self, path: str, url: str, data: bytes, digest: str) -> bool:
        """Whether `path` already holds `data` (and its digest, repaired where it is separate)."""
        try:
            stored, stored_digest = self._retrying("get", url, lambda: self._get(path))
        except FileNotFoundError:
            return False
        if stored != data:
            return False
        if stored_digest != digest and self._separate_digest:
            self._write_sidecar(path, digest)  # the writer stopped between object and digest
            self._withdraw(path)
        return True

    def delete(self, key: str) -> None:
        """Remove a key if present (only the run lock is ever removed)."""
        path, url = self._path(key), self.url(key)

        def rm() -> None:
            separate = (self._sidecar(path), self._pending(path))
            for target in (path, *separate) if self._separate_digest else (path,):
                self._remove(target)
            self.fs.invalidate_cache(path)

        self._retrying("delete", url, rm)

    # -- reads -----------------------------------------------------------------------------

    @property
    def _separate_digest(self) -> bool:
        return self._backend not in ("s3", "gcs", "azure")

    def get_bytes(
        self, key: str, *, expected_sha256: str | None = None, require_digest: bool = True
    ) -> bytes:
        """Read a whole object and check it against its sha256 (or `expected_sha256`).

        FileNotFoundError when absent, as every fsspec backend raises; StorageIntegrityError when
        the bytes are not those that were written. A caller that pins a digest of its own (a
        GlobalAdapterRef) passes it as `expected_sha256`; it takes precedence over the stored one,
        so objects written before stores kept digests stay readable by pinned readers.
        `require_digest=False` is for objects other tools write (a party's raw exports): a stored
        digest is still checked, but none is not an error.
        """
        if expected_sha256 is not None and not _HEX64.match(expected_sha256):
            raise ValueError(f"expected_sha256 {expected_sha256!r}: must be 64 lowercase hex")
        path, url = self._path(key), self.url(key)
        for read in range(_SETTLE_READS):
            data, stored = self._retrying("get", url, lambda: self._get(path))
            want = expected_sha256 or stored
            actual = sha256_hex(data)
            if want is not None and actual == want:
                return data
            if expected_sha256 is None and (stored is not None or require_digest):
                if self._written_but_not_digested(path, actual):
                    return data
            if want is None and not require_digest:
                return data
            if read < _SETTLE_READS - 1:
                time.sleep(0.05 * 2**read)
        if want is None:
            root = self.fs.unstrip_protocol(self.root)
            raise StorageIntegrityError(
                f"{url}: no sha256 is stored with this object ({len(data)} bytes), so it cannot "
                "be checked: it was written by another tool or before cloudfed stored digests. "
                "Fix: write it again through cloudfed, or, if you know the objects there are "
                f"intact, run `python -m cloudfed.storage add-digests {root}`"
            )
        raise StorageIntegrityError(
            f"{url}: the stored bytes do not match their sha256 (expected {want}, read "
            f"{len(data)} bytes with sha256 {actual}): the object was truncated or altered after "
            "it was written. Fix: delete it and let its writer write it again"
        )

    def _written_but_not_digested(self, path: str, actual: str) -> bool:
        """The writer announced exactly these bytes' digest and stopped before storing it."""
        return self._separate_digest and self._read_digest(self._pending(path)) == actual

    def _get(self, path: str) -> tuple[bytes, str | None]:
        """The object's bytes and the digest stored with it (None when it has none)."""
        if self._backend == "s3":
            return self._run(_s3_get, self.fs, path)
        if self._backend == "gcs":
            self.fs.invalidate_cache(path)  # metadata from a listing cache may be stale
            meta = (self._call("info", path).get("metadata") or {}).get(_GCS_DIGEST)
            return self._call("cat_file", path), meta
        if self._backend == "azure":
            return self._run(_azure_get, self.fs, path)
        data = self._call("cat_file", path)
        return data, self._read_digest(self._sidecar(path))

    def add_missing_digests(self, prefix: str = "") -> list[str]:
        """Store the sha256 of every object under `prefix` that has none; the keys it added.

        For objects written before stores kept digests (or copied in by another tool): whoever
        runs it vouches that they are intact, which is why it is a command and never automatic.
        """
        added = []
        for key in self.list(prefix):
            path, url = self._path(key), self.url(key)
            data, stored = self._retrying("get", url, lambda p=path: self._get(p))
            if stored is None:
                self.put_bytes(key, data)
                added.append(key)
        return added

    def exists(self, key: str) -> bool:
        path = self._path(key)
        self.fs.invalidate_cache(path)  # another process may have written it since
        return self._retrying("exists", self.url(key), lambda: self._call("exists", path))

    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix`, sorted, relative to the root; temp and digest files are not keys."""
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        url = self.fs.unstrip_protocol(base)

        def find() -> list[str]:
            self.fs.invalidate_cache(base)
            if not self._call("exists", base):
                return []
            return list(self._call("find", base))

        found = self._retrying("list", url, find)
        root = self.fs._strip_protocol(self.root).rstrip("/") + "/"
        keys = (self.fs._strip_protocol(p)[len(root) :] for p in found)
        return sorted(k for k in keys if not any(s.startswith(".") for s in k.split("/")))


_DIGESTS = ".sha256"  # hidden, so never a key (validate_key) and never listed
_PENDING = ".next"  # under _DIGESTS: digests announced before their object is written


def _atomic_local_write(path: str, data: bytes, *, exclusive: bool) -> None:
    """Temp file, fsync, then rename (or hard link, which fails if the name exists)."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            os.link(tmp, path)  # atomic, and fails if the key exists
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


async def _s3_get(fs: Any, path: str) -> tuple[bytes, str | None]:
    """One GET: the bytes and the metadata of the same version (no read/overwrite race)."""
    bucket, key, version = fs.split_path(path)
    kwargs = {"VersionId": version} if version else {}
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, **kwargs)
    try:
        data = await resp["Body"].read()
    finally:
        resp["Body"].close()
    return data, (resp.get("Metadata") or {}).get(_S3_DIGEST)


async def _azure_put(fs: Any, path: str, data: bytes, digest: str, exclusive: bool) -> None:
    """Put Blob with metadata in one request; adlfs's pipe_file fixes its own metadata.

    `retry_total=0`: the SDK's default retry sleeps 15 s and more; this module's policy retries.
    """
    from azure.core.exceptions import ResourceExistsError, ResourceModifiedError

    container, blob, _ = fs.split_path(path)
    metadata = {"is_directory": "false", _AZURE_DIGEST: digest}
    async with fs.service_client.get_blob_client(container=container, blob=blob) as client:
        try:
            await client.upload_blob(
                data, overwrite=not exclusive, metadata=metadata, retry_total=0
            )
        except (ResourceExistsError, ResourceModifiedError) as exc:
            raise FileExistsError(path) from exc
    fs.invalidate_cache(path)


async def _azure_get(fs: Any, path: str) -> tuple[bytes, str | None]:
    from azure.core.exceptions import ResourceNotFoundError

    container, blob, _ = fs.split_path(path)
    async with fs.service_client.get_blob_client(container=container, blob=blob) as client:
        try:
            stream = await client.download_blob(retry_total=0)
        except ResourceNotFoundError as exc:
            raise FileNotFoundError(path) from exc
        data = await stream.readall()
    return data, (stream.properties.metadata or {}).get(_AZURE_DIGEST)


def open_store(
    root: str, options: Mapping[str, Any] | None = None, *, retry: RetryPolicy | None = None
) -> Store:
    """The one way to open a configured location (a plain path, file://, s3://, gs://, abfs://)."""
    return Store(root, options, retry=retry)


def normalised_location(url: str) -> tuple[str, PurePosixPath]:
    """(canonical protocol, normalised path with its bucket first) of a local path or URL.

    Aliases of one place compare equal: file:///x and /x (and symlinks, resolved), s3a:// and
    s3://, gcs:// and gs://. Only filesystem classes are looked up, none is instantiated, so
    nothing here reaches the network.
    """
    protocol, _ = split_protocol(url)
    protocol = protocol or "file"
    try:
        cls = get_filesystem_class(protocol)
    except (ImportError, ValueError):  # no implementation installed: compare as written
        return protocol, PurePosixPath(posixpath.normpath("/" + url.split("://", 1)[-1]))
    protocols = cls.protocol if isinstance(cls.protocol, tuple | list) else (cls.protocol,)
    path = cls._strip_protocol(url)
    if issubclass(cls, LocalFileSystem):
        return "file", PurePosixPath(Path(path).resolve().as_posix())
    return protocols[0], PurePosixPath(posixpath.normpath("/" + str(path).lstrip("/")))


def _spellings(url: str) -> tuple[str, list[PurePosixPath]]:
    """The normalised location, and for an object store also its path with '..' kept.

    Object keys are literal: `s3://b/fed/../x/k` is an object under the prefix `fed/` there,
    though it normalises to `b/x/k`. Either reading may be the one a backend uses, so a
    containment check must consider both (doubled slashes and '.' collapse in both).
    """
    protocol, path = normalised_location(url)
    if protocol == "file" or ".." not in url:
        return protocol, [path]
    literal = url.split("://", 1)[-1] if "://" in url else url
    try:
        literal = get_filesystem_class(split_protocol(url)[0] or "file")._strip_protocol(url)
    except (ImportError, ValueError):
        pass
    parts = [p for p in str(literal).split("/") if p not in ("", ".")]
    return protocol, [path, PurePosixPath("/", *parts)]


def is_inside(child: str, parent: str) -> bool:
    """Whether `child` is `parent` or below it, whatever spelling either location uses.

    Conservative: with '..' in an object-store URL, inside under either reading counts.
    """
    (c_proto, c_paths), (p_proto, p_paths) = _spellings(child), _spellings(parent)
    return c_proto == p_proto and any(c.is_relative_to(p) for c in c_paths for p in p_paths)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m cloudfed.storage",
        description="Store the sha256 of objects written before cloudfed kept digests.",
    )
    parser.add_argument("command", choices=["add-digests"])
    parser.add_argument("root", help="the location: a folder, or an s3://, gs://, abfs:// URL")
    parser.add_argument("--options", default="{}", help="fsspec storage options as JSON")
    args = parser.parse_args(argv)
    store = open_store(args.root, json.loads(args.options))
    added = store.add_missing_digests()
    for key in added:
        print(f"added the sha256 of {store.url(key)}")
    print(f"{store.fs.unstrip_protocol(store.root)}: {len(added)} digests added")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
