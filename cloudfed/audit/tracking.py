"""The audit's MLflow run: a sqlite store, never a file store, and artifacts next to the report.

MLflow is driven through `MlflowClient` with an explicit tracking URI, so the audit never moves
the process-wide tracking URI that a ZenML step or another run in the same process relies on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cloudfed.audit.config import AuditConfig


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:500]


def metrics(report: dict[str, Any]) -> dict[str, float]:
    """`exposure/<arm>/repeats_<r>_mean` and friends; NaN-free so every value is loggable."""
    out: dict[str, float] = {
        "exposure/max_possible": report["max_exposure_bits"],
        "exposure/chance": report["chance_exposure_bits"],
        "base_eval_loss": report["base_eval_loss"],
        "seconds": report["seconds"],
    }
    for arm in report["arms"]:
        name = arm["name"]
        for level in arm["exposure"]:
            key = f"exposure/{name}/repeats_{level['repeats']}"
            out[f"{key}_mean"] = level["mean"]
            out[f"{key}_max"] = level["max"]
            out[f"{key}_extracted"] = float(level["extracted"])
        out[f"eval_loss/{name}"] = arm["eval_loss"]
        out[f"seconds/{name}"] = arm["seconds"]
        if arm["epsilon_spent"] is not None:
            out[f"epsilon/{name}"] = arm["epsilon_spent"]
            out[f"noise_multiplier/{name}"] = arm["noise_multiplier"]
    return out


def _experiment_id(client: Any, name: str, artifacts: Path) -> str:
    from cloudfed.tracking import set_experiment_kind

    found = client.get_experiment_by_name(name)
    experiment = (
        str(found.experiment_id)
        if found is not None
        else str(client.create_experiment(name, artifact_location=artifacts.resolve().as_uri()))
    )
    set_experiment_kind(client, experiment)  # opens on its runs and charts, not on traces
    return experiment


def log_audit(cfg: AuditConfig, report: dict[str, Any], files: Mapping[str, Path]) -> str:
    """One run per audit, named by the arms it compares so that runs tell apart in the UI."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations of a new store
    cfg.mlflow.db_path.parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    artifacts = cfg.mlflow.db_path.parent / "mlartifacts"
    experiment = _experiment_id(client, cfg.mlflow.experiment, artifacts)
    arms = " vs ".join(arm["name"] for arm in report["arms"])
    name = f"canary audit · {arms}"
    run = client.create_run(experiment, run_name=name, tags={"audit": "canaries"})
    run_id = run.info.run_id
    try:
        params: dict[str, str] = {}
        _flatten("", report["config"], params)
        items = sorted(params.items())
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[start : start + 100]])
        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, 0) for k, v in sorted(metrics(report).items())]
        for start in range(0, len(values), 1000):
            client.log_batch(run_id, metrics=values[start : start + 1000])
        for path in files.values():
            client.log_artifact(run_id, str(path), artifact_path="audit")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id
