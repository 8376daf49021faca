"""Headless Chromium driven over its DevTools pipe, for pages that render after they load.

`chromium --dump-dom` (tests/test_data_docs.py) dumps a page at its load event, which is enough for
static HTML but not for MLflow's UI, a single-page app that fetches and draws after loading;
`--virtual-time-budget` makes that race. Here the test waits, in real time, until a JavaScript
condition holds. The DevTools protocol travels over two pipes (fds 3 and 4, NUL-terminated JSON):
no port, no websocket library.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def require_chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("CLOUDFED_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed; `make test` installs Debian's chromium")
        pytest.skip("chromium not installed (run through `make test` to install it)")
    return CHROMIUM


def _above_4(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Browser:
    """One headless Chromium with one tab; every call has a deadline."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 2400) -> None:
        exe = require_chromium()
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        # Above 4, so that moving them onto 3 and 4 in the child cannot overwrite one another.
        to_browser, from_browser = (_above_4(fd) for fd in (to_browser, from_browser))

        def on_fds_3_and_4() -> None:  # where --remote-debugging-pipe expects them
            os.dup2(to_browser, 3)  # dup2 leaves the copies inheritable; the rest close on exec
            os.dup2(from_browser, 4)

        self.proc = subprocess.Popen(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                # Offline: only the local MLflow server answers; CDN lookups fail fast.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "about:blank",
            ],
            close_fds=False,
            preexec_fn=on_fds_3_and_4,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 60
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:  # events and other replies are skipped
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer {method}")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited (code {self.proc.poll()})")
            self._buffer += chunk

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate",
            session=self.session,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str, until: str, timeout: float = 90) -> Any:
        """Go to `url` and wait until the expression `until` is truthy; return its value."""
        self.call("Page.navigate", session=self.session, url=url)
        deadline = time.monotonic() + timeout
        while True:  # mid-navigation the page may not have a body yet: not yet, not an error
            value = self.evaluate(
                f"(() => {{ try {{ return ({until}); }} catch {{ return null; }} }})()"
            )
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText : ''")
                raise TimeoutError(f"{url}: {until!r} never held; the page said: {text[:3000]}")
            time.sleep(0.5)

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._write)
        os.close(self._read)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
