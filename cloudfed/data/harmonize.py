"""Harmonise one party's raw exports into canonical, scrubbed, contract-checked Parquet.

Runs inside the party's cloud. Rows that cannot be used are not silently dropped: each goes to
``<storage>/quarantine/<split>.jsonl`` with a reason, where the party's data steward can read it
(it never leaves the party). What leaves is a `DatasetRef`: paths, hashes and counts, so the
coordinator learns how much data a party has and under which contract, never what it says.
Nothing here logs or prints record text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cloudfed.data.contracts import contract_sha256, suite_path, validate_frame
from cloudfed.data.loaders import load_raw
from cloudfed.data.mapping import (
    CANONICAL_COLUMNS,
    SourceMapping,
    apply_mapping,
    check_format,
    load_party_mapping,
)
from cloudfed.data.ref import DatasetRef, ValidationSummary
from cloudfed.data.scrub import clean_many
from cloudfed.errors import DataError
from cloudfed.federation import PartyConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
CANONICAL_SCHEMA = pa.schema(
    [
        ("instruction", pa.string()),
        ("response", pa.string()),
        ("party", pa.string()),
        ("domain", pa.string()),
        ("task", pa.string()),
        ("source_row", pa.int64()),
    ]
)


@dataclass
class SplitResult:
    """One split after cleaning: accepted rows plus what was set aside and why."""

    accepted: pd.DataFrame
    quarantined: list[dict[str, object]]
    rows_read: int
    reasons: Counter[str] = field(default_factory=Counter)
    pii: Counter[str] = field(default_factory=Counter)


def _reason(instruction: str | None, response: str | None, max_chars: int) -> str | None:
    if not instruction:
        return "empty_instruction"
    if not response:
        return "empty_response"
    if len(instruction) > max_chars or len(response) > max_chars:
        return "too_long"
    return None


def clean_split(
    canon: pd.DataFrame,
    *,
    split: str,
    max_chars: int,
    seen_elsewhere: frozenset[tuple[str, str]] = frozenset(),
) -> SplitResult:
    """Scrub, then set aside empty, over-long and duplicate rows (after normalisation).

    ``seen_elsewhere`` holds the accepted train pairs when cleaning the held-out split, so that an
    evaluation row identical to a training row cannot inflate held-out scores.
    """
    instructions, pii_i = clean_many(canon["instruction"])
    responses, pii_r = clean_many(canon["response"])
    keep: list[int] = []
    quarantined: list[dict[str, object]] = []
    reasons: Counter[str] = Counter()
    seen: set[tuple[str, str]] = set()
    for i, (ins, resp) in enumerate(zip(instructions, responses, strict=True)):
        reason = _reason(ins, resp, max_chars)
        if reason is None:
            key = (str(ins), str(resp))
            if key in seen:
                reason = "duplicate"
            elif key in seen_elsewhere:
                reason = "duplicate_of_train"
            seen.add(key)
        if reason is None:
            keep.append(i)
            continue
        reasons[reason] += 1
        quarantined.append(
            {
                "split": split,
                "source_row": int(canon["source_row"].iat[i]),
                "reason": reason,
                "instruction": ins,
                "response": resp,
            }
        )
    cleaned = canon.assign(instruction=instructions, response=responses)
    accepted = cleaned.iloc[keep].reset_index(drop=True)[list(CANONICAL_COLUMNS)]
    return SplitResult(accepted, quarantined, len(canon), reasons, pii_i + pii_r)


def _write_parquet(df: pd.DataFrame, path: Path) -> str:
    """Write atomically and return the file's sha256 (stable across reruns of the same input)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    table = pa.Table.from_pandas(df, schema=CANONICAL_SCHEMA, preserve_index=False)
    pq.write_table(table.replace_schema_metadata(None), tmp, compression="snappy")
    os.replace(tmp, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_quarantine(rows: list[dict[str, object]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _load_split(party: PartyConfig, mapping: SourceMapping, root: Path, split: str) -> pd.DataFrame:
    raw_path = root / getattr(party.raw, split)
    check_format(raw_path, mapping)
    raw = load_raw(raw_path, mapping.format, encoding=mapping.encoding, gzip=mapping.gzip)
    return apply_mapping(raw, mapping, raw_path)


def _merge(summaries: dict[str, ValidationSummary]) -> ValidationSummary:
    first = next(iter(summaries.values()))
    return ValidationSummary(
        suite=first.suite,
        success=all(s.success for s in summaries.values()),
        evaluated=sum(s.evaluated for s in summaries.values()),
        successful=sum(s.successful for s in summaries.values()),
        failed_expectations=[
            f"{split}: {name}" for split, s in summaries.items() for name in s.failed_expectations
        ],
    )


def harmonize_party(
    party: PartyConfig, *, root: Path, contracts_dir: Path, max_chars: int = 2000
) -> DatasetRef:
    """Load, map, scrub, quarantine, validate and write one party's train and eval splits.

    Paths in ``party`` are relative to ``root``; the URIs in the returned ref are written the
    same way (``<party.storage>/harmonised/train.parquet``) so they mean the same thing in the
    party's cloud as in the run configuration.
    """
    root = Path(root)
    contracts_dir = contracts_dir if Path(contracts_dir).is_absolute() else root / contracts_dir
    mapping = load_party_mapping(party, root)
    suite_file = suite_path(contracts_dir)
    storage = root / party.storage

    results: dict[str, SplitResult] = {}
    train_pairs: frozenset[tuple[str, str]] = frozenset()
    for split in SPLITS:
        canon = _load_split(party, mapping, root, split)
        results[split] = clean_split(
            canon, split=split, max_chars=max_chars, seen_elsewhere=train_pairs
        )
        if split == "train":
            acc = results[split].accepted
            train_pairs = frozenset(zip(acc["instruction"], acc["response"], strict=True))
        _write_quarantine(results[split].quarantined, storage / "quarantine" / f"{split}.jsonl")

    summaries = {split: validate_frame(res.accepted, suite_file) for split, res in results.items()}
    for split, summary in summaries.items():
        if not summary.success:
            raw_path = root / getattr(party.raw, split)
            raise DataError(
                f"party {party.name!r}: harmonised {split} rows from {raw_path} "
                f"fail the contract {suite_file}: {', '.join(summary.failed_expectations)}. "
                f"Fix: correct the raw export or {mapping.source_path}, or adjust the suite; "
                f"see {storage / 'quarantine'} for rows already set aside."
            )

    shas = {
        split: _write_parquet(res.accepted, storage / "harmonised" / f"{split}.parquet")
        for split, res in results.items()
    }
    rows_read = sum(r.rows_read for r in results.values())
    accepted = sum(len(r.accepted) for r in results.values())
    quarantined = sum(len(r.quarantined) for r in results.values())
    if rows_read != accepted + quarantined:
        raise RuntimeError(
            f"party {party.name!r}: {rows_read} rows read but {accepted} accepted + "
            f"{quarantined} quarantined; harmonisation lost rows"
        )
    reasons = sum((r.reasons for r in results.values()), Counter())
    pii = sum((r.pii for r in results.values()), Counter())
    log.info(
        "harmonised party=%s read=%d accepted=%d quarantined=%d",
        party.name,
        rows_read,
        accepted,
        quarantined,
    )
    base = Path(party.storage)
    return DatasetRef(
        party=party.name,
        train_uri=(base / "harmonised" / "train.parquet").as_posix(),
        eval_uri=(base / "harmonised" / "eval.parquet").as_posix(),
        train_sha256=shas["train"],
        eval_sha256=shas["eval"],
        rows_read=rows_read,
        rows_accepted=accepted,
        rows_quarantined=quarantined,
        rows_train=len(results["train"].accepted),
        rows_eval=len(results["eval"].accepted),
        quarantine_uri=(base / "quarantine").as_posix(),
        quarantine_reasons=dict(sorted(reasons.items())),
        pii_replaced=dict(sorted(pii.items())),
        contract_sha256=contract_sha256(suite_file, root / party.mapping),
        validation=_merge(summaries),
    )
