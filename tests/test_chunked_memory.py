"""Streaming a raw export holds one chunk at a time: peak memory does not grow with the file."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from cloudfed.data.loaders import iter_raw

CHUNK_ROWS = 20_000
SMALL, LARGE = 50_000, 200_000
Writer = Callable[[Path, int], None]
FILLER = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod"


def write_csv(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write("id,instruction,response\n")
        fh.writelines(
            f'{i},"Question {i}, about {FILLER}",Answer {i:07d} {FILLER[:40]}\n'
            for i in range(rows)
        )


def write_jsonl(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8") as fh:
        fh.writelines(
            json.dumps({"id": i, "record": {"q": f"Question {i}, {FILLER}", "a": f"A{i}"}}) + "\n"
            for i in range(rows)
        )


def stream_peak(path: Path, fmt: str) -> tuple[int, int, int]:
    """Records seen, the last record number and the traced peak while streaming the file."""
    total = last = 0
    tracemalloc.start()
    try:
        for chunk in iter_raw(path, fmt, chunk_rows=CHUNK_ROWS):
            assert len(chunk.frame) == len(chunk.records) <= CHUNK_ROWS
            assert not chunk.problems
            total += chunk.size
            last = chunk.records[-1]
            del chunk
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return total, last, peak


@pytest.mark.parametrize(("fmt", "writer"), [("csv", write_csv), ("jsonl", write_jsonl)])
def test_peak_memory_is_flat_in_file_length(tmp_path: Path, fmt: str, writer: Writer) -> None:
    small, large = tmp_path / f"small.{fmt}", tmp_path / f"large.{fmt}"
    writer(small, SMALL)
    writer(large, LARGE)
    assert large.stat().st_size > 100 * LARGE  # ~150 bytes a row

    total_small, last_small, peak_small = stream_peak(small, fmt)
    total_large, last_large, peak_large = stream_peak(large, fmt)

    assert (total_small, last_small) == (SMALL, SMALL)
    assert (total_large, last_large) == (LARGE, LARGE)
    # Memory bounded by the chunk, not by the file: 4x the rows, well under 1.5x the peak.
    assert peak_large < 1.5 * peak_small, (peak_small, peak_large)
    # and far below what holding the whole file would take
    assert peak_large < large.stat().st_size
