"""The stewards' command: exit 0 pass, 1 data fails the contract, 2 the contract is invalid."""

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


def test_failing_rows_are_listed_with_numbers(
    clouds: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
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
    assert code == 1
    lines = out.splitlines()
    null_row = next(x for x in lines if "expect_column_values_to_not_be_null(response)" in x)
    assert "FAIL" in null_row and "2/240" in null_row and "6, 18" in null_row
    dup = next(x for x in lines if "│ duplicate " in x)
    assert "42, 54" in dup
    assert "near_duplicate" in out and "60" in out
    assert "FAIL" in lines[-1] or "FAIL" in out.split("blocking")[-1]
    assert list((tmp_path / "docs").rglob("*.html"))
    assert MARKER_PREFIX not in out


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
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
