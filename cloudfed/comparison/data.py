"""The comparison's data: every party harmonised once, and the IID re-split of the same rows."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cloudfed.comparison.spec import ComparisonSpec, federation_for
from cloudfed.data.ref import DatasetRef
from cloudfed.errors import DataError
from cloudfed.federation import parse_federation


def data_to_json(data: Mapping[str, Mapping[str, DatasetRef]]) -> dict[str, Any]:
    """The harmonised references as plain JSON (a step output: paths, digests, counts only)."""
    return {s: {p: r.model_dump(mode="json") for p, r in refs.items()} for s, refs in data.items()}


def data_from_json(doc: Mapping[str, Any]) -> dict[str, dict[str, DatasetRef]]:
    return {
        s: {p: DatasetRef.model_validate(r) for p, r in refs.items()} for s, refs in doc.items()
    }


@contextmanager
def policies_in(folder: Path) -> Iterator[None]:
    """The parties' policies (and DP-SGD ledgers beside them) for one arm only.

    Policies normally live where each party's runtime says; one process playing every party of
    many federations points them at a folder per federation, so no arm spends another's budget.
    """
    from cloudfed.party_policy import POLICY_DIR_ENV

    before = os.environ.get(POLICY_DIR_ENV)
    os.environ[POLICY_DIR_ENV] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(POLICY_DIR_ENV, None)
        else:
            os.environ[POLICY_DIR_ENV] = before


def _ensure_demo_data(spec: ComparisonSpec, root: Path) -> None:
    parties = spec.federation.get("parties", [])
    missing = [p for p in parties if not all((root / f).exists() for f in p["raw"].values())]
    if missing and spec.demo_data is not None:
        from cloudfed.data.demo import generate_demo

        d = spec.demo_data
        generate_demo(root / d.out, seed=d.seed, train_rows=d.train_rows, eval_rows=d.eval_rows)


def _write_rows(rows: pd.DataFrame, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(path, index=False)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def iid_split(refs: Mapping[str, DatasetRef], out_dir: Path, *, seed: int) -> dict[str, DatasetRef]:
    """Every party's harmonised train rows pooled and dealt out again uniformly at random.

    Each party keeps its row count and its own eval split; only the training rows lose their
    domain skew. A seeded numpy shuffle is right for data (not for masks or noise).
    """
    from cloudfed.party import read_rows

    names = sorted(refs)
    frames = [read_rows(refs[p].train_uri, refs[p].train_sha256) for p in names]
    pooled = pd.concat(frames, ignore_index=True)
    order = np.random.default_rng(seed).permutation(len(pooled))
    out, at = {}, 0
    for p, frame in zip(names, frames, strict=True):
        rows = pooled.iloc[order[at : at + len(frame)]].reset_index(drop=True)
        at += len(frame)
        path = out_dir / p / "train.parquet"
        sha = _write_rows(rows, path)
        out[p] = refs[p].model_copy(
            update={"train_uri": str(path), "train_sha256": sha, "rows_train": len(rows)}
        )
    return out


def prepare_data(spec: ComparisonSpec, root: Path) -> dict[str, dict[str, DatasetRef]]:
    """Harmonise each party once (the harmonize step's `party.prepare_dataset`), then split."""
    from cloudfed.data.tokens import counter_for
    from cloudfed.party import prepare_dataset
    from cloudfed.party_policy import provision

    _ensure_demo_data(spec, root)
    data_dir = root / spec.work_dir / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    fed = federation_for(spec, "comparison-data", data_dir, privacy={"mode": "off", "dp_sgd": {}})
    cfg = parse_federation(fed, source="comparison data")
    refs: dict[str, DatasetRef] = {}
    with policies_in(data_dir / "party-policies"):
        provision(cfg, force=True)
        for party in cfg.active_parties:
            ref = prepare_dataset(
                cfg,
                party,
                None,
                root=root,
                run_id="comparison",
                count_tokens=counter_for(cfg.base_model),
            )
            if not ref.ok:
                raise DataError(f"comparison: {party.name} has no usable data: {ref.message}")
            refs[party.name] = ref
    out: dict[str, dict[str, DatasetRef]] = {}
    for split in spec.splits:
        out[split] = (
            refs if split == "non-iid" else iid_split(refs, data_dir / "iid", seed=spec.iid_seed)
        )
    return out
