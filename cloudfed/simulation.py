"""A whole federation in one process, running the real stages in the one order they have.

The pipeline (`pipelines/federated_training.py`) runs each stage as a ZenML step on the party's
or the coordinator's runtime; this module runs the same core calls directly, for the comparison
table (`cloudfed.comparison`) and the protocol tests (`tests/protected_support.py`), where a step
per stage would only add minutes. The order of a round's stages is written once
(`cloudfed.protection.stages`), and both runners follow it.

Nothing here weakens a check: every party still consents under its own policy, every message is
sealed and verified, the privacy ledger is charged before training. What the simulation adds is
that one process plays every role, so it may read a party's own records (its training tokens, its
own copy of its metrics under DP) to report them: a comparison table needs them, a real
coordinator never sees them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from cloudfed import coordinator, party
from cloudfed.artifacts import (
    AggregateReport,
    CkksKeyRef,
    EvalRelease,
    FederationPlan,
    GlobalAdapterRef,
    LocalUpdateRef,
    PartyEval,
    Rejection,
    SealedUpdateRef,
    SecAggRoster,
    StageRef,
)
from cloudfed.data.ref import DatasetRef
from cloudfed.errors import CloudfedError
from cloudfed.exchange import Exchange, federation_exchange
from cloudfed.federation import FederationConfig
from cloudfed.locations import party_root, uri_path
from cloudfed.protection import messages
from cloudfed.protection.stages import Stage, round_stages

logger = logging.getLogger(__name__)


@dataclass
class RoundState:
    """What one round has produced so far; each stage reads and extends it."""

    cfg: FederationConfig
    plan: FederationPlan
    exchange: Exchange
    round: int
    current: GlobalAdapterRef
    parties: list[str]  # everyone who evaluates; the trainers unless `bases` names them
    datasets: Mapping[str, DatasetRef] = field(default_factory=dict)
    # Buffered rounds: the event's arrivals -> the published adapter each trains from.
    bases: Mapping[str, GlobalAdapterRef] = field(default_factory=dict)
    drop: Mapping[str, str] = field(default_factory=dict)
    local: dict[str, LocalUpdateRef] = field(default_factory=dict)
    dropped: list[Rejection] = field(default_factory=list)
    ckks_keys: list[CkksKeyRef] = field(default_factory=list)
    messages: list[StageRef] = field(default_factory=list)  # every protocol message, for bytes
    adverts: list[StageRef] = field(default_factory=list)
    shares: list[StageRef] = field(default_factory=list)
    roster: SecAggRoster | None = None
    upload_rosters: list[SecAggRoster] = field(default_factory=list)
    sealed: list[SealedUpdateRef] = field(default_factory=list)
    reveals: list[StageRef] = field(default_factory=list)
    ckks_plain: list[StageRef] = field(default_factory=list)
    new_ref: GlobalAdapterRef | None = None
    report: AggregateReport | None = None
    evals: list[EvalRelease] = field(default_factory=list)
    stopped: str = ""  # why the round ended before publishing, if it did

    @property
    def trainers(self) -> list[str]:
        return list(self.bases) if self.bases else self.parties

    @property
    def rosters(self) -> list[SecAggRoster]:
        return [self.roster] if self.roster is not None else []

    def attempt(self, p: str, stage: Stage, fn: Callable[[], Any]) -> Any:
        """A party that drops (on purpose, or on a failed check) leaves the round, which goes on."""
        if self.drop.get(p) == stage.value:
            self.dropped.append(Rejection(party=p, reason=f"dropped at {stage.value}"))
            return None
        try:
            return fn()
        except CloudfedError as exc:
            self.dropped.append(Rejection(party=p, reason=f"dropped at {stage.value}: {exc}"))
            return None

    def each(self, stage: Stage, parties: Sequence[str], fn: Callable[[str], Any]) -> list[Any]:
        out = [self.attempt(p, stage, lambda p=p: fn(p)) for p in parties]
        return [o for o in out if o is not None]


def _reserve(s: RoundState) -> None:
    from cloudfed.privacy.budget import reserve_round

    keys = coordinator.coordinator_keys(s.cfg, s.exchange)
    reservation = reserve_round(s.cfg, s.exchange, keys, s.plan, s.round, s.trainers)
    if not reservation.granted:
        s.stopped = reservation.message


def _train(s: RoundState) -> None:
    cfg = s.cfg
    for p in s.trainers:
        ref = s.attempt(
            p,
            Stage.TRAIN,
            lambda p=p: party.train_round(
                cfg, cfg.party(p), s.round, s.datasets[p], s.bases.get(p, s.current), s.plan
            ),
        )
        if ref is not None:
            s.local[p] = ref
    if len(s.local) < cfg.min_parties:
        s.stopped = (
            f"round {s.round}: only {len(s.local)} of {len(s.trainers)} parties trained, fewer "
            f"than min_parties={cfg.min_parties} ("
            + "; ".join(f"{d.party}: {d.reason}" for d in s.dropped)
            + ")"
        )


def _ckks_keygen(s: RoundState) -> None:
    kp = s.cfg.ckks_key_party
    s.ckks_keys = [party.ckks_keygen(s.cfg, s.cfg.party(kp), s.plan, s.round)]


def _advertise(s: RoundState) -> None:
    cfg = s.cfg
    s.adverts = s.each(
        Stage.ADVERTISE,
        list(s.local),
        lambda p: party.advertise(cfg, cfg.party(p), s.local[p], s.plan),
    )
    s.messages += s.adverts


def _keys_roster(s: RoundState) -> None:
    s.roster = coordinator.keys_roster(s.cfg, s.round, s.adverts, s.plan)


def _share_keys(s: RoundState) -> None:
    cfg, roster = s.cfg, s.roster
    assert roster is not None
    s.shares = s.each(
        Stage.SHARE_KEYS,
        roster.parties,
        lambda p: party.share_keys(cfg, cfg.party(p), roster, s.plan),
    )
    s.messages += s.shares


def _shares_roster(s: RoundState) -> None:
    assert s.roster is not None
    s.roster = coordinator.shares_roster(s.cfg, s.round, s.shares, s.roster, s.plan)
    s.upload_rosters = [s.roster]


def _upload(s: RoundState) -> None:
    cfg = s.cfg
    uploaders = s.roster.shared if s.roster is not None else list(s.local)
    rosters, keys = s.rosters, s.ckks_keys
    s.sealed = s.each(
        Stage.UPLOAD,
        uploaders,
        lambda p: party.upload(cfg, cfg.party(p), s.local[p], s.plan, rosters, keys),
    )


def _inputs_roster(s: RoundState) -> None:
    assert s.roster is not None
    s.roster = coordinator.inputs_roster(s.cfg, s.round, s.sealed, s.roster, s.current, s.plan)


def _unmask(s: RoundState) -> None:
    cfg, roster = s.cfg, s.roster
    assert roster is not None
    s.reveals = s.each(
        Stage.UNMASK,
        roster.uploaded,
        lambda p: party.reveal_shares(cfg, cfg.party(p), roster, s.plan),
    )
    s.messages += s.reveals


def _ckks_sum(s: RoundState) -> None:
    coordinator.ckks_sum(s.cfg, s.round, s.sealed, s.rosters, s.current, s.plan, s.ckks_keys[0])


def _ckks_decrypt(s: RoundState) -> None:
    cfg = s.cfg
    layout = messages.layout_for(cfg, s.exchange, s.plan)
    segment = layout.segment("ckks")
    assert segment is not None
    length = segment.size + messages.strategy_of(cfg, layout).n_slots  # every weight slot
    plain = party.ckks_decrypt_sum(cfg, cfg.party(cfg.ckks_key_party), s.round, s.plan, length)
    s.ckks_plain = [plain]
    s.messages.append(plain)


def _aggregate(s: RoundState) -> None:
    s.new_ref, s.report = coordinator.aggregate_protected(
        s.cfg,
        s.round,
        s.sealed,
        s.current,
        s.plan,
        dropped=s.dropped,
        rosters=s.rosters,
        reveals=s.reveals,
        ckks_plain=s.ckks_plain,
    )


def _evaluate(s: RoundState) -> None:
    model = s.new_ref or s.current
    s.evals = evaluate_all(s.cfg, s.plan, s.parties, s.datasets, model)


STAGE_FUNCTIONS: dict[Stage, Callable[[RoundState], None]] = {
    Stage.RESERVE: _reserve,
    Stage.TRAIN: _train,
    Stage.CKKS_KEYGEN: _ckks_keygen,
    Stage.ADVERTISE: _advertise,
    Stage.KEYS_ROSTER: _keys_roster,
    Stage.SHARE_KEYS: _share_keys,
    Stage.SHARES_ROSTER: _shares_roster,
    Stage.UPLOAD: _upload,
    Stage.INPUTS_ROSTER: _inputs_roster,
    Stage.UNMASK: _unmask,
    Stage.CKKS_SUM: _ckks_sum,
    Stage.CKKS_DECRYPT: _ckks_decrypt,
    Stage.AGGREGATE: _aggregate,
    Stage.EVALUATE: _evaluate,
}


def run_stages(
    state: RoundState,
    stages: Sequence[Stage],
    *,
    after: Callable[[Stage], None] | None = None,
) -> RoundState:
    """Run `stages` in order; stop at the first that ends the round (budget, too few parties)."""
    for stage in stages:
        STAGE_FUNCTIONS[stage](state)
        if after is not None:
            after(stage)
        if state.stopped:
            break
    return state


def evaluate_all(
    cfg: FederationConfig,
    plan: FederationPlan,
    parties: Sequence[str],
    datasets: Mapping[str, DatasetRef],
    model: GlobalAdapterRef,
) -> list[EvalRelease]:
    """Every party evaluates the same model; one that fails is left out, as in the pipeline."""
    out = []
    for p in parties:
        try:
            out.append(
                party.evaluate_round(cfg, cfg.party(p), datasets[p], model, plan, list(parties))
            )
        except CloudfedError as exc:
            logger.warning("round %d: party %s did not evaluate: %s", model.round, p, exc)
    return out


def own_evals(
    cfg: FederationConfig, model: GlobalAdapterRef, releases: Sequence[EvalRelease]
) -> list[PartyEval]:
    """Each party's metrics: as released, or (under DP) the party's own copy in its storage.

    Simulation only: one process plays every party, so the table may show what each party
    knows of itself; a coordinator sees only the secure sum.
    """
    out = []
    for r in releases:
        if r.metrics is not None:
            out.append(r.metrics)
            continue
        own = party_root(cfg.party(r.party)) / "evals" / (model.run_id or "no-run")
        path = own / f"r{model.round:04d}.json"  # where `party.evaluate_round` keeps it
        if path.is_file():
            out.append(PartyEval.model_validate_json(path.read_text(encoding="utf-8")))
    return out


def training_record(cfg: FederationConfig, ref: LocalUpdateRef) -> party.LocalUpdateRecord:
    """The party's own record of an update (its training metrics, released or not)."""
    path = uri_path(ref.uri, cfg.party(ref.party).storage_options).with_suffix(".json")
    return party.LocalUpdateRecord.model_validate_json(path.read_text(encoding="utf-8"))


class RoundResult(BaseModel):
    """What the comparison needs of one round (numbers only)."""

    model_config = ConfigDict(frozen=True)

    round: int
    eval_loss: float
    party_loss: dict[str, float]
    party_tokens: dict[str, int]  # training tokens per party this round
    party_samples: dict[str, int]  # training samples (optimiser batch budget) per party
    bytes_sent: int  # sealed updates and protocol messages put on the exchange
    epsilon: float | None  # after this round: party-level, or the largest DP-SGD epsilon
    seconds: float
    accepted: tuple[str, ...] = ()
    stopped: str = ""
    # Simulated, not measured: the virtual clock (cloudfed.aggregation.fedbuff) at the end of the
    # round, buffered events and synchronous rounds alike (a synchronous round waits for the
    # slowest party). None for the baselines, which are no federation.
    virtual_seconds: float | None = None
    staleness: dict[str, int] = {}  # per accepted party: versions between its base and the round


def _epsilon(s: RoundState, records: Mapping[str, party.LocalUpdateRecord]) -> float | None:
    """Party-level epsilon, else the largest DP-SGD epsilon among the round's training records."""
    if s.report is not None and s.report.privacy:
        return float(s.report.privacy["epsilon"])
    spent = [
        float(r.train["dp_sgd_epsilon"]) for r in records.values() if "dp_sgd_epsilon" in r.train
    ]
    return max(spent) if spent else None


def summarise(
    cfg: FederationConfig, s: RoundState, seconds: float, virtual_seconds: float | None = None
) -> RoundResult:
    """A round's numbers: the coordinator's view of the loss, each party's own view besides."""
    model = s.new_ref or s.current
    overall = coordinator.round_eval(cfg, s.plan, model, s.evals).loss
    records = {p: training_record(cfg, ref) for p, ref in s.local.items()}
    accepted = tuple(s.report.accepted) if s.report else ()
    return RoundResult(
        round=s.round,
        eval_loss=float(overall),
        party_loss={e.party: e.loss for e in own_evals(cfg, model, s.evals)},
        party_tokens={p: int(r.train.get("tokens", 0)) for p, r in records.items()},
        party_samples={p: int(r.train.get("samples_seen", 0)) for p, r in records.items()},
        bytes_sent=sum(r.bytes_sent for r in s.sealed) + sum(m.bytes for m in s.messages),
        epsilon=_epsilon(s, records),  # the records read above, not each party's file again
        seconds=seconds,
        accepted=accepted,
        stopped=s.stopped,
        virtual_seconds=virtual_seconds,
        staleness={
            p: s.round - 1 - r.base_round
            for p, r in records.items()
            if p in accepted and r.base_round is not None
        },
    )


class Simulation:
    """One federation run in-process: prepare, then `rounds` rounds of every stage.

    The caller provisions the parties' policies first (they are the parties', not the
    launcher's); `datasets` are the parties' harmonised references (`party.prepare_dataset`).
    With `aggregation.buffer`, rounds are buffered events as in the pipeline: each event's
    arrivals train from the published version they started from (`versions`), only they run
    the protection stages, the round record is published (the coordinator accepts stale bases
    only from its signed records) and every party evaluates the new global.
    """

    def __init__(self, cfg: FederationConfig, datasets: Mapping[str, DatasetRef]) -> None:
        from cloudfed.aggregation.fedbuff import schedule_for
        from cloudfed.buffer_window import round_schedule
        from cloudfed.run_lock import release

        self.cfg = cfg
        self.plan = coordinator.prepare(cfg)
        self.exchange = federation_exchange(cfg)
        release(self.exchange, self.plan.run_id)  # one process: no concurrent run to fence off
        self.current = self.plan.initial_adapter
        self.parties = [p for p in self.plan.parties if p in datasets]
        self.datasets = {
            p: party.release_dataset(cfg, cfg.party(p), datasets[p]) for p in self.parties
        }
        start = self.plan.start_round
        self.versions: dict[int, GlobalAdapterRef] = {start: self.current}  # published, by round
        self.schedule = round_schedule(cfg, start, self.parties)  # None: synchronous rounds
        # The virtual clock of either mode: buffered events, or synchronous rounds that each wait
        # for the slowest party (fedbuff.synchronous), so both arms are timed on one clock.
        self.clock = self.schedule or schedule_for(cfg, start_round=start, parties=self.parties)

    @property
    def modes(self) -> list[str]:
        return list(self.plan.protection.get("tensors", {}))

    def baseline(self) -> RoundResult:
        """Round 0: every party evaluates the starting adapter."""
        start = time.perf_counter()
        s = RoundState(
            self.cfg,
            self.plan,
            self.exchange,
            self.current.round,
            self.current,
            self.parties,
            self.datasets,
        )
        run_stages(s, [Stage.EVALUATE])
        return summarise(self.cfg, s, time.perf_counter() - start, 0.0)

    def round(self, r: int) -> RoundResult:
        """Every stage of round `r`; the global adapter moves on only if the round published."""
        from cloudfed.buffer_window import senders

        start = time.perf_counter()
        dropped: list[Rejection] = []
        bases = senders(self.schedule, r, self.parties, dropped)  # party -> version it trains from
        s = RoundState(
            self.cfg,
            self.plan,
            self.exchange,
            r,
            self.current,
            self.parties,
            self.datasets,
            bases={p: self.versions[v] for p, v in bases.items()},
            dropped=dropped,
        )
        run_stages(s, round_stages(self.modes, privacy=self.cfg.privacy.enabled))
        if s.new_ref is not None and s.report is not None:
            self._publish(s.new_ref, s.report)
            self.current = self.versions[r] = s.new_ref
        return summarise(self.cfg, s, time.perf_counter() - start, self.clock.event(r).at)

    def _publish(self, new_ref: GlobalAdapterRef, report: AggregateReport) -> None:
        """The aggregate step's round record (its commit point), under the run lock as there."""
        from cloudfed import run_lock
        from cloudfed.federation_state import publish_round

        run_lock.acquire(
            self.exchange, self.plan.run_id, federation_id=self.cfg.federation_id,
            timeout_minutes=60,
        )  # fmt: skip
        try:
            publish_round(self.cfg, self.plan, new_ref, report.policy_sha256, report.aggregation)
        finally:
            run_lock.release(self.exchange, self.plan.run_id)

    def run(self) -> list[RoundResult]:
        """Round 0 and every round up to `rounds`, stopping where the pipeline would."""
        results = [self.baseline()]
        for r in range(self.plan.start_round + 1, self.cfg.rounds + 1):
            result = self.round(r)
            if result.stopped:  # nothing was published this round: the pipeline stops here too
                logger.warning("cloudfed: simulation stopped: %s", result.stopped)
                break
            results.append(result)
        return results
