"""The data stewards' command: check a source mapping and a sample export without a pipeline.

    python -m cloudfed.contracts check data_contracts/sources/bank-gcp.yaml --sample export.jsonl

Runs exactly what the harmonise step runs (the same reader, mapping, cleaning, rows suite,
de-duplication and dataset suite) on the sample, in a temporary folder, and prints what passed
and what failed with the row numbers of failures. Record text is never printed.

Exit codes: 0 the sample passes (warnings allowed), 1 the data fails the contract (a blocking
expectation, rows that fail a rows-suite expectation, or a mapping that does not fit the
sample), 2 the contract itself is invalid (mapping or suite file).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cloudfed.data.contracts import Contract, load_contract
from cloudfed.data.dedup import DedupIndex
from cloudfed.data.harmonize import SplitResult, harmonise_split, judge
from cloudfed.data.mapping import SourceMapping, load_mapping
from cloudfed.data.tokens import count_utf8_bytes, counter_for
from cloudfed.errors import DataError

EXIT_PASS, EXIT_DATA, EXIT_CONTRACT = 0, 1, 2
MAX_ROWS_SHOWN = 12


def _rows(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:MAX_ROWS_SHOWN])
    more = len(numbers) - MAX_ROWS_SHOWN
    return shown + (f" (+{more} more)" if more > 0 else "")


def _load(mapping_file: Path, contracts_dir: Path | None) -> tuple[SourceMapping, Contract]:
    mapping = load_mapping(mapping_file)
    contracts = contracts_dir or mapping_file.absolute().parent.parent
    contract = load_contract(
        contracts,
        mapping_file=mapping_file,
        extra_rows=mapping.expectations.rows,
        extra_dataset=mapping.expectations.dataset,
        party=mapping.party,
    )
    return mapping, contract


def _quarantine_rows(path: Path) -> dict[str, list[int]]:
    """Row numbers per reason from the sample's quarantine file (text is not read out)."""
    by_reason: dict[str, list[int]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            by_reason.setdefault(entry["reason"], []).append(int(entry["source_row"]))
    return by_reason


def check(
    mapping_file: Path,
    sample: Path,
    *,
    contracts_dir: Path | None = None,
    docs_dir: Path | None = None,
    tokenizer: str | None = None,
    console: Console | None = None,
) -> int:
    """Validate mapping and sample, print the tables, return the exit code."""
    console = console or Console()
    try:
        mapping, contract = _load(mapping_file, contracts_dir)
    except DataError as exc:
        console.print(f"[bold red]contract invalid[/]: {exc}", highlight=False)
        return EXIT_CONTRACT
    count = counter_for(tokenizer) if tokenizer else count_utf8_bytes
    with tempfile.TemporaryDirectory(prefix="cloudfed-check-") as tmp:
        work = Path(tmp)
        try:
            res: SplitResult = harmonise_split(
                sample,
                split="sample",
                mapping=mapping,
                contract=contract,
                dedup=DedupIndex(),
                out_path=work / "sample.parquet",
                quarantine_path=work / "quarantine.jsonl",
                count_tokens=count,
            )
        except DataError as exc:
            console.print(f"[bold red]sample does not fit the mapping[/]: {exc}", highlight=False)
            return EXIT_DATA
        verdict = judge(contract, {"train": res}, docs_dir)
        quarantined = _quarantine_rows(work / "quarantine.jsonl")

    row_failures = 0
    for suite, tallies in (
        (contract.rows.name, res.tallies),
        (contract.dataset.name, verdict.dataset_tallies),
    ):
        table = Table(title=f"{suite}: {sample}", expand=False, title_justify="left")
        for col in ("expectation", "policy", "result", "failing", "rows"):
            table.add_column(col, overflow="fold")
        for t in tallies.values():
            policy = t.expectation.on_failure
            if t.success:
                result = "[green]pass[/]"
            elif policy == "warn":
                result = "[yellow]warn[/]"
            else:
                result = "[red]FAIL[/]"
            if not t.success and suite == contract.rows.name and policy == "quarantine":
                row_failures += 1
            if t.evaluated:
                failing = f"{t.unexpected}/{t.evaluated}"
            elif t.success or t.observed is None:
                failing = ""
            else:
                failing = f"observed {str(t.observed)[:40]}"
            table.add_row(t.expectation.label, policy, result, failing, _rows(t.failing_rows))
        console.print(table)

    counts = Table(title="rows", expand=False)
    for col in ("read", "accepted", "quarantined", "repaired", "pii replaced"):
        counts.add_column(col, justify="right")
    counts.add_row(
        str(res.rows_read),
        str(res.accepted),
        str(res.quarantined),
        str(res.repaired),
        str(sum(res.pii.values())),
    )
    console.print(counts)
    if quarantined:
        q = Table(title="quarantined rows (record numbers in the sample)", expand=False)
        q.add_column("reason")
        q.add_column("count", justify="right")
        q.add_column("rows", overflow="fold")
        for reason, rows in sorted(quarantined.items()):
            q.add_row(reason, str(len(rows)), _rows(rows))
        console.print(q)
    if verdict.docs:
        console.print(f"Data Docs: {verdict.docs[0]}", highlight=False)

    if verdict.blocking or row_failures:
        for b in verdict.blocking:
            console.print(f"[red]blocking[/]: {b}", highlight=False)
        console.print(
            f"[bold red]FAIL[/]: {len(verdict.blocking)} blocking expectation(s), "
            f"{row_failures} rows-suite expectation(s) with failing rows.",
            highlight=False,
        )
        return EXIT_DATA
    for w in verdict.warnings:
        console.print(f"[yellow]warning[/]: {w}", highlight=False)
    reasons = Counter({k: len(v) for k, v in quarantined.items()})
    console.print(f"[bold green]PASS[/] (set aside: {dict(reasons) or 'none'})", highlight=False)
    return EXIT_PASS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cloudfed.contracts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="check a source mapping against a sample export")
    c.add_argument("mapping", type=Path, help="data_contracts/sources/<party>.yaml")
    c.add_argument("--sample", type=Path, required=True, help="a raw export (or part of one)")
    c.add_argument(
        "--contracts",
        type=Path,
        default=None,
        help="contracts folder (default: two levels above the mapping)",
    )
    c.add_argument("--docs", type=Path, default=None, help="also write Data Docs HTML here")
    c.add_argument(
        "--tokenizer",
        default=None,
        help="local tokenizer path for token bounds (default: UTF-8 bytes, as the builtin model)",
    )
    args = parser.parse_args(argv)
    return check(
        args.mapping,
        args.sample,
        contracts_dir=args.contracts,
        docs_dir=args.docs,
        tokenizer=args.tokenizer,
    )


if __name__ == "__main__":
    sys.exit(main())
