import gzip
import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cloudfed.data.demo import generate_demo
from cloudfed.data.loaders import load_raw
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


def test_jsonl_bad_line_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        load_raw(path, "jsonl")
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2 is a JSON list, not an object"):
        load_raw(path, "jsonl")


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
    with pytest.raises(DataError, match=r"l\.csv: not readable as utf-8.*Fix: set `encoding`"):
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
