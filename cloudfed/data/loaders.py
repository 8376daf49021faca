"""Chunked readers for the raw export formats a party may hold: CSV, JSON Lines and Parquet.

A party's export can be far larger than the memory a harmonise step should need, so every reader
yields `RawChunk`s of at most ``chunk_rows`` records and keeps nothing between them. Cells are read
as they are, with no type guessing: CSV cells stay strings (an id such as ``007`` must not become
a number) and nested JSON objects stay dicts so that dotted mapping paths can reach into them.

A record that cannot be read (a JSON line that is not an object, a CSV row with the wrong number
of fields, bytes that are not the declared encoding and cannot be repaired) is not fatal: it is
returned as a `RawProblem` with its record and line number so that harmonisation quarantines it
with the reason. A whole file that is not what the mapping says (wrong encoding throughout, not
gzip, not Parquet, empty) is a `DataError` naming the file and the fix.
"""

from __future__ import annotations

import codecs
import csv
import gzip as gzip_mod
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cloudfed.errors import DataError

RawFormat = Literal["csv", "jsonl", "parquet"]
FORMATS: tuple[str, ...] = ("csv", "jsonl", "parquet")
DEMO_HINT = "run `make demo-data` (or `python -m cloudfed.data.demo --out .cloudfed/clouds`)"
DEFAULT_CHUNK_ROWS = 50_000  # GX has a fixed cost per run; 50k rows amortise it

# Bytes that the declared codec cannot decode arrive as lone surrogates (surrogateescape).
_ESCAPED = re.compile("[\udc80-\udcff]+")
# A file where most of the first chunk is undecodable is in another encoding, not damaged.
_WRONG_ENCODING_SHARE = 0.5
_BOMS = {  # utf-32 first: its little-endian mark starts with utf-16's
    codecs.BOM_UTF8: "utf-8",
    codecs.BOM_UTF32_LE: "utf-32",
    codecs.BOM_UTF32_BE: "utf-32",
    codecs.BOM_UTF16_LE: "utf-16",
    codecs.BOM_UTF16_BE: "utf-16",
}

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass(frozen=True)
class RawProblem:
    """A record that could not be read; it is quarantined, never dropped silently."""

    record: int
    line: int
    reason: str
    detail: str


@dataclass
class RawChunk:
    """Up to ``chunk_rows`` parsed records with their 1-based record and line numbers."""

    frame: pd.DataFrame
    records: list[int]
    lines: list[int]
    problems: list[RawProblem] = field(default_factory=list)
    repaired: int = 0

    @property
    def size(self) -> int:
        """Records this chunk accounts for: parsed plus unreadable."""
        return len(self.records) + len(self.problems)


def missing_file_fix(path: Path) -> str:
    """Suggest regenerating demo data for demo paths, and checking the config otherwise."""
    if ".cloudfed/clouds" in path.as_posix():
        return DEMO_HINT
    return "check the party's raw.train / raw.eval path in the run configuration"


def _python_codec(encoding: str) -> str:
    """utf-8 files often start with a BOM (Excel exports); utf-8-sig reads both."""
    name = codecs.lookup(encoding).name
    return "utf-8-sig" if name == "utf-8" else encoding


def _open_text(path: Path, *, encoding: str, gzip: bool) -> io.TextIOWrapper:
    raw: Any = gzip_mod.open(path, "rb") if gzip else open(path, "rb")  # noqa: SIM115
    return io.TextIOWrapper(
        raw, encoding=_python_codec(encoding), errors="surrogateescape", newline=""
    )


def repair_bytes(text: str, encoding: str) -> str | None:
    r"""Re-decode bytes the declared codec could not read as cp1252, or None when impossible.

    A utf-8 export with a few Windows-1252 bytes (``caf\xe9`` from a spreadsheet) is the common
    case; those bytes are the only ones re-read, so valid text is never touched. Bytes undefined
    in cp1252 make the record unrecoverable and it is quarantined instead.
    """

    def _fix(match: re.Match[str]) -> str:
        data = match.group(0).encode(encoding, "surrogateescape")
        return data.decode("cp1252")

    try:
        return _ESCAPED.sub(_fix, text)
    except UnicodeDecodeError:
        return None


class _Decoder:
    """Per-record encoding repair with a verdict on the file once the first chunk is seen."""

    def __init__(self, path: Path, encoding: str) -> None:
        self.path, self.encoding = path, encoding
        self.bad_in_first_chunk = 0
        self.first_bad_line: int | None = None

    def fix(self, value: Any, line: int) -> tuple[Any, bool | None]:
        """Return the repaired value and True (repaired), False (clean) or None (unreadable)."""
        if isinstance(value, str):
            if not _ESCAPED.search(value):
                return value, False
            if self.first_bad_line is None:
                self.first_bad_line = line
            fixed = repair_bytes(value, self.encoding)
            return (fixed, True) if fixed is not None else (None, None)
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            state: bool | None = False
            for key, item in value.items():
                fixed, st = self.fix(item, line)
                if st is None:
                    return None, None
                state = state or st
                out[key] = fixed
            return out, state
        return value, False

    def judge(self, bad: int, total: int) -> None:
        """Most of the first chunk undecodable: the mapping names the wrong encoding."""
        if total and bad / total > _WRONG_ENCODING_SHARE:
            raise DataError(
                f"{self.path}: line {self.first_bad_line}: {bad} of the first {total} records "
                f"are not valid {self.encoding}. Fix: set `encoding` in the source mapping to the "
                "file's real encoding (for example latin-1, cp1252 or utf-16)."
            )


# Signatures of binary files a steward may pick by mistake, with what to do instead.
_MAGIC: tuple[tuple[bytes, str, str], ...] = (
    (b"\x1f\x8b", "a gzip-compressed file", "set `gzip: true` in the source mapping"),
    (
        b"PK\x03\x04",
        "a zip archive (an .xlsx workbook is one)",
        "export the data as CSV or JSON Lines text (or unzip it first)",
    ),
    (b"PAR1", "a Parquet file", "set `format: parquet` in the source mapping"),
    (b"%PDF", "a PDF document", "export the records as CSV or JSON Lines"),
    (b"SQLite format 3\x00", "an SQLite database", "export the table as CSV or JSON Lines"),
    (
        b"\xd0\xcf\x11\xe0",
        "an old Office document (.xls)",
        "export the sheet as CSV (UTF-8) text",
    ),
)
_TEXT_CONTROLS = frozenset(b"\t\n\r\f\x1b")


def binary_kind(head: bytes) -> tuple[str, str] | None:
    """What a text export's first bytes say it really is, and the fix; None for text.

    A binary file decoded as text fails on most records, and the generic advice for that (try
    another encoding such as latin-1) would send the steward the wrong way.
    """
    for magic, what, fix in _MAGIC:
        if head.startswith(magic):
            return what, fix
    if not head:
        return None
    sample = head[: len(head) - len(head) % 2]
    if sample and sample[1::2].count(0) > 0.9 * len(sample) / 2:
        return "UTF-16 (little-endian) text without a byte-order mark", "set `encoding: utf-16-le`"
    if sample and sample[0::2].count(0) > 0.9 * len(sample) / 2:
        return "UTF-16 (big-endian) text without a byte-order mark", "set `encoding: utf-16-be`"
    # One damaged record may hold a stray control byte (the rows suite quarantines it); a
    # binary file is full of them (about 10% of uniformly spread bytes).
    controls = sum(b < 0x20 and b not in _TEXT_CONTROLS for b in head)
    if controls > 0.05 * len(head):
        return (
            "a binary file (it holds NUL or control bytes that text exports do not)",
            "point the party at the CSV / JSON Lines export, or set `format`/`gzip` to what "
            "the file is",
        )
    return None


def _check_start(path: Path, *, encoding: str, gzip: bool, fmt: str = "csv") -> None:
    opener: Any = gzip_mod.open if gzip else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(8192)
    except (gzip_mod.BadGzipFile, EOFError, OSError) as exc:
        raise DataError(
            f"{path}: not a valid gzip file ({exc}). "
            "Fix: set `gzip: false` in the source mapping or re-export the file."
        ) from None
    if not head:
        raise DataError(
            f"{path}: the file is empty (0 bytes). Fix: re-export it with a header and records."
        )
    declared = codecs.lookup(encoding).name
    for bom, name in _BOMS.items():
        if head.startswith(bom) and not declared.startswith(name):
            raise DataError(
                f"{path}: line 1: the file starts with a {name} byte-order mark but the "
                f"mapping says encoding {encoding!r}. Fix: set `encoding: {name}`."
            )
    wide = declared.startswith(("utf-16", "utf-32")) or any(head.startswith(b) for b in _BOMS)
    kind = None if fmt == "parquet" or wide else binary_kind(head)
    if kind is not None:
        raise DataError(
            f"{path}: this is {kind[0]}, not {fmt} text"
            + (" (after gzip decompression)" if gzip else "")
            + f". Fix: {kind[1]}."
        )


def _iter_csv(path: Path, *, encoding: str, gzip: bool, chunk_rows: int) -> Iterator[RawChunk]:
    decoder = _Decoder(path, encoding)
    dirty: set[int] = set()  # lines holding bytes the codec could not decode

    def lines(fh: io.TextIOWrapper) -> Iterator[str]:
        for number, line in enumerate(fh, start=1):
            if _ESCAPED.search(line):
                dirty.add(number)
            yield line

    with _open_text(path, encoding=encoding, gzip=gzip) as fh:
        reader = csv.reader(lines(fh))
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: no header row. Fix: re-export the file with a header.")
        header = [decoder.fix(h, 1)[0] or h for h in header]
        if len(set(header)) != len(header):
            raise DataError(
                f"{path}: line 1: duplicate column names {sorted(header)}. "
                "Fix: give every column a distinct name in the export."
            )
        width = len(header)
        record, prev_line, first = 0, reader.line_num, True
        rows: list[list[str]] = []
        records: list[int] = []
        lines_: list[int] = []
        problems: list[RawProblem] = []
        repaired = 0
        while True:
            try:
                row = next(reader, None)
            except csv.Error as exc:
                record += 1
                problems.append(RawProblem(record, prev_line + 1, "unparseable", str(exc)))
                prev_line = reader.line_num
                continue
            if row is not None:
                start, prev_line = prev_line + 1, reader.line_num
                if row:  # a blank line is not a record
                    record += 1
                    if len(row) != width:
                        problems.append(
                            RawProblem(
                                record,
                                start,
                                "wrong_field_count",
                                f"expected {width} fields as in the header, found {len(row)}",
                            )
                        )
                    elif not dirty or not any(n in dirty for n in range(start, prev_line + 1)):
                        rows.append(row)
                        records.append(record)
                        lines_.append(start)
                    else:
                        fixed, state = decoder.fix(dict(zip(header, row, strict=True)), start)
                        if state is None:
                            problems.append(
                                RawProblem(
                                    record, start, "undecodable", f"bytes not valid {encoding}"
                                )
                            )
                        else:
                            repaired += int(state)
                            rows.append(list(fixed.values()))
                            records.append(record)
                            lines_.append(start)
            if row is None or len(records) + len(problems) >= chunk_rows:
                if first:
                    bad = repaired + sum(p.reason == "undecodable" for p in problems)
                    decoder.judge(bad, len(records) + len(problems))
                    first = False
                if records or problems or record == 0:  # header only: still the columns
                    frame = pd.DataFrame(rows, columns=header, dtype=object)
                    yield RawChunk(frame, records, lines_, problems, repaired)
                rows, records, lines_, problems, repaired = [], [], [], [], 0
                if row is None:
                    return


def _iter_jsonl(path: Path, *, encoding: str, gzip: bool, chunk_rows: int) -> Iterator[RawChunk]:
    decoder = _Decoder(path, encoding)
    objs: list[dict[str, Any]] = []
    records: list[int] = []
    lines: list[int] = []
    problems: list[RawProblem] = []
    repaired, record, first = 0, 0, True

    def flush() -> RawChunk:
        return RawChunk(
            pd.DataFrame.from_records(objs) if objs else pd.DataFrame(),
            records,
            lines,
            problems,
            repaired,
        )

    with _open_text(path, encoding=encoding, gzip=gzip) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            record += 1
            fixed, state = decoder.fix(line, lineno)
            if state is None:
                problems.append(
                    RawProblem(record, lineno, "undecodable", f"bytes not valid {encoding}")
                )
            else:
                repaired += int(state)
                try:
                    obj = json.loads(fixed)
                except json.JSONDecodeError as exc:
                    problems.append(
                        RawProblem(
                            record,
                            lineno,
                            "unparseable",
                            f"not valid JSON ({exc.msg} at column {exc.colno})",
                        )
                    )
                else:
                    if isinstance(obj, dict):
                        objs.append(obj)
                        records.append(record)
                        lines.append(lineno)
                    else:
                        problems.append(
                            RawProblem(
                                record,
                                lineno,
                                "unparseable",
                                f"a JSON {type(obj).__name__}, not an object",
                            )
                        )
            if len(records) + len(problems) >= chunk_rows:
                if first:
                    bad = repaired + sum(p.reason == "undecodable" for p in problems)
                    decoder.judge(bad, len(records) + len(problems))
                    first = False
                yield flush()
                objs, records, lines, problems, repaired = [], [], [], [], 0
    if first:
        decoder.judge(repaired + sum(p.reason == "undecodable" for p in problems), record)
    if records or problems:
        yield flush()


def _iter_parquet(
    path: Path, *, chunk_rows: int, columns: list[str] | None = None
) -> Iterator[RawChunk]:
    """One row group at a time: Parquet's unit of reading bounds memory, not the file.

    (``iter_batches`` keeps read-ahead buffers that grew with the file in measurements; reading
    row groups explicitly does not. A file written as one huge row group is read whole.)
    """
    pf = pq.ParquetFile(path, pre_buffer=False)
    if columns is not None:  # only what the mapping reads: the rest never leaves the disk
        heads = {c.partition(".")[0] for c in columns}
        present = set(pf.schema_arrow.names)
        # A missing column: read them all, so the mapping error can list what is there.
        columns = (
            sorted(heads & present)
            if any(c in present for c in columns)
            and all(c in present or c.partition(".")[0] in present for c in columns)
            else None
        )
    done = 0
    for group in range(pf.num_row_groups):
        table = pf.read_row_group(group, columns=columns)
        for batch in table.to_batches(max_chunksize=chunk_rows):
            frame = pa.Table.from_batches([batch]).to_pandas()
            numbers = list(range(done + 1, done + len(frame) + 1))
            done += len(frame)
            yield RawChunk(frame.astype(object), numbers, numbers)
        del table
    if done == 0:  # no rows: still the columns, so the mapping can be checked
        yield RawChunk(pf.schema_arrow.empty_table().to_pandas().astype(object), [], [])


def iter_raw(
    path: str | Path,
    fmt: str,
    *,
    encoding: str = "utf-8",
    gzip: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    columns: list[str] | None = None,
) -> Iterator[RawChunk]:
    """Stream one raw export in chunks; memory is bounded by ``chunk_rows``, not the file.

    ``columns`` (Parquet only) limits reading to the top-level columns a mapping uses.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown raw format {fmt!r}. Fix: use one of {list(FORMATS)}.")
    if not path.is_file():
        raise DataError(f"{path}: raw file not found. Fix: {missing_file_fix(path)}.")
    if fmt == "parquet" and gzip:
        raise DataError(
            f"{path}: gzip: true is not supported for parquet. "
            "Fix: remove gzip from the mapping; parquet compresses internally."
        )
    _check_start(path, encoding=encoding, gzip=gzip, fmt=fmt)
    try:
        if fmt == "csv":
            yield from _iter_csv(path, encoding=encoding, gzip=gzip, chunk_rows=chunk_rows)
        elif fmt == "jsonl":
            yield from _iter_jsonl(path, encoding=encoding, gzip=gzip, chunk_rows=chunk_rows)
        else:
            yield from _iter_parquet(path, chunk_rows=chunk_rows, columns=columns)
    except DataError:
        raise
    except (gzip_mod.BadGzipFile, EOFError, zlib_error()) as exc:
        raise DataError(
            f"{path}: the gzip stream is damaged ({exc}). Fix: re-export or re-copy the file."
        ) from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(
            f"{path}: cannot be read as {fmt} ({type(exc).__name__}: {exc}). "
            f"Fix: check that the file is a complete {fmt} export and that `format` in the source "
            "mapping matches it."
        ) from None


def zlib_error() -> type[Exception]:
    """zlib.error, imported lazily (a truncated .gz raises it mid-stream)."""
    import zlib

    return zlib.error


def load_raw(
    path: str | Path,
    fmt: str,
    *,
    encoding: str = "utf-8",
    gzip: bool = False,
    nrows: int | None = None,
) -> pd.DataFrame:
    """Read the parsed records of a raw export (``nrows``: only the first ones) into one frame.

    For previews and preflight checks; harmonisation streams with `iter_raw` instead.
    """
    frames: list[pd.DataFrame] = []
    seen = 0
    chunk = min(nrows, DEFAULT_CHUNK_ROWS) if nrows else DEFAULT_CHUNK_ROWS
    for part in iter_raw(path, fmt, encoding=encoding, gzip=gzip, chunk_rows=chunk):
        frames.append(part.frame)
        seen += part.size
        if nrows is not None and seen >= nrows:
            break
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return df.iloc[:nrows].reset_index(drop=True) if nrows is not None else df
