"""Harmonise one party's raw exports into canonical, scrubbed, contract-checked Parquet.

Runs inside the party's cloud and streams: each split is read in chunks, and every chunk is
mapped, repaired, normalised, scrubbed, checked against the rows suite, de-duplicated and written
before the next is read, so memory does not grow with the file (except 16 bytes per accepted row
for de-duplication). Rows that cannot be used are not silently dropped: each goes to
``<storage>/quarantine/<split>.jsonl`` with the reason and, where a contract expectation failed,
its name; the party's data steward reads it there (it never leaves the party). Every chunk's
counts reconcile (read = accepted + quarantined) or the step stops.

What leaves is a `DatasetRef`: paths, hashes, counts, coarse histograms and expectation
verdicts, so the coordinator learns how much data a party has and under which contract, never
what it says. Nothing here logs or prints record text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cloudfed.data.contracts import Contract, Tally, add_result, load_contract
from cloudfed.data.dedup import DedupIndex
from cloudfed.data.loaders import DEFAULT_CHUNK_ROWS, RawChunk, iter_raw
from cloudfed.data.mapping import (
    CANONICAL_COLUMNS,
    SourceMapping,
    apply_mapping,
    check_format,
    load_party_mapping,
    metadata_problems,
)
from cloudfed.data.ref import (
    LENGTH_BINS,
    DataProfile,
    DatasetRef,
    ExpectationOutcome,
    LengthHistogram,
    ValidationSummary,
)
from cloudfed.data.scrub import clean_column
from cloudfed.data.tokens import TokenCounter, count_utf8_bytes
from cloudfed.errors import DataError
from cloudfed.federation import PartyConfig
from cloudfed.locations import is_remote, join, on_disk, party_root, raw_on_disk

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
HARMONISED_COLUMNS: tuple[str, ...] = (
    *CANONICAL_COLUMNS,
    "instruction_tokens",
    "response_tokens",
)
CANONICAL_SCHEMA = pa.schema(
    [
        ("instruction", pa.string()),
        ("response", pa.string()),
        ("party", pa.string()),
        ("domain", pa.string()),
        ("task", pa.string()),
        ("source_row", pa.int64()),
        ("instruction_tokens", pa.int64()),
        ("response_tokens", pa.int64()),
    ]
)
_TEXT = "string[pyarrow]"
DUPLICATE_REASONS = ("duplicate", "near_duplicate", "duplicate_of_train")
UNREADABLE_REASONS = ("unparseable", "undecodable", "wrong_field_count")


@dataclass
class SplitResult:
    """One split after harmonisation: counts, tallies and what the dataset suite needs."""

    split: str
    rows_read: int = 0
    accepted: int = 0
    quarantined: int = 0
    repaired: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    pii: Counter[str] = field(default_factory=Counter)
    tallies: dict[str, Tally] = field(default_factory=dict)
    template: Any = None
    instruction_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(LENGTH_BINS) + 1))
    response_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(LENGTH_BINS) + 1))
    instruction_tokens: int = 0
    response_tokens: int = 0
    domains: Counter[str] = field(default_factory=Counter)
    tasks: Counter[str] = field(default_factory=Counter)
    sha256: str = ""

    def check_reconciles(self, where: str) -> None:
        """Every row read is accounted for; anything else is a bug and must stop the step."""
        if self.rows_read != self.accepted + self.quarantined:
            raise RuntimeError(
                f"{where}: {self.rows_read} rows read but {self.accepted} accepted + "
                f"{self.quarantined} quarantined; harmonisation lost rows"
            )


def _histogram(tokens: np.ndarray) -> np.ndarray:
    return np.bincount(
        np.searchsorted(np.asarray(LENGTH_BINS), tokens, side="left"),
        minlength=len(LENGTH_BINS) + 1,
    )


class _Quarantine:
    """Append-only JSON Lines of rejected rows, in the party's storage only."""

    def __init__(self, fh: IO[str], split: str) -> None:
        self.fh, self.split = fh, split

    def add(self, **entry: Any) -> None:
        self.fh.write(json.dumps({"split": self.split, **entry}, ensure_ascii=False) + "\n")


def _quarantine_unreadable(chunk: RawChunk, q: _Quarantine, res: SplitResult) -> None:
    for p in chunk.problems:
        q.add(source_row=p.record, line=p.line, reason=p.reason, detail=p.detail)
        res.reasons[p.reason] += 1
    res.quarantined += len(chunk.problems)


def harmonise_chunk(
    chunk: RawChunk,
    *,
    mapping: SourceMapping,
    raw_path: Path,
    contract: Contract,
    dedup: DedupIndex,
    count_tokens: TokenCounter,
    res: SplitResult,
    quarantine: _Quarantine,
) -> pd.DataFrame:
    """One chunk through mapping, cleaning, the rows suite and de-duplication; accepted rows."""
    res.rows_read += chunk.size
    res.repaired += chunk.repaired
    _quarantine_unreadable(chunk, quarantine, res)
    canon = apply_mapping(chunk.frame, mapping, raw_path, records=chunk.records)
    lines = dict(zip(chunk.records, chunk.lines, strict=True))
    instructions, pii_i = clean_column(canon["instruction"].tolist())
    responses, pii_r = clean_column(canon["response"].tolist())
    pii = pii_i + pii_r
    res.repaired += pii.pop("_repaired", 0)
    res.pii.update(pii)
    # Arrow-backed strings: GX's column checks run about a third faster on them than on objects.
    canon["instruction"] = pd.Series(instructions, dtype=_TEXT)
    canon["response"] = pd.Series(responses, dtype=_TEXT)
    for column in ("party", "domain", "task"):
        canon[column] = canon[column].astype(_TEXT)
    canon["instruction_tokens"] = count_tokens(instructions)
    canon["response_tokens"] = count_tokens(responses)

    result = contract.rows.run(canon)
    if res.template is None:
        res.template = result
    by_row = add_result(res.tallies, result)
    failed: dict[int, list[str]] = {}
    for label, rows in by_row.items():
        if res.tallies[label].expectation.on_failure == "quarantine":
            for row in rows:
                failed.setdefault(row, []).append(label)

    source_rows = canon["source_row"].to_numpy()
    keep = ~np.isin(source_rows, np.fromiter(failed, dtype=np.int64, count=len(failed)))
    dup = np.full(len(canon), None, dtype=object)
    dup[keep] = dedup.classify(
        [instructions[i] for i in np.flatnonzero(keep)],
        [responses[i] for i in np.flatnonzero(keep)],
    )
    accepted_mask = keep & (dup == None)  # noqa: E711 - elementwise on an object array
    for pos in np.flatnonzero(~accepted_mask):  # only rejected rows pay for Python here
        row = int(source_rows[pos])
        labels = failed.get(row)
        reason = "contract" if labels else str(dup[pos])
        entry: dict[str, Any] = {"source_row": row, "line": lines.get(row), "reason": reason}
        if labels:
            entry["expectations"] = sorted(labels)
        quarantine.add(**entry, instruction=instructions[pos], response=responses[pos])
        res.reasons[reason] += 1
        res.quarantined += 1
    accepted = canon[accepted_mask].reset_index(drop=True)[list(HARMONISED_COLUMNS)]
    res.accepted += len(accepted)
    res.instruction_hist += _histogram(accepted["instruction_tokens"].to_numpy())
    res.response_hist += _histogram(accepted["response_tokens"].to_numpy())
    res.instruction_tokens += int(accepted["instruction_tokens"].sum())
    res.response_tokens += int(accepted["response_tokens"].sum())
    res.domains.update(accepted["domain"].tolist())
    res.tasks.update(accepted["task"].tolist())
    res.check_reconciles(f"{raw_path} (chunk ending at record {chunk.records[-1:]})")
    return accepted


@contextmanager
def _atomic_parquet(path: Path) -> Iterator[pq.ParquetWriter]:
    """A Parquet writer whose file appears only when everything was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = pq.ParquetWriter(tmp, CANONICAL_SCHEMA, compression="snappy")
    try:
        yield writer
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def harmonise_split(
    raw_path: Path,
    *,
    split: str,
    mapping: SourceMapping,
    contract: Contract,
    dedup: DedupIndex,
    out_path: Path,
    quarantine_path: Path,
    count_tokens: TokenCounter = count_utf8_bytes,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> SplitResult:
    """Stream one raw export into ``out_path`` (Parquet) and its quarantine file."""
    check_format(raw_path, mapping)
    res = SplitResult(split=split, tallies=contract.rows.new_tallies())
    quarantine_path.parent.mkdir(parents=True, exist_ok=True)
    with (
        quarantine_path.open("w", encoding="utf-8", newline="\n") as qfh,
        _atomic_parquet(out_path) as writer,
    ):
        quarantine = _Quarantine(qfh, split)
        chunks = iter_raw(
            raw_path,
            mapping.format,
            encoding=mapping.encoding,
            gzip=mapping.gzip,
            chunk_rows=chunk_rows,
            columns=mapping.raw_columns(),
        )
        for chunk in chunks:
            accepted = harmonise_chunk(
                chunk,
                mapping=mapping,
                raw_path=raw_path,
                contract=contract,
                dedup=dedup,
                count_tokens=count_tokens,
                res=res,
                quarantine=quarantine,
            )
            if len(accepted):
                writer.write_table(
                    pa.Table.from_pandas(accepted, schema=CANONICAL_SCHEMA, preserve_index=False)
                )
            # Drop this chunk before the reader builds the next one: otherwise two are alive.
            del chunk, accepted
        if res.template is None:  # no rows at all: still run the suite, for its verdicts
            empty = pd.DataFrame({c: pd.Series(dtype=object) for c in HARMONISED_COLUMNS})
            res.template = contract.rows.run(empty)
            add_result(res.tallies, res.template)
    res.check_reconciles(str(raw_path))
    res.sha256 = _sha256(out_path)
    return res


def dataset_profile_frame(results: dict[str, SplitResult]) -> pd.DataFrame:
    """The one-row frame the dataset suite checks: shares and counts, no record content."""
    read = sum(r.rows_read for r in results.values())
    accepted = sum(r.accepted for r in results.values())
    reasons = sum((r.reasons for r in results.values()), Counter())
    share = (lambda n: n / read) if read else (lambda n: 0.0)
    return pd.DataFrame(
        [
            {
                "rows_read": read,
                "rows_accepted": accepted,
                "accepted_share": share(accepted) if read else 0.0,
                "train_rows": results["train"].accepted if "train" in results else None,
                "eval_rows": results["eval"].accepted if "eval" in results else None,
                "duplicate_share": share(sum(reasons[k] for k in DUPLICATE_REASONS)),
                "unreadable_share": share(sum(reasons[k] for k in UNREADABLE_REASONS)),
                "contract_failure_share": share(reasons["contract"]),
            }
        ]
    )


def failure_message(t: Tally, split: str, *, rows: bool) -> str:
    """One failed expectation as a steward reads it: what was wanted and what was found.

    ``train: expect_column_values_to_be_between(train_rows) failed: train_rows >= 50,
    observed 8``; a rows-suite expectation gives its failing and evaluated rows instead.
    """
    head = f"{split}: {t.expectation.label} failed"
    if rows and t.evaluated:
        return f"{head} on {t.unexpected} of {t.evaluated} rows ({t.expectation.bound})"
    observed = "" if t.observed is None else f", observed {t.observed}"
    return f"{head}: {t.expectation.bound}{observed}"


@dataclass
class Verdict:
    """What the contract policy decided, with the Data Docs pages that show why."""

    outcomes: list[ExpectationOutcome]
    blocking: list[str]
    warnings: list[str]
    docs: list[Path]
    dataset_tallies: dict[str, Tally]


def judge(contract: Contract, results: dict[str, SplitResult], docs_dir: Path | None) -> Verdict:
    """Run the dataset suite, apply each expectation's policy and render Data Docs."""
    ds_tallies = contract.dataset.new_tallies()
    profile = dataset_profile_frame(results)
    ds_result = contract.dataset.run(profile)
    add_result(ds_tallies, ds_result)
    for t in ds_tallies.values():  # the value each bound was checked against, for messages
        column = t.expectation.kwargs.get("column")
        if t.observed is None and column in profile.columns:
            value = profile[column].iloc[0]
            rounded = None if pd.isna(value) else float(f"{value:.4g}")
            t.observed = int(rounded) if rounded is not None and rounded.is_integer() else rounded
    outcomes: list[ExpectationOutcome] = []
    blocking: list[str] = []
    warnings: list[str] = []
    groups = [(contract.rows.name, split, r.tallies) for split, r in results.items()]
    groups.append((contract.dataset.name, "all", ds_tallies))
    for suite, split, tallies in groups:
        for t in tallies.values():
            outcomes.append(t.outcome(suite, split))
            if t.success or t.expectation.on_failure == "quarantine":
                continue
            (blocking if t.expectation.on_failure == "block" else warnings).append(
                failure_message(t, split, rows=suite == contract.rows.name)
            )
    docs: list[Path] = []
    if docs_dir is not None:
        from cloudfed.data.docs import build_data_docs, docs_result  # GX's renderers: heavy

        docs = build_data_docs(
            [
                *(
                    (
                        split,
                        docs_result(
                            r.template,
                            r.tallies,
                            contract.rows.name,
                            quarantined_rows=r.reasons["contract"],
                        ),
                    )
                    for split, r in results.items()
                ),
                ("dataset", docs_result(ds_result, ds_tallies, contract.dataset.name)),
            ],
            docs_dir,
        )
    return Verdict(outcomes, blocking, warnings, docs, ds_tallies)


def _summary(suite: str, outcomes: list[ExpectationOutcome]) -> ValidationSummary:
    failed = sorted({f"{o.split}: {o.expectation}" for o in outcomes if not o.success})
    ok = sum(o.success for o in outcomes)
    return ValidationSummary(
        suite=suite,
        success=not failed,
        evaluated=len(outcomes),
        successful=ok,
        failed_expectations=failed,
    )


def _profile(results: dict[str, SplitResult]) -> DataProfile:
    def hist(attr: str, total: str) -> LengthHistogram:
        counts = sum((getattr(r, attr) for r in results.values()), np.zeros(len(LENGTH_BINS) + 1))
        return LengthHistogram(
            counts=[int(c) for c in counts],
            total_tokens=sum(getattr(r, total) for r in results.values()),
        )

    return DataProfile(
        columns={f.name: str(f.type) for f in CANONICAL_SCHEMA},
        rows={s: r.accepted for s, r in results.items()},
        instruction_tokens=hist("instruction_hist", "instruction_tokens"),
        response_tokens=hist("response_hist", "response_tokens"),
        domains=dict(sum((r.domains for r in results.values()), Counter())),
        tasks=dict(sum((r.tasks for r in results.values()), Counter())),
    )


def harmonize_party(
    party: PartyConfig,
    *,
    root: Path,
    contracts_dir: Path,
    count_tokens: TokenCounter = count_utf8_bytes,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    run_id: str = "latest",
    private: bool = False,
) -> DatasetRef:
    """Load, map, scrub, quarantine, validate and write one party's train and eval splits.

    Paths in ``party`` are relative to ``root``; the URIs in the returned ref are written the
    same way (``<party.storage>/harmonised/train.parquet``) so they mean the same thing in the
    party's cloud as in the run configuration. Data Docs go to
    ``<storage>/data_docs/<run_id>/`` and are built before a blocking verdict is raised, so the
    steward can read why.

    `private` (any DP on): logs and errors carry no count or observed value, because the step's
    logs and a failure's message reach the coordinator's side; the details stay in the party's
    Data Docs and quarantine.

    A party's storage or raw exports may be object-store URLs: the splits, quarantine and Data
    Docs are then written in a private temp folder and uploaded to the party's own storage
    (also when the contract blocks), and raw URLs are read from private temp copies.
    """
    root = Path(root)
    with (
        raw_on_disk(party) as local_party,
        on_disk(party_root(party, root), download=False) as storage,
    ):
        return _harmonize(
            local_party,
            storage=storage,
            root=root,
            contracts_dir=contracts_dir,
            count_tokens=count_tokens,
            chunk_rows=chunk_rows,
            run_id=run_id,
            private=private,
        )


def _harmonize(
    party: PartyConfig,
    *,
    storage: Path,
    root: Path,
    contracts_dir: Path,
    count_tokens: TokenCounter,
    chunk_rows: int,
    run_id: str,
    private: bool,
) -> DatasetRef:
    """`storage` is a local folder: the party's own, or the temp folder uploaded to it."""

    def shown(path: Path) -> str:  # where the party finds it: its storage, not a temp folder
        if not is_remote(party.storage):
            return str(path)
        return join(party.storage, path.relative_to(storage).as_posix())

    contracts_dir = contracts_dir if Path(contracts_dir).is_absolute() else root / contracts_dir
    mapping = load_party_mapping(party, root)
    contract = load_contract(
        contracts_dir,
        mapping_file=root / party.mapping,
        extra_rows=mapping.expectations.rows,
        extra_dataset=mapping.expectations.dataset,
        party=party.name,
    )
    staging = storage / "harmonised" / ".staging"
    results: dict[str, SplitResult] = {}
    train_index = DedupIndex()
    for split in SPLITS:
        results[split] = harmonise_split(
            root / getattr(party.raw, split),
            split=split,
            mapping=mapping,
            contract=contract,
            dedup=train_index if split == "train" else DedupIndex(parent=train_index),
            out_path=staging / f"{split}.parquet",
            quarantine_path=storage / "quarantine" / f"{split}.jsonl",
            count_tokens=count_tokens,
            chunk_rows=chunk_rows,
        )
    docs_dir = storage / "data_docs" / run_id
    verdict = judge(contract, results, docs_dir)
    docs_page = verdict.docs[0] if verdict.docs else docs_dir
    # A misspelled label in the mapping is configuration, not data: safe to name under DP too.
    hints = "".join(f"\n{p}" for p in metadata_problems(mapping, contract.rows.expectations))
    if verdict.blocking and private:
        raise DataError(
            f"party {party.name!r}: its harmonised data fails a blocking expectation of its "
            "contract; under DP the details stay with the party (its Data Docs and quarantine)."
            + hints
        )
    if verdict.blocking:
        raise DataError(
            f"party {party.name!r}: the harmonised data fails the contract "
            f"({', '.join(contract.files)}):\n  - "
            + "\n  - ".join(verdict.blocking)
            + hints
            + f"\nFix: correct the raw export or {mapping.source_path}, or change the "
            "expectation's bounds or meta.on_failure in the suite. Rows set aside are in "
            f"{shown(storage / 'quarantine')}; the Data Docs are at {shown(docs_page)}."
        )
    for split in SPLITS:
        os.replace(staging / f"{split}.parquet", storage / "harmonised" / f"{split}.parquet")
    for warning in [] if private else verdict.warnings:
        log.warning("contract warning party=%s: %s", party.name, warning)

    rows_read = sum(r.rows_read for r in results.values())
    accepted = sum(r.accepted for r in results.values())
    quarantined = sum(r.quarantined for r in results.values())
    if rows_read != accepted + quarantined:
        raise RuntimeError(f"party {party.name!r}: rows do not reconcile")
    reasons = sum((r.reasons for r in results.values()), Counter())
    pii = sum((r.pii for r in results.values()), Counter())
    if private:
        log.info("harmonised party=%s (counts stay with the party under DP)", party.name)
    else:
        log.info(
            "harmonised party=%s read=%d accepted=%d quarantined=%d",
            party.name,
            rows_read,
            accepted,
            quarantined,
        )
    base = party.storage
    if is_remote(base):
        docs_uri = shown(docs_page)
    else:
        docs_rel = docs_page.relative_to(root) if docs_page.is_relative_to(root) else docs_page
        docs_uri = Path(docs_rel).as_posix()
    return DatasetRef(
        party=party.name,
        train_uri=join(base, "harmonised/train.parquet"),
        eval_uri=join(base, "harmonised/eval.parquet"),
        train_sha256=results["train"].sha256,
        eval_sha256=results["eval"].sha256,
        rows_read=rows_read,
        rows_accepted=accepted,
        rows_quarantined=quarantined,
        rows_train=results["train"].accepted,
        rows_eval=results["eval"].accepted,
        quarantine_uri=join(base, "quarantine"),
        quarantine_reasons=dict(sorted(reasons.items())),
        pii_replaced=dict(sorted(pii.items())),
        rows_repaired=sum(r.repaired for r in results.values()),
        contract_sha256=contract.sha256,
        canonical_sha256=contract.canonical_sha256,
        validation=_summary(contract.rows.name, verdict.outcomes),
        expectations=verdict.outcomes,
        warnings=verdict.warnings,
        profile=_profile(results),
        docs_uri=docs_uri,
    )
