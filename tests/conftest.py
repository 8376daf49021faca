"""Test isolation: every session gets its own ZenML config, offline hubs and no analytics.

The variables are set at import time, before any test module imports zenml, because ZenML reads
its config path once per process.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="cloudfed-tests-"))
os.environ["ZENML_CONFIG_PATH"] = str(_SESSION_DIR / "zenml")
os.environ["ZENML_ANALYTICS_OPT_IN"] = "false"
os.environ["ZENML_ENABLE_RICH_TRACEBACK"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def tiny_model_path(session_dir: Path) -> str:
    """The built-in tiny Llama, built once per session into the session's cache."""
    from cloudfed.training.model import resolve_base_model

    return resolve_base_model("builtin:tiny-llama", cache_dir=session_dir / "models", seed=0)


@pytest.fixture(autouse=True)
def party_policies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's parties read their policies (and keep their state) in a folder of its own."""
    from cloudfed.party_policy import POLICY_DIR_ENV

    folder = tmp_path / "party-policies"
    monkeypatch.setenv(POLICY_DIR_ENV, str(folder))
    return folder
