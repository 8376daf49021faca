"""Configured locations as paths: a local folder stays a `Path`, an object-store URL a `StorePath`.

Every party's storage, its raw sources and the coordinator's storage may be a plain path, a
file:// URL or an fsspec URL (s3://, gs://, abfs://). Code that keeps state there was written
against `pathlib`; a `StorePath` offers the few path operations it uses over `cloudfed.storage`
(the one byte-store API), so a local location keeps its exact behaviour (owner-only files,
os.replace) and an object store gets whole-object PUTs, which are atomic already.

Libraries that need a folder (Great Expectations' Data Docs, parquet writers, MLflow artifacts,
the key files) work in `on_disk`: the location itself when local, else a private temp folder
(0700) whose files are uploaded when the block ends.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from cloudfed.storage import Store, open_store

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(location: str) -> bool:
    """An fsspec URL other than file://: read and written through a Store, never as a Path."""
    return bool(_URL.match(str(location))) and not str(location).startswith("file://")


def local_path(location: str) -> Path:
    """A plain path or a file:// URL as a local Path."""
    text = str(location)
    return Path(text[len("file://") :]) if text.startswith("file://") else Path(text)


class StorePath:
    """A key under a Store, with the pathlib operations the party and coordinator code use."""

    def __init__(self, store: Store, key: str = "") -> None:
        self.store, self.key = store, key.strip("/")

    def __truediv__(self, part: str | os.PathLike[str]) -> StorePath:
        joined = PurePosixPath(self.key, str(part)).as_posix() if self.key else str(part)
        return StorePath(self.store, joined)

    def __str__(self) -> str:
        return self.as_posix()

    def __repr__(self) -> str:
        return f"StorePath({self.as_posix()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StorePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def as_posix(self) -> str:
        if self.key:
            return self.store.url(self.key)
        return self.store.fs.unstrip_protocol(self.store.root)

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def parent(self) -> StorePath:
        parent = PurePosixPath(self.key).parent.as_posix()
        return StorePath(self.store, "" if parent == "." else parent)

    def with_suffix(self, suffix: str) -> StorePath:
        return StorePath(self.store, PurePosixPath(self.key).with_suffix(suffix).as_posix())

    def with_name(self, name: str) -> StorePath:
        return StorePath(self.store, PurePosixPath(self.key).with_name(name).as_posix())

    def is_file(self) -> bool:
        """A key itself, not a prefix (a backend's `exists` says yes to both)."""
        if not self.key or not self.store.exists(self.key):
            return False
        return all(k == self.key for k in self.store.list(self.key))

    def exists(self) -> bool:
        """A key, or a prefix holding keys (object stores have no empty folders)."""
        if not self.key:
            return bool(self.store.list())
        return self.store.exists(self.key) or bool(self.store.list(self.key))

    def read_bytes(self, *, require_digest: bool = True) -> bytes:
        """`require_digest=False` for objects other tools write (raw exports): see Store."""
        return self.store.get_bytes(self.key, require_digest=require_digest)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        self.store.put_bytes(self.key, bytes(data))

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        if not missing_ok and not self.is_file():
            raise FileNotFoundError(str(self))
        self.store.delete(self.key)

    def mkdir(self, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: a key's prefix exists once a key is put under it."""

    def iterdir(self) -> Iterator[StorePath]:
        """The direct children (files, and one entry per sub-prefix)."""
        prefix = f"{self.key}/" if self.key else ""
        children = {k[len(prefix) :].split("/", 1)[0] for k in self.store.list(self.key)}
        for child in sorted(children):
            yield self / child

    def keys(self) -> list[str]:
        """Every key under this prefix, relative to it."""
        prefix = f"{self.key}/" if self.key else ""
        return [k[len(prefix) :] for k in self.store.list(self.key)]


AnyPath = Path | StorePath


def location(root: str | os.PathLike[str], options: Mapping[str, Any] | None = None) -> AnyPath:
    """A configured location: a Path for plain paths and file://, a StorePath for object stores."""
    text = str(root)
    if is_remote(text):
        return StorePath(open_store(text, options))
    return local_path(text)


def party_root(party: Any, root: Path | None = None) -> AnyPath:
    """A party's storage (`parties[].storage` with its `storage_options`).

    A relative local path is relative to `root` when given (harmonisation), else to the working
    directory, as before.
    """
    where = location(party.storage, party.storage_options)
    if isinstance(where, Path) and root is not None:
        return Path(root) / where
    return where


def uri_path(uri: str, options: Mapping[str, Any] | None = None) -> AnyPath:
    """The file behind a URI a party recorded (a DatasetRef or update record): Path or StorePath."""
    if not is_remote(uri):
        return local_path(uri)
    parent, _, name = uri.rstrip("/").rpartition("/")
    return StorePath(open_store(parent, options), name)


def join(where: str, key: str) -> str:
    """A key under a configured location, written as the configuration writes it."""
    if is_remote(where):
        return f"{where.rstrip('/')}/{key}"
    return (local_path(where) / key).as_posix()


def write_private(path: AnyPath, data: bytes) -> None:
    """Owner-only and atomic: locally created 0600 in a 0700 folder and renamed into place."""
    if isinstance(path, StorePath):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def replace_bytes(path: AnyPath, data: bytes, *, mode: int | None = None) -> None:
    """The newest copy of a state file: os.replace locally, one PUT (atomic) on an object store.

    `mode` is the local folder's mode when it has to be created (0o700 for party state).
    """
    if isinstance(path, StorePath):
        path.write_bytes(data)
        return
    if mode is None:
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True, mode=mode)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def remove_tree(path: AnyPath) -> None:
    """Delete a folder or every key under a prefix; absent is fine."""
    if isinstance(path, StorePath):
        for key in path.keys():
            path.store.delete(f"{path.key}/{key}")
        return
    shutil.rmtree(path, ignore_errors=True)


def _visible(relative: Path) -> bool:
    """Temp and staging files (hidden names) never leave the work folder."""
    return not any(part.startswith(".") for part in relative.parts)


def _create_owner_only(target: Path, data: bytes) -> None:
    """A new file in a private temp folder, 0600 from its first byte (key files pass through)."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


@contextmanager
def on_disk(path: AnyPath, *, download: bool = True) -> Iterator[Path]:
    """A local folder for a library that needs one, uploaded to `path` when the block ends.

    Local: `path` itself. Object store: a fresh temp folder (0700); with `download` every key
    under `path` is copied in first (0600: key files are among them), and afterwards every
    visible file that is new or changed is uploaded, also when the block raises (quarantine and
    Data Docs explain a failure, so they must reach the party's storage too).
    """
    if isinstance(path, Path):
        yield path
        return
    work = Path(tempfile.mkdtemp(prefix="cloudfed-"))  # mkdtemp makes it 0700
    before: dict[str, bytes] = {}
    try:
        if download:
            for key in path.keys():
                data = (path / key).read_bytes()
                target = work / key
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                _create_owner_only(target, data)
                before[key] = data
        try:
            yield work
        finally:
            for file in sorted(p for p in work.rglob("*") if p.is_file()):
                relative = file.relative_to(work)
                if not _visible(relative):
                    continue
                data = file.read_bytes()
                if before.get(relative.as_posix()) != data:
                    (path / relative.as_posix()).write_bytes(data)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def fetched(uri: str, options: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """A raw source as a local file for the streaming loaders: itself, or a private temp copy."""
    where = uri_path(uri, options)
    if isinstance(where, Path):
        yield where
        return
    work = Path(tempfile.mkdtemp(prefix="cloudfed-raw-"))
    try:
        target = work / where.name
        # the organisation's own export: no cloudfed digest to require
        _create_owner_only(target, where.read_bytes(require_digest=False))
        yield target
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def raw_on_disk(party: Any) -> Iterator[Any]:
    """The party with its raw exports as local files: itself, or private temp copies of URLs.

    The streaming loaders, format checks and mapping checks then read them as before.
    """
    splits = ("train", "eval")
    if not any(is_remote(getattr(party.raw, s)) for s in splits):
        yield party
        return
    from cloudfed.errors import ConfigError

    with ExitStack() as stack:
        local: dict[str, str] = {}
        for split in splits:
            uri = getattr(party.raw, split)
            try:
                path = stack.enter_context(fetched(uri, party.raw_storage_options))
            except FileNotFoundError:
                raise ConfigError(
                    f"parties[{party.name}].raw.{split}: {uri} not found. Fix: check the URL "
                    "and raw_options (or storage_options) of this party"
                ) from None
            local[split] = str(path)
        yield party.model_copy(update={"raw": party.raw.model_copy(update=local)})
