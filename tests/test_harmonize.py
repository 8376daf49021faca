import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cloudfed.data.contracts import contract_sha256, load_contract, suite_path, validate_frame
from cloudfed.data.demo import (
    IDENTIFIER_ROWS,
    MARKER_PREFIX,
    MARKER_RE,
    generate_demo,
    planted_markers,
)
from cloudfed.data.harmonize import HARMONISED_COLUMNS, harmonize_party
from cloudfed.data.ref import DatasetRef
from cloudfed.data.report import findings, harmonisation_report, report_markdown
from cloudfed.errors import DataError
from cloudfed.federation import PartyConfig

REPO = Path(__file__).resolve().parents[1]
EXT = {"hospital-aws": "csv", "bank-gcp": "jsonl", "insurer-azure": "parquet"}
SUITE = REPO / "data_contracts/canonical/instruction_response.json"
DATASET_SUITE = REPO / "data_contracts/canonical/dataset_profile.json"
DEMO_PII = {"EMAIL": 2, "PHONE": 2, "IBAN": 1, "CARD": 1, "NATIONAL_ID": 1, "IP": 1}


def party_config(name: str, ext: str | None = None) -> PartyConfig:
    base = f".cloudfed/clouds/{name}"
    ext = ext or EXT[name]
    return PartyConfig(
        name=name,
        raw={"train": f"{base}/raw/train.{ext}", "eval": f"{base}/raw/eval.{ext}"},
        mapping=f"data_contracts/sources/{name}.yaml",
        storage=f"{base}/storage",
    )


def make_root(path: Path) -> Path:
    shutil.copytree(REPO / "data_contracts", path / "data_contracts")
    generate_demo(path / ".cloudfed/clouds", seed=0)
    return path


def harmonise(root: Path, name: str, **kw: object) -> DatasetRef:
    return harmonize_party(
        party_config(name), root=root, contracts_dir=Path("data_contracts"), **kw
    )


def edit_suite(root: Path, file: str, column: str, **changes: object) -> None:
    path = root / "data_contracts/canonical" / file
    doc = json.loads(path.read_text())
    for exp in doc["expectations"]:
        if exp["kwargs"].get("column") == column:
            exp["kwargs"].update({k: v for k, v in changes.items() if k != "on_failure"})
            if "on_failure" in changes:
                exp["meta"]["on_failure"] = changes["on_failure"]
    path.write_text(json.dumps(doc, indent=2))


def edit_mapping(root: Path, name: str, **changes: object) -> Path:
    path = root / f"data_contracts/sources/{name}.yaml"
    doc = yaml.safe_load(path.read_text())
    doc.update(changes)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def harmonised(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, DatasetRef]]:
    root = make_root(tmp_path_factory.mktemp("repo"))
    return root, {name: harmonise(root, name) for name in EXT}


# --- demo data through the contract --------------------------------------------------------


@pytest.mark.parametrize("name", list(EXT))
def test_counts_reconcile_and_reasons(
    harmonised: tuple[Path, dict[str, DatasetRef]], name: str
) -> None:
    root, refs = harmonised
    ref = refs[name]
    assert ref.rows_read == 300
    assert ref.rows_read == ref.rows_accepted + ref.rows_quarantined
    assert ref.rows_accepted == ref.rows_train + ref.rows_eval
    assert ref.quarantine_reasons == {"contract": 3, "duplicate": 2, "near_duplicate": 1}
    assert (ref.rows_train, ref.rows_eval) == (234, 60)
    assert ref.pii_replaced == DEMO_PII
    assert ref.rows_repaired == 1
    assert not ref.warnings
    quarantine = root / ref.quarantine_uri
    entries = [json.loads(x) for x in (quarantine / "train.jsonl").read_text().splitlines()]
    assert (quarantine / "eval.jsonl").read_text() == ""
    by_row = {e["source_row"]: e for e in entries}
    assert sorted(by_row) == [6, 18, 30, 42, 54, 60]
    assert by_row[6]["expectations"] == [
        "expect_column_values_to_be_between(response_tokens)",
        "expect_column_values_to_not_be_null(response)",
    ]
    assert "expect_column_value_lengths_to_be_between(response)" in by_row[30]["expectations"]
    assert by_row[42]["reason"] == "duplicate" and by_row[60]["reason"] == "near_duplicate"
    if name == "hospital-aws":  # CSV: one header line, so record n is on line n + 1
        assert by_row[6]["line"] == 7


def test_outcomes_name_failed_expectations_with_counts(
    harmonised: tuple[Path, dict[str, DatasetRef]],
) -> None:
    ref = harmonised[1]["bank-gcp"]
    failed = {(o.split, o.expectation): o for o in ref.expectations if not o.success}
    assert set(failed) == {
        ("train", "expect_column_values_to_not_be_null(response)"),
        ("train", "expect_column_value_lengths_to_be_between(response)"),
        ("train", "expect_column_values_to_be_between(response_tokens)"),
    }
    assert failed[("train", "expect_column_values_to_not_be_null(response)")].unexpected == 2
    assert all(o.on_failure == "quarantine" for o in failed.values())
    dataset = [o for o in ref.expectations if o.suite.startswith("dataset_profile")]
    assert len(dataset) == 6 and all(o.success for o in dataset)


@pytest.mark.parametrize("name", list(EXT))
def test_files_and_hashes(harmonised: tuple[Path, dict[str, DatasetRef]], name: str) -> None:
    root, refs = harmonised
    ref = refs[name]
    assert ref.train_uri == f".cloudfed/clouds/{name}/storage/harmonised/train.parquet"
    for uri, sha, rows in (
        (ref.train_uri, ref.train_sha256, ref.rows_train),
        (ref.eval_uri, ref.eval_sha256, ref.rows_eval),
    ):
        path = root / uri
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
        df = pd.read_parquet(path)
        assert len(df) == rows
        assert tuple(df.columns) == HARMONISED_COLUMNS
        assert (df["instruction_tokens"] == df["instruction"].str.encode("utf-8").str.len()).all()
        text = " ".join(df["instruction"]) + " ".join(df["response"])
        assert "@" not in text and "DE89" not in text and "4111 1111 1111 1111" not in text
        if uri.endswith("train.parquet"):
            for kind in IDENTIFIER_ROWS.values():
                assert f"[{kind}]" in text
            assert "order 4111 1111 1111 1112" in text  # a look-alike survives
            assert "Served at the café." in text  # mojibake repaired
        assert len(MARKER_RE.findall(" ".join(df["instruction"]))) == rows


def test_ref_and_report_carry_no_record_text(
    harmonised: tuple[Path, dict[str, DatasetRef]],
) -> None:
    root, refs = harmonised
    markers = planted_markers(root / ".cloudfed/clouds")
    assert len(markers) == 891  # 900 records, 9 planted copies
    report = harmonisation_report(list(refs.values()))
    blobs = [ref.model_dump_json() for ref in refs.values()]
    blobs += [json.dumps(report), report_markdown(report)]
    for blob in blobs:
        assert MARKER_PREFIX not in blob
        assert "Detailed notes" not in blob and "@" not in blob and "café" not in blob


def test_cross_party_report(harmonised: tuple[Path, dict[str, DatasetRef]]) -> None:
    refs = list(harmonised[1].values())
    report = harmonisation_report(refs)
    assert report["totals"] == {"rows_read": 900, "accepted": 882, "quarantined": 18}
    assert report["domain_balance"] == {"banking": 33.33, "healthcare": 33.33, "insurance": 33.33}
    assert {r["party"] for r in report["parties"]} == set(EXT)
    hist = report["length_histograms"]["bank-gcp"]
    assert sum(hist["instruction"]) == 294 == sum(hist["response"])
    assert report["findings"] == []
    assert "| party |" in report_markdown(report)
    other = refs[0].model_copy(update={"canonical_sha256": "0" * 64, "party": "x"})
    assert any("different canonical suites" in f for f in findings([*refs, other]))
    noisy = refs[0].model_copy(update={"rows_quarantined": 150, "party": "noisy"})
    assert any(f.startswith("noisy: quarantined 50.0%") for f in findings([*refs, noisy]))


def test_rerun_gives_same_ref(
    harmonised: tuple[Path, dict[str, DatasetRef]], tmp_path: Path
) -> None:
    _, refs = harmonised
    root = make_root(tmp_path)
    for name in EXT:
        again = harmonise(root, name)
        # Only the Data Docs page differs: GX names it by the validation time.
        assert again.model_copy(update={"docs_uri": ""}) == refs[name].model_copy(
            update={"docs_uri": ""}
        )
        assert (root / again.docs_uri).is_file()


def test_small_chunks_give_the_same_data(
    harmonised: tuple[Path, dict[str, DatasetRef]], tmp_path: Path
) -> None:
    _, refs = harmonised
    root = make_root(tmp_path)
    for name in EXT:
        ref = harmonise(root, name, chunk_rows=7)
        # Other row groups, so other bytes: compare the rows.
        pd.testing.assert_frame_equal(
            pd.read_parquet(root / ref.train_uri), pd.read_parquet(harmonised[0] / ref.train_uri)
        )
        assert ref.quarantine_reasons == refs[name].quarantine_reasons


def test_gzip_csv_harmonises_like_plain(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    plain = harmonise(root, "hospital-aws")
    raw = root / ".cloudfed/clouds/hospital-aws/raw"
    for split in ("train", "eval"):
        (raw / f"{split}.csv.gz").write_bytes(gzip.compress((raw / f"{split}.csv").read_bytes()))
    edit_mapping(root, "hospital-aws", gzip=True)
    packed = harmonize_party(
        party_config("hospital-aws", "csv.gz"), root=root, contracts_dir=Path("data_contracts")
    )
    assert packed.train_sha256 == plain.train_sha256
    assert packed.contract_sha256 != plain.contract_sha256  # the mapping changed


# --- contract versioning -------------------------------------------------------------------


def test_contract_sha_covers_both_suites_and_mapping(tmp_path: Path) -> None:
    mapping = tmp_path / "m.yaml"
    mapping.write_text("party: p\n")
    first = contract_sha256(SUITE, DATASET_SUITE, mapping)
    mapping.write_text("party: q\n")
    assert contract_sha256(SUITE, DATASET_SUITE, mapping) != first
    assert contract_sha256(SUITE, mapping) != contract_sha256(SUITE, DATASET_SUITE, mapping)
    contract = load_contract(REPO / "data_contracts", mapping_file=mapping)
    assert contract.sha256 == contract_sha256(SUITE, DATASET_SUITE, mapping)
    assert contract.canonical_sha256 == contract_sha256(SUITE, DATASET_SUITE)


def test_validate_frame_names_failures_without_values() -> None:
    df = pd.DataFrame({"instruction": ["q"] * 3, "response": ["a", "b", "c"]})
    df["party"], df["domain"], df["task"] = "p", "banking", "qa"
    df["source_row"] = [1, 2, 3]
    df["instruction_tokens"], df["response_tokens"] = 2, 1
    assert validate_frame(df, SUITE).success
    df.loc[1, "response"] = "write to leak.CFMKABCDEF@example.com"
    summary = validate_frame(df.drop(columns="task"), SUITE)
    assert not summary.success
    assert "expect_column_values_to_not_match_regex_list(response)" in (summary.failed_expectations)
    assert "expect_table_columns_to_match_set" in summary.failed_expectations
    assert MARKER_PREFIX not in summary.model_dump_json()


# --- policy: block, warn, quarantine ------------------------------------------------------


def test_block_below_min_rows_names_expectation_and_docs(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    edit_suite(root, "dataset_profile.json", "train_rows", min_value=500)
    with pytest.raises(DataError) as exc:
        harmonise(root, "bank-gcp")
    msg = str(exc.value)
    assert "party 'bank-gcp'" in msg
    # The bound and what was found, as the steward would write them.
    assert "expect_column_values_to_be_between(train_rows) failed: train_rows >= 500, " in msg
    assert "observed 234" in msg
    assert "dataset_profile.json" in msg and "Data Docs are at" in msg
    assert MARKER_PREFIX not in msg
    storage = root / ".cloudfed/clouds/bank-gcp/storage"
    assert not (storage / "harmonised/train.parquet").exists()
    assert list((storage / "data_docs/latest/validations").rglob("*.html"))


def test_warn_policy_keeps_the_run_going(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    edit_suite(root, "dataset_profile.json", "duplicate_share", max_value=0.001)
    ref = harmonise(root, "insurer-azure")
    assert ref.rows_train == 234
    assert ref.warnings == [
        "all: expect_column_values_to_be_between(duplicate_share) failed: "
        "duplicate_share <= 0.001, observed 0.01"
    ]


def test_blocking_row_expectation_unknown_domain(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    edit_mapping(root, "hospital-aws", metadata={"domain": "retail", "task": "clinical_qa"})
    with pytest.raises(
        DataError,
        match=r"expect_column_values_to_be_in_set\(domain\) failed on "
        r"240 of 240 rows \(domain in \[",
    ) as exc:
        harmonise(root, "hospital-aws")
    assert "metadata.domain: 'retail' is not an allowed value" in str(exc.value)
    edit_mapping(root, "hospital-aws", metadata={"domain": "helthcare", "task": "clinical_qa"})
    with pytest.raises(DataError, match="did you mean 'healthcare'"):
        harmonise(root, "hospital-aws")


def test_mapping_extra_expectation_quarantines_its_rows(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    extra = {
        "type": "expect_column_values_to_not_match_regex",
        "kwargs": {"column": "instruction", "regex": "Pulmonology"},
        "meta": {"why": "this party may not share pulmonology cases"},
    }
    edit_mapping(root, "hospital-aws", expectations={"rows": [extra]})
    with pytest.raises(DataError):
        # Two not_match_regex on instruction would be ambiguous in reports: refused.
        harmonise(root, "hospital-aws")
    extra["type"] = "expect_column_values_to_match_regex"
    extra["kwargs"] = {"column": "instruction", "regex": "^(?!Pulmonology: Which)"}
    edit_mapping(root, "hospital-aws", expectations={"rows": [extra]})
    ref = harmonise(root, "hospital-aws")
    assert ref.quarantine_reasons["contract"] > 8
    df = pd.read_parquet(root / ref.train_uri)
    assert not df["instruction"].str.startswith("Pulmonology: Which").any()
    assert df["instruction"].str.startswith("Pulmonology").any()


def test_invalid_policy_and_expectation_are_contract_errors(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    edit_suite(root, "dataset_profile.json", "train_rows", on_failure="quarantine")
    with pytest.raises(
        DataError,
        match=r"dataset_profile.json: expectations\[0\]\.meta"
        r"\.on_failure: 'quarantine' is not a policy here",
    ):
        harmonise(root, "bank-gcp")
    root2 = make_root(tmp_path / "b")
    edit_mapping(root2, "bank-gcp", expectations={"rows": [{"type": "expect_nonsense"}]})
    with pytest.raises(DataError, match="expect_nonsense.*not a valid GX 1.x expectation"):
        harmonise(root2, "bank-gcp")


# --- schema drift and bad files ------------------------------------------------------------


def test_renamed_column_gives_line_and_renames_fixes_it(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    raw = root / ".cloudfed/clouds/hospital-aws/raw"
    for split in ("train", "eval"):
        df = pd.read_csv(raw / f"{split}.csv", dtype=str, keep_default_na=False)
        df.rename(columns={"answer": "reply"}).to_csv(raw / f"{split}.csv", index=False)
    with pytest.raises(DataError) as exc:
        harmonise(root, "hospital-aws")
    msg = str(exc.value)
    assert "fields.response in" in msg and "(line 9)" in msg and "'answer'" in msg
    assert "renames:" in msg
    edit_mapping(root, "hospital-aws", renames={"reply": "answer"})
    assert harmonise(root, "hospital-aws").rows_train == 234


def test_missing_key_in_some_records_and_extra_columns(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    path = root / ".cloudfed/clouds/bank-gcp/raw/train.jsonl"
    lines = path.read_text().splitlines()
    rec = json.loads(lines[99])
    del rec["record"]["output"]
    rec["unexpected_extra"] = {"a": 1}
    lines[99] = json.dumps(rec)
    lines.insert(120, "{not json")
    path.write_text("\n".join(lines) + "\n")
    ref = harmonise(root, "bank-gcp")
    entries = [
        json.loads(x) for x in (root / ref.quarantine_uri / "train.jsonl").read_text().splitlines()
    ]
    by_row = {e["source_row"]: e for e in entries}
    assert "expect_column_values_to_not_be_null(response)" in by_row[100]["expectations"]
    assert by_row[121]["reason"] == "unparseable" and by_row[121]["line"] == 121
    assert ref.rows_read == 301 and ref.rows_read == ref.rows_accepted + ref.rows_quarantined


def test_header_only_file_blocks_with_min_rows(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    path = root / ".cloudfed/clouds/hospital-aws/raw/train.csv"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match=r"train_rows\) failed: train_rows >= 50, observed 0\b"):
        harmonise(root, "hospital-aws")
    path.write_text("")
    with pytest.raises(DataError, match=r"train.csv: the file is empty \(0 bytes\)"):
        harmonise(root, "hospital-aws")


def test_no_row_text_logged_or_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    root = make_root(tmp_path)
    with caplog.at_level("DEBUG"):
        harmonise(root, "hospital-aws")
    captured = capsys.readouterr()
    assert MARKER_PREFIX not in captured.out + captured.err + caplog.text
    assert "harmonised party=hospital-aws" in caplog.text


def test_suite_path_is_the_rows_suite() -> None:
    assert suite_path(REPO / "data_contracts") == SUITE


def test_suite_pii_patterns_match_what_the_scrubber_replaces() -> None:
    """The suite's fast (literal-first) PII regexes agree with the scrubber's own patterns."""
    import random
    import re

    from cloudfed.data.scrub import EMAIL_PATTERN, IPV4_PATTERN, NATIONAL_ID_PATTERN, scrub_text

    doc = json.loads(SUITE.read_text())
    regexes = next(
        e["kwargs"]["regex_list"]
        for e in doc["expectations"]
        if e["type"] == "expect_column_values_to_not_match_regex_list"
    )
    email, ipv4, ssn = (re.compile(r) for r in regexes)
    ssn_ref = re.compile(NATIONAL_ID_PATTERN.split("|")[0])
    ip_ref, email_ref = re.compile(IPV4_PATTERN), re.compile(EMAIL_PATTERN)
    rng = random.Random(5)
    alphabet = "0123456789..--- a2559x@"
    for _ in range(50_000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 18)))
        assert bool(ipv4.search(s)) == bool(ip_ref.search(s)), s
        assert bool(ssn.search(s)) == bool(ssn_ref.search(s)), s
    for text in ("mail a.b@ex.com", "from 192.168.1.20", "SSN 078-05-1120 here"):
        assert any(p.search(text) for p in (email, ipv4, ssn))
        assert not any(p.search(scrub_text(text)[0]) for p in (email, ipv4, ssn))
    assert email.search("x@mail.example.org") and email_ref.search("x@mail.example.org")


def test_token_counts_use_the_models_tokenizer(tiny_model_path: str) -> None:
    from transformers import AutoTokenizer

    from cloudfed.data.tokens import count_utf8_bytes, counter_for, tokenizer_counter
    from cloudfed.errors import ConfigError

    texts = ["héllo wörld", None, "plain", "café 日本"]
    assert list(count_utf8_bytes(texts)) == [13, 0, 5, 12]
    assert counter_for("builtin:tiny-llama") is count_utf8_bytes
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    expected = [len(tok(t or "", add_special_tokens=False)["input_ids"]) for t in texts]
    assert list(tokenizer_counter(tiny_model_path)(texts)) == expected
    # The builtin tokenizer is byte-level, so the fast byte count is exact for it.
    assert expected == list(count_utf8_bytes(texts))
    with pytest.raises(ConfigError, match="tokenizer is not available locally"):
        tokenizer_counter("/nonexistent/model-folder")


def test_under_dp_logs_and_refusals_carry_no_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Step logs and a failure's message reach the coordinator's side: under DP, no counts."""
    root = make_root(tmp_path)
    edit_suite(root, "dataset_profile.json", "duplicate_share", max_value=0.001)  # a warning
    with caplog.at_level("DEBUG"):
        ref = harmonise(root, "insurer-azure", private=True)
    assert ref.rows_train == 234  # the party's own reference keeps them (it is redacted later)
    assert "harmonised party=insurer-azure" in caplog.text
    for leak in ("read=", "accepted=", "quarantined=", "observed", "234", "0.01"):
        assert leak not in caplog.text, leak
    edit_suite(root, "dataset_profile.json", "train_rows", min_value=500)  # now it blocks
    with pytest.raises(DataError) as exc:
        harmonise(root, "bank-gcp", private=True)
    msg = str(exc.value)
    assert "fails a blocking expectation of its contract" in msg
    assert "observed" not in msg and "234" not in msg and "train_rows" not in msg
