"""The comparison's steps: harmonise once, one step per arm (its seeds inside), the report.

Each arm runs as in-process federations (`cloudfed.comparison`): the comparison measures methods
on one machine, it does not deploy them, so its arms carry no step operator.
"""

from pathlib import Path
from typing import Annotated, Any

from zenml import step

from steps._work import timed_work
from steps.artifacts import Artifacts


@step
def prepare_comparison(
    comparison: dict[str, Any],
) -> Annotated[dict[str, Any], Artifacts.COMPARISON_DATA]:
    """Every party's harmonised splits (non-iid as harmonised, iid re-dealt), by reference."""
    with timed_work():
        from cloudfed.comparison import data_to_json, parse_spec, prepare_data

        data = prepare_data(parse_spec(comparison), Path.cwd())
    return data_to_json(data)


@step
def run_arm(
    comparison: dict[str, Any], arm: str, data: dict[str, Any]
) -> Annotated[list[dict[str, Any]], Artifacts.ARM_RESULTS]:
    with timed_work() as meta:
        from cloudfed.comparison import data_from_json, parse_spec
        from cloudfed.comparison import run_arm as run

        spec = parse_spec(comparison)
        results = run(spec, spec.arm(arm), data_from_json(data), Path.cwd())
        meta.update(federations=[r.federation_id for r in results if r.federation_id])
    return [r.model_dump(mode="json") for r in results]


@step
def compare_report(
    comparison: dict[str, Any], arms: list[list[dict[str, Any]]]
) -> Annotated[str, Artifacts.COMPARISON_TABLE]:
    """Table, CSV and chart to `out_dir` and to the comparison's own MLflow experiment.

    The tracking URI is the active stack's tracker's (set while this step runs); without a
    tracker the files are still written.
    """
    with timed_work():
        import mlflow

        from cloudfed.comparison import RunResult, finish, parse_spec

        spec = parse_spec(comparison)
        results = [RunResult.model_validate(r) for arm in arms for r in arm]
        tracked = mlflow.active_run() is not None
        uri = mlflow.get_tracking_uri() if tracked else None
        files = finish(spec, results, Path.cwd(), tracking_uri=uri)
        text = files["markdown"].read_text(encoding="utf-8")
    print(text, flush=True)
    return text
