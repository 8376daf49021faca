"""The default demo's one pipeline run, shared by every test module that reads it.

`configs/local.yaml` moved into a temp folder and run through `benchmarks/demo_run.py` (so the
benchmark is exercised too). The run is made once per test session, whichever module asks
first, and its MLflow and ZenML run ids are taken at once: other modules' pipeline runs may come
between, so "the newest run" would not do.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudfed.data.demo import generate_demo
from tests.e2e_support import BIN, REPO_ROOT, make_project, mlflow_last_run, party_env, write_config

_RUN: dict[str, Any] = {}
# What the Makefile exports for `make run` (its quiet default included): the demo runs as a
# person's `make run` does, so its console is what that person reads.
MAKE_RUN_ENV = {
    "CLOUDFED_LOG": "quiet",
    "ZENML_ANALYTICS_OPT_IN": "false",
    "ZENML_ENABLE_RICH_TRACEBACK": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}


def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not _RUN:
        _RUN.update(_make(tmp_path_factory))
    return _RUN


def _make(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from zenml.client import Client

    work = tmp_path_factory.mktemp("demo")
    clouds = work / "clouds"
    generate_demo(clouds)  # what `make demo-data` writes
    doc = yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text(encoding="utf-8"))
    fed = copy.deepcopy(doc["parameters"]["federation"])
    fed.update(
        model_cache=str(work / "models"),
        exchange=str(work / "exchange"),
        coordinator_storage=str(work / "coordinator"),
        contracts_dir=str(REPO_ROOT / "data_contracts"),
    )
    for party in fed["parties"]:
        name = party["name"]
        party["raw"] = {
            k: str(clouds / Path(v).relative_to(".cloudfed/clouds"))
            for k, v in party["raw"].items()
        }
        party["mapping"] = str(REPO_ROOT / party["mapping"])
        party["storage"] = str(clouds / name / "storage")
    project = make_project(work / "project")
    config = write_config(work / "run.yaml", fed)
    console = work / "console.txt"
    proc = subprocess.run(
        [str(BIN / "python"), str(REPO_ROOT / "benchmarks" / "demo_run.py")]
        + ["--config", str(config), "--project", str(project), "--console", str(console)],
        cwd=project,
        env={**party_env(project, config), **MAKE_RUN_ENV},
        capture_output=True,
        text=True,
        timeout=1800,  # 161 s idle, 427 s under the heaviest load measured
    )
    out: dict[str, Any] = {"work": work, "clouds": clouds, "proc": proc, "fed": fed, "bench": {}}
    out["console"] = console.read_text(encoding="utf-8") if console.exists() else ""
    if proc.returncode == 0:
        out["bench"] = json.loads(proc.stdout)
        out["mlflow_run_id"] = mlflow_last_run()[1].info.run_id
        newest = Client().list_pipeline_runs(sort_by="desc:created", size=1).items[0]
        out["zenml_run_id"] = newest.id
    return out


def demo_mlflow_run(demo: dict[str, Any]) -> tuple[Any, Any]:
    """The MLflow client on the session's store and the demo's own run."""
    assert demo["proc"].returncode == 0, demo["proc"].stderr[-6000:]
    client, _ = mlflow_last_run()
    return client, client.get_run(demo["mlflow_run_id"])
