import codecs
import gzip
import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cloudfed.data.demo import generate_demo
from cloudfed.data.loaders import RawChunk, RawProblem, iter_raw, load_raw
from cloudfed.data.mapping import (
    CANONICAL_COLUMNS,
    SourceMapping,
    apply_mapping,
    check_source,
    load_mapping,
    parse_spec,
    render,
)
from cloudfed.errors import DataError
from cloudfed.federation import PartyConfig, load_run_config

REPO = Path(__file__).resolve().parents[1]
EXT = {"hospital-aws": "csv", "bank-gcp": "jsonl", "insurer-azure": "parquet"}


def party_config(name: str) -> PartyConfig:
    base = f".cloudfed/clouds/{name}"
    ext = EXT[name]
    return PartyConfig(
        name=name,
        raw={"train": f"{base}/raw/train.{ext}", "eval": f"{base}/raw/eval.{ext}"},
        mapping=f"data_contracts/sources/{name}.yaml",
        storage=f"{base}/storage",
    )


def make_mapping(**overrides: object) -> SourceMapping:
    doc: dict[str, object] = {
        "party": "bank-gcp",
        "format": "jsonl",
        "fields": {
            "instruction": "{record.instruction}\n\n{record.input}",
            "response": "record.output",
        },
        "metadata": {"domain": "banking", "task": "support"},
    }
    doc.update(overrides)
    return SourceMapping.model_validate(doc)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository-shaped root: the real mapping files plus freshly generated demo exports."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(REPO / "data_contracts", root / "data_contracts")
    generate_demo(root / ".cloudfed/clouds", seed=0)
    return root


# --- loaders -------------------------------------------------------------------------------


def test_csv_keeps_text_as_text(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text('id,answer\n007,"a, b"\n008,NA\n009,\n', encoding="utf-8")
    df = load_raw(path, "csv")
    assert list(df["id"]) == ["007", "008", "009"]
    assert list(df["answer"]) == ["a, b", "NA", ""]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_gzip_matches_plain(tmp_path: Path, fmt: str) -> None:
    body = (
        "q,a\nhello,world\nsecond,row\n"
        if fmt == "csv"
        else '{"q": "hello", "a": {"x": 1}}\n\n{"q": "second", "a": {"x": 2}}\n'
    )
    plain = tmp_path / f"d.{fmt}"
    plain.write_text(body, encoding="utf-8")
    packed = tmp_path / f"d.{fmt}.gz"
    packed.write_bytes(gzip.compress(body.encode()))
    a = load_raw(plain, fmt)
    b = load_raw(packed, fmt, gzip=True)
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 2
    with pytest.raises(DataError, match=rf"d\.{fmt}: not a valid gzip file.*gzip: false"):
        load_raw(plain, fmt, gzip=True)


def test_jsonl_keeps_nested_objects(tmp_path: Path) -> None:
    path = tmp_path / "n.jsonl"
    path.write_text(json.dumps({"id": 1, "record": {"instruction": "x", "input": ""}}) + "\n")
    df = load_raw(path, "jsonl")
    assert df.loc[0, "record"] == {"instruction": "x", "input": ""}


def test_jsonl_bad_lines_are_quarantined_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": \n[1, 2]\n"text"\n{"a": 5}\n')
    chunks = list(iter_raw(path, "jsonl"))
    problems = [p for c in chunks for p in c.problems]
    assert [(p.record, p.line, p.reason) for p in problems] == [
        (2, 2, "unparseable"),
        (3, 3, "unparseable"),
        (4, 4, "unparseable"),
    ]
    assert "not valid JSON" in problems[0].detail
    assert problems[1].detail == "a JSON list, not an object"
    assert problems[2].detail == "a JSON str, not an object"
    assert [r for c in chunks for r in c.records] == [1, 5]
    # load_raw returns the readable records only, in file order
    assert list(load_raw(path, "jsonl")["a"]) == [1, 5]


def test_parquet_and_head_only(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "n": [1, 2, 3]}), path)
    assert list(load_raw(path, "parquet")["prompt"]) == ["a", "b", "c"]
    assert len(load_raw(path, "parquet", nrows=2)) == 2
    with pytest.raises(DataError, match="parquet compresses internally"):
        load_raw(path, "parquet", gzip=True)


def test_wrong_encoding_and_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    path.write_bytes("q,a\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(
        DataError,
        match=r"l\.csv: line 2: 1 of the first 1 records are not valid utf-8\. Fix: set `encoding`",
    ):
        load_raw(path, "csv")
    assert load_raw(path, "csv", encoding="latin-1").loc[0, "q"] == "café"
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk\.parquet: cannot be read as parquet"):
        load_raw(junk, "parquet")


def test_missing_file_messages(tmp_path: Path) -> None:
    demo_path = tmp_path / ".cloudfed/clouds/bank-gcp/raw/train.jsonl"
    with pytest.raises(
        DataError, match=r"train\.jsonl: raw file not found\. Fix: run `make demo-data`"
    ):
        load_raw(demo_path, "jsonl")
    other = tmp_path / "exports/train.csv"
    with pytest.raises(
        DataError, match=r"train\.csv: raw file not found\. Fix: check the party's raw"
    ):
        load_raw(other, "csv")


# --- chunked reading: record and line numbers -----------------------------------------------

CSV_SPANNING = (
    "id,text\n"  # line 1
    "1,a\n"  # 2
    '2,"multi\nline\nfield"\n'  # 3-5
    "\n"  # 6: blank, not a record
    "3,c\n"  # 7
    "4,d\n"  # 8
    "\n"  # 9
    '5,"x, y"\n'  # 10
    "6,f\n"  # 11
    "7,g"  # 12, no final newline
)
JSONL_SPANNING = (
    '{"id": 1, "text": "a"}\n'  # line 1
    "\n"  # 2: blank
    '{"id": 2, "text": "multi\\nline"}\n'  # 3
    '{"id": 3, "text": {"nested": true}}\n'  # 4
    "   \n"  # 5: whitespace only
    '{"id": 4, "text": "d"}\n'  # 6
    '{"id": 5, "text": "x, y"}\n'  # 7
    '{"id": 6, "text": "f"}\n'  # 8
    '{"id": 7, "text": "g"}'  # 9, no final newline
)
EXPECTED_LINES = {
    "csv": [[2, 3, 7], [8, 10, 11], [12]],
    "jsonl": [[1, 3, 4], [6, 7, 8], [9]],
}


def write_raw(path: Path, body: bytes, *, gz: bool) -> Path:
    path.write_bytes(gzip.compress(body) if gz else body)
    return path


def all_records(chunks: list[RawChunk]) -> list[int]:
    return [r for c in chunks for r in c.records]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_text_formats_number_records_and_lines_across_chunks(
    tmp_path: Path, fmt: str, gz: bool
) -> None:
    body = CSV_SPANNING if fmt == "csv" else JSONL_SPANNING
    path = write_raw(tmp_path / f"r.{fmt}", body.encode(), gz=gz)
    chunks = list(iter_raw(path, fmt, gzip=gz, chunk_rows=3))
    assert [c.records for c in chunks] == [[1, 2, 3], [4, 5, 6], [7]]
    assert [c.lines for c in chunks] == EXPECTED_LINES[fmt]
    assert all(not c.problems and c.repaired == 0 for c in chunks)
    frame = pd.concat([c.frame for c in chunks], ignore_index=True)
    assert [str(v) for v in frame["id"]] == ["1", "2", "3", "4", "5", "6", "7"]
    if fmt == "csv":
        assert frame.loc[1, "text"] == "multi\nline\nfield"
        assert frame.loc[4, "text"] == "x, y"
        assert all(isinstance(v, str) for v in frame["id"])  # no type guessing
    else:
        assert frame.loc[1, "text"] == "multi\nline"
        assert frame.loc[2, "text"] == {"nested": True}


def test_csv_crlf_line_numbers_count_the_embedded_newline(tmp_path: Path) -> None:
    path = tmp_path / "crlf.csv"
    path.write_bytes(b'id,t\r\n1,"a\r\nb"\r\n\r\n2,c\r\n3,d\r\n')
    chunks = list(iter_raw(path, "csv", chunk_rows=2))
    assert [c.lines for c in chunks] == [[2, 5], [6]]
    assert chunks[0].frame.loc[0, "t"] == "a\r\nb"
    assert list(chunks[1].frame["t"]) == ["d"]


def test_parquet_chunks_number_records(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    n = 8
    pq.write_table(
        pa.table({"id": list(range(1, n + 1)), "text": [f"t{i}" for i in range(1, n + 1)]}),
        path,
        row_group_size=5,
    )
    chunks = list(iter_raw(path, "parquet", chunk_rows=3))
    assert all(0 < len(c.records) <= 3 for c in chunks)
    assert len(chunks) >= 3
    assert all_records(chunks) == list(range(1, n + 1))
    for c in chunks:
        assert c.lines == c.records
        assert [int(v) for v in c.frame["id"]] == c.records
        assert list(c.frame["text"]) == [f"t{r}" for r in c.records]


# --- encodings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_latin1_declared_utf8_is_a_file_level_encoding_error(tmp_path: Path, fmt: str) -> None:
    rows = [("café", "crème"), ("naïve", "déjà vu"), ("plain", "row"), ("Zürich", "Genève")]
    if fmt == "csv":
        text = "q,a\n" + "".join(f"{q},{a}\n" for q, a in rows)
    else:
        text = "".join(json.dumps({"q": q, "a": a}, ensure_ascii=False) + "\n" for q, a in rows)
    path = tmp_path / f"latin.{fmt}"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError) as exc:
        list(iter_raw(path, fmt, chunk_rows=10))
    msg = str(exc.value)
    assert msg.startswith(f"{path}: line {2 if fmt == 'csv' else 1}: ")
    assert "3 of the first 4 records are not valid utf-8" in msg
    assert "Fix: set `encoding`" in msg
    with pytest.raises(DataError, match="encoding"):
        load_raw(path, fmt)
    df = load_raw(path, fmt, encoding="latin-1")
    assert list(df["q"]) == [q for q, _ in rows]


def _stray_byte_file(tmp_path: Path, fmt: str, bad: bytes) -> Path:
    clean = [f"row{i}" for i in range(1, 6)]
    if fmt == "csv":
        lines = [b"q,a"] + [f"{c},x".encode() for c in clean]
        lines.insert(3, b"caf" + bad + b",x")  # record 3, line 4
    else:
        lines = [json.dumps({"q": c, "a": "x"}).encode() for c in clean]
        lines.insert(2, b'{"q": "caf' + bad + b'", "a": "x"}')  # record 3, line 3
    path = tmp_path / f"stray.{fmt}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_stray_cp1252_byte_in_utf8_file_is_repaired(tmp_path: Path, fmt: str) -> None:
    path = _stray_byte_file(tmp_path, fmt, b"\xe9")
    chunks = list(iter_raw(path, fmt, chunk_rows=3))
    assert sum(c.repaired for c in chunks) == 1
    assert chunks[0].repaired == 1 and chunks[1].repaired == 0
    assert not [p for c in chunks for p in c.problems]
    assert all_records(chunks) == [1, 2, 3, 4, 5, 6]
    df = load_raw(path, fmt)
    assert list(df["q"]) == ["row1", "row2", "café", "row3", "row4", "row5"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_byte_undefined_in_cp1252_makes_record_undecodable(tmp_path: Path, fmt: str) -> None:
    path = _stray_byte_file(tmp_path, fmt, b"\x81")
    chunks = list(iter_raw(path, fmt, chunk_rows=3))
    problems = [p for c in chunks for p in c.problems]
    line = 4 if fmt == "csv" else 3
    assert problems == [RawProblem(3, line, "undecodable", "bytes not valid utf-8")]
    assert all_records(chunks) == [1, 2, 4, 5, 6]
    assert sum(c.repaired for c in chunks) == 0
    assert sum(c.size for c in chunks) == 6
    assert list(load_raw(path, fmt)["q"]) == ["row1", "row2", "row3", "row4", "row5"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_utf16_with_bom_declared_utf8_names_utf16(tmp_path: Path, fmt: str) -> None:
    text = "q,a\nhé,x\n" if fmt == "csv" else '{"q": "hé", "a": "x"}\n'
    path = tmp_path / f"wide.{fmt}"
    path.write_bytes(text.encode("utf-16"))  # with BOM
    with pytest.raises(DataError) as exc:
        list(iter_raw(path, fmt))
    msg = str(exc.value)
    assert str(path) in msg
    assert "utf-16 byte-order mark" in msg and "Fix: set `encoding: utf-16`" in msg
    assert load_raw(path, fmt, encoding="utf-16").to_dict("records") == [{"q": "hé", "a": "x"}]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_utf8_bom_does_not_pollute_the_first_column(tmp_path: Path, fmt: str) -> None:
    text = "q,a\nhé,x\n" if fmt == "csv" else '{"q": "hé", "a": "x"}\n'
    path = tmp_path / f"bom.{fmt}"
    path.write_bytes(codecs.BOM_UTF8 + text.encode())
    chunks = list(iter_raw(path, fmt))
    assert list(chunks[0].frame.columns) == ["q", "a"]
    assert chunks[0].frame.loc[0, "q"] == "hé"
    assert chunks[0].repaired == 0 and not chunks[0].problems


# --- unreadable records and whole-file faults --------------------------------------------------


def test_csv_wrong_field_count_is_a_problem_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "w.csv"
    path.write_text('q,a\n1,x\n2,"two\nlines"\n3,x,extra\n4\n\n5,x\n')
    chunks = list(iter_raw(path, "csv", chunk_rows=3))
    problems = [p for c in chunks for p in c.problems]
    assert [(p.record, p.line, p.reason) for p in problems] == [
        (3, 5, "wrong_field_count"),
        (4, 6, "wrong_field_count"),
    ]
    assert problems[0].detail == "expected 2 fields as in the header, found 3"
    assert problems[1].detail == "expected 2 fields as in the header, found 1"
    assert all_records(chunks) == [1, 2, 5]
    assert [ln for c in chunks for ln in c.lines] == [2, 3, 8]
    assert list(load_raw(path, "csv")["q"]) == ["1", "2", "5"]


@pytest.mark.parametrize(
    ("fmt", "gz"),
    [("csv", False), ("jsonl", False), ("parquet", False), ("csv", True), ("jsonl", True)],
)
def test_empty_file_is_a_data_error(tmp_path: Path, fmt: str, gz: bool) -> None:
    path = write_raw(tmp_path / f"empty.{fmt}", b"", gz=gz)
    with pytest.raises(DataError, match=r"empty\.\w+: the file is empty \(0 bytes\)\. Fix:"):
        list(iter_raw(path, fmt, gzip=gz))


def test_header_only_csv_has_no_records_and_no_error(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text("q,a\n")
    chunks = list(iter_raw(path, "csv"))
    # One empty chunk that still carries the header, so a mapping can be checked against it.
    assert [c.size for c in chunks] == [0]
    assert list(chunks[0].frame.columns) == ["q", "a"]
    df = load_raw(path, "csv")
    assert len(df) == 0 and list(df.columns) == ["q", "a"]


def test_truncated_gzip_is_a_data_error(tmp_path: Path) -> None:
    body = "".join(f'{{"q": "row {i} {"x" * 50}"}}\n' for i in range(2000)).encode()
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(gzip.compress(body)[:-400])
    with pytest.raises(DataError, match=r"t\.jsonl\.gz: the gzip stream is damaged.*Fix:"):
        list(iter_raw(path, "jsonl", gzip=True, chunk_rows=100))


# --- mapping files -------------------------------------------------------------------------


def test_repo_mappings_load_and_match_local_config() -> None:
    cfg = load_run_config(REPO / "configs/local.yaml")
    for party in cfg.parties:
        mapping = load_mapping(REPO / party.mapping)
        assert mapping.party == party.name
        assert party.raw.train.endswith(f".{mapping.format}")
        assert party == party_config(party.name).model_copy(
            update={"cloud": party.cloud, "step_operator": party.step_operator}
        )


def test_unknown_field_in_yaml_names_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bank-gcp.yaml"
    path.write_text(
        "party: bank-gcp\nformat: jsonl\n"
        "fields: {instruction: q, response: a, respnse_extra: b}\n"
        "metadata: {domain: banking, task: qa}\n"
    )
    with pytest.raises(DataError) as exc:
        load_mapping(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "fields.respnse_extra" in msg
    assert "Fix: remove 'respnse_extra'" in msg


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("format: xml", "format: Input should be 'csv', 'jsonl' or 'parquet'"),
        ("format: parquet\ngzip: true", "gzip: true applies to csv and jsonl only"),
        ("format: csv\nencoding: klingon", "encoding: unknown codec 'klingon'"),
    ],
)
def test_bad_values_name_field(tmp_path: Path, yaml_text: str, expected: str) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        f"party: p\n{yaml_text}\nfields: {{instruction: q, response: a}}\n"
        "metadata: {domain: d, task: t}\n"
    )
    with pytest.raises(DataError, match="m.yaml") as exc:
        load_mapping(path)
    assert expected in str(exc.value)


def test_missing_key_and_bad_template(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("party: p\nformat: csv\nfields: {instruction: '{q:>5}', response: a}\n")
    with pytest.raises(DataError) as exc:
        load_mapping(path)
    msg = str(exc.value)
    assert "metadata: Field required. Fix: add 'metadata'" in msg
    assert "fields.instruction" in msg and "format or conversion" in msg


def test_invalid_mapping_errors_carry_yaml_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        "party: p\n"  # 1
        "format: csv\n"  # 2
        "renames:\n"  # 3
        "  Question: q\n"  # 4
        "metadata:\n"  # 5
        "  domain: d\n"  # 6
        "fields:\n"  # 7
        "  instruction: '{q!r}'\n"  # 8
        "  response: a\n"  # 9
        "  extra: b\n"  # 10
    )
    with pytest.raises(DataError) as exc:
        load_mapping(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: the source mapping is invalid:")
    assert "line 8: fields.instruction: template '{q!r}'" in msg
    assert "line 10: fields.extra: Extra inputs are not permitted" in msg
    assert "line 5: metadata.task: Field required. Fix: add 'metadata.task'" in msg


def test_unknown_column_error_gives_the_field_line(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        "party: p\nformat: csv\nmetadata: {domain: d, task: t}\n"
        "fields:\n  instruction: q\n  response: answr\n"
    )
    mapping = load_mapping(path)
    with pytest.raises(DataError) as exc:
        apply_mapping(pd.DataFrame({"q": ["x"], "a": ["y"]}), mapping, "raw.csv")
    assert f"fields.response in {path} (line 6) reads 'answr'" in str(exc.value)


def test_renames_and_record_numbers() -> None:
    mapping = make_mapping(
        format="csv",
        renames={"Question v2": "question", "not in export": "ignored"},
        fields={"instruction": "question", "response": "answer"},
    )
    df = pd.DataFrame({"Question v2": ["q1", "q2"], "answer": ["a1", "a2"]})
    out = apply_mapping(df, mapping, "raw.csv", records=[4, 9])
    assert list(out["instruction"]) == ["q1", "q2"]
    assert list(out["response"]) == ["a1", "a2"]
    assert list(out["source_row"]) == [4, 9]
    # without the rename the raw column name is not found
    plain = make_mapping(format="csv", fields={"instruction": "question", "response": "answer"})
    with pytest.raises(DataError, match=r"column 'question' is missing"):
        apply_mapping(df, plain, "raw.csv")


def test_mapping_over_streamed_chunks_keeps_raw_record_numbers(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text(CSV_SPANNING)
    mapping = make_mapping(format="csv", fields={"instruction": "text", "response": "id"})
    outs = [
        apply_mapping(c.frame, mapping, path, records=c.records)
        for c in iter_raw(path, "csv", chunk_rows=3)
    ]
    out = pd.concat(outs, ignore_index=True)
    assert list(out["source_row"]) == [1, 2, 3, 4, 5, 6, 7]
    assert list(out["response"]) == ["1", "2", "3", "4", "5", "6", "7"]
    assert out.loc[1, "instruction"] == "multi\nline\nfield"


# --- applying mappings -----------------------------------------------------------------------


def test_template_join_drops_empty_parts_cleanly() -> None:
    literals, paths = parse_spec("{record.instruction}\n\n{record.input}")
    assert paths == ["record.instruction", "record.input"]
    assert render(literals, ["Do X", "ctx"]) == "Do X\n\nctx"
    assert render(literals, ["Do X", None]) == "Do X"
    assert render(literals, [None, "ctx"]) == "ctx"
    assert render(literals, [None, None]) is None
    lit, p = parse_spec("Q: {a} / {b}.")
    assert render(lit, [None, "y"]) == "Q: y."
    assert parse_spec("{{literal}} {a}")[0] == ["{literal} ", ""]


def test_nested_path_template_and_value_maps() -> None:
    df = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "record": [
                {"instruction": "Freeze card", "input": "", "output": "Done", "ch": "tel"},
                {"instruction": "Raise limit", "input": "VIP", "output": None, "ch": "web"},
                {"instruction": "  ", "input": "only ctx", "output": 5},
            ],
        }
    )
    mapping = make_mapping(
        fields={
            "instruction": "{record.instruction}\n\n{record.input} via {record.ch}",
            "response": "record.output",
        },
        value_maps={"record.ch": {"tel": "phone"}},
    )
    out = apply_mapping(df, mapping, "raw.jsonl")
    assert list(out.columns) == list(CANONICAL_COLUMNS)
    assert list(out["instruction"]) == [
        "Freeze card via phone",
        "Raise limit\n\nVIP via web",
        "only ctx",
    ]
    assert list(out["response"]) == ["Done", None, "5"]
    assert list(out["source_row"]) == [1, 2, 3]
    assert set(out["party"]) == {"bank-gcp"} and set(out["task"]) == {"support"}


def test_unknown_column_names_raw_file_mapping_file_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "hospital-aws.yaml"
    path.write_text(
        "party: hospital-aws\nformat: csv\nfields: {instruction: question, response: answr}\n"
        "metadata: {domain: healthcare, task: qa}\n"
    )
    mapping = load_mapping(path)
    df = pd.DataFrame({"question": ["q"], "answer": ["a"]})
    with pytest.raises(DataError) as exc:
        apply_mapping(df, mapping, "clouds/h/raw/train.csv")
    msg = str(exc.value)
    assert msg.startswith("clouds/h/raw/train.csv: fields.response in ")
    assert str(path) in msg
    assert "'answr'" in msg and "['question', 'answer']" in msg


def test_unknown_nested_key_lists_keys_present() -> None:
    df = pd.DataFrame({"record": [{"instruction": "i", "output": "o"}]})
    mapping = make_mapping(fields={"instruction": "record.instrction", "response": "record.output"})
    with pytest.raises(
        DataError,
        match=r"key 'instrction' is missing under 'record'; keys present: \['instruction', 'out",
    ):
        apply_mapping(df, mapping, "raw.jsonl")


@pytest.mark.parametrize("name", list(EXT))
def test_each_demo_party_maps_to_canonical_rows(root: Path, name: str) -> None:
    party = party_config(name)
    mapping = load_mapping(root / party.mapping)
    raw_path = root / party.raw.eval
    out = apply_mapping(load_raw(raw_path, mapping.format), mapping, raw_path)
    assert list(out.columns) == list(CANONICAL_COLUMNS)
    assert len(out) == 60
    assert out["instruction"].str.contains(r"CFMK[0-9A-F]{6}").all()
    assert out["response"].notna().all()
    assert list(out["source_row"]) == list(range(1, 61))
    assert set(out["party"]) == {name}
    if name == "hospital-aws":
        assert (
            out["instruction"]
            .str.match(r"^(Cardiology|Endocrinology|Pulmonology|General practice): ")
            .all()
        )
    if name == "bank-gcp":
        assert not out["instruction"].str.endswith("\n").any()
        assert out["instruction"].str.contains("\n\n").any()
    if name == "insurer-azure":
        assert out["instruction"].str.match(r"^Policy type: (motor|home|travel|pet)\n").all()


# --- preflight -----------------------------------------------------------------------------


def test_check_source_passes_on_demo(root: Path) -> None:
    for name in EXT:
        check_source(party_config(name), root)


def test_check_source_missing_raw_file_says_make_demo_data(tmp_path: Path) -> None:
    shutil.copytree(REPO / "data_contracts", tmp_path / "data_contracts")
    with pytest.raises(DataError) as exc:
        check_source(party_config("bank-gcp"), tmp_path)
    msg = str(exc.value)
    assert "bank-gcp/raw/train.jsonl" in msg and "not found" in msg
    assert "run `make demo-data`" in msg


def test_check_source_unknown_column(root: Path, tmp_path: Path) -> None:
    text = (root / "data_contracts/sources/insurer-azure.yaml").read_text()
    bad = tmp_path / "insurer-azure.yaml"
    bad.write_text(text.replace("response: completion", "response: completon"))
    party = party_config("insurer-azure").model_copy(update={"mapping": str(bad)})
    with pytest.raises(DataError) as exc:
        check_source(party, root)
    msg = str(exc.value)
    assert "insurer-azure/raw/train.parquet" in msg and str(bad) in msg
    assert "'completon'" in msg and "'completion'" in msg


def test_check_source_wrong_party_and_format(root: Path, tmp_path: Path) -> None:
    party = party_config("bank-gcp").model_copy(
        update={"mapping": "data_contracts/sources/hospital-aws.yaml"}
    )
    with pytest.raises(DataError, match=r"party: 'hospital-aws' but .* party 'bank-gcp'"):
        check_source(party, root)
    text = (root / "data_contracts/sources/bank-gcp.yaml").read_text()
    bad = tmp_path / "bank-gcp.yaml"
    bad.write_text(text.replace("format: jsonl", "format: csv"))
    party = party_config("bank-gcp").model_copy(update={"mapping": str(bad)})
    with pytest.raises(
        DataError, match=r"format: 'csv' does not match .*train\.jsonl.*Fix: set `format: jsonl`"
    ):
        check_source(party, root)


def test_binary_kind_tells_binary_from_damaged_text() -> None:
    from cloudfed.data.loaders import binary_kind

    assert binary_kind(b"q,a\nhello,world\n" * 50) is None
    # One damaged record with a stray control byte is text: the rows suite quarantines it.
    assert binary_kind(b"q,a\nhel\x00lo,world\n" + b"q,a\nhello,world\n" * 50) is None
    assert binary_kind("q,a\nhé,x\n".encode("utf-16-le"))[1] == "set `encoding: utf-16-le`"
    assert binary_kind(b"PAR1\x15\x04")[1] == "set `format: parquet` in the source mapping"
    what, fix = binary_kind(bytes(range(256)) * 4)
    assert what.startswith("a binary file") and "encoding" not in fix
