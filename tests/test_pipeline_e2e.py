"""The real pipeline through `zenml pipeline run`, 2 parties x 2 rounds, on an isolated stack."""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from cloudfed.data.demo import MARKER_PREFIX, generate_demo
from tests.e2e_support import (
    federation,
    make_project,
    mlflow_last_run,
    run_pipeline,
    scan_for,
    write_config,
)

pytestmark = pytest.mark.e2e
PARTIES = ["hospital-aws", "bank-gcp"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("e2e")
    clouds = work / "clouds"
    generate_demo(clouds, seed=11)
    project = make_project(work / "project")
    config = write_config(work / "run.yaml", federation(work, clouds, PARTIES))
    proc = run_pipeline(project, config)
    return {"work": work, "clouds": clouds, "proc": proc}


def test_run_completes_and_prints_summary(demo_run: dict) -> None:
    proc = demo_run["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    summary = (
        demo_run["work"] / "coordinator" / "test-federation" / "last_run" / "summary.txt"
    ).read_text()
    assert "held-out loss per round" in summary
    assert "round limit (2) reached" in summary


def test_mlflow_has_per_round_and_per_party_metrics(demo_run: dict) -> None:
    assert demo_run["proc"].returncode == 0
    client, run = mlflow_last_run()
    history = client.get_metric_history(run.info.run_id, "federation/eval_loss")
    assert sorted(m.step for m in history) == [0, 1, 2]
    for party in PARTIES:
        steps = {
            m.step for m in client.get_metric_history(run.info.run_id, f"party/{party}/eval_loss")
        }
        assert steps == {0, 1, 2}
        sent = client.get_metric_history(run.info.run_id, f"party/{party}/bytes_sent")
        assert sorted(m.step for m in sent) == [1, 2] and all(m.value > 0 for m in sent)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/round_table.csv", "report/loss_per_round.png"} <= artifacts
    assert client.list_artifacts(run.info.run_id, "final_adapter")


def test_mlflow_shows_contract_versions_report_and_data_docs(demo_run: dict) -> None:
    import json

    assert demo_run["proc"].returncode == 0
    client, run = mlflow_last_run()
    params, tags = run.data.params, run.data.tags
    local = client.download_artifacts(
        run.info.run_id, "harmonisation/report.json", str(demo_run["work"])
    )
    report = json.loads(Path(local).read_text())
    assert {p["party"] for p in report["parties"]} == set(PARTIES)
    assert report["totals"]["quarantined"] == 12  # 6 planted faults per party
    for party in PARTIES:
        assert len(params[f"party/{party}/contract_sha256"]) == 64
        assert report["contracts"][party] == params[f"party/{party}/contract_sha256"]
        link = tags[f"party/{party}/data_docs"]
        assert link.startswith("file:///"), link  # absolute: opens from anywhere
        docs = Path(urllib.request.url2pathname(urllib.parse.urlparse(link).path))
        assert docs.is_file() and docs.suffix == ".html", docs
        assert docs.is_relative_to((demo_run["clouds"] / party / "storage").resolve()), docs
        metrics = run.data.metrics
        assert metrics[f"party/{party}/quarantined/near_duplicate"] == 1
        assert metrics[f"party/{party}/pii/iban"] == 1


def test_mlflow_shows_protection_per_round(demo_run: dict) -> None:
    import json

    assert demo_run["proc"].returncode == 0
    client, run = mlflow_last_run()
    params, tags, rid = run.data.params, run.data.tags, run.info.run_id
    assert params["protection/mode"] == "secagg"
    assert len(params["protection/policy_sha256"]) == 64
    assert tags["protection/policy_sha256"] == params["protection/policy_sha256"]
    for r in (1, 2):
        path = client.download_artifacts(
            rid, f"protection/round_{r:04d}.json", str(demo_run["work"])
        )
        doc = json.loads(Path(path).read_text())
        assert (
            doc["mode"] == "secagg" and doc["policy_sha256"] == params["protection/policy_sha256"]
        )
        assert doc["secagg"]["uploaded"] == len(PARTIES) == doc["secagg"]["revealed"]
    survivors = client.get_metric_history(rid, "protection/secagg/uploaded")
    assert [m.value for m in sorted(survivors, key=lambda m: m.step)] == [2.0, 2.0]
    for party in PARTIES:
        ratio = client.get_metric_history(rid, f"party/{party}/bytes_over_fp32")
        assert ratio and all(1.0 <= m.value <= 1.05 for m in ratio), [m.value for m in ratio]


def test_final_adapter_beats_base_model(demo_run: dict) -> None:
    assert demo_run["proc"].returncode == 0
    client, run = mlflow_last_run()
    by_step = {
        m.step: m.value for m in client.get_metric_history(run.info.run_id, "federation/eval_loss")
    }
    assert by_step[2] < by_step[0], by_step


def _update_needles(clouds: Path) -> list[bytes]:
    """64-byte slices of every party's plaintext update tensors (past the safetensors header)."""
    needles = []
    for path in sorted(clouds.glob("*/storage/updates/*.safetensors")):
        data = path.read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        needles.append(data[header + 256 : header + 320])
    return needles


def test_no_raw_text_or_plaintext_update_reaches_coordinator_side(demo_run: dict) -> None:
    assert demo_run["proc"].returncode == 0
    zen = Path(os.environ["ZENML_CONFIG_PATH"])
    work = demo_run["work"]
    roots = [zen, work / "exchange", work / "coordinator"]
    assert all(r.is_dir() and any(r.rglob("*")) for r in roots), roots
    assert list(zen.rglob("mlflow.db")) and list(zen.rglob("*.log")), "stores not where scanned"
    markers = [MARKER_PREFIX.encode()]
    updates = _update_needles(demo_run["clouds"])
    assert len(updates) == len(PARTIES) * 2, "expected one update per party and round"
    # Positive controls: the scanner finds what legitimately lives on each side.
    assert scan_for([demo_run["clouds"] / PARTIES[0] / "raw"], markers)
    assert scan_for([demo_run["clouds"]], updates[:1])
    plan_artifact = next(zen.rglob("federation_plan"), None)
    assert plan_artifact is not None, "the plan artifact is not in the scanned artifact store"
    leaks = scan_for(roots, markers + updates)
    assert not leaks, f"raw records or plaintext updates leaked to the coordinator side: {leaks}"
    out = demo_run["proc"].stdout + demo_run["proc"].stderr
    assert MARKER_PREFIX not in out
