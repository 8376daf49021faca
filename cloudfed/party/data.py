"""A party's rows: harmonised from its raw export and read back only if unchanged since recorded.

Training and evaluation refuse a file whose hash differs from the one in its reference, so the
rows a round uses are the rows harmonisation checked; under DP the reference carries keyed
digests, never plain hashes of the party's data.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from cloudfed.artifacts import FederationPlan
from cloudfed.data.ref import DatasetRef, redact, unavailable
from cloudfed.data.tokens import TokenCounter
from cloudfed.errors import CloudfedError, DataError
from cloudfed.federation import FederationConfig, PartyConfig
from cloudfed.locations import AnyPath, uri_path
from cloudfed.party.admission import consent
from cloudfed.party_policy import ConsentError
from cloudfed.protection import KeyPairs, messages
from cloudfed.protection.commitments import keyed_digest, matches


def read_verified(path: AnyPath, sha256: str, what: str, keys: KeyPairs | None = None) -> bytes:
    """Refuse to train or evaluate on a file that changed since it was registered.

    With `keys`, `sha256` is the party's keyed digest of the file (a redacted reference).
    """
    data = path.read_bytes()
    ok = matches(keys, data, what, sha256) if keys is not None else messages.sha256(data) == sha256
    if not ok:
        raise DataError(
            f"{path}: {what} changed since it was recorded (sha256 mismatch). Fix: re-run the "
            "pipeline so harmonisation and training see the same file."
        )
    return data


def read_rows(
    uri: str,
    sha256: str,
    keys: KeyPairs | None = None,
    options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """`options`: the party's storage_options when `uri` is in an object store."""
    import io

    data = read_verified(uri_path(uri, options), sha256, "harmonised data", keys)
    rows = pd.read_parquet(io.BytesIO(data))
    if rows.empty:
        raise DataError(
            f"{uri}: no rows left after harmonisation. Fix: check the party's raw export and its "
            "quarantine file, or raise the contract's minimum row count so this is caught earlier."
        )
    return rows


def split_rows(
    data: DatasetRef, split: str, keys: KeyPairs, options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    uri, digest = (
        (data.train_uri, data.train_sha256)
        if split == "train"
        else (data.eval_uri, data.eval_sha256)
    )
    return read_rows(uri, digest, keys if data.redacted else None, options)


def release_dataset(cfg: FederationConfig, party: PartyConfig, ref: DatasetRef) -> DatasetRef:
    """The harmonise step's output: the full reference without DP, a redacted one with DP."""
    if not cfg.privacy.protects_records:
        return ref
    keys, _ = consent(cfg, party)
    return redact(
        ref,
        keyed_digest(keys, ref.train_sha256, "harmonised data"),
        keyed_digest(keys, ref.eval_sha256, "harmonised data"),
    )


def prepare_dataset(
    cfg: FederationConfig,
    party: PartyConfig,
    plan: FederationPlan | None,
    *,
    root: Path,
    run_id: str,
    count_tokens: TokenCounter,
) -> DatasetRef:
    """Consent, check the source as preflight does, harmonise, release: the outcome as a status.

    A missing file or a mapping that does not fit is a configuration error, found by the same
    check preflight runs (so the message is the same) and reported before a row is harmonised;
    rows failing their contract are a data outcome. Only the status tells the two apart once the
    step has run on a remote step operator, so nothing here raises them.
    """
    from cloudfed.data.harmonize import harmonize_party
    from cloudfed.preflight import check_party_source

    private = cfg.privacy.protects_records
    try:
        consent(cfg, party, plan)  # before reading a row: is this round acceptable?
    except ConsentError as exc:
        return unavailable(party.name, "refused", str(exc))
    try:
        check_party_source(cfg, party, root, private=private)
    except CloudfedError as exc:
        return unavailable(party.name, "config-error", str(exc))
    try:
        ref = harmonize_party(
            party,
            root=root,
            contracts_dir=Path(cfg.contracts_dir),
            count_tokens=count_tokens,
            run_id=run_id,
            private=private,
        )
    except DataError as exc:
        return unavailable(party.name, "data-failed", str(exc))
    return release_dataset(cfg, party, ref)
