"""MLflow's UI on the demo run's own store, in headless Chromium: what a reviewer sees.

`mlflow ui` is started on the store `make ui` would find (`infra/mlflow_uri.py` in the test's
ZenML project) and the demo's one pipeline run (tests/shared_demo.py) is opened the way the
README says: the run is named by what ran, its Model metrics tab starts with the headline charts
on the first screen, its artifacts open, and its Data Docs tags are absolute links.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import Browser, require_chromium
from tests.e2e_support import BIN, zenml_env
from tests.shared_demo import demo_mlflow_run, demo_run

pytestmark = pytest.mark.e2e
HEADLINE = [f"federation/{k}" for k in ("eval_loss", "eval_perplexity", "epsilon", "bytes_sent")]
ML_VIEW = "workflowType=machine_learning"  # MLflow 3.17's browser-side GenAI/training switch


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_chromium()  # before the pipeline run: without a browser there is nothing to check
    return demo_run(tmp_path_factory)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(demo: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`make ui` on the demo's project: the tracking URI from the stack, then `mlflow ui`."""
    assert demo["proc"].returncode == 0, demo["proc"].stderr[-6000:]
    project = demo["work"] / "project"
    uri = subprocess.run(
        [str(BIN / "python"), "infra/mlflow_uri.py"],
        cwd=project,
        env=zenml_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert uri.startswith("sqlite:///"), uri
    port = _free_port()
    log = tmp_path_factory.mktemp("mlflow-ui") / "ui.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "ui", "--backend-store-uri", uri]
            + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=project,
            env=zenml_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its uvicorn workers go with it
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    with Browser(tmp_path_factory.mktemp("chromium-profile")) as b:
        yield b


def _run_page(demo: dict[str, Any], ui: str, tab: str = "") -> tuple[Any, str]:
    _, run = demo_mlflow_run(demo)
    page = f"{ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return run, f"{page}{tab}?{ML_VIEW}"


def test_the_headline_charts_are_the_first_thing_on_the_model_metrics_tab(
    demo: dict[str, Any], ui: str, browser: Browser
) -> None:
    run, url = _run_page(demo, ui, "/model-metrics")
    # Drawn: each chart's legend names this run and the key (the title alone comes first).
    legends = [f"{run.info.run_name} ({k})" for k in HEADLINE]
    drawn = " && ".join(f"document.body.innerText.includes({t!r})" for t in legends)
    page = browser.open(
        url,
        f"""({drawn}) && {{
            sections: Array.from(document.querySelectorAll(
                '[data-testid="experiment-view-compare-runs-section-header"]'
            )).map(e => e.innerText.split('\\n')[0]),
            charts: Array.from(document.querySelectorAll('h4[title]')).map(e => e.title),
            top: Math.max(...{HEADLINE!r}.map(
                k => document.querySelector(`h4[title="${{k}}"]`).getBoundingClientRect().bottom
            )),
            text: document.body.innerText,
        }}""",
    )
    assert page["sections"][0] == "federation", page["sections"]
    assert sorted(page["charts"][:4]) == sorted(HEADLINE), page["charts"]
    assert any(s.startswith("party/") for s in page["sections"][1:]), page["sections"]
    assert page["top"] < 1200, page["top"]  # on the first screen, not under per-party groups
    assert page["text"].index(legends[0]) < page["text"].index("party/")


def test_the_run_is_named_by_what_ran_and_links_to_data_docs(
    demo: dict[str, Any], ui: str, browser: Browser
) -> None:
    run, url = _run_page(demo, ui)
    parties = [p["name"] for p in demo["fed"]["parties"]]
    text = browser.open(
        url,
        "document.body.innerText.includes('data_docs') "
        "&& document.body.innerText.includes('privacy/mode') && document.body.innerText",
    )
    rounds = demo["fed"]["rounds"]
    assert f"demo-federation · secagg+dp-sgd · r1-{rounds}" in text
    for party in parties:
        link = run.data.tags[f"party/{party}/data_docs"]
        assert f"party/{party}/data_docs" in text and link in text, party
        page = Path(urllib.request.url2pathname(urllib.parse.urlparse(link).path))
        assert link.startswith("file:///") and page.is_file(), link


def test_the_artifacts_open_in_the_ui(demo: dict[str, Any], ui: str, browser: Browser) -> None:
    _, url = _run_page(demo, ui, "/artifacts/report/summary.txt")
    shown = "document.body.innerText"
    text = browser.open(url, f"{shown}.includes('held-out loss per round') && {shown}")
    for folder in ("report", "final_adapter", "harmonisation", "privacy", "protection"):
        assert folder in text.split(), folder
    assert "eps hospital-aws" in text  # the summary itself, read through the server


def test_the_readme_link_opens_the_experiment_on_its_runs(
    demo: dict[str, Any], ui: str, browser: Browser
) -> None:
    _, run = demo_mlflow_run(demo)
    text = browser.open(
        f"{ui}/#/experiments/{run.info.experiment_id}?{ML_VIEW}",
        f"document.body.innerText.includes({run.info.run_name!r}) && document.body.innerText",
    )
    assert "Runs" in text.split()  # the model-training view's tab, not the GenAI overview
