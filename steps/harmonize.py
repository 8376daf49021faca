"""Party: raw export -> canonical rows in the party's storage; only a DatasetRef leaves."""

from pathlib import Path
from typing import Annotated, Any

from zenml import log_metadata, step

from cloudfed.data.ref import DatasetRef
from steps.artifacts import Artifacts


@step
def harmonize(
    federation: dict[str, Any], party: str
) -> Annotated[DatasetRef, Artifacts.DATASET_REF]:
    from cloudfed.data.harmonize import harmonize_party
    from cloudfed.federation import parse_federation

    cfg = parse_federation(federation)
    ref = harmonize_party(cfg.party(party), root=Path.cwd(), contracts_dir=Path(cfg.contracts_dir))
    log_metadata(
        {
            "rows_accepted": ref.rows_accepted,
            "rows_quarantined": ref.rows_quarantined,
            "contract_sha256": ref.contract_sha256,
        }
    )
    return ref
