"""Real storage servers on 127.0.0.1 for the storage tests, and a fault-injecting HTTP proxy.

S3 is moto's server, GCS is gcp-storage-emulator, Azure is Azurite (installed by `make test` into
.tools/azurite). Each starts once per session on a free port and stops at the end. A tool that is
missing skips its tests when run by hand, and fails them under `make test`
(CLOUDFED_REQUIRE_STORAGE_SERVERS=1), which installs every one.

The proxy sits between a client and a server and, per request, forwards, answers 500, delays, or
forwards and then drops the connection before the client hears the answer (the server has stored
the upload; the client does not know).
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

# gcsfs >= 2026.x defaults to its "extended" filesystem, which first asks the gRPC storage-control
# API whether a bucket is zonal; the emulator speaks only JSON over HTTP, so each call would spend
# ~20 s in that lookup's retries. The classic filesystem is what the emulator can test (and what
# the extended one delegates to for ordinary buckets). Set before gcsfs is first imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

ROOT = Path(__file__).resolve().parents[1]
AZURITE = ROOT / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
# Azurite's well-known development account (public, documented by Microsoft; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def require(tool: str, fix: str) -> None:
    if os.environ.get("CLOUDFED_REQUIRE_STORAGE_SERVERS") == "1":
        pytest.fail(f"{tool} is not installed; {fix}")
    pytest.skip(f"{tool} not installed ({fix})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclass
class Backend:
    """How to reach one server: a root URL and fsspec options, with the port to proxy."""

    name: str
    host_port: int
    make: Callable[[int], tuple[str, dict[str, Any]]]  # port -> (root URL, storage options)

    def root_and_options(self, port: int | None = None) -> tuple[str, dict[str, Any]]:
        root, options = self.make(self.host_port if port is None else port)
        return f"{root}/{uuid.uuid4().hex[:12]}", options  # a fresh prefix per test


# -- servers -------------------------------------------------------------------------------


def _s3_options(port: int) -> dict[str, Any]:
    return {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
        "skip_instance_cache": True,
    }


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Backend]:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        require("moto[server]", "pip install -e '.[dev]'")
    import boto3

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        opts = _s3_options(port)
        boto3.client(
            "s3",
            endpoint_url=opts["endpoint_url"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket="cloudfed")
        yield Backend("s3", port, lambda p: ("s3://cloudfed", _s3_options(p)))
    finally:
        server.stop()


def _gcs_options(port: int) -> dict[str, Any]:
    return {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "token": "anon",
        "project": "cloudfed-test",
        "skip_instance_cache": True,
    }


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[Backend]:
    try:
        from gcp_storage_emulator.server import create_server
    except ImportError:
        require("gcp-storage-emulator", "pip install -e '.[dev]'")
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="cloudfed")
    server.start()
    try:
        wait_for_port(port)
        yield Backend("gcs", port, lambda p: ("gs://cloudfed", _gcs_options(p)))
    finally:
        server.stop()


def _azure_options(port: int) -> dict[str, Any]:
    conn = (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};"
    )
    return {"connection_string": conn, "skip_instance_cache": True}


@pytest.fixture(scope="session")
def azure_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    if not AZURITE.exists():
        require("Azurite", "`make azurite` installs it into .tools/azurite")
    port = free_port()
    workdir = tmp_path_factory.mktemp("azurite")
    proc = subprocess.Popen(
        [
            str(AZURITE),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--silent",
        ],
        cwd=workdir,  # Azurite's debug log and lock files, if any, stay out of the repo
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        from azure.storage.blob import BlobServiceClient

        conn = _azure_options(port)["connection_string"]
        BlobServiceClient.from_connection_string(conn).create_container("cloudfed")
        yield Backend("azure", port, lambda p: ("abfs://cloudfed", _azure_options(p)))
    finally:
        proc.terminate()  # in memory: nothing to save; open keep-alive clients can delay it
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the fault proxy -----------------------------------------------------------------------


@dataclass
class Fault:
    """What to do to the next `times` requests that `match` (method, path with query)."""

    action: str  # "500", "delay", "drop" (forward, then hang up before answering)
    match: Callable[[str, str], bool]
    times: int = 1
    delay_s: float = 0.0


@dataclass
class FaultProxy:
    """A reverse proxy on 127.0.0.1 in front of one server, with faults queued by the test."""

    upstream_port: int
    faults: list[Fault] = field(default_factory=list)
    seen: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, what happened)
    port: int = 0
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and fault.match(method, path):
                    fault.times -= 1
                    return fault
        return None

    def _record(self, method: str, path: str, what: str) -> None:
        with self._lock:
            self.seen.append((method, path, what))

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._take(self.command, self.path)
                action = fault.action if fault else "forward"
                proxy._record(self.command, self.path, action)
                if action == "500":
                    payload = b"injected failure"
                    self.send_response(500)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if action == "delay":
                    time.sleep(fault.delay_s)  # type: ignore[union-attr]
                status, reason, headers, payload = self._forward(body)
                if action == "drop":  # stored upstream; the client never hears it
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(status, reason)
                for name, value in headers:
                    if name.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("transfer-encoding", "connection", "content-length")
                }
                headers["Content-Length"] = str(len(body))
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    return resp.status, resp.reason, resp.getheaders(), resp.read()
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        serve = lambda: self._server.serve_forever(poll_interval=0.05)  # noqa: E731
        threading.Thread(target=serve, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[[Backend], FaultProxy]]:
    """A factory: `fault_proxy(backend)` starts a proxy in front of that backend's server."""
    started: list[FaultProxy] = []

    def make(backend: Backend) -> FaultProxy:
        proxy = FaultProxy(backend.host_port).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()
