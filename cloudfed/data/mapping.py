r"""Source mappings: how one party's raw export becomes canonical instruction/response rows.

A data steward owns one YAML file per source (``data_contracts/sources/<party>.yaml``). A field
is named in one of three ways, so that most exports need no code:

* a column name: ``response: answer``
* a dotted path into nested JSON or Parquet structs: ``response: record.output``
* a template joining several values: ``instruction: "{record.instruction}\n\n{record.input}"``

In a template, the literal text between two placeholders is a separator: it is written only when
there is a non-empty value on both sides of it, so an empty ``input`` drops cleanly instead of
leaving a dangling blank line. Text before the first or after the last placeholder is written
whenever any value is present. ``{{`` and ``}}`` are literal braces.
"""

from __future__ import annotations

import difflib
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from cloudfed.data.contracts import Expectation
from cloudfed.data.loaders import load_raw, missing_file_fix
from cloudfed.errors import DataError
from cloudfed.federation import PartyConfig

CANONICAL_COLUMNS: tuple[str, ...] = (
    "instruction",
    "response",
    "party",
    "domain",
    "task",
    "source_row",
)
PREFLIGHT_ROWS = 20
_SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldMap(_Strict):
    """Where the two canonical text fields come from."""

    instruction: str = Field(min_length=1)
    response: str = Field(min_length=1)

    @field_validator("instruction", "response")
    @classmethod
    def _parseable(cls, spec: str) -> str:
        parse_spec(spec)
        return spec


class Metadata(_Strict):
    """Constant labels attached to every row of the source."""

    domain: str = Field(min_length=1)
    task: str = Field(min_length=1)


class ExtraExpectations(_Strict):
    """Expectations a source adds to the canonical suites (GX 1.x ``{type, kwargs, meta}``)."""

    rows: list[dict[str, Any]] = Field(default_factory=list)
    dataset: list[dict[str, Any]] = Field(default_factory=list)


class SourceMapping(_Strict):
    """One party's mapping file, validated."""

    party: str = Field(min_length=1)
    format: Literal["csv", "jsonl", "parquet"]
    gzip: bool = False
    encoding: str = "utf-8"
    renames: dict[str, str] = Field(default_factory=dict)
    fields: FieldMap
    metadata: Metadata
    value_maps: dict[str, dict[str, str]] = Field(default_factory=dict)
    expectations: ExtraExpectations = Field(default_factory=ExtraExpectations)
    _source_path: str = PrivateAttr(default="<in-memory mapping>")

    @model_validator(mode="after")
    def _check(self) -> SourceMapping:
        if self.gzip and self.format == "parquet":
            raise ValueError("gzip: true applies to csv and jsonl only; parquet compresses itself")
        return self

    @property
    def source_path(self) -> str:
        """The YAML file this mapping came from, for error messages."""
        return self._source_path

    def raw_columns(self) -> list[str]:
        """Top-level raw columns the mapping reads (before `renames`)."""
        back = {new: old for old, new in self.renames.items()}
        heads = {p.partition(".")[0] for ps in self.referenced_paths().values() for p in ps}
        full = {p for ps in self.referenced_paths().values() for p in ps}
        return sorted({back.get(h, h) for h in heads | full})

    def referenced_paths(self) -> dict[str, list[str]]:
        """Raw columns or dotted paths each canonical field reads."""
        return {
            name: parse_spec(getattr(self.fields, name))[1] for name in ("instruction", "response")
        }


_FIXES = {
    "format": "use csv, jsonl or parquet",
    "encoding": "use a Python codec name such as utf-8 or latin-1",
    "instruction": "name a column, a dotted path (record.instruction) or a template '{a}\\n\\n{b}'",
    "response": "name a column, a dotted path (record.output) or a template '{a}\\n\\n{b}'",
    "domain": "set a short constant label such as healthcare",
    "task": "set a short constant label such as qa",
    "gzip": "set gzip: true only for .gz csv/jsonl exports",
    "value_maps": "write value_maps: {column: {raw value: replacement}}",
    "renames": "write renames: {column in the export: name the fields use}",
    "rows": "list GX expectations as {type: expect_..., kwargs: {...}}",
    "dataset": "list GX expectations as {type: expect_..., kwargs: {...}}",
    "party": "set the party's name as in the run configuration",
}


def parse_spec(spec: str) -> tuple[list[str], list[str]]:
    """Split a field spec into literal segments and the paths between them.

    A spec without placeholders is a single path. Returns ``(literals, paths)`` with
    ``len(literals) == len(paths) + 1``.
    """
    if "{" not in spec and "}" not in spec:
        return ["", ""], [spec.strip()]
    literals: list[str] = []
    paths: list[str] = []
    pending = ""
    try:
        parsed = list(string.Formatter().parse(spec))
    except ValueError as exc:
        raise ValueError(
            f"template {spec!r} is malformed ({exc}); use {{{{ }}}} for braces"
        ) from None
    for literal, field, fmt_spec, conversion in parsed:
        pending += literal
        if field is None:
            continue
        if not field.strip() or fmt_spec or conversion:
            raise ValueError(
                f"template {spec!r} has placeholder {{{field}}} with a format or conversion; "
                "only plain {column} or {path.to.key} placeholders are supported"
            )
        literals.append(pending)
        paths.append(field.strip())
        pending = ""
    literals.append(pending)
    if not paths:
        raise ValueError(f"template {spec!r} has no {{placeholder}}")
    return literals, paths


def yaml_lines(text: str) -> dict[tuple[str | int, ...], int]:
    """Line (1-based) of every key and list item in a YAML document, by its path."""
    lines: dict[tuple[str | int, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str | int, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, str(key.value))
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _line_of(lines: dict[tuple[str | int, ...], int], loc: tuple[str | int, ...]) -> int:
    """The line of ``loc`` or of its nearest parent present in the file (1 for the top)."""
    for cut in range(len(loc), 0, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return 1


def _mapping_error(path: Path, exc: ValidationError, text: str) -> DataError:
    lines_by_path = yaml_lines(text)
    lines = [f"{path}: the source mapping is invalid:"]
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        field = ".".join(str(p) for p in loc) or "(top level)"
        key = str(loc[-1]) if loc else ""
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            fix = f"remove '{key}' or correct its spelling (see data_contracts/README.md)"
        elif err.get("type") == "missing":
            fix = f"add '{field}'"
        else:
            fix = _FIXES.get(key, f"correct '{field}'")
        line = _line_of(lines_by_path, loc)
        lines.append(f"  - line {line}: {field}: {msg}. Fix: {fix}.")
    return DataError("\n".join(lines))


def load_mapping(path: str | Path) -> SourceMapping:
    """Read and validate a mapping file; errors name the file, the line, the field and the fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: source mapping not found. Fix: create it (see data_contracts/README.md) "
            "or correct the party's `mapping` path in the run configuration."
        )
    try:
        text = path.read_text(encoding="utf-8")
        doc = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text. Fix: save the mapping as UTF-8.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise DataError(
            f"{path}: {where}not valid YAML ({problem}). Fix: correct the YAML syntax there."
        ) from None
    if not isinstance(doc, dict):
        raise DataError(
            f"{path}: expected a mapping of settings. Fix: see data_contracts/README.md."
        )
    try:
        mapping = SourceMapping.model_validate(doc)
    except ValidationError as exc:
        raise _mapping_error(path, exc, text) from None
    mapping._source_path = str(path)
    try:
        "".encode(mapping.encoding)
    except LookupError:
        line = yaml_lines(text).get(("encoding",), 1)
        raise DataError(
            f"{path}: line {line}: encoding: unknown codec {mapping.encoding!r}. "
            f"Fix: {_FIXES['encoding']}."
        ) from None
    return mapping


def _top_keys(df: pd.DataFrame, column: str) -> list[str]:
    keys: set[str] = set()
    for value in df[column]:
        if isinstance(value, dict):
            keys.update(str(k) for k in value)
    return sorted(keys)


def _path_problem(df: pd.DataFrame, path: str) -> str | None:
    """Explain why ``path`` cannot be read from ``df``, or return None when it can."""
    if path in df.columns:
        return None
    head, _, rest = path.partition(".")
    if not rest or head not in df.columns:
        return f"column {head if rest else path!r} is missing; columns present: {list(df.columns)}"
    parent = head
    values = list(df[head])
    for key in rest.split("."):
        dicts = [v for v in values if isinstance(v, dict)]
        if len(df) and not dicts:
            return f"{parent!r} holds no nested objects, so {path!r} cannot be read"
        if len(df) and not any(key in d for d in dicts):
            present = sorted({str(k) for d in dicts for k in d})
            return f"key {key!r} is missing under {parent!r}; keys present: {present}"
        values = [d.get(key) for d in dicts]
        parent = f"{parent}.{key}"
    return None


def rename_columns(df: pd.DataFrame, mapping: SourceMapping) -> pd.DataFrame:
    """Apply the mapping's ``renames`` so fields can use stable names across export versions."""
    present = {k: v for k, v in mapping.renames.items() if k in df.columns}
    return df.rename(columns=present) if present else df


def check_columns(df: pd.DataFrame, mapping: SourceMapping, source_file: str | Path) -> None:
    """Fail early, naming both files, when the mapping reads something the raw data lacks."""
    df = rename_columns(df, mapping)
    for name, paths in mapping.referenced_paths().items():
        for path in paths:
            problem = _path_problem(df, path)
            if problem:
                line = _field_lines(mapping).get(name)
                at = f" (line {line})" if line else ""
                raise DataError(
                    f"{source_file}: fields.{name} in {mapping.source_path}{at} reads {path!r}, "
                    f"but {problem}. Fix: correct fields.{name} in {mapping.source_path}, add a "
                    "`renames:` entry for a renamed column, or re-export the raw file with it."
                )


def _field_lines(mapping: SourceMapping) -> dict[str, int]:
    try:
        text = Path(mapping.source_path).read_text(encoding="utf-8")
    except OSError:
        return {}
    lines = yaml_lines(text)
    return {k[1]: v for k, v in lines.items() if len(k) == 2 and k[0] == "fields"}


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and value != value:
        return True
    return isinstance(value, str) and not value.strip()


def _resolve(df: pd.DataFrame, path: str, value_maps: dict[str, dict[str, str]]) -> list[Any]:
    if path in df.columns:
        values = list(df[path])
    else:
        head, _, rest = path.partition(".")
        values = list(df[head])
        for key in rest.split("."):
            values = [v.get(key) if isinstance(v, dict) else None for v in values]
    vmap = value_maps.get(path)
    out: list[Any] = []
    for v in values:
        if _is_missing(v):
            out.append(None)
            continue
        text = v if isinstance(v, str) else str(v)
        out.append(vmap.get(text, text) if vmap else text)
    return out


def render(literals: list[str], values: list[str | None]) -> str | None:
    """Join the present values with the separator that precedes each; None if all are absent."""
    parts: list[str] = []
    for i, value in enumerate(values):
        if value is None:
            continue
        if parts:
            parts.append(literals[i])
        parts.append(value)
    if not parts:
        return None
    return literals[0] + "".join(parts) + literals[-1]


def _render_field(df: pd.DataFrame, spec: str, value_maps: dict[str, dict[str, str]]) -> list[Any]:
    literals, paths = parse_spec(spec)
    columns = [_resolve(df, p, value_maps) for p in paths]
    return [render(literals, list(row)) for row in zip(*columns, strict=True)] if len(df) else []


def apply_mapping(
    df: pd.DataFrame,
    mapping: SourceMapping,
    source_file: str | Path,
    records: list[int] | None = None,
) -> pd.DataFrame:
    """Turn raw rows into canonical rows; missing values become None, never the text "nan".

    ``source_row`` is the 1-based number of the record in the raw file (header excluded; given
    by the chunked reader as ``records``), so a quarantine entry can be traced back without
    copying the row anywhere else.
    """
    if len(df) or len(df.columns):  # a chunk of only unreadable records has no columns
        check_columns(df, mapping, source_file)
    df = rename_columns(df, mapping)
    out = pd.DataFrame(
        {
            "instruction": pd.Series(
                _render_field(df, mapping.fields.instruction, mapping.value_maps), dtype=object
            ),
            "response": pd.Series(
                _render_field(df, mapping.fields.response, mapping.value_maps), dtype=object
            ),
        }
    )
    out["party"] = mapping.party
    out["domain"] = mapping.metadata.domain
    out["task"] = mapping.metadata.task
    numbers = records if records is not None else range(1, len(df) + 1)
    out["source_row"] = pd.Series(numbers, dtype="int64")
    return out[list(CANONICAL_COLUMNS)]


def check_format(path: Path, mapping: SourceMapping) -> None:
    """Catch a mapping that names another format than the file's extension shows."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = _SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is not None and fmt != mapping.format:
        raise DataError(
            f"{mapping.source_path}: format: {mapping.format!r} does not match {path} "
            f"(looks like {fmt}). Fix: set `format: {fmt}` or point the party at the right file."
        )


def load_party_mapping(party: PartyConfig, root: Path) -> SourceMapping:
    """Load a party's mapping and check it was written for that party."""
    mapping = load_mapping(root / party.mapping)
    if mapping.party != party.name:
        typo = difflib.get_close_matches(party.name, [mapping.party], n=1, cutoff=0.75)
        meant = (
            f"if the party is {mapping.party!r}, correct parties[{party.name}].name; otherwise "
            if typo
            else ""
        )
        raise DataError(
            f"{mapping.source_path}: party: {mapping.party!r} but the run configuration uses this "
            f"file for party {party.name!r}. Fix: {meant}point parties[{party.name}].mapping at "
            "the party's own mapping file or correct `party`."
        )
    return mapping


def check_source_files(party: PartyConfig, root: Path) -> SourceMapping:
    """What can be checked of a party's source without reading a record.

    The mapping is valid and the party's own, and each raw file exists in the format the mapping
    names. Nothing in its messages depends on the data, so they may reach the coordinator under DP.
    """
    mapping = load_party_mapping(party, root)
    for split in ("train", "eval"):
        raw_path = root / getattr(party.raw, split)
        if not raw_path.is_file():
            raise DataError(
                f"{raw_path}: raw {split} file of party {party.name!r} not found. "
                f"Fix: {missing_file_fix(raw_path)}."
            )
        check_format(raw_path, mapping)
    return mapping


def check_source_rows(party: PartyConfig, root: Path, mapping: SourceMapping) -> None:
    """Read the first rows of each raw file and check that the mapping finds what it reads."""
    for split in ("train", "eval"):
        raw_path = root / getattr(party.raw, split)
        head = load_raw(
            raw_path,
            mapping.format,
            encoding=mapping.encoding,
            gzip=mapping.gzip,
            nrows=PREFLIGHT_ROWS,
        )
        check_columns(head, mapping, raw_path)


def metadata_problems(mapping: SourceMapping, expectations: Sequence[Expectation]) -> list[str]:
    """The mapping's constant labels that the rows suite's allowed sets refuse, with a fix.

    A misspelled ``domain`` would otherwise fail every row; naming the closest allowed value
    here turns "240 of 240 rows failed" into a one-word fix.
    """
    values = {"domain": mapping.metadata.domain, "task": mapping.metadata.task}
    lines = _metadata_lines(mapping)
    problems = []
    for exp in expectations:
        column = exp.kwargs.get("column")
        allowed = exp.kwargs.get("value_set")
        if exp.type != "expect_column_values_to_be_in_set" or column not in values:
            continue
        if not isinstance(allowed, list) or values[column] in allowed:
            continue
        allowed = [str(a) for a in allowed]
        close = difflib.get_close_matches(values[column], allowed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        at = f"line {lines[column]}: " if column in lines else ""
        problems.append(
            f"{mapping.source_path}: {at}metadata.{column}: {values[column]!r} is not an allowed "
            f"value; {hint}Fix: use one of {allowed} (the rows suite's allowed set, in "
            f"{exp.origin}), or add the value there."
        )
    return problems


def _metadata_lines(mapping: SourceMapping) -> dict[str, int]:
    try:
        text = Path(mapping.source_path).read_text(encoding="utf-8")
    except OSError:
        return {}
    return {k[1]: v for k, v in yaml_lines(text).items() if len(k) == 2 and k[0] == "metadata"}


def check_source(party: PartyConfig, root: Path) -> None:
    """Preflight a party's raw exports against its mapping, reading only the first rows."""
    check_source_rows(party, root, check_source_files(party, root))
