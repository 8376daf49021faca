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

from cloudfed.aggregation.fedbuff import durations, schedule_for, synchronous
from cloudfed.comparison import (
    ComparisonSpec,
    RunResult,
    finish,
    parse_spec,
    prepare_data,
    run_arm,
)
from cloudfed.comparison.clock import closest_loss, time_curves, time_to_loss
from cloudfed.data.ref import DatasetRef
from cloudfed.federation import FederationConfig
from cloudfed.party import read_rows
from tests.e2e_support import BIN, REPO_ROOT, make_project, zenml_env

TINY = REPO_ROOT / "configs" / "compare-tiny.yaml"
FULL = REPO_ROOT / "configs" / "compare.yaml"
E2E_ARMS = ("local-only", "fedavg-plaintext", "cloudfed-hybrid-examples")
SYNC, ASYNC = "cloudfed-hybrid-examples", "cloudfed-async-fedbuff"


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
    data = prepare_data(spec, root)  # writes the demo data first (demo_data in the config)
    results = [r for arm in spec.arms for r in run_arm(spec, arm, data, root)]
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
    active = spec.arms
    rows = csv_rows(tiny["files"])
    assert [(r["arm"], r["split"]) for r in rows] == [
        (a.name, s) for a in active for s in spec.splits
    ]
    parties = [p["name"] for p in spec.federation["parties"]]
    rounds = {a.name: a.overrides.get("rounds", spec.federation["rounds"]) for a in active}
    for r in rows:
        values = [r["eval_loss_mean"], r["perplexity_mean"], *(r[f"loss_{p}"] for p in parties)]
        assert all(math.isfinite(float(v)) for v in values), r
        assert int(r["rounds"]) == rounds[r["arm"]], r
        # the simulated clock: every federation has one, the baselines none
        assert (r["virtual_seconds"] == "") == (r["kind"] != "federated"), r
    assert {(r["arm"], r["split"]) for r in rows} >= {(ASYNC, s) for s in spec.splits}
    # every weighting preset and server optimiser of the aggregation block has its own row
    assert {a.name for a in active} >= {
        f"cloudfed-hybrid-{x}"
        for x in ("paper", "inverse-loss", "bandwidth", "fedadam", "fedyogi", "fedavgm", "fedprox")
    }


def test_csv_and_markdown_agree(tiny: dict[str, Any]) -> None:
    lines = tiny["files"]["markdown"].read_text(encoding="utf-8").splitlines()
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| arm ")]
    rows = csv_rows(tiny["files"])
    assert len(table) == len(rows)
    for line, row in zip(table, rows, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:2] == [row["arm"], row["split"]]
        simulated = "-" if row["virtual_seconds"] == "" else f"{float(row['virtual_seconds']):.2f}"
        assert cells[-4] == simulated
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
    every: list[RunResult] = tiny["results"]
    results = [r for r in every if r.arm != ASYNC]  # buffered: its own budget, below
    assert len({r.samples for r in results}) == 1, {(r.arm, r.split): r.samples for r in results}
    fixed = {r.tokens for r in results if r.arm != "dp-fl-record"}
    assert max(fixed) <= 1.1 * min(fixed), fixed
    assert all(r.tokens > 0 for r in results)
    # Each buffered event trains only its arrivals: the budget is per training, not per round.
    spec: ComparisonSpec = tiny["spec"]
    t = spec.federation["training"]
    trainings = sum(len(e.arrivals) for e in schedule_for(arm_config(tiny, ASYNC)).events)
    for r in every:
        if r.arm == ASYNC:
            assert r.samples == trainings * t["local_steps"] * t["batch_size"]
            assert r.samples != results[0].samples  # the table note says so


def test_targets_are_computed(tiny: dict[str, Any]) -> None:
    import json

    doc = json.loads(tiny["files"]["results"].read_text(encoding="utf-8"))
    goals = doc["targets"]
    assert len(goals) == 6
    assert all(g["value"] is not None and g["met"] is not None for g in goals[:4]), goals
    assert all(ASYNC not in g["detail"] for g in goals[:4])  # its budget differs: own target
    for g in goals[4:]:  # asynchronous: a ratio, or "not reached" with the closest loss
        assert g["met"] is not None, g
        assert (g["value"] is None) == (g["met"] is False and "not reached" in g["detail"]), g


def test_mlflow_run_per_arm_in_its_own_experiment(tiny: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    spec: ComparisonSpec = tiny["spec"]
    client = MlflowClient(tracking_uri=tiny["uri"])
    exp = client.get_experiment_by_name(spec.experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(a.name for a in spec.arms)
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
    assert [r["arm"] for r in rows] == [a.name for a in parse_spec(raw).arms]
    from mlflow.tracking import MlflowClient

    dbs = sorted(Path(zenml_env()["ZENML_CONFIG_PATH"]).rglob("mlflow.db"))
    assert dbs, "no MLflow sqlite store under the isolated ZenML config"
    client = MlflowClient(tracking_uri=f"sqlite:///{dbs[0]}")
    exp = client.get_experiment_by_name(raw["experiment"])
    assert exp is not None
    assert len(client.search_runs([exp.experiment_id])) == len(parse_spec(raw).arms)


def test_comparison_and_simulation_never_import_zenml() -> None:
    import sys

    code = (
        "import sys, cloudfed.simulation, cloudfed.comparison.report, cloudfed.comparison.runs; "
        "sys.exit('zenml' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0


# --- the asynchronous arm and its simulated clock ---------------------------------------------


def arm_config(tiny: dict[str, Any], name: str, **extra: Any) -> FederationConfig:
    """The federation config an arm of the tiny comparison ran with (seed 0)."""
    from cloudfed.comparison.spec import deep_merge, federation_for
    from cloudfed.federation import parse_federation

    spec: ComparisonSpec = tiny["spec"]
    overrides = deep_merge(deep_merge(spec.arm(name).overrides, {"seed": 0}), extra)
    return parse_federation(federation_for(spec, "check", tiny["root"], **overrides))


def test_async_arm_times_come_from_the_schedule(tiny: dict[str, Any]) -> None:
    """Buffered events at their `.at`, synchronous rounds at the slowest party: one clock."""
    spec: ComparisonSpec = tiny["spec"]
    buffered = schedule_for(arm_config(tiny, ASYNC))
    sync_cfg = arm_config(tiny, SYNC)
    sync = synchronous(durations(sync_cfg), rounds=sync_cfg.rounds)
    # tiny: 2 local steps x batch 4 x 64 tokens at 1000 tokens/s = 0.512 s; insurer-azure 5x.
    assert [e.at for e in buffered.events] == [0.512, 1.024]
    assert [[a.party for a in e.arrivals] for e in buffered.events] == [
        ["bank-gcp", "hospital-aws"]
    ] * 2
    assert [e.at for e in sync.events] == [2.56]
    for r in tiny["results"]:
        times = [rr.virtual_seconds for rr in r.rounds]
        if r.arm == ASYNC:
            assert times == [0.0, *(e.at for e in buffered.events)], times
            assert all(b > a for a, b in zip(times, times[1:], strict=False))
            assert [set(rr.accepted) for rr in r.rounds[1:]] == [
                {a.party for a in e.arrivals} for e in buffered.events
            ]
        elif r.arm == SYNC:
            assert times == [0.0, *(e.at for e in sync.events)], times
    # The target is read off these curves (seed means per split), as the helper computes it.
    import json

    curves = time_curves(tiny["results"])
    goals = json.loads(tiny["files"]["results"].read_text(encoding="utf-8"))["targets"][4:]
    for goal, split in zip(goals, ("non-iid", "iid"), strict=True):
        assert split.replace("non-iid", "non-IID").replace("iid", "IID") in goal["name"]
        fast, ref = curves[(ASYNC, split)], curves[(SYNC, split)]
        reached = time_to_loss(fast, ref[-1][1])
        if reached is None:
            assert goal["value"] is None and f"{closest_loss(fast):.4f}" in goal["detail"]
        else:
            assert goal["value"] == pytest.approx(reached / ref[-1][0])
    text = tiny["files"]["markdown"].read_text(encoding="utf-8")
    assert "simulated s" in text and "not measured" in text
    # MLflow: the simulated clock as a per-round series of the async arm's run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tiny["uri"])
    exp = client.get_experiment_by_name(spec.experiment)
    assert exp is not None
    run = next(r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == ASYNC)
    history = client.get_metric_history(run.info.run_id, "non-iid/simulated_seconds")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.0), (1, 0.512), (2, 1.024)]


def test_time_to_loss_interpolates_linearly_in_virtual_time() -> None:
    curve = [(0.0, 3.0), (1.0, 2.0), (3.0, 1.0)]
    assert time_to_loss(curve, 1.5) == 2.0  # between t=1 (2.0) and t=3 (1.0): halfway
    assert time_to_loss(curve, 2.0) == 1.0  # reached exactly at a round
    assert time_to_loss(curve, 3.5) == 0.0  # already at the start
    assert time_to_loss(curve, 0.5) is None
    assert closest_loss(curve) == 1.0


def test_time_ratio_target_met_and_not_reached() -> None:
    from cloudfed.comparison.report import _time_ratio

    fast = [(0.0, 3.0), (1.0, 2.0), (3.0, 1.0)]
    met = _time_ratio("t", fast, [(0.0, 3.0), (5.0, 1.5)], 0.6, ASYNC)
    assert met.value == pytest.approx(0.4) and met.met is True  # 2.0 s / 5.0 s
    slow = _time_ratio("t", fast, [(0.0, 3.0), (2.5, 1.5)], 0.6, ASYNC)
    assert slow.value == pytest.approx(0.8) and slow.met is False
    never = _time_ratio("t", fast, [(0.0, 3.0), (5.0, 0.5)], 0.6, ASYNC)
    assert never.value is None and never.met is False
    assert "not reached in 2 rounds; closest loss 1.0000, synchronous final 0.5000" in never.detail
    assert _time_ratio("t", None, fast, 0.6, ASYNC).met is None


def test_a_buffered_simulation_accepts_a_stale_contribution(tiny: dict[str, Any]) -> None:
    """insurer-azure 2x slow: its update from version 0 joins event 3 at staleness 2."""
    from cloudfed.comparison.spec import ArmSpec

    spec: ComparisonSpec = tiny["spec"]
    parties = [
        {**p, "compute_scale": 2.0} if p["name"] == "insurer-azure" else p
        for p in spec.federation["parties"]
    ]
    overrides = {**spec.arm(ASYNC).overrides, "rounds": 3, "parties": parties}
    arm = ArmSpec(name="async-stale", overrides=overrides)
    plan = schedule_for(arm_config(tiny, ASYNC, rounds=3, parties=parties))
    stale = plan.event(3).arrivals
    assert [(a.party, a.base, a.staleness) for a in stale] == [
        ("insurer-azure", 0, 2),
        ("bank-gcp", 2, 0),
    ]
    one = spec.model_copy(update={"splits": ["non-iid"], "arms": [arm]})
    (result,) = run_arm(one, arm, tiny["data"], tiny["root"] / "stale")
    last = result.rounds[3]
    assert set(last.accepted) == {"insurer-azure", "bank-gcp"}  # the coordinator took it
    assert last.staleness == {"insurer-azure": 2, "bank-gcp": 0}
    assert [r.virtual_seconds for r in result.rounds] == [0.0, *(e.at for e in plan.events)]
    assert all(math.isfinite(r.eval_loss) for r in result.rounds)
