"""A credential-free step operator: runs ZenML's own step entrypoint in a local process.

It stands where SageMaker, Vertex, AzureML or Kubernetes would in a multi-cloud stack, so that a
real pipeline run shows which operator ZenML handed each step to: every submission is appended to
`record_file` as {"operator": name, "step": invocation id} before the step runs. Nothing else is
simulated: the step runs through ZenML's step-operator entrypoint, as in a cloud job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from zenml.enums import ExecutionStatus
from zenml.step_operators import BaseStepOperator, BaseStepOperatorConfig, BaseStepOperatorFlavor

# step run id -> its process; the orchestrator submits and waits in the same process.
_RUNNING: dict[str, subprocess.Popen[bytes]] = {}


class StandInStepOperatorConfig(BaseStepOperatorConfig):
    record_file: str


class StandInStepOperator(BaseStepOperator):
    @property
    def config(self) -> StandInStepOperatorConfig:
        return self._config  # type: ignore[return-value]

    def submit(self, info: Any, entrypoint_command: list[str], environment: dict[str, str]) -> None:
        with open(self.config.record_file, "a") as fh:
            fh.write(json.dumps({"operator": self.name, "step": info.pipeline_step_name}) + "\n")
        command = [sys.executable, *entrypoint_command[1:]]  # "python" as this interpreter
        _RUNNING[str(info.step_run_id)] = subprocess.Popen(
            command, env={**os.environ, **environment}
        )

    def _status(self, code: int | None) -> ExecutionStatus:
        if code is None:
            return ExecutionStatus.RUNNING
        return ExecutionStatus.COMPLETED if code == 0 else ExecutionStatus.FAILED

    def get_status(self, step_run: Any) -> ExecutionStatus:
        return self._status(_RUNNING[str(step_run.id)].poll())

    def wait(self, step_run: Any) -> ExecutionStatus:
        return self._status(_RUNNING.pop(str(step_run.id)).wait())


class StandInStepOperatorFlavor(BaseStepOperatorFlavor):
    @property
    def name(self) -> str:
        return "stand_in"

    @property
    def config_class(self) -> type[StandInStepOperatorConfig]:
        return StandInStepOperatorConfig

    @property
    def implementation_class(self) -> type[StandInStepOperator]:
        return StandInStepOperator
