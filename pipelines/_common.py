"""What every pipeline of the project needs around its wiring: the -c file, errors, the tracker."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from cloudfed.errors import CloudfedError

# ZenML 0.98 keeps the run's finished steps in a cache of 100 (BoundedDict) while resolving a
# step's inputs, and adds the ones it fetched with one update that evicts the oldest: a step with
# more than 100 upstream steps then fails with "No step `harmonize_<party>` found in current run"
# (50 parties: the round-0 log step reads 50 evaluations and 50 datasets; benchmarks/scale.py).
# Read when the run starts, after this module is imported; a value set by the user wins.
STEP_RUN_CACHE_ENV = "ZENML_EXECUTION_CONTEXT_STEP_RUN_CACHE_SIZE"
os.environ.setdefault(STEP_RUN_CACHE_ENV, "100000")


def config_source() -> str:
    """The -c file as the user typed it, so messages can name it."""
    argv = sys.argv
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return "the run configuration"


@contextmanager
def user_errors() -> Iterator[None]:
    """A fixable problem ends the run with its message and exit code 2, not a traceback."""
    try:
        yield
    except CloudfedError as exc:
        print(f"\ncloudfed: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def tracker_name() -> str | None:
    from zenml.client import Client

    tracker = Client().active_stack.experiment_tracker
    return tracker.name if tracker else None
