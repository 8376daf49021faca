"""The data contract: two Great Expectations 1.x suites plus a party's mapping, with a policy.

* ``canonical/instruction_response.json`` — the *rows* suite, run on every chunk of canonical
  rows before they are accepted. A failing column-map expectation names the failing rows (by
  ``source_row``), which are quarantined with the expectation's name.
* ``canonical/dataset_profile.json`` — the *dataset* suite, run once per party on a one-row frame
  of released aggregates (accepted rows per split, accepted share, duplicate rate, ...), so that
  "at least 50 rows" or "at most 5 % duplicates" are GX expectations a steward edits like any
  other, evaluated without holding the party's data in memory.

Each expectation's ``meta.on_failure`` is the policy: ``quarantine`` (rows suite only, the
default there: failing rows are set aside), ``warn`` (recorded, the run goes on) or ``block``
(the harmonise step fails with a message; the default for the dataset suite and for rows-suite
expectations that are not about single rows, such as a missing column).

GX runs with results that carry counts and row numbers but never unexpected values, because those
would be record text. GX is set up once per process and the ZenML GX integration is not used
because it pins GX < 1.0.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from cloudfed.data.ref import ExpectationOutcome, ValidationSummary
from cloudfed.errors import DataError

SUITE_FILE = Path("canonical") / "instruction_response.json"
DATASET_SUITE_FILE = Path("canonical") / "dataset_profile.json"
OnFailure = Literal["quarantine", "warn", "block"]
ON_FAILURE: tuple[str, ...] = ("quarantine", "warn", "block")
MAX_FAILING_ROWS_KEPT = 100  # per expectation and split, for the stewards' report
_DATASOURCE = "cloudfed_canonical"
_ASSET = "harmonised"
_BATCH = "whole_frame"
# Counts and row numbers, never values (see the module docstring).
ROW_RESULT_FORMAT: dict[str, Any] = {
    "result_format": "COMPLETE",
    "unexpected_index_column_names": ["source_row"],
    "exclude_unexpected_values": True,
    "partial_unexpected_count": 0,
    "return_unexpected_index_query": False,
}
DATASET_RESULT_FORMAT: dict[str, Any] = {
    "result_format": "SUMMARY",
    "exclude_unexpected_values": True,
    "partial_unexpected_count": 0,
}
DOCS_KEYS = (  # what a Data Docs page may show of a result: counts, no rows
    "element_count",
    "unexpected_count",
    "unexpected_percent",
    "missing_count",
    "missing_percent",
    "unexpected_percent_total",
    "unexpected_percent_nonmissing",
    "observed_value",
)


def suite_path(contracts_dir: str | Path) -> Path:
    """Where the canonical rows suite lives inside a contracts directory."""
    return Path(contracts_dir) / SUITE_FILE


def contract_sha256(*files: str | Path) -> str:
    """Hash of the contract files' bytes in order: what the data was checked against."""
    digest = hashlib.sha256()
    for path in map(Path, files):
        try:
            data = path.read_bytes()
        except OSError:
            raise DataError(f"{path}: contract file not readable. Fix: restore it.") from None
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def _context() -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = ctx.data_sources.add_pandas(_DATASOURCE).add_dataframe_asset(_ASSET)
    asset.add_batch_definition_whole_dataframe(_BATCH)
    return ctx


def read_suite(path: Path) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """Name, expectations and meta of a suite file; a broken file is a `DataError`."""
    try:
        raw = path.read_bytes()
    except OSError:
        raise DataError(
            f"{path}: contract suite not found. Fix: restore data_contracts/canonical/ or set "
            "contracts_dir in the run configuration."
        ) from None
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}). Fix: correct the suite file.") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("expectations"), list):
        raise DataError(
            f"{path}: expected an object with 'name' and an 'expectations' list. "
            "Fix: see data_contracts/README.md."
        )
    return str(doc.get("name") or path.stem), doc["expectations"], doc.get("meta") or {}


def _label(exp_type: str, kwargs: dict[str, Any]) -> str:
    column = kwargs.get("column")
    return f"{exp_type}({column})" if column else exp_type


def label_of(result: Any) -> str:
    """The label of the expectation a GX result is about (see `Expectation.label`)."""
    config = result.expectation_config
    return _label(str(config.type), dict(config.kwargs or {}))


def _short(value: Any, limit: int = 40) -> str:
    # Regexes hold control characters: escape them rather than print them to a terminal.
    printable = isinstance(value, str) and value.isprintable()
    text = value if printable else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_bound(exp_type: str, kwargs: dict[str, Any]) -> str:
    """The expectation's bound as a steward would write it: ``train_rows >= 50``.

    Messages pair it with the observed value, so "failed" says what was wanted and what was
    found without opening the suite file. Expectations without a simple bound fall back to
    their type.
    """
    column = kwargs.get("column", "")
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    if exp_type in (
        "expect_column_values_to_be_between",
        "expect_column_value_lengths_to_be_between",
        "expect_column_mean_to_be_between",
        "expect_column_max_to_be_between",
        "expect_column_min_to_be_between",
        "expect_table_row_count_to_be_between",
    ):
        subject = {
            "expect_column_value_lengths_to_be_between": f"length of {column}",
            "expect_column_mean_to_be_between": f"mean of {column}",
            "expect_column_max_to_be_between": f"max of {column}",
            "expect_column_min_to_be_between": f"min of {column}",
            "expect_table_row_count_to_be_between": "row count",
        }.get(exp_type, column)
        if lo is not None and hi is not None:
            return f"{lo} <= {subject} <= {hi}"
        if lo is not None:
            return f"{subject} >= {lo}"
        if hi is not None:
            return f"{subject} <= {hi}"
        return subject
    if exp_type == "expect_column_values_to_be_in_set":
        return f"{column} in {_short(kwargs.get('value_set'))}"
    if exp_type == "expect_column_values_to_not_be_null":
        return f"{column} not null"
    if exp_type == "expect_column_values_to_be_unique":
        return f"{column} unique"
    if exp_type == "expect_column_values_to_be_of_type":
        return f"{column} of type {kwargs.get('type_')}"
    if exp_type in (
        "expect_column_values_to_match_regex",
        "expect_column_values_to_not_match_regex",
    ):
        verb = "does not match" if "_not_" in exp_type else "matches"
        return f"{column} {verb} {_short(kwargs.get('regex'))}"
    if exp_type == "expect_column_values_to_not_match_regex_list":
        return f"{column} matches none of {len(kwargs.get('regex_list') or [])} patterns"
    if exp_type == "expect_table_columns_to_match_set":
        return f"columns = {_short(kwargs.get('column_set'))}"
    return _label(exp_type, kwargs)


@dataclass(frozen=True)
class Expectation:
    """One expectation as the steward wrote it, with where it came from and its policy."""

    type: str
    kwargs: dict[str, Any]
    meta: dict[str, Any]
    on_failure: OnFailure
    origin: str

    @property
    def label(self) -> str:
        """Type and column: stable across chunks, readable in messages and MLflow."""
        return _label(self.type, self.kwargs)

    @property
    def bound(self) -> str:
        """What the expectation asks for, in a steward's words (`describe_bound`)."""
        return describe_bound(self.type, self.kwargs)


def _expectations(
    items: Sequence[Any], origin: str, default: OnFailure, *, allow_quarantine: bool
) -> list[Expectation]:
    out: list[Expectation] = []
    for i, exp in enumerate(items):
        where = f"{origin}: expectations[{i}]"
        if not isinstance(exp, dict) or not isinstance(exp.get("type"), str):
            raise DataError(
                f"{where}: expected an object with a 'type' (and optional 'kwargs', 'meta'). "
                "Fix: write {type: expect_..., kwargs: {...}}."
            )
        meta = dict(exp.get("meta") or {})
        policy = meta.get("on_failure", default)
        allowed = ON_FAILURE if allow_quarantine else ("warn", "block")
        if policy not in allowed:
            raise DataError(
                f"{where}.meta.on_failure: {policy!r} is not a policy here. "
                f"Fix: use one of {list(allowed)}."
            )
        kwargs = exp.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise DataError(f"{where}.kwargs: expected a mapping. Fix: write kwargs: {{...}}.")
        out.append(Expectation(exp["type"], kwargs, meta, policy, origin))
    return out


@dataclass
class Tally:
    """One expectation's outcome summed over the chunks of a split."""

    expectation: Expectation
    success: bool = True
    evaluated: int = 0
    unexpected: int = 0
    missing: int = 0
    observed: Any = None
    failing_rows: list[int] = field(default_factory=list)

    def outcome(self, suite: str, split: str) -> ExpectationOutcome:
        """What may be released about this expectation: counts and the verdict, no rows."""
        return ExpectationOutcome(
            suite=suite,
            split=split,
            expectation=self.expectation.label,
            on_failure=self.expectation.on_failure,
            success=self.success,
            evaluated=self.evaluated,
            unexpected=self.unexpected,
        )


def _definition(name: str, expectations: list[Expectation], origin: str) -> Any:
    """Register a suite once per content: copies of the same file share one definition."""
    key = hashlib.sha256(
        json.dumps(
            [name, [(e.type, e.kwargs, e.meta) for e in expectations]],
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:12]
    if key in _DEFINITIONS:
        return _DEFINITIONS[key]
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    configs = []
    for i, exp in enumerate(expectations):
        try:
            configs.append(
                ExpectationConfiguration(type=exp.type, kwargs=exp.kwargs, meta=exp.meta)
            )
            configs[-1].to_domain_obj()  # GX suites drop invalid expectations with a log line
        except Exception as exc:  # GX raises several types for unknown/ill-formed expectations
            raise DataError(
                f"{exp.origin}: expectation {exp.type!r} (#{i}) is not a valid GX 1.x "
                f"expectation ({'; '.join(str(exc).splitlines()[1:3]) or exc}). Fix: use a GX "
                "1.x expectation type with its keyword arguments."
            ) from None
    ctx = _context()
    # GX needs unique suite names per context; pages show the display name (`docs_result`).
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"{name}~{key}", expectations=configs))
    batch = ctx.data_sources.get(_DATASOURCE).get_asset(_ASSET).get_batch_definition(_BATCH)
    _DEFINITIONS[key] = ctx.validation_definitions.add(
        gx.ValidationDefinition(name=f"validate-{name}-{key}", data=batch, suite=suite)
    )
    return _DEFINITIONS[key]


_DEFINITIONS: dict[str, Any] = {}


class Suite:
    """A GX suite (file plus a mapping's extra expectations) and its running tallies."""

    def __init__(
        self,
        name: str,
        expectations: list[Expectation],
        origin: str,
        result_format: dict[str, Any],
    ) -> None:
        self.name = name
        self.expectations = expectations
        self._definition = _definition(name, expectations, origin)
        self._format = result_format

    def run(self, frame: pd.DataFrame) -> Any:
        """Validate one frame; the raw GX result (kept in memory only, it holds row numbers)."""
        return self._definition.run(
            batch_parameters={"dataframe": frame}, result_format=self._format
        )

    def new_tallies(self) -> dict[str, Tally]:
        """Fresh per-expectation counters for one split."""
        return {e.label: Tally(e) for e in self.expectations}


def failing_rows(result: Any) -> list[int] | None:
    """Row numbers a column-map expectation failed on; None when it is not about rows."""
    res = result.result or {}
    if "unexpected_index_list" not in res and "element_count" not in res:
        return None
    rows: list[int] = []
    for item in res.get("unexpected_index_list") or []:
        if isinstance(item, dict):
            value = item.get("source_row")
            rows.extend(int(v) for v in (value if isinstance(value, list) else [value]))
    return rows


def add_result(tallies: dict[str, Tally], result: Any) -> dict[str, list[int]]:
    """Fold one chunk's GX result into the tallies; returns failing rows per row expectation."""
    by_row: dict[str, list[int]] = {}
    for r in result.results:
        label = label_of(r)
        tally = tallies[label]
        res = r.result or {}
        tally.success = tally.success and bool(r.success)
        tally.evaluated += int(res.get("element_count") or 0)
        tally.unexpected += int(res.get("unexpected_count") or 0)
        tally.missing += int(res.get("missing_count") or 0)
        if "observed_value" in res:
            tally.observed = res["observed_value"]
        rows = failing_rows(r)
        if rows is not None and not r.success:
            by_row[label] = rows
            room = MAX_FAILING_ROWS_KEPT - len(tally.failing_rows)
            tally.failing_rows.extend(rows[: max(room, 0)])
    return by_row


@dataclass(frozen=True)
class Contract:
    """The rows suite, the dataset suite and the hash of every file they came from."""

    rows: Suite
    dataset: Suite
    sha256: str
    canonical_sha256: str
    files: tuple[str, ...]


def load_contract(
    contracts_dir: str | Path,
    *,
    mapping_file: str | Path | None = None,
    extra_rows: Sequence[Any] = (),
    extra_dataset: Sequence[Any] = (),
    party: str = "",
) -> Contract:
    """Read both suites, add a source's extra expectations and register them with GX."""
    contracts_dir = Path(contracts_dir)
    rows_file = contracts_dir / SUITE_FILE
    dataset_file = contracts_dir / DATASET_SUITE_FILE
    rows_name, rows_items, _ = read_suite(rows_file)
    ds_name, ds_items, _ = read_suite(dataset_file)
    rows_exps = _expectations(rows_items, str(rows_file), "quarantine", allow_quarantine=True)
    ds_exps = _expectations(ds_items, str(dataset_file), "block", allow_quarantine=False)
    origin = f"{mapping_file}: expectations" if mapping_file else "mapping"
    rows_exps += _expectations(
        list(extra_rows), f"{origin}.rows", "quarantine", allow_quarantine=True
    )
    ds_exps += _expectations(
        list(extra_dataset), f"{origin}.dataset", "block", allow_quarantine=False
    )
    for exps, where in ((rows_exps, rows_file), (ds_exps, dataset_file)):
        labels = [e.label for e in exps]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise DataError(
                f"{where}: {dup} appear more than once (counting the mapping's extra "
                "expectations). Fix: keep one expectation per type and column."
            )
    suffix = f"-{party}" if party else ""
    files = tuple(str(p) for p in (rows_file, dataset_file, mapping_file) if p is not None)
    return Contract(
        rows=Suite(rows_name + suffix, rows_exps, str(rows_file), ROW_RESULT_FORMAT),
        dataset=Suite(ds_name + suffix, ds_exps, str(dataset_file), DATASET_RESULT_FORMAT),
        sha256=contract_sha256(*files),
        canonical_sha256=contract_sha256(rows_file, dataset_file),
        files=files,
    )


def validate_frame(df: pd.DataFrame, suite_file: str | Path) -> ValidationSummary:
    """Run one suite file on a frame in a single batch (for small frames and tests)."""
    path = Path(suite_file)
    name, items, _ = read_suite(path)
    exps = _expectations(items, str(path), "block", allow_quarantine=True)
    suite = Suite(name, exps, str(path), DATASET_RESULT_FORMAT)
    result = suite.run(df)
    failed = sorted({label_of(r) for r in result.results if not r.success})
    stats = result.statistics
    return ValidationSummary(
        suite=name,
        success=bool(result.success),
        evaluated=int(stats["evaluated_expectations"]),
        successful=int(stats["successful_expectations"]),
        failed_expectations=failed,
    )
