"""What every pipeline module sets up before ZenML starts a run (pipelines/_common.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.e2e_support import REPO_ROOT

PROBE = (
    "import os, pipelines._common as c; from zenml.constants import "
    "ENV_ZENML_EXECUTION_CONTEXT_STEP_RUN_CACHE_SIZE as name; "
    "print(name == c.STEP_RUN_CACHE_ENV, os.environ[name])"
)


def _probe(**env: str) -> str:
    base = {
        k: v for k, v in os.environ.items() if k != "ZENML_EXECUTION_CONTEXT_STEP_RUN_CACHE_SIZE"
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO_ROOT,
        env={**base, "PYTHONPATH": str(REPO_ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_step_run_cache_holds_a_50_party_fan_in() -> None:
    """ZenML's default (100) breaks any step with more than 100 upstream steps (50 parties)."""
    same, size = _probe().split()
    assert same == "True" and int(size) >= 10_000


def test_a_cache_size_the_user_set_wins() -> None:
    assert _probe(ZENML_EXECUTION_CONTEXT_STEP_RUN_CACHE_SIZE="500") == "True 500"
