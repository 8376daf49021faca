"""What a person running the federation reads: a progress line per round, not ZenML's step log.

`make run` sets `CLOUDFED_LOG=quiet` (`make run V=1` sets `full`). In the process that runs the
pipeline, quiet mode filters what reaches the console and nothing else: ZenML's stored step
logs, MLflow and the report files keep everything, so a quiet run can still be read in full
afterwards. What stays on the console:
- cloudfed's own progress lines (logger `cloudfed.progress`: one per stage and round);
- warnings and errors a user must act on (a party excluded or dropped, a budget stop, a failure);
- whatever the steps print themselves (the final round table, once).
What goes: ZenML's per-step INFO lines, external artifact uploads, GX's registration chatter, and
the warnings known to need no action (listed in `NOISE` with the reason each is harmless).

`CLOUDFED_LOG` is read by the launching process from its shell. A party step refuses any
`CLOUDFED_*` variable set in a run configuration's `environment:`, this one included: it has no
business there.
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings

LOG_ENV = "CLOUDFED_LOG"
PROGRESS_LOGGER = "cloudfed.progress"

# Warnings that need no action, each with why: a quiet console drops them, V=1 shows them.
NOISE: tuple[tuple[str, str], ...] = (
    # ZenML's MLflow tracker disables autologging for every framework it knows; fastai is not
    # installed, so disabling it fails. We never enable autologging.
    ("zenml.integrations.mlflow", r"Failed to disable MLflow autologging"),
    # Opacus's per-sample-gradient hooks on LoRA layers whose inputs come from frozen weights:
    # torch notes the full backward hook sees no input gradient, which Opacus does not use.
    ("py.warnings", r"Full backward hook is firing when gradients are computed"),
)


def quiet() -> bool:
    """Quiet only when asked: a bare `zenml pipeline run` keeps ZenML's usual full log."""
    return os.environ.get(LOG_ENV, "full").strip().lower() == "quiet"


class QuietConsole(logging.Filter):
    """Lets through cloudfed's progress lines and the warnings that need a person."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == PROGRESS_LOGGER or record.name.startswith(PROGRESS_LOGGER + "."):
            return True
        if record.levelno < logging.WARNING:
            return False
        if record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        return not any(
            record.name.startswith(name) and re.search(pattern, message) for name, pattern in NOISE
        )


def _is_console(handler: logging.Handler) -> bool:
    """A stream handler that is not a file: ZenML's console handler, or a plain one elsewhere."""
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )


def configure() -> bool:
    """Install the quiet console when `CLOUDFED_LOG=quiet`; returns whether it did.

    Called once the logging framework has set up its handlers (ZenML does on import), so the
    filter sits on the console handler only and stored logs stay complete. Idempotent.
    """
    progress = logging.getLogger(PROGRESS_LOGGER)
    progress.setLevel(logging.INFO)  # shown even when ZENML_LOGGING_VERBOSITY hides INFO
    if not quiet():
        return False
    for handler in logging.getLogger().handlers:
        if _is_console(handler) and not any(isinstance(f, QuietConsole) for f in handler.filters):
            handler.addFilter(QuietConsole())
    # Python warnings reach the console either through logging (ZenML captures them) or
    # directly; the harmless ones go in both cases.
    for name, pattern in NOISE:
        if name == "py.warnings":
            warnings.filterwarnings("ignore", message=pattern)
    try:  # transformers' "Writing model shards" bar (and the hub's), printed straight to stderr
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    return True


def progress_bars() -> bool:
    """Whether cloudfed's own per-step bars (tqdm) are drawn: not on a quiet console."""
    return not quiet()


class Progress:
    """One line per stage and round, with the time since the run started."""

    def __init__(self, rounds: int, parties: int) -> None:
        self.rounds, self.parties = rounds, parties
        self.start = time.monotonic()
        self.log = logging.getLogger(PROGRESS_LOGGER)

    def elapsed(self) -> str:
        seconds = int(time.monotonic() - self.start)
        return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"

    def line(self, text: str) -> str:
        """Log one progress line (and return it, so callers and tests can see what was said)."""
        msg = f"cloudfed: {text} [{self.elapsed()} elapsed]"
        self.log.info(msg)
        return msg

    def harmonised(self, passed: int) -> str:
        return self.line(f"harmonised: {passed}/{self.parties} parties passed their data contracts")

    def round_done(self, r: int, trained: int, uploaded: int, evaluated: int, dropped: int) -> str:
        """Round r of N: how many parties got through each stage, so a stall names its stage."""
        name = "base model evaluated" if r == 0 else f"{trained} trained, {uploaded} uploaded"
        extra = f", {dropped} dropped" if dropped else ""
        return self.line(
            f"round {r}/{self.rounds}: {name}, {evaluated}/{self.parties} parties evaluated{extra}"
        )
