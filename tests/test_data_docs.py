"""Data Docs HTML, opened in headless Chromium without a network: what a steward reads.

The pages must render offline (no CDN: the styles ship with the site), the index must list its
validations, every expectation must show its policy and why, and a rows suite whose failing
rows were quarantined must say so rather than "Failed".
"""

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cloudfed.data.demo import MARKER_PREFIX
from cloudfed.data.docs import make_offline
from tests.test_harmonize import edit_suite, harmonise, make_root

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
GREEN, RED, AMBER = "rgb(30, 126, 52)", "rgb(200, 35, 51)", "rgb(179, 107, 0)"

# Runs inside the page after it loaded: what the browser actually drew for the status icons.
PROBE = """
<script>
window.addEventListener('load', () => {
  const icons = [...document.querySelectorAll('i.fas')].map((el) => {
    const before = getComputedStyle(el, '::before');
    const box = el.getBoundingClientRect();
    return {cls: el.className, content: before.content, color: getComputedStyle(el).color,
            width: box.width, height: box.height};
  });
  const sheets = [...document.styleSheets].map((s) => s.href).filter(Boolean);
  document.body.setAttribute('data-probe', JSON.stringify({icons, sheets}));
});
</script>
"""


def dump_dom(page: Path) -> str:
    """The DOM after Chromium rendered the page, offline (any network lookup fails)."""
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


def probed(page: Path) -> tuple[str, dict[str, Any]]:
    """Render a copy of the page (same folder, so relative links hold) with `PROBE` in it."""
    copy = page.with_name(f"probe-{page.name}")
    copy.write_text(page.read_text().replace("</body>", PROBE + "</body>", 1))
    dom = dump_dom(copy)
    found = re.search(r'<body[^>]*data-probe="([^"]*)"', dom)
    assert found, "the probe script did not run"
    return dom, json.loads(html.unescape(found.group(1)))


def visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def table_rows(dom: str) -> list[str]:
    return re.findall(r"<tr>(?:(?!</tr>).)*?</tr>", dom, re.S)


def assert_offline(dom: str, probe: dict[str, Any]) -> None:
    """No CDN left, and the site's own stylesheet drew the status icons."""
    assert not re.search(r"<(?:link|script)\b[^>]*(?:href|src)=\"https?://", dom)
    assert any(s.endswith("/static/styles/cloudfed-offline.css") for s in probe["sheets"])
    assert probe["icons"]
    for icon in probe["icons"]:
        assert icon["content"] not in ("none", "normal", ""), icon  # a glyph, not an empty <i>
        assert icon["width"] > 0 and icon["height"] > 0, icon


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = make_root(tmp_path_factory.mktemp("docs"))
    ref = harmonise(root, "bank-gcp", run_id="run-42")
    assert "data_docs/run-42/validations/instruction_response-bank-gcp" in ref.docs_uri
    assert ref.quarantine_reasons["contract"] >= 3
    return root / ref.docs_uri, root / ref.docs_uri.split("/validations/")[0]


def test_rows_page_says_quarantined_with_policy_and_styled_icons(site: tuple[Path, Path]) -> None:
    page, _ = site
    dom, probe = probed(page)
    text = visible_text(dom)
    assert "Expectation Suite: instruction_response-bank-gcp" in text
    status = re.search(r"Status: (.*?) Policy: (.*?) Statistics", text)
    assert status, text[:600]
    assert re.fullmatch(r"Accepted, \d+ rows quarantined", status.group(1)), status.group(1)
    assert "rows set aside in quarantine, the rest accepted" in status.group(2)
    assert "Failed" not in status.group(1)
    # The expectations the planted rows fail, as GX renders them, with counts and the policy.
    assert "values must never be null" in text and "2 unexpected values found" in text
    rows = table_rows(dom)
    null_row = next(
        visible_text(r) for r in rows if "2 unexpected values found" in r and "fa-filter" in r
    )
    assert "quarantine: 2 rows set aside, the run goes on" in null_row
    assert "a row without it cannot be trained on" in null_row  # the expectation's `why`
    quarantined = [r for r in rows if "fa-filter text-warning" in r]
    assert len(quarantined) >= 3
    assert not [r for r in rows if "fa-times" in r]  # nothing blocked: no red cross
    block_row = next(visible_text(r) for r in rows if "Must have exactly these columns" in r)
    assert " block " in f" {block_row} " and "the canonical schema" in block_row

    assert_offline(dom, probe)
    by_kind = {i["cls"].split()[1]: i for i in probe["icons"]}
    assert by_kind["fa-check-circle"]["color"] == GREEN
    assert by_kind["fa-check-circle"]["content"] == '"\u2714"'
    assert by_kind["fa-filter"]["color"] == AMBER
    assert MARKER_PREFIX not in dom  # counts only, never a record


def test_index_lists_its_validations_offline(site: tuple[Path, Path]) -> None:
    _, home = site
    dom, probe = probed(home / "index.html")
    links = re.findall(
        r'<a[^>]*class="cf-index-link"[^>]*href="([^"]+)"|'
        r'<a[^>]*href="([^"]+)"[^>]*class="cf-index-link"',
        dom,
    )
    hrefs = sorted(a or b for a, b in links)
    assert len(hrefs) == 3, dom[-3000:]
    assert {Path(h).name for h in hrefs} == {"train.html", "eval.html", "dataset.html"}
    for href in hrefs:
        assert (home / href).is_file(), href  # the listed pages exist, relative to the index
    rows = [visible_text(r) for r in table_rows(dom)]
    train = next(r for r in rows if " train " in f" {r} ")
    assert re.match(r"Accepted, \d+ rows quarantined instruction_response-bank-gcp train", train)
    assert sum(r.startswith("Passed") for r in rows) == 2
    assert_offline(dom, probe)
    colors = {i["cls"].split()[1]: i["color"] for i in probe["icons"]}
    assert colors == {"fa-check-circle": GREEN, "fa-filter": AMBER}


def test_dataset_page_and_a_blocked_run(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    edit_suite(root, "dataset_profile.json", "train_rows", min_value=500)
    with pytest.raises(Exception, match="Data Docs are at"):
        harmonise(root, "bank-gcp", run_id="blocked")
    pages = list((root / ".cloudfed/clouds/bank-gcp/storage/data_docs/blocked").rglob("*.html"))
    dataset = next(p for p in pages if "dataset_profile-bank-gcp" in p.as_posix())
    dom, probe = probed(dataset)
    text = visible_text(dom)
    assert "Expectation Suite: dataset_profile-bank-gcp" in text
    assert "Status: Blocked Policy: 1 blocking expectation(s) failed: the run stops" in text
    row = next(visible_text(r) for r in table_rows(dom) if "fa-times" in r and "500" in r)
    assert "block: the run stops" in row and "minimum accepted training rows" in row
    assert_offline(dom, probe)
    red = [i for i in probe["icons"] if "fa-times" in i["cls"]]
    assert red and all(i["color"] == RED for i in red)


def test_make_offline_rewrites_links_relative_to_each_page(tmp_path: Path) -> None:
    page = tmp_path / "validations/suite/run/time/train.html"
    page.parent.mkdir(parents=True)
    page.write_text(
        "<html><head>"
        '<link rel="stylesheet" href="https://maxcdn.bootstrapcdn.com/b.min.css"/>\n'
        '<script src="https://code.jquery.com/jquery-3.7.1.min.js"></script>\n'
        '<link rel="shortcut icon" href="../../../static/images/favicon.ico"/>'
        "</head><body>"
        '<img src="https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/'
        'logo-long.png?d=20261128T0"/></body></html>'
    )
    for _ in range(2):  # a site rebuilt in the same folder: still one stylesheet link
        make_offline(tmp_path)
    out = page.read_text()
    assert "https://" not in out
    assert out.count("cloudfed-offline.css") == 1
    assert 'href="../../../../static/styles/cloudfed-offline.css"' in out
    assert 'href="../../../../static/images/favicon.ico"' in out
    assert 'src="../../../../static/images/logo-long.png"' in out
    assert (tmp_path / "static/styles/cloudfed-offline.css").read_text().count(".fa-times") == 1
