"""Canonical data contract: a Great Expectations 1.x suite checked against harmonised rows.

The suite is a JSON file that data stewards edit (``data_contracts/canonical/*.json``); its hash,
together with the party's mapping file, is recorded in every `DatasetRef` so that a reviewer can
tell which contract a round was trained under. GX runs with ``BOOLEAN_ONLY`` results: the summary
keeps expectation names and counts, never unexpected values, because those would be record text.
GX is set up once per process (its import and context cost more than validating a few hundred
rows), and the ZenML GX integration is not used because it pins GX < 1.0.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from cloudfed.data.ref import ValidationSummary
from cloudfed.errors import DataError

SUITE_FILE = Path("canonical") / "instruction_response.json"
_DATASOURCE = "cloudfed_canonical"
_ASSET = "harmonised"
_BATCH = "whole_frame"


def suite_path(contracts_dir: str | Path) -> Path:
    """Where the canonical suite lives inside a contracts directory."""
    return Path(contracts_dir) / SUITE_FILE


def contract_sha256(suite_file: str | Path, mapping_file: str | Path) -> str:
    """Hash of the suite bytes followed by the mapping bytes: what the data was checked against."""
    digest = hashlib.sha256()
    for path in (Path(suite_file), Path(mapping_file)):
        try:
            digest.update(path.read_bytes())
        except OSError:
            raise DataError(f"{path}: contract file not readable. Fix: restore it.") from None
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


def _parse_suite(path: Path, raw: bytes) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}). Fix: correct the suite file.") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("expectations"), list):
        raise DataError(
            f"{path}: expected an object with 'name' and an 'expectations' list. "
            "Fix: see data_contracts/README.md."
        )
    name = str(doc.get("name") or path.stem)
    return name, doc["expectations"], doc.get("meta") or {}


_DEFINITIONS: dict[str, Any] = {}  # suite sha256 -> GX ValidationDefinition in `_context()`


def _validation_definition(path: Path, sha: str, raw: bytes) -> Any:
    """Register a suite once per content: copies of the same file share one definition."""
    if sha in _DEFINITIONS:
        return _DEFINITIONS[sha]
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    name, expectations, meta = _parse_suite(path, raw)
    configs = []
    for i, exp in enumerate(expectations):
        try:
            configs.append(
                ExpectationConfiguration(
                    type=exp["type"], kwargs=exp.get("kwargs", {}), meta=exp.get("meta")
                )
            )
        except Exception as exc:  # GX raises several types for unknown/ill-formed expectations
            raise DataError(
                f"{path}: expectations[{i}] is not a valid GX expectation ({exc}). "
                "Fix: use a GX 1.x expectation type with its keyword arguments."
            ) from None
    ctx = _context()
    suite = ctx.suites.add(
        gx.ExpectationSuite(name=f"{name}-{sha[:12]}", expectations=configs, meta=meta)
    )
    batch = ctx.data_sources.get(_DATASOURCE).get_asset(_ASSET).get_batch_definition(_BATCH)
    _DEFINITIONS[sha] = ctx.validation_definitions.add(
        gx.ValidationDefinition(name=f"validate-{sha[:12]}", data=batch, suite=suite)
    )
    return _DEFINITIONS[sha]


def _label(result: Any) -> str:
    cfg = result.expectation_config
    column = (cfg.kwargs or {}).get("column")
    return f"{cfg.type}({column})" if column else str(cfg.type)


def validate_frame(df: pd.DataFrame, suite_file: str | Path) -> ValidationSummary:
    """Run the suite on a canonical frame; the summary names failed expectations, not values."""
    path = Path(suite_file)
    try:
        raw = path.read_bytes()
    except OSError:
        raise DataError(
            f"{path}: contract suite not found. Fix: restore data_contracts/canonical/ or set "
            "contracts_dir in the run configuration."
        ) from None
    sha = hashlib.sha256(raw).hexdigest()
    definition = _validation_definition(path, sha, raw)
    result = definition.run(batch_parameters={"dataframe": df}, result_format="BOOLEAN_ONLY")
    failed = sorted({_label(r) for r in result.results if not r.success})
    stats = result.statistics
    return ValidationSummary(
        suite=_parse_suite(path, raw)[0],
        success=bool(result.success),
        evaluated=int(stats["evaluated_expectations"]),
        successful=int(stats["successful_expectations"]),
        failed_expectations=failed,
    )


def check_contract(
    df: pd.DataFrame, *, suite_file: str | Path, mapping_file: str | Path
) -> tuple[ValidationSummary, str]:
    """Validate and return the summary with the hash of the contract it was checked against."""
    return validate_frame(df, suite_file), contract_sha256(suite_file, mapping_file)
