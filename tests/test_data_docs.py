"""Data Docs HTML, opened in headless Chromium: the page a steward reads must show the failures."""

import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cloudfed.data.demo import MARKER_PREFIX
from tests.test_harmonize import harmonise, make_root

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def dump_dom(page: Path) -> str:
    """The DOM after Chromium rendered the page, offline (CDN lookups fail fast)."""
    if CHROMIUM is None:
        if os.environ.get("CLOUDFED_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed; `make test` installs Debian's chromium")
        pytest.skip("chromium not installed (run through `make test` to install it)")
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout


def visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def test_data_docs_show_suite_and_failed_expectations(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    ref = harmonise(root, "bank-gcp", run_id="run-42")
    page = root / ref.docs_uri
    assert "data_docs/run-42/validations/instruction_response-bank-gcp" in ref.docs_uri
    dom = dump_dom(page)
    text = visible_text(dom)
    assert "Expectation Suite: instruction_response-bank-gcp" in text
    assert "Status: Failed" in text
    # The three expectations the planted rows fail, as GX renders them, with their counts.
    assert "values must never be null" in text
    assert "2 unexpected values found" in text
    failed_rows = re.findall(
        r"<tr>(?:(?!</tr>).)*?fa-times text-danger(?:(?!</tr>).)*?</tr>", dom, re.S
    )
    assert len(failed_rows) >= 3
    assert MARKER_PREFIX not in dom  # counts only, never a record
    dataset_pages = list((root / ref.docs_uri).parents[3].glob("dataset_profile-*/**/*.html"))
    assert dataset_pages
    assert "Expectation Suite: dataset_profile-bank-gcp" in visible_text(dump_dom(dataset_pages[0]))
