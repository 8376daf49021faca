"""Party: raw export -> canonical rows in the party's storage; only a DatasetRef leaves."""

from pathlib import Path
from typing import Annotated, Any

from zenml import get_step_context, step

from cloudfed.artifacts import FederationPlan
from cloudfed.data.ref import DatasetRef
from steps._party import refuse_launcher_environment
from steps._work import timed_work
from steps.artifacts import Artifacts


@step
def harmonize(
    federation: dict[str, Any], party: str, plan: FederationPlan
) -> Annotated[DatasetRef, Artifacts.DATASET_REF]:
    """Under DP only a redacted reference (no counts, keyed digests) and no counts as metadata."""
    with timed_work(party=party) as meta:
        refuse_launcher_environment(party)
        from cloudfed.data.harmonize import harmonize_party
        from cloudfed.data.tokens import counter_for
        from cloudfed.federation import parse_federation
        from cloudfed.party import consent, release_dataset

        cfg = parse_federation(federation)
        consent(cfg, cfg.party(party), plan)  # before reading a row: is this round acceptable?
        ref = harmonize_party(
            cfg.party(party),
            root=Path.cwd(),
            contracts_dir=Path(cfg.contracts_dir),
            count_tokens=counter_for(cfg.base_model),
            run_id=str(get_step_context().pipeline_run.id),
            private=cfg.privacy.protects_records,
        )
        ref = release_dataset(cfg, cfg.party(party), ref)
        meta.update(contract_sha256=ref.contract_sha256, data_docs=ref.docs_uri)
        if not ref.redacted:
            meta.update(rows_accepted=ref.rows_accepted, rows_quarantined=ref.rows_quarantined)
    return ref
