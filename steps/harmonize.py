"""Party: raw export -> canonical rows in the party's storage; only a DatasetRef leaves."""

from pathlib import Path
from typing import Annotated, Any

from zenml import get_step_context, step

from cloudfed.data.ref import DatasetRef
from steps._work import timed_work
from steps.artifacts import Artifacts


@step
def harmonize(
    federation: dict[str, Any], party: str
) -> Annotated[DatasetRef, Artifacts.DATASET_REF]:
    with timed_work(party=party) as meta:
        from cloudfed.data.harmonize import harmonize_party
        from cloudfed.data.tokens import counter_for
        from cloudfed.federation import parse_federation

        cfg = parse_federation(federation)
        ref = harmonize_party(
            cfg.party(party),
            root=Path.cwd(),
            contracts_dir=Path(cfg.contracts_dir),
            count_tokens=counter_for(cfg.base_model),
            run_id=str(get_step_context().pipeline_run.id),
        )
        meta.update(
            rows_accepted=ref.rows_accepted,
            rows_quarantined=ref.rows_quarantined,
            contract_sha256=ref.contract_sha256,
            data_docs=ref.docs_uri,
        )
    return ref
