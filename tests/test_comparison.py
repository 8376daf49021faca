"""The comparison table (issue 13): the tiny comparison once per session, in-process, then
through `zenml pipeline run` on an isolated stack."""

from __future__ import annotations

import csv
import io
import math
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from cloudfed.comparison import (
    ComparisonSpec,
    RunResult,
    finish,
    parse_spec,
    prepare_data,
    run_arm,
)
from cloudfed.data.ref import DatasetRef
from cloudfed.federation import FederationConfig
from cloudfed.party import read_rows
from tests.e2e_support import BIN, REPO_ROOT, make_project, zenml_env

TINY = REPO_ROOT / "configs" / "compare-tiny.yaml"
FULL = REPO_ROOT / "configs" / "compare.yaml"
E2E_ARMS = ("local-only", "fedavg-plaintext", "cloudfed-hybrid-examples")


def tiny_raw(model_cache: Path) -> dict[str, Any]:
    """configs/compare-tiny.yaml with repository paths made absolute (runs from any folder)."""
    raw = yaml.safe_load(TINY.read_text(encoding="utf-8"))["parameters"]["comparison"]
    fed = raw["federation"]
    fed["contracts_dir"] = str(REPO_ROOT / "data_contracts")
    fed["model_cache"] = str(model_cache)
    for p in fed["parties"]:
        p["mapping"] = str(REPO_ROOT / p["mapping"])
    return raw


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory, session_dir: Path) -> dict[str, Any]:
    """The tiny comparison, run once: its spec, data, results and files."""
    root = tmp_path_factory.mktemp("comparison")
    spec = parse_spec(tiny_raw(session_dir / "models"))
    active, _ = spec.active_arms()
    data = prepare_data(spec, root)  # writes the demo data first (demo_data in the config)
    results = [r for arm in active for r in run_arm(spec, arm, data, root)]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    files = finish(spec, results, root, tracking_uri=uri)
    return {
        "root": root,
        "spec": spec,
        "data": data,
        "results": results,
        "files": files,
        "uri": uri,
    }


def csv_rows(files: dict[str, Path]) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(files["csv"].read_text(encoding="utf-8"))))


def test_every_arm_and_split_has_a_finite_row(tiny: dict[str, Any]) -> None:
    spec: ComparisonSpec = tiny["spec"]
    active, skipped = spec.active_arms()
    rows = csv_rows(tiny["files"])
    assert [(r["arm"], r["split"]) for r in rows] == [
        (a.name, s) for a in active for s in spec.splits
    ]
    parties = [p["name"] for p in spec.federation["parties"]]
    for r in rows:
        values = [r["eval_loss_mean"], r["perplexity_mean"], *(r[f"loss_{p}"] for p in parties)]
        assert all(math.isfinite(float(v)) for v in values), r
        assert int(r["rounds"]) == spec.federation["rounds"], r
    if "aggregation" not in FederationConfig.model_fields:
        assert any("cloudfed-hybrid-fedadam" in s for s in skipped)
    text = tiny["files"]["markdown"].read_text(encoding="utf-8")
    assert "not run, FederationConfig has no ['aggregation']" in text or not skipped


def test_csv_and_markdown_agree(tiny: dict[str, Any]) -> None:
    lines = tiny["files"]["markdown"].read_text(encoding="utf-8").splitlines()
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| arm ")]
    rows = csv_rows(tiny["files"])
    assert len(table) == len(rows)
    for line, row in zip(table, rows, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:2] == [row["arm"], row["split"]]
        assert cells[2].startswith(f"{float(row['eval_loss_mean']):.4f} ± ")
        assert cells[3].startswith(f"{float(row['perplexity_mean']):.2f} ± ")
        assert cells[-1] == f"{float(row['train_tokens']):,.0f}"
        eps = cells[-2]
        assert (eps == "-") == (row["epsilon"] == ""), (eps, row["epsilon"])


def test_chart_and_results_written(tiny: dict[str, Any]) -> None:
    assert tiny["files"]["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tiny["files"]["results"].stat().st_size > 0


def test_arms_are_separate_federations(tiny: dict[str, Any]) -> None:
    federated: list[RunResult] = [r for r in tiny["results"] if r.kind == "federated"]
    assert len(federated) >= 4
    ids = [r.federation_id for r in federated]
    ledgers = [r.ledger for r in federated]
    assert len(set(ids)) == len(ids) and len(set(ledgers)) == len(ledgers)
    assert all(Path(ledger).is_dir() for ledger in ledgers)
    dp = {r.arm: r for r in federated if r.final.epsilon is not None}
    assert {"dp-fl-party", "dp-fl-record"} <= set(dp)
    assert dp["dp-fl-party"].epsilon_unit == "party-level"
    assert dp["dp-fl-record"].epsilon_unit == "record-level"
    # No DP arm's spend shows up in another arm: each has its own ledger and policies.
    assert all(r.final.epsilon is None for r in federated if r.arm not in dp)


def test_token_budgets_are_equal(tiny: dict[str, Any]) -> None:
    """Every arm trains the same optimiser samples; tokens match wherever batches are fixed-size
    (DP-SGD draws Poisson batches of the same expected size)."""
    results: list[RunResult] = tiny["results"]
    assert len({r.samples for r in results}) == 1, {(r.arm, r.split): r.samples for r in results}
    fixed = {r.tokens for r in results if r.arm != "dp-fl-record"}
    assert max(fixed) <= 1.1 * min(fixed), fixed
    assert all(r.tokens > 0 for r in results)


def test_targets_are_computed(tiny: dict[str, Any]) -> None:
    import json

    doc = json.loads(tiny["files"]["results"].read_text(encoding="utf-8"))
    goals = doc["targets"]
    assert len(goals) == 4
    assert all(g["value"] is not None and g["met"] is not None for g in goals), goals


def test_mlflow_run_per_arm_in_its_own_experiment(tiny: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    spec: ComparisonSpec = tiny["spec"]
    client = MlflowClient(tracking_uri=tiny["uri"])
    exp = client.get_experiment_by_name(spec.experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    active, _ = spec.active_arms()
    assert sorted(r.info.run_name for r in runs) == sorted(a.name for a in active)
    run = next(r for r in runs if r.info.run_name == "he-fl")
    history = client.get_metric_history(run.info.run_id, "non-iid/eval_loss")
    assert [m.step for m in history] == [0, 1]
    names = {a.path for a in client.list_artifacts(run.info.run_id, "comparison")}
    assert {"comparison/table.md", "comparison/table.csv", "comparison/loss_per_round.png"} <= names


def test_iid_split_keeps_counts_and_mixes_domains(tiny: dict[str, Any]) -> None:
    data: dict[str, dict[str, DatasetRef]] = tiny["data"]
    non_iid, iid = data["non-iid"], data["iid"]
    frames = {}
    for p, ref in non_iid.items():
        assert iid[p].rows_train == ref.rows_train
        assert iid[p].eval_uri == ref.eval_uri  # each party keeps its own held-out split
        before = read_rows(ref.train_uri, ref.train_sha256)
        after = read_rows(iid[p].train_uri, iid[p].train_sha256)
        assert len(after) == len(before)
        assert before["domain"].nunique() == 1
        assert after["domain"].nunique() == len(non_iid), after["domain"].value_counts()
        frames[p] = (before, after)
    pooled = sorted(pd.concat([b for b, _ in frames.values()])["instruction"])
    dealt = sorted(pd.concat([a for _, a in frames.values()])["instruction"])
    assert pooled == dealt  # the same rows, only dealt out again


def test_tiny_config_has_every_arm_of_the_full_one() -> None:
    def arms(path: Path) -> list[str]:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        return [a["name"] for a in doc["parameters"]["comparison"]["arms"]]

    assert arms(TINY) == arms(FULL)


def test_a_misspelt_override_is_refused_before_anything_runs(session_dir: Path) -> None:
    from cloudfed.errors import ConfigError

    raw = tiny_raw(session_dir / "models")
    raw["arms"][2]["overrides"] = {"protection": {"defualt": "plaintext"}}
    with pytest.raises(ConfigError, match="did you mean 'default'"):
        parse_spec(raw)


def test_comparison_pipeline_through_zenml(tmp_path: Path, session_dir: Path) -> None:
    """One command, `zenml pipeline run pipelines.comparison.comparison -c ...`, on a tiny run."""
    project = make_project(tmp_path / "project")
    raw = tiny_raw(session_dir / "models")
    # Short: one split and three arms (a baseline, plaintext, secure aggregation) through ZenML;
    # every arm and both splits run in-process above.
    raw["splits"] = ["non-iid"]
    raw["arms"] = [a for a in raw["arms"] if a["name"] in E2E_ARMS]
    config = tmp_path / "compare-tiny.yaml"
    config.write_text(yaml.safe_dump({"enable_cache": False, "parameters": {"comparison": raw}}))
    proc = subprocess.run(
        [
            str(BIN / "zenml"),
            "pipeline",
            "run",
            "pipelines.comparison.comparison",
            "-c",
            str(config),
        ],
        cwd=project,
        env=zenml_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = project / ".cloudfed" / "comparison-tiny"
    assert (out / "table.md").is_file() and (out / "loss_per_round.png").is_file()
    rows = list(csv.DictReader((out / "table.csv").open(encoding="utf-8")))
    active, _ = parse_spec(raw).active_arms()
    assert [r["arm"] for r in rows] == [a.name for a in active]
    from mlflow.tracking import MlflowClient

    dbs = sorted(Path(zenml_env()["ZENML_CONFIG_PATH"]).rglob("mlflow.db"))
    assert dbs, "no MLflow sqlite store under the isolated ZenML config"
    client = MlflowClient(tracking_uri=f"sqlite:///{dbs[0]}")
    exp = client.get_experiment_by_name(raw["experiment"])
    assert exp is not None
    assert len(client.search_runs([exp.experiment_id])) == len(active)


def test_comparison_and_simulation_never_import_zenml() -> None:
    import sys

    code = (
        "import sys, cloudfed.simulation, cloudfed.comparison.report, cloudfed.comparison.runs; "
        "sys.exit('zenml' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0
