"""Stage deadlines: the coordinator waits for a stage's party steps until its deadline, no longer.

A party that has not answered when a stage closes is dropped from the round as if it had crashed,
and the protocol's dropout path takes over (secure aggregation recovers its masks from the shares,
the round goes on while `min_parties` remain). Whatever it sends afterwards is refused: lateness
is judged by when the coordinator observed the answer, on the coordinator's own monotonic clock,
never by a time a party wrote (a party's clock is its own to set).

Framework-free: a "pending" answer is anything with `running() -> bool` (ZenML's step futures
have it), so the logic is tested without ZenML and the pipeline only supplies the futures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from cloudfed.artifacts import Rejection

logger = logging.getLogger(__name__)

# Longest deadline accepted: a week. A stage that takes longer is a stuck run, not a slow one.
MAX_DEADLINE_SECONDS = 7 * 24 * 3600.0
POLL_SECONDS = 0.2


class StageDeadlines(BaseModel):
    """Seconds each party stage of a round may take, from when the coordinator launches it.

    A cloud step operator spends minutes launching a job before the step's code starts
    (README, "Step cost on cloud step operators"), so the defaults leave room for a launch
    queue: generous for training and evaluation, which load the model, and half an hour for
    the light protocol stages. The secure-aggregation advertisement runs inside the training
    step, so `train` covers both.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: float = Field(4 * 3600.0, gt=0.0, le=MAX_DEADLINE_SECONDS)
    share_keys: float = Field(1800.0, gt=0.0, le=MAX_DEADLINE_SECONDS)
    upload: float = Field(1800.0, gt=0.0, le=MAX_DEADLINE_SECONDS)
    unmask: float = Field(1800.0, gt=0.0, le=MAX_DEADLINE_SECONDS)
    evaluate: float = Field(2 * 3600.0, gt=0.0, le=MAX_DEADLINE_SECONDS)

    def seconds(self, stage: str) -> float:
        if stage not in type(self).model_fields:
            raise KeyError(f"no deadline for stage {stage!r}")
        return float(getattr(self, stage))


class Pending(Protocol):
    """An answer the coordinator is waiting for (a ZenML step future, in the pipeline)."""

    def running(self) -> bool: ...


def missed_reason(stage: str) -> str:
    return f"missed the {stage} deadline"


@dataclass
class StageWindow:
    """One stage of one round: open from launch until `seconds` later on the coordinator's clock.

    `collect` waits for the pending answers until they are all in or the window closes; it
    returns the on-time ones, the parties it drops, and the ones still running, which a
    `LateAnswers` keeps an eye on so that their answers are refused, with a log line, when
    they come.
    """

    stage: str
    round: int
    seconds: float
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    opened_at: float = field(init=False)
    closed_at: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.opened_at = self.clock()

    @property
    def closes_at(self) -> float:
        return self.opened_at + self.seconds

    def collect(
        self, pending: Mapping[str, Pending]
    ) -> tuple[dict[str, Any], list[Rejection], dict[str, Any]]:
        """(finished, dropped, late): wait until every answer is in or the deadline passes.

        `finished` maps each party whose step ended before the close to its pending object
        (which may still hold a failure, for the caller to read); `late` those still running.
        """
        waiting = dict(pending)
        finished: dict[str, Any] = {}
        while waiting and (now := self.clock()) < self.closes_at:  # observed before the close
            for party, answer in list(waiting.items()):
                if not answer.running():
                    finished[party] = waiting.pop(party)
            if waiting:
                self.sleep(min(POLL_SECONDS, self.closes_at - now))
        self.closed_at = self.clock()
        dropped = [Rejection(party=p, reason=missed_reason(self.stage)) for p in sorted(waiting)]
        for r in dropped:
            logger.warning(
                "round %d: party %s dropped: %s (%g s); the %s stage closed without it",
                self.round,
                r.party,
                r.reason,
                self.seconds,
                self.stage,
            )
        return finished, dropped, waiting


@dataclass
class LateAnswers:
    """Steps still running when their stage closed; what they send is refused when it comes.

    `sweep` is called at every stage boundary (and at the end of the run): an answer that has
    come in since is logged as refused and never read. The coordinator never passes it on, so
    a message a late party puts on the exchange is never opened.
    """

    clock: Callable[[], float] = time.monotonic
    late: list[tuple[StageWindow, str, Pending]] = field(default_factory=list)
    refused: list[Rejection] = field(default_factory=list)

    def add(self, window: StageWindow, late: Mapping[str, Pending]) -> None:
        self.late += [(window, party, answer) for party, answer in sorted(late.items())]

    def sweep(self) -> list[Rejection]:
        """Log and return the late answers that came in since the last sweep."""
        came: list[Rejection] = []
        still = []
        for window, party, answer in self.late:
            if answer.running():
                still.append((window, party, answer))
                continue
            after = self.clock() - (window.closed_at or window.closes_at)
            reason = (
                f"late {window.stage} refused: observed {after:.1f} s after the round "
                f"{window.round} {window.stage} stage closed"
            )
            logger.warning("round %d: party %s: %s", window.round, party, reason)
            came.append(Rejection(party=party, reason=reason))
        self.late = still
        self.refused += came
        return came

    def drain(self, seconds: float, *, sleep: Callable[[float], None] = time.sleep) -> list[str]:
        """At the end of a run: refuse late answers as they come, for at most `seconds`.

        Returns the steps still running then; their answers are never read.
        """
        until = self.clock() + seconds
        while self.late and self.clock() < until:
            self.sweep()
            if self.late:
                sleep(min(POLL_SECONDS * 5, max(until - self.clock(), 0.0)))
        self.sweep()
        return self.still_running()

    def still_running(self) -> list[str]:
        return [f"{party} ({w.stage}, round {w.round})" for w, party, _ in self.late]
