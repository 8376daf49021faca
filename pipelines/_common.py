"""What every pipeline of the project needs around its wiring: the -c file, errors, the tracker."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from cloudfed.errors import CloudfedError


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
