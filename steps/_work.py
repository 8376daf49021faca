"""Time the work inside a step, so benchmarks can tell ZenML+MLflow overhead from our own."""

from collections.abc import Iterator
from contextlib import contextmanager
from time import perf_counter
from typing import Any

from zenml import log_metadata

WORK_SECONDS = "work_seconds"


@contextmanager
def timed_work(**metadata: Any) -> Iterator[dict[str, Any]]:
    """Yield a dict the step may add metadata to; logged with the body's wall time at the end."""
    start = perf_counter()
    extra: dict[str, Any] = dict(metadata)
    try:
        yield extra
    finally:  # a failed step still records how long its work ran
        extra[WORK_SECONDS] = perf_counter() - start
        log_metadata(extra)
