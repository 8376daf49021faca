"""A federation outlives a pipeline run: signed round records on the exchange say where it stands.

Why: the privacy budget carries across runs, so a run that restarted from the base model would
spend budget to relearn what an earlier run already published. Each published round therefore
writes one record (the global adapter, the aggregation state, the privacy ledger's head, what
defines the model), signed by the coordinator and written once: the record of round r is that
round's commit point. A new run continues after the last record; a run killed before it retries
the round under its own run id (the exchange keys of one run never meet another's), a run killed
after it continues at r+1. `start_over` opens a new generation from the base model; a generation's
round-0 record names the initial adapter.

The exchange is untrusted: records are signed, and the coordinator checks that its own ledger
still passes through the head a record names (no budget rolled back under a continued model).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cloudfed.artifacts import GlobalAdapterRef
from cloudfed.errors import ConfigError, ProtectionError
from cloudfed.exchange import Exchange
from cloudfed.federation import FederationConfig
from cloudfed.locations import AnyPath, replace_bytes
from cloudfed.protection.keys import KeyPairs

logger = logging.getLogger(__name__)
RECORD_KIND = "round-record"
HISTORY = "history"
_RECORD = re.compile(r"^history/g(\d{4,})/r(\d{4,})\.signed$")


class AggregationState(BaseModel):
    """The coordinator's state between rounds, versioned for strategies that keep one.

    FedAvg keeps none; server optimisers (moments) and buffered rounds (the buffer) fill `state`
    under their own `strategy` and `version`, so a continued run can refuse a state it cannot read.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = 1
    strategy: str = "fedavg"
    state: dict[str, Any] = Field(default_factory=dict)


class Lineage(BaseModel):
    """What a continued round must share with the rounds before it, each a config field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str
    lora_rank: int
    lora_alpha: float
    lora_target_modules: list[str]
    parties: list[str]
    protection: str  # the protection policy's sha256 (layout over the adapter's tensors)
    aggregation: str

    @classmethod
    def of(cls, cfg: FederationConfig, policy_sha256: str) -> Lineage:
        return cls(
            base_model=cfg.base_model,
            lora_rank=cfg.lora.rank,
            lora_alpha=float(cfg.lora.alpha),
            lora_target_modules=sorted(cfg.lora.target_modules),
            parties=sorted(p.name for p in cfg.active_parties),
            protection=policy_sha256,
            aggregation=cfg.aggregation.strategy,
        )


# Lineage field -> the config field a user changes (named in the refusal).
_CONFIG_FIELD = {
    "base_model": "base_model",
    "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha",
    "lora_target_modules": "lora.target_modules",
    "parties": "parties (and participants)",
    "protection": "protection (its policy)",
    "aggregation": "aggregation",
}


class RoundRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    federation_id: str
    generation: int = Field(ge=1)
    round: int = Field(ge=0)
    run_id: str
    global_adapter: GlobalAdapterRef
    aggregation: AggregationState = AggregationState()
    ledger_version: int | None = None  # the privacy ledger right after this round committed
    ledger_head: str | None = None
    lineage: Lineage
    previous_sha256: str | None = None  # the record of round-1 in this generation
    published_at: str = ""


def history_of(cfg: FederationConfig, exchange: Exchange, keys: KeyPairs) -> History:
    """The federation's history as its coordinator reads it (with its own high-water mark)."""
    return History(exchange, keys, cfg.federation_id, cfg.coordinator_dir / "history_head.json")


def record_key(generation: int, round: int) -> str:
    return f"{HISTORY}/g{generation:04d}/r{round:04d}.signed"


def _context(federation_id: str, round: int):
    from cloudfed.protection.envelope import SealContext

    return SealContext(
        federation_id=federation_id, round=round, party="coordinator", kind=RECORD_KIND
    )


class History:
    """The federation's round records on the exchange, as its coordinator reads and writes them."""

    def __init__(
        self,
        exchange: Exchange,
        keys: KeyPairs,
        federation_id: str,
        head_file: AnyPath | None = None,
    ) -> None:
        """`head_file`, in the coordinator's own storage, is the newest record it has seen.

        The exchange is untrusted: without it, deleting the newest records (or a generation)
        would roll the federation back unnoticed, and a later run could publish a second,
        equally signed version of a round.
        """
        self.exchange, self.keys, self.federation_id = exchange, keys, federation_id
        self.head_file = head_file

    def _seen(self) -> tuple[int, int, str] | None:
        if self.head_file is None or not self.head_file.exists():
            return None
        doc = json.loads(self.head_file.read_text(encoding="utf-8"))
        return int(doc["generation"]), int(doc["round"]), str(doc["sha256"])

    def _remember(self, generation: int, round: int, digest: str) -> None:
        if self.head_file is None:
            return
        seen = self._seen()
        if seen is not None and (seen[0], seen[1]) > (generation, round):
            return
        doc = {"generation": generation, "round": round, "sha256": digest}
        replace_bytes(self.head_file, json.dumps(doc).encode())  # atomic either way

    def _check_against_seen(self, generation: int, digests: dict[int, str]) -> None:
        seen = self._seen()
        if seen is None:
            return
        g, r, digest = seen
        where = f"{self.exchange.url(HISTORY)} (the coordinator last saw {self.head_file})"
        if (generation, max(digests)) < (g, r):
            raise ProtectionError(
                f"{where}: the history ends at generation {generation} round {max(digests)}, "
                f"before generation {g} round {r} that this coordinator published or read: "
                "records were removed (rolled back). Fix: restore them from a backup"
            )
        at = digests.get(r) if generation == g else self.read(g, r)[1]
        if at != digest:
            raise ProtectionError(
                f"{where}: generation {g} round {r} is not the record this coordinator saw "
                "(replaced). Fix: restore the original record"
            )

    def _index(self) -> dict[int, list[int]]:
        found: dict[int, list[int]] = {}
        for key in self.exchange.list(HISTORY):
            if m := _RECORD.match(key):
                found.setdefault(int(m.group(1)), []).append(int(m.group(2)))
        return {g: sorted(rs) for g, rs in found.items()}

    def read(self, generation: int, round: int) -> tuple[RoundRecord, str]:
        """A record and the sha256 of its signed bytes, or ProtectionError if it is not ours."""
        from cloudfed.protection.envelope import open_public

        key = record_key(generation, round)
        blob = self.exchange.get_bytes(key)
        try:
            opened = open_public(
                blob,
                context=_context(self.federation_id, round),
                sender=self.keys.public_bundle(),
            )
            record = RoundRecord.model_validate_json(opened.payload)
        except (ProtectionError, ValueError):
            raise ProtectionError(
                f"{self.exchange.url(key)}: this round record is not signed by this "
                "coordinator (tampered, or another coordinator's). Fix: restore it, or start a "
                "new generation with start_over: true"
            ) from None
        if (record.federation_id, record.generation, record.round) != (
            self.federation_id,
            generation,
            round,
        ):
            raise ProtectionError(f"{self.exchange.url(key)}: the record names another round")
        return record, hashlib.sha256(blob).hexdigest()

    def latest(self) -> RoundRecord | None:
        """The newest generation's last round, checked back to its round 0 through the chain."""
        index = self._index()
        if not index:
            if self._seen() is not None:
                raise ProtectionError(
                    f"{self.exchange.url(HISTORY)}: no round records, but this coordinator saw "
                    f"some ({self.head_file}): the history was removed. Fix: restore it, or "
                    "delete that file to start the federation anew"
                )
            return None
        generation = max(index)
        rounds = index[generation]
        if rounds != list(range(len(rounds))):
            raise ProtectionError(
                f"{self.exchange.url(HISTORY)}: generation {generation} has rounds {rounds}, not "
                "0..n without gaps; a record was removed. Fix: restore it from a backup, or "
                "start a new generation with start_over: true"
            )
        previous: str | None = None
        record = None
        digests: dict[int, str] = {}
        for r in rounds:
            record, digest = self.read(generation, r)
            if record.previous_sha256 != previous:
                raise ProtectionError(
                    f"{self.exchange.url(record_key(generation, r))}: its chain does not pass "
                    "through the record before it"
                )
            previous = digests[r] = digest
        self._check_against_seen(generation, digests)
        assert record is not None and previous is not None
        self._remember(generation, record.round, previous)
        return record

    def next_generation(self) -> int:
        return max(self._index(), default=0) + 1

    def publish(self, record: RoundRecord) -> str:
        """Write once: a second publication of the same round fails, whoever attempts it."""
        from cloudfed.protection.envelope import sign_public

        previous = None
        if record.round > 0:
            _, previous = self.read(record.generation, record.round - 1)
        record = record.model_copy(
            update={
                "previous_sha256": previous,
                "published_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
        )
        blob = sign_public(
            record.model_dump_json(indent=1).encode(),
            context=_context(self.federation_id, record.round),
            sender=self.keys,
        )
        key = record_key(record.generation, record.round)
        seen = self._seen()
        if seen is not None and (record.generation, record.round) <= (seen[0], seen[1]):
            raise ProtectionError(
                f"{self.exchange.url(key)}: this coordinator already published or read "
                f"generation {seen[0]} round {seen[1]}; it does not publish round {record.round} "
                f"of generation {record.generation} again"
            )
        try:
            self.exchange.put_bytes(key, blob, exclusive=True)
            self._remember(record.generation, record.round, hashlib.sha256(blob).hexdigest())
        except FileExistsError:
            raise ProtectionError(
                f"{self.exchange.url(key)}: round {record.round} of generation "
                f"{record.generation} is already published; two runs of one federation must not "
                "publish the same round"
            ) from None
        return key


def check_continues(last: RoundRecord, now: Lineage, *, federation_id: str, source: str) -> None:
    """Refuse to continue a model whose defining settings changed, naming the field."""
    before = last.lineage.model_dump()
    for name, value in now.model_dump().items():
        if before[name] != value:
            raise ConfigError(
                f"{source}: federation {federation_id!r} is at round {last.round}, trained with "
                f"{_CONFIG_FIELD[name]} = {before[name]!r}; this config has {value!r}. "
                "Continuing would mix two models. Fix: restore the setting, or start over from "
                "the base model with `start_over: true` (make start-over), or choose a new "
                "federation_id"
            )


def check_ledger(last: RoundRecord, ledger: Any) -> None:
    """The ledger must still pass through the head the last round recorded (never rolled back)."""
    if last.ledger_version is None:
        return
    v = last.ledger_version
    if v == 0:
        # Version 0 is the ledger never saved: every saved version extends it, but no chain
        # holds its head (version 1 chains to nothing). It must still be this federation's.
        empty = type(ledger)(
            federation_id=ledger.federation_id, delta=ledger.delta, accountant=ledger.accountant
        )
        if empty.head() != last.ledger_head:
            raise ProtectionError(
                f"the privacy ledger is not the one round {last.round} was published with (it "
                "started from another empty ledger). Fix: restore the coordinator's ledger copy"
            )
        return
    if ledger.version < v:
        raise ProtectionError(
            f"the privacy ledger is at version {ledger.version}, older than version {v} that "
            f"round {last.round} was published with: the budget was rolled back. Fix: restore "
            "the coordinator's ledger copy"
        )
    at = ledger.head() if ledger.version == v else ledger.chain[v - 1]
    if at != last.ledger_head:
        raise ProtectionError(
            f"the privacy ledger does not pass through the version round {last.round} was "
            "published with (forked). Fix: restore the coordinator's ledger copy"
        )


def describe(record: RoundRecord, exchange: Exchange) -> str:
    return (
        f"round {record.round} (generation {record.generation}), global adapter sha256 "
        f"{record.global_adapter.sha256[:12]}… at {exchange.url(record.global_adapter.key)}"
    )


def publish_round(
    cfg: FederationConfig,
    plan: Any,
    new_ref: GlobalAdapterRef,
    policy_sha256: str,
    aggregation: dict[str, Any] | None = None,
) -> str:
    """The round's commit point, after its adapter and ledger entry: later runs continue after it.

    Kept out of the aggregation itself, which may run without a pipeline (tests, benchmarks).
    """
    from cloudfed import run_lock
    from cloudfed.coordinator import coordinator_keys, ledger_head
    from cloudfed.exchange import federation_exchange

    exchange = federation_exchange(cfg)
    keys = coordinator_keys(cfg, exchange)
    key = history_of(cfg, exchange, keys).publish(
        RoundRecord(
            federation_id=cfg.federation_id,
            generation=plan.generation,
            round=new_ref.round,
            run_id=plan.run_id,
            global_adapter=new_ref,
            aggregation=AggregationState(
                version=int(aggregation.get("version", 1)),
                strategy=str(aggregation.get("strategy", cfg.aggregation.strategy)),
                state=dict(aggregation.get("state", {})),
            )
            if aggregation
            else AggregationState(strategy=cfg.aggregation.strategy),
            lineage=Lineage.of(cfg, policy_sha256),
            **ledger_head(cfg, exchange, keys),
        )
    )
    run_lock.heartbeat(exchange, plan.run_id)
    return key


def status(cfg: FederationConfig) -> str:
    """Where a federation stands, for a person: last round, its adapter, the lock."""
    from cloudfed import run_lock
    from cloudfed.coordinator import coordinator_keys
    from cloudfed.exchange import federation_exchange

    exchange = federation_exchange(cfg)
    last = history_of(cfg, exchange, coordinator_keys(cfg, exchange)).latest()
    lines = [f"federation {cfg.federation_id} on {exchange.fs.unstrip_protocol(exchange.root)}"]
    if last is None:
        lines.append("no round published yet: the next run starts from the base model")
    else:
        lines.append(f"at {describe(last, exchange)}, published by run {last.run_id}")
        left = cfg.rounds - last.round
        lines.append(
            f"rounds: {cfg.rounds} in total, {max(left, 0)} left for the next run"
            + ("" if left > 0 else " (raise rounds to train further, or start over)")
        )
    holder = run_lock.read_lock(exchange)
    lines.append(
        "lock: free"
        if holder is None
        else f"lock: held by run {holder.run_id} (pid {holder.pid} on {holder.host}, "
        f"heartbeat {holder.heartbeat_at})"
    )
    return "\n".join(lines)


def _start_over_config(config: str, out: str) -> None:
    """A copy of the run config with start_over: true.

    One run starts over; later runs with the original config continue the new generation.
    """
    import yaml

    doc = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    doc["parameters"]["federation"]["start_over"] = True
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    print(f"{out}: {config} with start_over: true")


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from cloudfed.errors import CloudfedError
    from cloudfed.federation import load_run_config

    parser = argparse.ArgumentParser(
        prog="python -m cloudfed.federation_state",
        description="Where a federation stands; clear a dead run's lock; start over.",
    )
    parser.add_argument("command", choices=["status", "unlock", "start-over-config"])
    parser.add_argument("config", help="the run configuration (zenml pipeline run -c)")
    parser.add_argument("--out", default=".cloudfed/start-over.yaml")
    args = parser.parse_args(argv)
    try:
        if args.command == "start-over-config":
            load_run_config(args.config)
            _start_over_config(args.config, args.out)
            return 0
        cfg = load_run_config(args.config)
        if args.command == "unlock":
            from cloudfed import run_lock
            from cloudfed.exchange import federation_exchange

            exchange = federation_exchange(cfg)
            holder = run_lock.read_lock(exchange)
            if holder is None:
                print(f"{cfg.federation_id}: not locked")
                return 0
            exchange.delete(run_lock.LOCK_KEY)
            print(
                f"{cfg.federation_id}: removed the lock of run {holder.run_id} (pid {holder.pid})"
            )
            return 0
        print(status(cfg))
        return 0
    except CloudfedError as exc:
        print(f"cloudfed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
