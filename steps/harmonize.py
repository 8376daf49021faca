"""Party: raw export -> canonical rows in the party's storage; only a DatasetRef leaves."""

from pathlib import Path
from typing import Annotated, Any

from zenml import step

from cloudfed.data.ref import DatasetRef
from steps._work import timed_work
from steps.artifacts import Artifacts


@step
def harmonize(
    federation: dict[str, Any], party: str
) -> Annotated[DatasetRef, Artifacts.DATASET_REF]:
    with timed_work(party=party) as meta:
        from cloudfed.data.harmonize import harmonize_party
        from cloudfed.federation import parse_federation

        cfg = parse_federation(federation)
        ref = harmonize_party(
            cfg.party(party), root=Path.cwd(), contracts_dir=Path(cfg.contracts_dir)
        )
        meta.update(
            rows_accepted=ref.rows_accepted,
            rows_quarantined=ref.rows_quarantined,
            contract_sha256=ref.contract_sha256,
        )
    return ref
