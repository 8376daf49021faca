import json
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from cloudfed.data import demo
from cloudfed.data.demo import MARKER_PREFIX, MARKER_RE, generate_demo, planted_markers

TRAIN, EVAL = 240, 60


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.*"))}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clouds")
    generate_demo(root, seed=0, train_rows=TRAIN, eval_rows=EVAL)
    return root


def _texts(party: str, path: Path) -> list[str]:
    """Instruction-side text of every record, where each record's marker is planted."""
    if party == "hospital-aws":
        return list(pd.read_csv(path, dtype=str, keep_default_na=False)["question"])
    if party == "bank-gcp":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["record"]["instruction"] for line in lines]
    return list(pq.read_table(path).column("prompt").to_pylist())


def test_layout_and_return_value(tmp_path: Path) -> None:
    written = generate_demo(tmp_path, seed=1)
    assert written == {
        "hospital-aws": {
            "train": tmp_path / "hospital-aws/raw/train.csv",
            "eval": tmp_path / "hospital-aws/raw/eval.csv",
        },
        "bank-gcp": {
            "train": tmp_path / "bank-gcp/raw/train.jsonl",
            "eval": tmp_path / "bank-gcp/raw/eval.jsonl",
        },
        "insurer-azure": {
            "train": tmp_path / "insurer-azure/raw/train.parquet",
            "eval": tmp_path / "insurer-azure/raw/eval.parquet",
        },
    }
    assert all(p.is_file() for splits in written.values() for p in splits.values())


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    generate_demo(tmp_path / "a", seed=3)
    generate_demo(tmp_path / "b", seed=3)
    generate_demo(tmp_path / "c", seed=4)
    a, b, c = (_files(tmp_path / d) for d in "abc")
    assert len(a) == 6
    assert a == b
    assert all(a[name] != c[name] for name in a)


def test_raw_shapes_differ_per_party(demo_root: Path) -> None:
    hospital = pd.read_csv(demo_root / "hospital-aws/raw/train.csv", dtype=str)
    assert list(hospital.columns) == ["question", "answer", "dept"]
    first = json.loads((demo_root / "bank-gcp/raw/train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"id", "record", "meta"}
    assert set(first["record"]) == {"instruction", "input", "output"}
    insurer = pq.read_table(demo_root / "insurer-azure/raw/train.parquet")
    assert insurer.column_names == ["prompt", "completion", "policy_type", "created_at", "agent_id"]
    assert str(insurer.schema.field("created_at").type) == "timestamp[us, tz=UTC]"
    assert (len(hospital), insurer.num_rows) == (TRAIN, TRAIN)


def test_every_record_carries_a_marker_unique_to_it(demo_root: Path) -> None:
    per_row: list[str] = []
    for party, ext in demo.PARTIES.items():
        for split in ("train", "eval"):
            for text in _texts(party, demo_root / party / "raw" / f"{split}.{ext}"):
                found = MARKER_RE.findall(text)
                assert len(found) == 1, f"{party}/{split}: a record has {len(found)} markers"
                per_row.append(found[0])
    assert len(per_row) == 3 * (TRAIN + EVAL)
    # Only the planted exact and near duplicates (3 per party) repeat a marker.
    repeats = len(demo.DUPLICATES) + len(demo.NEAR_DUPLICATES)
    assert len(set(per_row)) == len(per_row) - 3 * repeats
    assert planted_markers(demo_root) == set(per_row)
    assert all(m.startswith(MARKER_PREFIX) and len(m) == 10 for m in per_row)


def test_train_split_has_the_planted_faults(demo_root: Path) -> None:
    df = pd.read_csv(demo_root / "hospital-aws/raw/train.csv", dtype=str, keep_default_na=False)
    assert (df["answer"] == "").sum() == 2  # one empty, one null (CSV writes both as "")
    assert (df["answer"].str.len() > 4000).sum() == 1
    assert df.duplicated().sum() == 2
    text = " ".join(df["question"]) + " " + " ".join(df["answer"])
    assert text.count("@") == 2
    assert sum(text.count(p) for p in demo._PHONES) == 2
    bank = [
        json.loads(line)["record"]["output"]
        for line in (demo_root / "bank-gcp/raw/train.jsonl").read_text().splitlines()
    ]
    assert bank.count(None) == 1 and bank.count("") == 1
    insurer = pq.read_table(demo_root / "insurer-azure/raw/train.parquet").to_pandas()
    assert insurer["completion"].isna().sum() == 1
    assert insurer.drop(columns="created_at").duplicated().sum() == 2
    eval_df = pd.read_csv(demo_root / "hospital-aws/raw/eval.csv", dtype=str, keep_default_na=False)
    assert (eval_df["answer"] == "").sum() == 0
    assert eval_df.duplicated().sum() == 0


def test_parties_are_non_iid(demo_root: Path) -> None:
    hospital = pd.read_csv(demo_root / "hospital-aws/raw/eval.csv", dtype=str)
    insurer = pq.read_table(demo_root / "insurer-azure/raw/eval.parquet").to_pandas()
    assert insurer["completion"].str.len().mean() > 2 * hospital["answer"].str.len().mean()
    assert not hospital["question"].str.contains("GBP|EUR|claim", case=False).any()
    assert insurer["prompt"].str.contains("EUR").all()


def test_generation_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    generate_demo(tmp_path)
    assert time.perf_counter() - start < 1.0


def test_cli_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    demo.main(["--out", str(tmp_path), "--seed", "2", "--train-rows", "60", "--eval-rows", "5"])
    assert len(pq.read_table(tmp_path / "insurer-azure/raw/eval.parquet")) == 5
    out = capsys.readouterr().out
    assert "bank-gcp" in out and MARKER_PREFIX not in out


def test_too_few_rows_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train_rows"):
        generate_demo(tmp_path, train_rows=10)


def test_scaled_parties_copy_the_demo_shapes_under_their_own_names(tmp_path: Path) -> None:
    from cloudfed.data.demo import generate_scaled, scaled_parties
    from cloudfed.data.mapping import load_mapping

    sources = Path(__file__).resolve().parents[1] / "data_contracts" / "sources"
    written = generate_scaled(tmp_path, 5, sources=sources, train_rows=60, eval_rows=4)
    assert (
        list(written)
        == list(scaled_parties(5))
        == [
            "hospital-aws-00",
            "bank-gcp-01",
            "insurer-azure-02",
            "hospital-aws-03",
            "bank-gcp-04",
        ]
    )
    assert written["insurer-azure-02"]["train"].suffix == ".parquet"
    for party, files in written.items():
        assert load_mapping(files["mapping"]).party == party  # each mapping names its party
    markers = planted_markers_of(written)
    repeats = len(demo.DUPLICATES) + len(demo.NEAR_DUPLICATES)  # planted within each party
    assert len(markers) == 5 * (60 + 4 - repeats)  # unique across parties, not only within one
    generate_scaled(tmp_path / "again", 5, sources=sources, train_rows=60, eval_rows=4)
    assert _files(tmp_path / "hospital-aws-03") == _files(tmp_path / "again" / "hospital-aws-03")
    with pytest.raises(ValueError, match="at least one party"):
        scaled_parties(0)


def planted_markers_of(written: dict[str, dict[str, Path]]) -> set[str]:
    found: set[str] = set()
    for files in written.values():
        for split in ("train", "eval"):
            path = files[split]
            if path.suffix == ".parquet":
                text = json.dumps(pq.read_table(path).to_pylist(), default=str)
            else:
                text = path.read_text(encoding="utf-8")
            found.update(MARKER_RE.findall(text))
    return found
