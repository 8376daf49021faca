"""A party that misses a stage deadline is dropped like a crash, and its late upload is refused.

The real pipeline on an isolated stack: the bank's own runtime makes its upload step sleep past
the upload deadline (`CLOUDFED_FAULT_DELAY`, a fault-injection hook read from the party's
environment, never from the run configuration). The round completes with the other two: secure
aggregation recovers the bank's masks from the shares, and the bank's sealed upload, which does
land on the exchange later, is never read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloudfed.data.demo import generate_demo
from cloudfed.party.admission import FAULT_DELAY_ENV
from tests.e2e_support import (
    federation,
    make_project,
    mlflow_last_run,
    run_pipeline,
    write_config,
)

pytestmark = pytest.mark.e2e
PARTIES = ["hospital-aws", "bank-gcp", "insurer-azure"]
UPLOAD_DEADLINE = 60.0  # honest uploads: 5-10 s here, several times that under CI load
SLEEP = 100.0


def test_party_missing_the_upload_deadline_is_dropped_and_its_late_upload_refused(
    tmp_path: Path,
) -> None:
    clouds = tmp_path / "clouds"
    generate_demo(clouds, seed=6, train_rows=60, eval_rows=10)
    fed = federation(tmp_path, clouds, PARTIES, rounds=1)
    fed["training"]["local_steps"] = 5
    fed["deadlines"] = {"upload": UPLOAD_DEADLINE}
    project = make_project(tmp_path / "project")
    proc = run_pipeline(
        project,
        write_config(tmp_path / "run.yaml", fed),
        extra_env={FAULT_DELAY_ENV: f"bank-gcp:upload:{SLEEP:g}"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "bank-gcp sleeps 100 s at upload, round 1" in out  # the hook did fire
    assert "party bank-gcp dropped: missed the upload deadline" in out
    assert "party bank-gcp: late upload refused: observed" in out
    assert "after the round 1 upload stage closed" in out

    client, run = mlflow_last_run()
    metrics = run.data.metrics
    assert metrics["round/parties_accepted"] == 2
    assert metrics["protection/secagg/shared"] == 3 and metrics["protection/secagg/uploaded"] == 2
    local = client.download_artifacts(run.info.run_id, "rejections/round_0001.json", str(tmp_path))
    reasons = {r["party"]: r["reason"] for r in json.loads(Path(local).read_text())}
    assert reasons == {"bank-gcp": "missed the upload deadline"}, reasons
    # The late upload did reach the exchange; the round was aggregated without it.
    late = (tmp_path / "exchange").rglob("updates/bank-gcp.sealed")
    assert len([p for p in late if ".sha256" not in p.parts]) == 1  # not its digest sidecar
