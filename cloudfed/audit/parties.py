"""Instruction/response rows for the audit's parties, from the demo generator, offline.

The audit measures memorisation, not the data pipeline, so it reads the demo's raw exports with
a fixed mapping per party (the same fields the source mappings in data_contracts/ name) instead
of running harmonisation: rows with an empty instruction or response are dropped and the rest
are kept as written. The canaries then go into one party's rows only.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from cloudfed.data.demo import generate_demo


@dataclass(frozen=True)
class PartyRows:
    train: pd.DataFrame
    eval: pd.DataFrame


def _hospital(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return pd.DataFrame({"instruction": df["question"], "response": df["answer"]})


def _bank(path: Path) -> pd.DataFrame:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    rows = []
    for rec in records:
        body = rec.get("record") or {}
        note = body.get("input") or ""
        instruction = body.get("instruction") or ""
        rows.append(
            {
                "instruction": f"{instruction}\n\n{note}" if note else instruction,
                "response": body.get("output") or "",
            }
        )
    return pd.DataFrame(rows, columns=["instruction", "response"])


def _insurer(path: Path) -> pd.DataFrame:
    df = pq.read_table(path, columns=["prompt", "completion"]).to_pandas()
    return pd.DataFrame({"instruction": df["prompt"], "response": df["completion"]})


_READERS = {"hospital-aws": _hospital, "bank-gcp": _bank, "insurer-azure": _insurer}


def _clean(df: pd.DataFrame) -> pd.DataFrame:
    df = df.fillna("").astype(str)
    keep = (df["instruction"].str.strip() != "") & (df["response"].str.strip() != "")
    return df[keep].reset_index(drop=True)


def demo_rows(
    parties: list[str], *, seed: int, train_rows: int, eval_rows: int
) -> dict[str, PartyRows]:
    """Each party's train and held-out rows, generated into a folder deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="cloudfed-audit-") as tmp:
        written = generate_demo(Path(tmp), seed=seed, train_rows=train_rows, eval_rows=eval_rows)
        return {
            party: PartyRows(
                train=_clean(_READERS[party](written[party]["train"])),
                eval=_clean(_READERS[party](written[party]["eval"])),
            )
            for party in parties
        }
