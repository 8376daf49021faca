"""Readers for the raw export formats a party may hold: CSV, JSON Lines and Parquet.

Each reader returns the rows as they are, with no type guessing: CSV cells stay strings (an id
such as ``007`` or a postcode must not become a number) and nested JSON objects stay dicts so
that dotted mapping paths (``record.instruction``) can reach into them. Every failure is a
`DataError` naming the file and what to do about it.
"""

from __future__ import annotations

import gzip as gzip_mod
import io
import json
from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cloudfed.errors import DataError

RawFormat = Literal["csv", "jsonl", "parquet"]
FORMATS: tuple[str, ...] = ("csv", "jsonl", "parquet")
DEMO_HINT = "run `make demo-data` (or `python -m cloudfed.data.demo --out .cloudfed/clouds`)"


def missing_file_fix(path: Path) -> str:
    """Suggest regenerating demo data for demo paths, and checking the config otherwise."""
    if ".cloudfed/clouds" in path.as_posix():
        return DEMO_HINT
    return "check the party's raw.train / raw.eval path in the run configuration"


def _open_text(path: Path, *, encoding: str, gzip: bool) -> io.TextIOBase:
    if gzip:
        return io.TextIOWrapper(gzip_mod.open(path, "rb"), encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")  # noqa: SIM115 - closed by the caller


def _read_csv(path: Path, *, encoding: str, gzip: bool, nrows: int | None) -> pd.DataFrame:
    with _open_text(path, encoding=encoding, gzip=gzip) as fh:
        # keep_default_na=False: a cell reading "NA" or "null" is text, an empty cell is "".
        return pd.read_csv(fh, dtype=str, keep_default_na=False, nrows=nrows)


def _read_jsonl(path: Path, *, encoding: str, gzip: bool, nrows: int | None) -> pd.DataFrame:
    records: list[dict[str, object]] = []
    with _open_text(path, encoding=encoding, gzip=gzip) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: line {lineno} is not valid JSON ({exc.msg} at column {exc.colno}). "
                    "Fix: write one JSON object per line."
                ) from None
            if not isinstance(obj, dict):
                raise DataError(
                    f"{path}: line {lineno} is a JSON {type(obj).__name__}, not an object. "
                    "Fix: write one JSON object per line."
                )
            records.append(obj)
            if nrows is not None and len(records) >= nrows:
                break
    return pd.DataFrame.from_records(records) if records else pd.DataFrame()


def _read_parquet(path: Path, *, nrows: int | None) -> pd.DataFrame:
    if nrows is None:
        table = pq.read_table(path)
    else:
        pf = pq.ParquetFile(path)
        batch = next(pf.iter_batches(batch_size=nrows), None)
        table = (
            pa.Table.from_batches([batch]) if batch is not None else pf.schema_arrow.empty_table()
        )
    return table.to_pandas()


def load_raw(
    path: str | Path,
    fmt: str,
    *,
    encoding: str = "utf-8",
    gzip: bool = False,
    nrows: int | None = None,
) -> pd.DataFrame:
    """Read one raw export; ``nrows`` reads only the first rows (for preflight checks)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown raw format {fmt!r}. Fix: use one of {list(FORMATS)}.")
    if not path.is_file():
        raise DataError(f"{path}: raw file not found. Fix: {missing_file_fix(path)}.")
    try:
        if fmt == "csv":
            return _read_csv(path, encoding=encoding, gzip=gzip, nrows=nrows)
        if fmt == "jsonl":
            return _read_jsonl(path, encoding=encoding, gzip=gzip, nrows=nrows)
        if gzip:
            raise DataError(
                f"{path}: gzip: true is not supported for parquet. "
                "Fix: remove gzip from the mapping; parquet compresses internally."
            )
        return _read_parquet(path, nrows=nrows)
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not readable as {encoding} (byte {exc.start}). "
            "Fix: set `encoding` in the source mapping to the file's real encoding."
        ) from None
    except (gzip_mod.BadGzipFile, EOFError) as exc:
        raise DataError(
            f"{path}: not a valid gzip file ({exc}). "
            "Fix: set `gzip: false` in the source mapping or re-export the file."
        ) from None
    except (pd.errors.ParserError, pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(
            f"{path}: cannot be read as {fmt} ({type(exc).__name__}). "
            f"Fix: check that the file is a complete {fmt} export and that `format` in the source "
            "mapping matches it."
        ) from None
