"""The data stewards' command: check a source mapping and a sample export without a pipeline.

    python -m cloudfed.contracts check data_contracts/sources/bank-gcp.yaml --sample export.jsonl

Runs exactly what the harmonise step runs (the same reader, mapping, cleaning, rows suite,
de-duplication and dataset suite) on the sample, in a temporary folder, and prints what passed,
what was quarantined and what failed, with each expectation's bound, the observed value and the
row numbers of failures. Record text is never printed.

The canonical suites are found from the mapping (its folder or a folder above it, directly or
as ``data_contracts/``, then ``./data_contracts``) unless ``--contracts`` names them.

Exit codes, matching what the pipeline would do with the same data: 0 the sample is accepted
(warnings and quarantined rows allowed; their count is printed), 1 a blocking expectation fails
or the mapping does not fit the sample, 2 the contract itself is invalid (mapping, its labels,
or a suite file, or no suite found).
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

from cloudfed.data.contracts import SUITE_FILE, Contract, load_contract, suite_path
from cloudfed.data.dedup import DedupIndex
from cloudfed.data.harmonize import SplitResult, failure_message, harmonise_split, judge
from cloudfed.data.mapping import SourceMapping, load_mapping, metadata_problems
from cloudfed.data.tokens import count_utf8_bytes, counter_for
from cloudfed.errors import DataError

EXIT_PASS, EXIT_DATA, EXIT_CONTRACT = 0, 1, 2
MAX_ROWS_SHOWN = 12


def _rows(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:MAX_ROWS_SHOWN])
    more = len(numbers) - MAX_ROWS_SHOWN
    return shown + (f" (+{more} more)" if more > 0 else "")


def find_contracts(mapping_file: Path, contracts_dir: Path | None = None) -> Path:
    """The contracts folder for a mapping: ``--contracts``, else found from the mapping.

    A steward may keep the mapping anywhere (their own repository, a scratch folder). Looking
    next to it and above it (directly or in a ``data_contracts/`` there), then in
    ``./data_contracts``, finds the suites in every layout that has them; otherwise the error
    says to pass ``--contracts`` rather than naming a path the steward never chose.
    """
    if contracts_dir is not None:
        if suite_path(contracts_dir).is_file():
            return contracts_dir
        raise DataError(
            f"--contracts {contracts_dir}: no {SUITE_FILE.as_posix()} there. Fix: pass "
            "--contracts the folder that holds canonical/ (the repository's data_contracts/)."
        )
    here = mapping_file.absolute().parent  # not resolve(): a symlinked sources/ stays put
    for folder in (here, *here.parents, Path.cwd()):
        for candidate in (folder, folder / "data_contracts"):
            if suite_path(candidate).is_file():
                return candidate
    raise DataError(
        f"{mapping_file}: no canonical suite ({SUITE_FILE.as_posix()}) found next to the "
        "mapping, in a folder above it or in ./data_contracts. Fix: pass --contracts "
        "<folder holding canonical/>, for example --contracts path/to/cloudfed/data_contracts."
    )


def _load(mapping_file: Path, contracts_dir: Path | None) -> tuple[SourceMapping, Contract]:
    mapping = load_mapping(mapping_file)
    contracts = find_contracts(mapping_file, contracts_dir)
    contract = load_contract(
        contracts,
        mapping_file=mapping_file,
        extra_rows=mapping.expectations.rows,
        extra_dataset=mapping.expectations.dataset,
        party=mapping.party,
    )
    problems = metadata_problems(mapping, contract.rows.expectations)
    if problems:
        raise DataError("\n".join(problems))
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

    console.print(f"contracts: {', '.join(contract.files)}", highlight=False)
    quarantining: list[str] = []
    for suite, tallies in (
        (contract.rows.name, res.tallies),
        (contract.dataset.name, verdict.dataset_tallies),
    ):
        rows_suite = suite == contract.rows.name
        table = Table(title=f"{suite}: {sample}", expand=False, title_justify="left")
        for col in ("expectation", "policy", "result", "bound", "observed", "rows"):
            table.add_column(col, overflow="fold")
        for t in tallies.values():
            policy = t.expectation.on_failure
            if t.success:
                result = "[green]pass[/]"
            elif policy == "quarantine":
                result = "[yellow]quarantined[/]"
                quarantining.append(
                    failure_message(t, "sample", rows=rows_suite) + ": rows quarantined"
                )
            elif policy == "warn":
                result = "[yellow]warn[/]"
            else:
                result = "[red]FAIL[/]"
            if rows_suite and t.evaluated:
                observed = f"{t.unexpected} of {t.evaluated} rows fail"
            else:
                observed = "" if t.observed is None else str(t.observed)[:40]
            table.add_row(
                t.expectation.label,
                policy,
                result,
                t.expectation.bound,
                observed,
                _rows(t.failing_rows),
            )
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
    if verdict.docs and docs_dir is not None:
        console.print(f"Data Docs: {docs_dir.absolute() / 'index.html'}", highlight=False)

    for w in [*quarantining, *verdict.warnings]:
        console.print(f"[yellow]warning[/]: {w}", highlight=False)
    if verdict.blocking:
        for b in verdict.blocking:
            console.print(f"[red]blocking[/]: {b}", highlight=False)
        console.print(
            f"[bold red]FAIL[/]: {len(verdict.blocking)} blocking expectation(s); the harmonise "
            "step would stop.",
            highlight=False,
        )
        return EXIT_DATA
    reasons = Counter({k: len(v) for k, v in quarantined.items()})
    set_aside = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "none"
    n_warn = len(quarantining) + len(verdict.warnings)
    head = f"PASS with {n_warn} warning(s)" if n_warn else "PASS"
    console.print(
        f"[bold green]{head}[/]: the harmonise step would accept {res.accepted} of "
        f"{res.rows_read} rows (set aside: {set_aside}).",
        highlight=False,
    )
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
        help="folder holding canonical/ (default: found next to or above the mapping, "
        "then ./data_contracts)",
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
