"""The federation as a dynamic ZenML pipeline: wiring only, every decision lives in cloudfed.

    zenml pipeline run pipelines.federated_training.federated_training -c configs/local.yaml

Party steps carry their party's step operator, or its light one for the protocol stages (none
locally); a stage's party steps run concurrently until the stage's deadline. Coordinator steps
carry the active stack's experiment tracker, so one MLflow run holds every round of a run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from zenml import pipeline
from zenml.enums import ExecutionMode

from cloudfed import console
from cloudfed.aggregation.fedbuff import clock
from cloudfed.artifacts import Rejection
from cloudfed.buffer_window import round_schedule, senders
from cloudfed.deadlines import LateAnswers, StageWindow
from cloudfed.errors import CloudfedError, ConfigError, DataError
from cloudfed.federation import FederationConfig, load_run_config, parse_federation
from cloudfed.preflight import check_config
from cloudfed.protection.stages import Stage, protection_stages
from pipelines._common import config_source, tracker_name, user_errors
from pipelines._images import party_docker_settings, stack_facts
from steps.aggregate import aggregate
from steps.ckks import ckks_decrypt, ckks_keygen, ckks_sum
from steps.evaluate import evaluate
from steps.export import export_update
from steps.harmonize import harmonize
from steps.prepare import prepare_federation
from steps.privacy import privacy_reserve
from steps.secagg import (
    secagg_inputs_roster,
    secagg_keys_roster,
    secagg_reveal,
    secagg_share_keys,
    secagg_shares_roster,
)
from steps.track import log_baseline, log_round, publish_report
from steps.train import train_local

logger = logging.getLogger("cloudfed")
LATE_DRAIN_SECONDS = 600.0  # at the end of a run, how long late steps are watched for
console.configure()  # `make run`: progress lines and warnings only (CLOUDFED_LOG=quiet)


def _party_step(step: Any, cfg: FederationConfig, party: str, kind: str) -> Any:
    """The one place a party step's options are set. `kind`: `harmonize` or a stage's name.

    Steps that read the party's rows or load the model run on its `step_operator`, the light
    protocol stages on its `light_step_operator` (`PartyConfig.step_operator_for`); on either,
    in the party's own image (pipelines/_images.py).
    """
    operator = cfg.party(party).step_operator_for(kind)
    if not operator:
        return step  # runs where the pipeline runs: no image of its own
    docker = party_docker_settings(cfg, party, **stack_facts())
    return step.with_options(step_operator=operator, settings={"docker": docker})


def _party_failure(exc: BaseException) -> tuple[str, BaseException]:
    """Why a party step failed, and the exception behind ZenML's wrapping of a concurrent step."""
    seen: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in seen:
        seen.append(cause)
        if isinstance(cause, CloudfedError):
            return str(cause), cause
        cause = getattr(cause, "original_exception", None) or cause.__cause__
    return type(seen[-1]).__name__, seen[-1]


class _PartyStage:
    """Run one stage's party steps concurrently, each until the stage's deadline.

    A party whose step fails, or is still running when the deadline passes, is dropped from the
    round (`dropped`), and the round goes on; an answer that comes after the stage closed is
    refused (`late`, cloudfed.deadlines). A configuration error stops the run.
    """

    def __init__(
        self, cfg: FederationConfig, round: int, dropped: list[Rejection], late: LateAnswers
    ) -> None:
        self.cfg, self.round, self.dropped, self.late = cfg, round, dropped, late

    def each(
        self, stage: str, step: Any, parties: Any, federation: Any, *args: Any
    ) -> dict[str, Any]:
        """`step(federation, p, *args)` per party p (a dict argument is indexed by the party).

        Returns the step future (its outputs, by reference) of each party that made it in time.
        """
        self.late.sweep()
        window = StageWindow(stage, self.round, self.cfg.deadlines.seconds(stage))
        pending = {}
        for p in parties:
            per_party = [a[p] if isinstance(a, dict) else a for a in args]
            pending[p] = _party_step(step, self.cfg, p, stage).submit(
                federation, p, *per_party, id=f"{stage}_{p}_r{self.round}"
            )
        finished, missed, late = window.collect(pending)
        self.dropped += missed
        self.late.add(window, late)
        out = {}
        for p in (p for p in pending if p in finished):
            try:
                finished[p].wait()
            except Exception as exc:
                why, cause = _party_failure(exc)
                if isinstance(cause, ConfigError):
                    raise cause from None
                logger.warning("round %d: party %s dropped at %s: %s", self.round, p, stage, why)
                self.dropped.append(Rejection(party=p, reason=f"dropped at {stage}: {why}"))
                continue
            out[p] = finished[p]
        return out


def _evaluate_all(
    cfg: FederationConfig,
    late: LateAnswers,
    federation: Any,
    parties: list[str],
    datasets: dict[str, Any],
    current: Any,
    plan: Any,
    round: int,
) -> list[Any]:
    """Every party evaluates the same model; under DP their shares only add up together."""
    missing: list[Rejection] = []  # a party that does not evaluate is only missing from the sum
    stage = _PartyStage(cfg, round, missing, late)
    done = stage.each("evaluate", evaluate, parties, federation, datasets, current, plan, parties)
    return list(done.values())


@pipeline(dynamic=True, enable_cache=False, execution_mode=ExecutionMode.CONTINUE_ON_FAILURE)
def federated_training(federation: dict[str, Any] | None = None) -> None:
    # Optional only so that a misspelt `parameters:` block reaches preflight's message here.
    with user_errors():
        if federation is None:
            load_run_config(config_source())  # raises: parameters.federation is missing
        cfg = parse_federation(federation, source=config_source())
        check_config(cfg, config_source())  # what preflight refuses without a party's data
        tracker = tracker_name()
        progress = console.Progress(cfg.rounds, len(cfg.active_parties))

        def coord(step: Any) -> Any:
            return step.with_options(experiment_tracker=tracker) if tracker else step

        # Step outputs travel by reference; plain values would be uploaded again for every step.
        federation, plan, current = coord(prepare_federation)(
            federation, config_source(), id="prepare"
        )
        planned = plan.load()
        try:
            _run_rounds(cfg, coord, federation, plan, current, planned, progress)
        finally:  # a killed run leaves its lock; the next run takes it over (cloudfed.run_lock)
            _release_lock(cfg, planned.run_id)


def _release_lock(cfg: FederationConfig, run_id: str) -> None:
    from cloudfed import run_lock
    from cloudfed.exchange import federation_exchange

    run_lock.release(federation_exchange(cfg), run_id)


def _heartbeat(cfg: FederationConfig, run_id: str) -> None:
    from cloudfed import run_lock
    from cloudfed.exchange import federation_exchange

    run_lock.heartbeat(federation_exchange(cfg), run_id)


def _run_rounds(
    cfg: FederationConfig,
    coord: Any,
    federation: Any,
    plan: Any,
    current: Any,
    planned: Any,
    progress: console.Progress,
) -> None:
    """Harmonise, then rounds start_round+1 .. rounds: `rounds` is the federation's total."""
    with user_errors():
        if planned.start_round >= cfg.rounds:
            from cloudfed.exchange import federation_exchange

            ref = planned.initial_adapter
            print(
                f"cloudfed: federation {cfg.federation_id} has published all {cfg.rounds} rounds "
                f"(at round {planned.start_round}); nothing to train and nothing new published. "
                f"The last model: {federation_exchange(cfg).url(ref.key)} (sha256 {ref.sha256}); "
                f"its report: {cfg.coordinator_dir / 'last_run'}. To train further raise rounds; "
                "to start from the base model set start_over: true (make start-over).",
                flush=True,
            )
            return
        parties = planned.parties
        datasets, excluded = {}, []
        for p in parties:  # every party harmonises before any trains, so a stop costs nothing
            ref = _party_step(harmonize, cfg, p, "harmonize")(
                federation, p, plan, id=f"harmonize_{p}"
            )
            outcome = ref.load()
            if outcome.status == "config-error":  # missing or unfit file: stop, as preflight
                raise ConfigError(outcome.message)
            if outcome.ok:
                datasets[p] = ref
            else:  # fails its contract, or refuses the run
                logger.warning("party %s excluded: %s", p, outcome.message)
                excluded.append(Rejection(party=p, reason=f"excluded: {outcome.message}"))
        if len(datasets) < cfg.min_parties:
            raise DataError(
                f"{len(datasets)} of {len(parties)} parties passed their data contracts, fewer "
                f"than min_parties ({cfg.min_parties}):\n"
                + "\n".join(f"[{r.party}] {r.reason}" for r in excluded)
            )
        parties = list(datasets)
        progress.harmonised(len(datasets))
        start = planned.start_round
        late = LateAnswers()  # steps still running after their stage closed: refused when done
        evals = _evaluate_all(cfg, late, federation, parties, datasets, current, plan, start)
        progress.round_done(start, 0, 0, len(evals), 0)
        rows = [
            coord(log_baseline)(
                federation,
                plan,
                current,
                evals,
                list(datasets.values()),
                excluded,
                id=f"log_round_r{start}",
            )
        ]
        stop_reason = f"round limit ({cfg.rounds}) reached"
        protection = planned.protection.get("tensors", {})
        schedule = round_schedule(cfg, start, parties)
        versions = {start: current}  # global adapters a buffered round's parties train from
        for r in range(start + 1, cfg.rounds + 1):
            _heartbeat(cfg, planned.run_id)  # stops here if another run took the lock over
            dropped: list[Rejection] = []
            bases = senders(schedule, r, parties, dropped)  # party -> version it trains from
            if cfg.privacy.enabled:  # charged before anyone trains; refused means stop cleanly
                reservation = coord(privacy_reserve)(
                    federation, r, plan, list(bases), id=f"privacy_reserve_r{r}"
                ).load()
                if not reservation["granted"]:
                    stop_reason = reservation["message"]
                    logger.warning("cloudfed: stopping before round %d: %s", r, stop_reason)
                    break
            party = _PartyStage(cfg, r, dropped, late)
            trained = party.each(
                "train",
                train_local,
                list(bases),
                federation,
                r,
                datasets,
                {p: versions[base] for p, base in bases.items()},
                plan,
            )
            local = {p: out[0] for p, out in trained.items()}  # the update stays in its cloud
            if len(local) < cfg.min_parties:  # e.g. DP-SGD budgets spent: stop, say why
                stop_reason = (
                    f"round {r}: only {len(local)} of {len(bases)} parties trained, fewer than "
                    f"min_parties={cfg.min_parties} ("
                    + "; ".join(f"{d.party}: {d.reason}" for d in dropped)
                    + ")"
                )
                logger.warning("cloudfed: stopping: %s", stop_reason)
                break
            done = _protect_and_aggregate(
                cfg, coord, party, federation, plan, r, trained, current, dropped, protection
            )
            new_ref, report, sealed = done.new_ref, done.report, done.sealed
            current = versions[r] = new_ref
            evals = _evaluate_all(cfg, late, federation, parties, datasets, current, plan, r)
            rows.append(
                coord(log_round)(
                    federation,
                    plan,
                    current,
                    r,
                    evals,
                    report,
                    list(local.values()),
                    sealed,
                    *([] if schedule is None else [clock(schedule.event(r))]),
                    id=f"log_round_r{r}",
                )
            )
            progress.round_done(r, len(local), len(sealed), len(evals), len(dropped))
        coord(publish_report)(federation, plan, rows, current, stop_reason, id="publish_report")
        # ZenML 0.98 has no step timeout and ends a run once its steps have: a late step holds
        # the run open anyway, so its answer is refused with a log line when it comes (bounded).
        if running := late.drain(LATE_DRAIN_SECONDS):
            logger.warning(
                "cloudfed: steps still running past their stage deadline: %s; their answers are "
                "never read, and the run ends once they stop",
                ", ".join(running),
            )


@dataclass
class _Protected:
    """What one round's protection stages produced so far: ZenML step outputs."""

    uploaders: list[str]
    adverts: list[Any] = field(default_factory=list)
    shares: list[Any] = field(default_factory=list)
    roster: Any = None
    rosters: list[Any] = field(default_factory=list)
    sealed: list[Any] = field(default_factory=list)
    reveals: list[Any] = field(default_factory=list)
    ckks_keys: list[Any] = field(default_factory=list)
    summed: Any = None
    ckks_plain: list[Any] = field(default_factory=list)
    new_ref: Any = None
    report: Any = None


def _protect_and_aggregate(
    cfg: FederationConfig,
    coord: Any,
    party: _PartyStage,
    federation: Any,
    plan: Any,
    r: int,
    trained: dict[str, Any],
    current: Any,
    dropped: list[Rejection],
    protection: Any,
) -> _Protected:
    """From trained updates to the published aggregate, stage by stage in the core's order.

    The order is `cloudfed.protection.stages`; here each stage is one ZenML step per party (its
    parties' steps run concurrently, each until the stage's deadline), or one coordinator step.
    A folded stage (`FOLDED_INTO`) ran inside its host's party step: its handler collects.
    """
    local = {p: out[0] for p, out in trained.items()}
    s = _Protected(uploaders=list(local))
    kp = cfg.ckks_key_party

    def keygen() -> None:  # fresh keys each round; the secret stays with the key party
        s.ckks_keys = [
            _party_step(ckks_keygen, cfg, kp, Stage.CKKS_KEYGEN)(
                federation, kp, r, plan, id=f"ckks_keygen_r{r}"
            )
        ]

    def advertise() -> None:  # ran in the training step; its adverts came back with the update
        s.adverts = [ref for out in trained.values() for ref in out[1].load()]

    def keys_roster() -> None:
        s.roster = coord(secagg_keys_roster)(
            federation, r, s.adverts, plan, id=f"secagg_keys_roster_r{r}"
        )

    def share_keys() -> None:
        who = s.roster.load().parties
        shared = party.each("share_keys", secagg_share_keys, who, federation, s.roster, plan)
        s.shares = list(shared.values())

    def shares_roster() -> None:
        s.roster = coord(secagg_shares_roster)(
            federation, r, s.shares, s.roster, plan, id=f"secagg_shares_roster_r{r}"
        )
        s.uploaders, s.rosters = s.roster.load().shared, [s.roster]

    def upload() -> None:
        sealed = party.each(
            "upload", export_update, s.uploaders, federation, local, plan, s.rosters, s.ckks_keys
        )
        s.sealed = list(sealed.values())

    def inputs_roster() -> None:
        s.roster = coord(secagg_inputs_roster)(
            federation, r, s.sealed, s.rosters[0], current, plan, id=f"secagg_inputs_roster_r{r}"
        )
        s.rosters = [s.roster]

    def unmask() -> None:
        who = s.roster.load().uploaded
        s.reveals = list(
            party.each("unmask", secagg_reveal, who, federation, s.roster, plan).values()
        )

    def summed() -> None:
        s.summed = coord(ckks_sum)(
            federation, r, s.sealed, s.rosters, current, plan, s.ckks_keys[0], id=f"ckks_sum_r{r}"
        )

    def decrypt() -> None:
        s.ckks_plain = [
            _party_step(ckks_decrypt, cfg, kp, Stage.CKKS_DECRYPT)(
                federation, kp, r, s.summed, plan, id=f"ckks_decrypt_r{r}"
            )
        ]

    def aggregated() -> None:
        s.new_ref, s.report = coord(aggregate)(
            federation,
            r,
            s.sealed,
            current,
            dropped,
            plan,
            s.rosters,
            s.reveals,
            s.ckks_plain,
            id=f"aggregate_r{r}",
        )

    handlers: dict[Stage, Any] = {
        Stage.CKKS_KEYGEN: keygen,
        Stage.ADVERTISE: advertise,
        Stage.KEYS_ROSTER: keys_roster,
        Stage.SHARE_KEYS: share_keys,
        Stage.SHARES_ROSTER: shares_roster,
        Stage.UPLOAD: upload,
        Stage.INPUTS_ROSTER: inputs_roster,
        Stage.UNMASK: unmask,
        Stage.CKKS_SUM: summed,
        Stage.CKKS_DECRYPT: decrypt,
        Stage.AGGREGATE: aggregated,
    }
    for stage in protection_stages(protection):
        party.late.sweep()  # a late answer that came in meanwhile is refused, with a log line
        handlers[stage]()  # a stage the pipeline cannot run is a KeyError, never a skip
    return s
