"""Where cloudfed keeps bytes: a local folder or an fsspec URL (s3://, gs://, abfs://, file://).

One small module so that every configured location (the exchange, each party's storage, the
coordinator's storage, raw sources) is read and written the same way: keys are validated so
nothing escapes the root, writes that must happen once are conditional, and readers never see a
half-written object. Nothing here trusts what it reads; callers authenticate (envelopes) or check
digests.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
from fsspec.core import split_protocol
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import get_filesystem_class

_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}$")


def validate_key(key: str) -> str:
    """Reject anything that could escape the root or collide with temp files (hidden names)."""
    if not key or key.startswith("/") or "\\" in key or ":" in key:
        raise ValueError(f"invalid storage key {key!r}: must be a relative path")
    if not all(_SEGMENT.match(part) for part in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}: empty, hidden or '..' segment")
    return key


class Store:
    """Byte store rooted at a local path or fsspec URL; every key is validated first."""

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None) -> None:
        """`storage_options` go to the fsspec backend (an S3-compatible store's endpoint_url)."""
        self.fs, path = fsspec.core.url_to_fs(str(root), **dict(storage_options or {}))
        self.root = path.rstrip("/")
        self._local = isinstance(self.fs, LocalFileSystem)
        if self._local:
            self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, key: str) -> str:
        return f"{self.root}/{validate_key(key)}"

    def put_bytes(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        """Readers never see a half-written file: local writes go to a temp name, then rename.

        `exclusive` writes only if the key is absent (FileExistsError otherwise): what must happen
        once, such as publishing a round, cannot be done twice by two runs.
        """
        path = self._path(key)
        if not self._local:
            if exclusive:
                with self.fs.open(path, "xb") as fh:  # If-None-Match / generation-0 writes
                    fh.write(bytes(data))
                return
            self.fs.pipe_file(path, bytes(data))  # object-store PUTs are already atomic
            return
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

    def delete(self, key: str) -> None:
        """Remove a key if present (only the run lock is ever removed)."""
        path = self._path(key)
        if self.fs.exists(path):
            self.fs.rm_file(path)

    def get_bytes(self, key: str) -> bytes:
        """Read a whole object; FileNotFoundError when absent, as every fsspec backend raises."""
        return self.fs.cat_file(self._path(key))

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix`, sorted, relative to the root; temp files are not keys."""
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not self.fs.exists(base):
            return []
        found = self.fs.find(base)
        root = self.fs._strip_protocol(self.root).rstrip("/") + "/"
        keys = (self.fs._strip_protocol(p)[len(root) :] for p in found)
        return sorted(k for k in keys if not any(s.startswith(".") for s in k.split("/")))

    def url(self, key: str) -> str:
        return self.fs.unstrip_protocol(self._path(key))


def open_store(root: str, options: Mapping[str, Any] | None = None) -> Store:
    """The one way to open a configured location (a plain path, file://, s3://, gs://, abfs://)."""
    return Store(root, options)


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


def is_inside(child: str, parent: str) -> bool:
    """Whether `child` is `parent` or below it, whatever spelling either location uses."""
    (c_proto, c_path), (p_proto, p_path) = normalised_location(child), normalised_location(parent)
    return c_proto == p_proto and c_path.is_relative_to(p_path)
