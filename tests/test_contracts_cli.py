"""The stewards' command: exit 0 pass, 1 data fails the contract, 2 the contract is invalid."""

import gzip
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cloudfed.contracts import main
from cloudfed.data.demo import MARKER_PREFIX, generate_demo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture(scope="module")
def clouds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clouds")
    generate_demo(out, seed=0)
    return out


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_clean_sample_passes(clouds: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(
        [
            "check",
            str(REPO / "data_contracts/sources/insurer-azure.yaml"),
            "--sample",
            str(clouds / "insurer-azure/raw/eval.parquet"),
        ],
        capsys,
    )
    assert code == 0, out
    assert "PASS" in out and "instruction_response-insurer-azure" in out
    assert MARKER_PREFIX not in out


def test_quarantined_rows_pass_with_warnings_and_row_numbers(
    clouds: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The demo export the pipeline accepts: rows set aside are warnings, not a failure."""
    code, out = run(
        [
            "check",
            str(REPO / "data_contracts/sources/bank-gcp.yaml"),
            "--sample",
            str(clouds / "bank-gcp/raw/train.jsonl"),
            "--docs",
            str(tmp_path / "docs"),
        ],
        capsys,
    )
    assert code == 0, out
    lines = out.splitlines()
    null_row = next(x for x in lines if "expect_column_values_to_not_be_null(response)" in x)
    assert "quarantined" in null_row and "2 of 240 rows fail" in null_row
    assert "response not null" in null_row and "6, 18" in null_row
    assert "FAIL" not in out
    dup = next(x for x in lines if "│ duplicate " in x)
    assert "42, 54" in dup
    assert "near_duplicate" in out and "60" in out
    flat = " ".join(out.split())
    assert "warning: sample: expect_column_values_to_not_be_null(response) failed on 2 of 240 " in (
        flat
    )
    assert "PASS with 3 warning(s): the harmonise step would accept 234 of 240 rows" in flat
    assert "set aside: contract 3, duplicate 2, near_duplicate 1" in flat
    assert list((tmp_path / "docs").rglob("*.html"))
    assert MARKER_PREFIX not in out


def test_blocking_failure_exits_1_with_bound_and_observed(
    clouds: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    lines = (clouds / "bank-gcp/raw/train.jsonl").read_text().splitlines()
    sample = tmp_path / "head.jsonl"
    sample.write_text("\n".join(lines[6:14]) + "\n")  # records 7-14: clean
    code, out = run(
        ["check", str(REPO / "data_contracts/sources/bank-gcp.yaml"), "--sample", str(sample)],
        capsys,
    )
    assert code == 1, out
    flat = " ".join(out.split())
    assert "blocking: all: expect_column_values_to_be_between(train_rows) failed: " in flat
    assert "train_rows >= 50, observed 8" in flat
    assert "FAIL: 1 blocking expectation(s)" in flat
    row = next(x for x in out.splitlines() if "(train_rows)" in x)
    assert "FAIL" in row and "train_rows >= 50" in row and "│ 8 " in row


def test_invalid_mapping_exits_2_with_line_and_field(
    clouds: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    contracts = tmp_path / "data_contracts"
    (contracts / "sources").mkdir(parents=True)
    (contracts / "canonical").symlink_to(REPO / "data_contracts/canonical")
    doc = yaml.safe_load((REPO / "data_contracts/sources/bank-gcp.yaml").read_text())
    doc["fields"]["respnse"] = doc["fields"].pop("response")
    broken = contracts / "sources/bank-gcp.yaml"
    broken.write_text(yaml.safe_dump(doc, sort_keys=False))
    code, out = run(
        ["check", str(broken), "--sample", str(clouds / "bank-gcp/raw/eval.jsonl")], capsys
    )
    assert code == 2
    flat = " ".join(out.split())
    assert "fields.respnse: Extra inputs are not permitted" in flat
    assert "fields.response: Field required" in flat
    line = next(i for i, x in enumerate(broken.read_text().splitlines(), 1) if "respnse" in x)
    assert f"line {line}: fields.respnse" in flat


def test_mapping_reading_a_missing_column_exits_1(
    clouds: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    contracts = tmp_path / "data_contracts"
    (contracts / "sources").mkdir(parents=True)
    (contracts / "canonical").symlink_to(REPO / "data_contracts/canonical")
    text = (REPO / "data_contracts/sources/hospital-aws.yaml").read_text()
    broken = contracts / "sources/hospital-aws.yaml"
    broken.write_text(text.replace("response: answer", "response: reply"))
    code, out = run(
        ["check", str(broken), "--sample", str(clouds / "hospital-aws/raw/eval.csv")], capsys
    )
    assert code == 1
    flat = " ".join(out.split())
    assert "fields.response in" in flat and "reads 'reply'" in flat and "(line 9)" in flat


def test_invalid_suite_exits_2(
    clouds: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    contracts = tmp_path / "data_contracts"
    (contracts / "canonical").mkdir(parents=True)
    (contracts / "sources").symlink_to(REPO / "data_contracts/sources")
    (contracts / "canonical/instruction_response.json").write_text("{not json")
    (contracts / "canonical/dataset_profile.json").write_text(
        (REPO / "data_contracts/canonical/dataset_profile.json").read_text()
    )
    code, out = run(
        [
            "check",
            str(contracts / "sources/hospital-aws.yaml"),
            "--sample",
            str(clouds / "hospital-aws/raw/eval.csv"),
        ],
        capsys,
    )
    assert code == 2 and "instruction_response.json: not valid JSON" in " ".join(out.split())


def test_module_entry_point_exit_code(clouds: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cloudfed.contracts",
            "check",
            "data_contracts/sources/hospital-aws.yaml",
            "--sample",
            str(clouds / "hospital-aws/raw/train.csv"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "PASS with" in proc.stdout


def test_mapping_outside_the_repository(
    clouds: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A steward's own copy of a mapping: found via --contracts or a data_contracts/ above it."""
    monkeypatch.chdir(tmp_path)  # no ./data_contracts to fall back on
    own = tmp_path / "steward" / "bank.yaml"
    own.parent.mkdir()
    own.write_text((REPO / "data_contracts/sources/bank-gcp.yaml").read_text())
    sample = str(clouds / "bank-gcp/raw/eval.jsonl")
    code, out = run(["check", str(own), "--sample", sample], capsys)
    assert code == 2
    flat = " ".join(out.split())
    assert "no canonical suite (canonical/instruction_response.json) found" in flat
    assert "Fix: pass --contracts" in flat
    code, out = run(
        ["check", str(own), "--sample", sample, "--contracts", str(tmp_path / "nowhere")], capsys
    )
    assert code == 2 and "Fix: pass --contracts the folder that holds canonical/" in " ".join(
        out.split()
    )
    code, out = run(
        ["check", str(own), "--sample", sample, "--contracts", str(REPO / "data_contracts")],
        capsys,
    )
    assert code == 0, out
    assert f"contracts: {REPO / 'data_contracts/canonical/instruction_response.json'}" in (
        " ".join(out.split())
    )
    # A contracts folder kept above the mapping, as `data_contracts/`, is found by itself.
    (tmp_path / "data_contracts").mkdir()
    (tmp_path / "data_contracts/canonical").symlink_to(REPO / "data_contracts/canonical")
    code, out = run(["check", str(own), "--sample", sample], capsys)
    assert code == 0, out


def test_misspelled_domain_suggests_the_allowed_value(
    clouds: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    own = tmp_path / "bank.yaml"
    text = (REPO / "data_contracts/sources/bank-gcp.yaml").read_text()
    own.write_text(text.replace("domain: banking", "domain: bankng"))
    code, out = run(
        [
            "check",
            str(own),
            "--sample",
            str(clouds / "bank-gcp/raw/eval.jsonl"),
            "--contracts",
            str(REPO / "data_contracts"),
        ],
        capsys,
    )
    assert code == 2
    flat = " ".join(out.split())
    line = next(i for i, x in enumerate(own.read_text().splitlines(), 1) if "bankng" in x)
    assert f"line {line}: metadata.domain: 'bankng' is not an allowed value" in flat
    assert "did you mean 'banking'?" in flat


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (bytes(range(256)) * 8, "this is a binary file"),
        (b"PK\x03\x04" + b"\x00" * 64, "this is a zip archive"),
        (gzip.compress(b'{"record": {}}\n' * 10), "this is a gzip-compressed file"),
    ],
)
def test_binary_sample_is_called_binary(
    clouds: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    content: bytes,
    expected: str,
) -> None:
    sample = tmp_path / "export.jsonl"
    sample.write_bytes(content)
    code, out = run(
        ["check", str(REPO / "data_contracts/sources/bank-gcp.yaml"), "--sample", str(sample)],
        capsys,
    )
    assert code == 1
    flat = " ".join(out.split())
    assert expected in flat and "not jsonl text" in flat
    assert "latin-1" not in flat and "encoding" not in flat
