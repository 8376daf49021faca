"""A credential-free step operator: runs ZenML's own step entrypoint in a local process.

It stands where SageMaker, Vertex, AzureML or Kubernetes would in a multi-cloud stack, so that a
real pipeline run shows which operator ZenML handed each step to: every submission is appended to
`record_file` as {"operator": name, "step": invocation id} before the step runs. Nothing else is
simulated: the step runs through ZenML's step-operator entrypoint, as in a cloud job.

ZenML rewrites its repository and global configuration files in place (not atomically) whenever a
client starts, so step processes sharing the launcher's files can read one another's half-written
YAML ("'ClientConfiguration' object has no attribute 'active_project_id'", seen once in CI). No two
jobs of a real step operator share a disk. So, as in a container, each job gets its own copy of the
repository configuration, and the jobs take turns through ZenML's start-up (one lock file), where
the global configuration is read and rewritten; the global one itself stays shared, since the local
artifact store's path derives from its folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from zenml.client import Client
from zenml.enums import ExecutionStatus
from zenml.step_operators import BaseStepOperator, BaseStepOperatorConfig, BaseStepOperatorFlavor
from zenml.utils import source_utils

# Runs ZenML's step entrypoint after the job's client has started under the start-up lock.
_JOB = """
import fcntl, runpy, sys
with open(sys.argv.pop(1), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    from zenml.client import Client
    Client().zen_store
sys.argv[0] = "zenml.entrypoints.entrypoint"
runpy.run_module("zenml.entrypoints.entrypoint", run_name="__main__", alter_sys=True)
"""

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
        assert entrypoint_command[1:3] == ["-m", "zenml.entrypoints.entrypoint"], entrypoint_command
        jobs = Path(self.config.record_file).parent / "stand_in_jobs"
        command = [sys.executable, "-c", _JOB, str(jobs / "startup.lock"), *entrypoint_command[3:]]
        env = {**os.environ, **environment, **self._own_repository(jobs / str(info.step_run_id))}
        _RUNNING[str(info.step_run_id)] = subprocess.Popen(command, env=env)

    @staticmethod
    def _own_repository(home: Path) -> dict[str, str]:
        """The job's own copy of the repository configuration; its code stays the launcher's."""
        root = Client().root
        assert root is not None, "the stand-in runs from a ZenML repository (zenml init)"
        (home / ".zen").mkdir(parents=True)
        shutil.copyfile(root / ".zen" / "config.yaml", home / ".zen" / "config.yaml")
        return {
            "ZENML_REPOSITORY_PATH": str(home),
            "ZENML_CUSTOM_SOURCE_ROOT": source_utils.get_source_root(),
        }

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
