"""Helpers to run the real pipeline through the ZenML CLI on an isolated local stack."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PARTY_FILES = {
    "hospital-aws": ("csv", "hospital-aws"),
    "bank-gcp": ("jsonl", "bank-gcp"),
    "insurer-azure": ("parquet", "insurer-azure"),
}


PROJECT_DIRS = ("cloudfed", "steps", "pipelines", "infra")


def zenml_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NO_COLOR"] = "1"
    return env


def make_project(dest: Path) -> Path:
    """A copy of the project with its own `.zen`, so tests never touch the checkout's ZenML repo."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_DIRS:
        shutil.copytree(REPO_ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = zenml_env()
    subprocess.run(
        [str(BIN / "zenml"), "init"], cwd=dest, env=env, check=True, capture_output=True, text=True
    )
    subprocess.run(
        ["bash", "infra/register_local_stack.sh", str(BIN), "cloudfed-test"],
        cwd=dest,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return dest


def federation(work: Path, clouds: Path, parties: list[str], **overrides: Any) -> dict[str, Any]:
    fed: dict[str, Any] = {
        "federation_id": "test-federation",
        "base_model": "builtin:tiny-llama",
        "model_cache": str(work / "models"),
        "exchange": str(work / "exchange"),
        "coordinator_storage": str(work / "coordinator"),
        "contracts_dir": str(REPO_ROOT / "data_contracts"),
        "rounds": 2,
        "min_parties": 2,
        "seed": 3,
        "training": {
            "local_steps": 30,
            "batch_size": 8,
            "learning_rate": 0.003,
            "max_seq_len": 128,
            "max_eval_rows": 48,
        },
        "lora": {"rank": 4, "alpha": 8},
        "parties": [
            {
                "name": p,
                "raw": {
                    "train": str(clouds / p / "raw" / f"train.{PARTY_FILES[p][0]}"),
                    "eval": str(clouds / p / "raw" / f"eval.{PARTY_FILES[p][0]}"),
                },
                "mapping": str(REPO_ROOT / "data_contracts" / "sources" / f"{p}.yaml"),
                "storage": str(clouds / p / "storage"),
            }
            for p in parties
        ],
    }
    fed.update(overrides)
    return fed


def write_config(path: Path, fed: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"enable_cache": False, "parameters": {"federation": fed}}))
    return path


def policy_dir(config: Path) -> Path:
    """Where the parties of a test run keep their policies: beside its run config."""
    return config.parent / "party-policies"


def party_env(project: Path, config: Path) -> dict[str, str]:
    """The run's environment with its parties' policies provisioned (kept once written), as
    `make run` does; a config too broken to provision is left for the pipeline to refuse."""
    env = zenml_env()
    env["CLOUDFED_PARTY_POLICIES"] = str(policy_dir(config))
    subprocess.run(
        [str(BIN / "python"), "-m", "cloudfed.party_policy", "provision", str(config)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    return env


def pipeline_command(config: Path) -> list[str]:
    return [
        str(BIN / "zenml"),
        "pipeline",
        "run",
        "pipelines.federated_training.federated_training",
        "-c",
        str(config),
    ]


def run_pipeline(
    project: Path, config: Path, timeout: int = 900, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`extra_env`: the parties' own runtime environment (e.g. a fault-injection hook)."""
    return subprocess.run(
        pipeline_command(config),
        cwd=project,
        env={**party_env(project, config), **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_until_killed(
    project: Path, config: Path, when: Callable[[], bool], log: Path, timeout: float = 600
) -> tuple[bool, str]:
    """Start a run; SIGKILL its whole process group once `when()` holds.

    Returns whether it was killed while still running, and its log. A crash as it would happen:
    no handler runs, locks and reservations stay where the run left them.
    """
    with log.open("w") as fh:
        proc = subprocess.Popen(
            pipeline_command(config),
            cwd=project,
            env=party_env(project, config),
            stdout=fh,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        killed = False
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if when():
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = True
                    break
                time.sleep(0.02)
        finally:
            timed_out = proc.poll() is None and not killed
            if timed_out:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    said = log.read_text()
    if timed_out:  # not "the run ended before the kill": it never reached the kill point
        said += f"\n[run_until_killed: the kill point was not reached within {timeout:g} s]\n"
    return killed, said


def stored_files(
    root: Path | str, options: dict[str, Any] | None = None
) -> Iterator[tuple[str, bytes]]:
    """Every file under a folder or an object-store prefix (fsspec URL), hidden names included."""
    if isinstance(root, Path) or "://" not in root:
        for path in Path(root).rglob("*"):
            if path.is_file():
                yield str(path), path.read_bytes()
        return
    import fsspec

    fs, base = fsspec.core.url_to_fs(root, **(options or {}))
    fs.invalidate_cache()  # another process may have written since this one last listed
    for path in fs.find(base):
        yield fs.unstrip_protocol(path), fs.cat_file(path)


def scan_for(
    roots: Sequence[Path | str], needles: list[bytes], options: dict[str, Any] | None = None
) -> dict[str, list[str]]:
    """Every file under `roots` (folders, or bucket URLs read with `options`) holding a needle."""
    hits: dict[str, list[str]] = {}
    for root in roots:
        for name, data in stored_files(root, options):
            for needle in needles:
                if needle in data:
                    hits.setdefault(needle.decode(errors="replace"), []).append(name)
    return hits


def mlflow_last_run():
    """The MLflow client on the isolated ZenML store and the newest run of the pipeline."""
    from mlflow.tracking import MlflowClient

    dbs = sorted(Path(os.environ["ZENML_CONFIG_PATH"]).rglob("mlflow.db"))
    assert dbs, "no MLflow sqlite store under the isolated ZenML config"
    client = MlflowClient(tracking_uri=f"sqlite:///{dbs[0]}")
    exp = client.get_experiment_by_name("federated_training")
    assert exp is not None, "MLflow experiment 'federated_training' missing"
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    assert runs
    return client, runs[0]
