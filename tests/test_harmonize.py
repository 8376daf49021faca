import hashlib
import json
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from cloudfed.data.contracts import contract_sha256, suite_path, validate_frame
from cloudfed.data.demo import MARKER_PREFIX, MARKER_RE, generate_demo, planted_markers
from cloudfed.data.harmonize import clean_split, harmonize_party
from cloudfed.data.ref import DatasetRef
from cloudfed.data.scrub import clean_text, normalise_text, scrub_text
from cloudfed.errors import DataError
from cloudfed.federation import PartyConfig

REPO = Path(__file__).resolve().parents[1]
EXT = {"hospital-aws": "csv", "bank-gcp": "jsonl", "insurer-azure": "parquet"}
SUITE = REPO / "data_contracts/canonical/instruction_response.json"


def party_config(name: str) -> PartyConfig:
    base = f".cloudfed/clouds/{name}"
    return PartyConfig(
        name=name,
        raw={"train": f"{base}/raw/train.{EXT[name]}", "eval": f"{base}/raw/eval.{EXT[name]}"},
        mapping=f"data_contracts/sources/{name}.yaml",
        storage=f"{base}/storage",
    )


def make_root(path: Path) -> Path:
    shutil.copytree(REPO / "data_contracts", path / "data_contracts")
    generate_demo(path / ".cloudfed/clouds", seed=0)
    return path


@pytest.fixture(scope="module")
def harmonised(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, DatasetRef]]:
    root = make_root(tmp_path_factory.mktemp("repo"))
    refs = {
        name: harmonize_party(party_config(name), root=root, contracts_dir=Path("data_contracts"))
        for name in EXT
    }
    return root, refs


# --- scrubbing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "phone",
    ["+1 555-013-2271", "(555) 014-9932", "+44 20 7946 0958", "555.017.4410", "555 017 4410"],
)
def test_scrub_phone_formats(phone: str) -> None:
    text, counts = scrub_text(f"Call {phone} today.")
    assert text == "Call [PHONE] today."
    assert counts == {"PHONE": 1}


def test_scrub_email_and_counts_per_kind() -> None:
    text, counts = scrub_text(
        "Mail j.doe+claims@mail.example.co.uk or ops@bank.io, tel +1 555-013-2271"
    )
    assert text == "Mail [EMAIL] or [EMAIL], tel [PHONE]"
    assert counts == {"EMAIL": 2, "PHONE": 1}


def test_scrub_leaves_markers_numbers_and_dates() -> None:
    keep = (
        "Case CFMK123456 and CFMK3A9F01 in 2023: paid $12,450.00 on 2023-04-15, acct 4400123456, "
        "1.250.000 EUR, BP 120/80, 10.0.0.1, years 2021 - 2023, dose 500 mg, ext 555-0132"
    )
    text, counts = scrub_text(keep)
    assert text == keep
    assert not counts


def test_normalise_unicode_and_whitespace() -> None:
    assert (
        normalise_text("  ﬁle\u00a0 name\u200b\t here \r\n\r\n\r\n\n next  ")
        == "file name here\n\nnext"
    )
    assert normalise_text("Ｃａｓｅ １２") == "Case 12"
    assert clean_text(None) == (None, {})
    assert clean_text("  ")[0] == ""


def test_clean_split_reasons_and_normalised_duplicates() -> None:
    canon = pd.DataFrame(
        {
            "instruction": ["q1", "q1 ", "q2", None, "q4", "q5", "x" * 30, "q7"],
            "response": ["a", "a", "", "a", "a@b.com", "a", "a", "a"],
            "party": "p",
            "domain": "d",
            "task": "t",
            "source_row": range(1, 9),
        }
    )
    res = clean_split(canon, split="eval", max_chars=20, seen_elsewhere=frozenset({("q7", "a")}))
    assert list(res.accepted["source_row"]) == [1, 5, 6]
    assert list(res.accepted["response"]) == ["a", "[EMAIL]", "a"]
    assert [(q["source_row"], q["reason"]) for q in res.quarantined] == [
        (2, "duplicate"),
        (3, "empty_response"),
        (4, "empty_instruction"),
        (7, "too_long"),
        (8, "duplicate_of_train"),
    ]
    assert res.pii == {"EMAIL": 1}
    assert res.rows_read == 8


# --- contracts -----------------------------------------------------------------------------


def _canon(n: int = 300) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "instruction": [f"question {i}" for i in range(n)],
            "response": [f"answer {i}" for i in range(n)],
            "party": "p",
            "domain": "d",
            "task": "t",
            "source_row": range(1, n + 1),
        }
    )


def test_contract_passes_clean_rows_quickly() -> None:
    validate_frame(_canon(5), SUITE)  # warm the per-process GX context
    start = time.perf_counter()
    summary = validate_frame(_canon(), SUITE)
    assert time.perf_counter() - start < 2.0
    assert summary.success and summary.evaluated == summary.successful == 17
    assert summary.suite == "instruction_response"


def test_contract_names_failures_without_values(capsys: pytest.CaptureFixture[str]) -> None:
    df = _canon(10)
    df.loc[3, "response"] = "write to leak.CFMKABCDEF@example.com"
    df = df.drop(columns="task")
    summary = validate_frame(df, SUITE)
    assert not summary.success
    assert summary.failed_expectations == [
        "expect_column_to_exist(task)",
        "expect_column_values_to_not_be_null(task)",
        "expect_column_values_to_not_match_regex(response)",
    ]
    captured = capsys.readouterr()
    assert MARKER_PREFIX not in summary.model_dump_json() + captured.out + captured.err


def test_contract_sha_covers_suite_and_mapping(tmp_path: Path) -> None:
    mapping = tmp_path / "m.yaml"
    mapping.write_text("party: p\n")
    first = contract_sha256(SUITE, mapping)
    assert first == hashlib.sha256(SUITE.read_bytes() + b"party: p\n").hexdigest()
    mapping.write_text("party: q\n")
    assert contract_sha256(SUITE, mapping) != first


# --- harmonise demo data -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EXT))
def test_counts_reconcile_and_reasons(
    harmonised: tuple[Path, dict[str, DatasetRef]], name: str
) -> None:
    root, refs = harmonised
    ref = refs[name]
    assert ref.rows_read == 300
    assert ref.rows_read == ref.rows_accepted + ref.rows_quarantined
    assert ref.rows_accepted == ref.rows_train + ref.rows_eval
    assert ref.quarantine_reasons == {"duplicate": 2, "empty_response": 2, "too_long": 1}
    assert (ref.rows_train, ref.rows_eval) == (235, 60)
    assert sum(ref.pii_replaced.values()) >= 3 and set(ref.pii_replaced) == {"EMAIL", "PHONE"}
    assert ref.validation.success and not ref.validation.failed_expectations
    quarantine = root / ref.quarantine_uri
    lines = (quarantine / "train.jsonl").read_text().splitlines()
    assert len(lines) == 5 and (quarantine / "eval.jsonl").read_text() == ""
    assert sorted(json.loads(line)["source_row"] for line in lines) == [6, 18, 30, 42, 54]


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
        assert list(df.columns) == [
            "instruction",
            "response",
            "party",
            "domain",
            "task",
            "source_row",
        ]
        text = " ".join(df["instruction"]) + " ".join(df["response"])
        assert "@" not in text
        assert "[EMAIL]" in text or "[PHONE]" in text or uri.endswith("eval.parquet")
        assert len(MARKER_RE.findall(" ".join(df["instruction"]))) == rows


def test_ref_carries_no_record_text(harmonised: tuple[Path, dict[str, DatasetRef]]) -> None:
    root, refs = harmonised
    markers = planted_markers(root / ".cloudfed/clouds")
    assert len(markers) == 894
    for ref in refs.values():
        blob = ref.model_dump_json()
        assert MARKER_PREFIX not in blob
        assert not any(m in blob for m in markers)
        assert "Detailed notes" not in blob and "@" not in blob


def test_rerun_gives_same_sha(
    harmonised: tuple[Path, dict[str, DatasetRef]], tmp_path: Path
) -> None:
    _, refs = harmonised
    root = make_root(tmp_path)
    for name in EXT:
        again = harmonize_party(
            party_config(name), root=root, contracts_dir=root / "data_contracts"
        )
        assert again == refs[name]


def test_contract_failure_names_party_file_and_expectation(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    with pytest.raises(DataError) as exc:
        # Let the 4599-char planted row through quarantine; the suite caps text at 4000.
        harmonize_party(
            party_config("bank-gcp"),
            root=root,
            contracts_dir=Path("data_contracts"),
            max_chars=10_000,
        )
    msg = str(exc.value)
    assert "party 'bank-gcp'" in msg and "bank-gcp/raw/train.jsonl" in msg
    assert "harmonised train rows" in msg
    assert "expect_column_value_lengths_to_be_between(response)" in msg
    assert str(suite_path(root / "data_contracts")) in msg
    assert MARKER_PREFIX not in msg
    assert not (root / ".cloudfed/clouds/bank-gcp/storage/harmonised").exists()


def test_no_row_text_logged_or_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    root = make_root(tmp_path)
    with caplog.at_level("DEBUG"):
        harmonize_party(
            party_config("hospital-aws"), root=root, contracts_dir=Path("data_contracts")
        )
    captured = capsys.readouterr()
    assert MARKER_PREFIX not in captured.out + captured.err + caplog.text
    assert "harmonised party=hospital-aws" in caplog.text
