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
    """Returns, not raises, what became of the party, so the pipeline can read it.

    A remote step operator's failure reaches the pipeline without its exception type. Under DP a
    redacted reference and no counts.
    """
    with timed_work(party=party) as meta:
        from cloudfed.data.ref import unavailable
        from cloudfed.data.tokens import counter_for
        from cloudfed.federation import parse_federation
        from cloudfed.party import prepare_dataset
        from cloudfed.party_policy import ConsentError

        cfg = parse_federation(federation)
        try:
            refuse_launcher_environment(party)
        except ConsentError as exc:
            ref = unavailable(party, "refused", str(exc))
        else:
            ref = prepare_dataset(
                cfg,
                cfg.party(party),
                plan,
                root=Path.cwd(),
                run_id=str(get_step_context().pipeline_run.id),
                count_tokens=counter_for(cfg.base_model),
            )
        meta.update(status=ref.status)
        if ref.ok:
            meta.update(contract_sha256=ref.contract_sha256, data_docs=ref.docs_uri)
        if ref.ok and not ref.redacted:
            meta.update(rows_accepted=ref.rows_accepted, rows_quarantined=ref.rows_quarantined)
    return ref
