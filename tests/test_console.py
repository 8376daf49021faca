"""The quiet console of `make run`: what a person must see gets through, the noise does not.

The end-to-end count of a default run's lines is in tests/test_pipeline_demo.py.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator

import pytest

from cloudfed import console


def _record(name: str, level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, "", 0, msg, (), None)


def test_the_quiet_filter_keeps_progress_and_warnings_a_user_must_act_on() -> None:
    quiet = console.QuietConsole()
    keep = [
        _record("cloudfed.progress", logging.INFO, "cloudfed: round 1/4: 3 trained"),
        _record("cloudfed", logging.WARNING, "round 2: party bank-gcp dropped at upload: x"),
        _record("cloudfed", logging.WARNING, "party bank-gcp excluded: fails its contract"),
        _record("cloudfed", logging.WARNING, "cloudfed: stopping before round 3: privacy budget"),
        _record("zenml.orchestrators", logging.ERROR, "Step train_bank-gcp_r1 failed."),
    ]
    drop = [
        _record("zenml.orchestrators", logging.INFO, "Step prepare has started."),
        _record("great_expectations._docs_decorators", logging.INFO, "Skipping registering x"),
        _record("zenml.artifacts", logging.INFO, "Uploading external artifact to 'x'."),
        _record(
            "zenml.integrations.mlflow.experiment_trackers.mlflow_experiment_tracker",
            logging.WARNING,
            "Failed to disable MLflow autologging for the following frameworks: ['fastai'].",
        ),
        _record(
            "py.warnings",
            logging.WARNING,
            "dp_sgd.py:147: UserWarning: Full backward hook is firing when gradients are computed "
            "with respect to module outputs since no inputs require gradients.",
        ),
    ]
    assert [quiet.filter(r) for r in keep] == [True] * len(keep)
    assert [quiet.filter(r) for r in drop] == [False] * len(drop)
    # A warning from the same logger as a known-harmless one, saying something else, stays.
    other = _record("zenml.integrations.mlflow", logging.WARNING, "MLflow tracking URI unreachable")
    assert quiet.filter(other)


@pytest.fixture
def console_handler() -> Iterator[logging.StreamHandler]:
    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    stored = logging.Handler()  # stands for ZenML's step-log storage: never filtered
    root.addHandler(handler)
    root.addHandler(stored)
    filters = warnings.filters[:]
    # pytest's own capture handlers are stream handlers on the root logger too: configure()
    # filters them, and later tests' caplog would lose INFO records unless they are restored.
    handler_filters = {h: h.filters[:] for h in root.handlers}
    try:
        yield handler
    finally:
        for h, kept in handler_filters.items():
            h.filters[:] = kept
        root.removeHandler(handler)
        root.removeHandler(stored)
        warnings.filters[:] = filters
        assert not stored.filters


def test_configure_filters_the_console_only_when_quiet(
    console_handler: logging.StreamHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(console.LOG_ENV, raising=False)
    assert not console.quiet() and console.progress_bars()
    assert console.configure() is False and not console_handler.filters
    monkeypatch.setenv(console.LOG_ENV, "quiet")
    assert console.quiet() and not console.progress_bars()
    assert console.configure() is True and console.configure() is True
    assert sum(isinstance(f, console.QuietConsole) for f in console_handler.filters) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        console.configure()
        warnings.warn("Full backward hook is firing when gradients are computed", stacklevel=1)
        warnings.warn("something a user must read", stacklevel=1)
    assert [str(w.message) for w in caught] == ["something a user must read"]


def test_progress_says_round_k_of_n_parties_and_elapsed() -> None:
    progress = console.Progress(rounds=4, parties=3)
    assert progress.round_done(0, 0, 0, 3, 0) == (
        "cloudfed: round 0/4: base model evaluated, 3/3 parties evaluated [0s elapsed]"
    )
    line = progress.round_done(2, 3, 2, 3, 1)
    assert line.startswith("cloudfed: round 2/4: 3 trained, 2 uploaded, 3/3 parties evaluated")
    assert ", 1 dropped [" in line
    progress.start -= 125
    said = progress.harmonised(2)
    assert said.endswith("2/3 parties passed their data contracts [2m05s elapsed]")
