"""Buffered asynchronous rounds (FedBuff, Nguyen et al. 2022) on a virtual clock.

Parties train at their own pace; the coordinator aggregates as soon as K updates have arrived
(the buffer), whatever global version each was trained from. Two cores cannot show the speed-up
of parallel clouds, so time here is virtual: a training lasts its tokens (local_steps x
batch_size x max_seq_len) times the party's public `compute_scale`, over
`buffer.tokens_per_second`. Measured seconds would make the schedule noisy and unrepeatable.

The schedule is a pure function of public configuration, so every role derives the same one:
- all parties start from the run's first global version at time 0;
- updates arrive in order of (time, party name); an arrival joins the open buffer r with
  staleness tau = (r - 1) - base, or is dropped if tau > max_staleness (its party restarts at
  once from the newest global);
- when the buffer holds K updates, event r aggregates them and their parties restart from
  global r. A party holds one update at a time: secure aggregation takes one update per party
  per round, and a second update from the same base would double its say.

`schedule_for(cfg)` is the entry point outside the pipeline; `drive` replays a schedule with
any train/aggregate functions (the comparison's in-process simulation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from cloudfed.aggregation.staleness import StalenessSettings
from cloudfed.errors import AggregationError

if TYPE_CHECKING:
    from cloudfed.federation import FederationConfig

Model = TypeVar("Model")


class BufferSettings(BaseModel):
    """`aggregation.buffer`: null runs synchronous rounds; a block runs buffered ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(2, ge=2)  # K: updates per aggregation (at least min_parties)
    max_staleness: int = Field(4, ge=0)  # S: older updates are dropped
    staleness: StalenessSettings = StalenessSettings()
    # The virtual clock: training tokens a compute_scale-1 party processes per virtual second.
    tokens_per_second: float = Field(1000.0, gt=0.0)


@dataclass(frozen=True)
class Arrival:
    party: str
    base: int  # the global version it was trained from
    started: float
    arrived: float
    staleness: int  # tau in the buffer it entered (dropped: the tau it would have had)


@dataclass(frozen=True)
class Event:
    round: int
    at: float  # virtual time of the aggregation
    seconds: float  # virtual time since the previous event (or the run's start)
    arrivals: tuple[Arrival, ...]
    dropped: tuple[Arrival, ...] = ()  # arrived since the previous event, staler than S
    restarts: tuple[str, ...] = ()  # who trains from global `round` after it


@dataclass(frozen=True)
class Schedule:
    start_round: int
    events: tuple[Event, ...]

    def event(self, round: int) -> Event:
        index = round - self.start_round - 1
        if not 0 <= index < len(self.events):
            raise AggregationError(f"the schedule has no event for round {round}")
        return self.events[index]

    @property
    def total_seconds(self) -> float:
        return self.events[-1].at if self.events else 0.0


def durations(cfg: FederationConfig, parties: Sequence[str] | None = None) -> dict[str, float]:
    """Virtual seconds of one local training per party, from public settings only."""
    buffer = cfg.aggregation.buffer or BufferSettings()
    t = cfg.training
    tokens = t.local_steps * t.batch_size * t.max_seq_len
    names = list(parties) if parties is not None else [p.name for p in cfg.active_parties]
    return {p: tokens * cfg.party(p).compute_scale / buffer.tokens_per_second for p in names}


def schedule(
    durations: Mapping[str, float],
    *,
    size: int,
    max_staleness: int,
    rounds: int,
    start_round: int = 0,
) -> Schedule:
    """Events start_round+1 .. rounds of a buffered federation (see the module docstring)."""
    if not 2 <= size <= len(durations):
        raise AggregationError(
            f"aggregation.buffer.size={size} needs between 2 and the {len(durations)} "
            "parties taking part. Fix: lower buffer.size or add parties"
        )
    if any(not d > 0 for d in durations.values()):
        raise AggregationError(f"training durations {dict(durations)} must all be positive")
    inflight = {p: (0.0, start_round) for p in durations}  # party -> (started, base)
    buffer: list[Arrival] = []
    dropped: list[Arrival] = []
    events: list[Event] = []
    r, last = start_round + 1, 0.0
    while r <= rounds:
        party = min(inflight, key=lambda p: (inflight[p][0] + durations[p], p))
        started, base = inflight.pop(party)
        now = started + durations[party]
        arrival = Arrival(party, base, started, now, (r - 1) - base)
        if arrival.staleness > max_staleness:
            dropped.append(arrival)
            inflight[party] = (now, r - 1)
            continue
        buffer.append(arrival)
        if len(buffer) < size:
            continue
        events.append(
            Event(r, now, now - last, tuple(buffer), tuple(dropped), tuple(a.party for a in buffer))
        )
        inflight.update({a.party: (now, r) for a in buffer})
        buffer, dropped, r, last = [], [], r + 1, now
    return Schedule(start_round, tuple(events))


def synchronous(durations: Mapping[str, float], *, rounds: int, start_round: int = 0) -> Schedule:
    """Synchronous rounds on the same clock: each waits for the slowest party."""
    slowest = max(durations.values())
    events = []
    for i, r in enumerate(range(start_round + 1, rounds + 1)):
        t0 = i * slowest
        arrivals = tuple(Arrival(p, r - 1, t0, t0 + d, 0) for p, d in sorted(durations.items()))
        events.append(Event(r, t0 + slowest, slowest, arrivals, (), tuple(sorted(durations))))
    return Schedule(start_round, tuple(events))


def schedule_for(
    cfg: FederationConfig,
    *,
    start_round: int = 0,
    rounds: int | None = None,
    parties: Sequence[str] | None = None,
) -> Schedule:
    """The run's schedule from its config (synchronous when `aggregation.buffer` is null)."""
    d = durations(cfg, parties)
    total = cfg.rounds if rounds is None else rounds
    buffer = cfg.aggregation.buffer
    if buffer is None:
        return synchronous(d, rounds=total, start_round=start_round)
    return schedule(
        d,
        size=buffer.size,
        max_staleness=buffer.max_staleness,
        rounds=total,
        start_round=start_round,
    )


def drive(
    plan: Schedule,
    initial: Model,
    train: Callable[[Arrival, int, Model], object],
    aggregate: Callable[[Event, list[object]], Model],
) -> list[Model]:
    """Replay a schedule: `train(arrival, round, base_model)` per arrival, then `aggregate`.

    Trainings run lazily at their event, from the version they started from: with deterministic
    training the result is the one an eager run would give. Returns the globals after each event.
    """
    versions: dict[int, Model] = {plan.start_round: initial}
    out: list[Model] = []
    for event in plan.events:
        updates = [train(a, event.round, versions[a.base]) for a in event.arrivals]
        versions[event.round] = aggregate(event, updates)
        out.append(versions[event.round])
    return out


def update_staleness(cfg: FederationConfig, round: int, base_round: int | None) -> int:
    """Tau of an update trained from `base_round` and sent in `round`; 0 in synchronous rounds.

    The party computes it from public round numbers; the coordinator checks the base itself
    (cloudfed.buffer_window), since the discounted weight is hidden inside the protected sum.
    """
    buffer = cfg.aggregation.buffer
    if buffer is None or base_round is None:
        return 0
    tau = (round - 1) - base_round
    if not 0 <= tau <= buffer.max_staleness:
        raise AggregationError(
            f"an update trained from global version {base_round} cannot be sent in round "
            f"{round}: staleness {tau} lies outside 0..aggregation.buffer.max_staleness="
            f"{buffer.max_staleness}"
        )
    return tau


def clock(event: Event) -> dict[str, float]:
    """What MLflow shows of an event's virtual clock and staleness (all public)."""
    taus = [a.staleness for a in event.arrivals]
    return {
        "virtual_seconds": event.seconds,
        "virtual_seconds_total": event.at,
        "staleness_max": float(max(taus)),
        "staleness_mean": sum(taus) / len(taus),
        "dropped_stale": float(len(event.dropped)),
    }
