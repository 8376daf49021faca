"""The paper's comparison table as a dynamic ZenML pipeline: one step per arm, then the report.

    zenml pipeline run pipelines.comparison.comparison -c configs/compare.yaml

Arms are data (`configs/compare.yaml`); arms whose config field the code lacks are left out with
a note in the report. The report step carries the stack's experiment tracker and logs into the
comparison's own MLflow experiment.
"""

from __future__ import annotations

from typing import Any

from zenml import pipeline

from cloudfed import console
from cloudfed.comparison import parse_spec
from pipelines._common import config_source, tracker_name, user_errors
from steps.compare import compare_report, prepare_comparison, run_arm

console.configure()


@pipeline(dynamic=True, enable_cache=False)
def comparison(comparison: dict[str, Any] | None = None) -> None:
    with user_errors():
        spec = parse_spec(comparison, source=config_source())
        tracker = tracker_name()
        data = prepare_comparison(comparison, id="prepare_data")
        results = [run_arm(comparison, arm.name, data, id=f"arm_{arm.name}") for arm in spec.arms]
        report = (
            compare_report.with_options(experiment_tracker=tracker) if tracker else compare_report
        )
        report(comparison, results, id="report")
