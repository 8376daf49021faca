"""ZenML's own cost per step, and what batching parties into one step would save (no cloudfed work).

    .venv/bin/python benchmarks/zenml_floor.py [--parties 10 50] [--stages 5]
    .venv/bin/python benchmarks/zenml_floor.py --tiny     # 2 parties, 1 stage (a test)

The federation's pipeline runs one step per party and stage (train, advertise, share_keys,
upload, unmask, evaluate), so at 50 parties a round is ~300 steps whose own work is milliseconds.
This measures, on an isolated ZenML config (never the user's), a dynamic pipeline of the same
shape whose steps do nothing: `per_party` (parties x stages steps, each passing a small artifact
like our refs) against `batched` (one step per stage for all parties sharing a runtime, the
proposal in README "Scale"). The difference is the floor batching removes. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # before zenml is imported: it reads its config path once
    _SCRATCH = Path(tempfile.mkdtemp(prefix="cloudfed-zenml-floor-"))
    os.environ["ZENML_CONFIG_PATH"] = str(_SCRATCH / "zenml-config")
    os.environ["ZENML_ANALYTICS_OPT_IN"] = "false"
    os.environ["ZENML_ENABLE_RICH_TRACEBACK"] = "false"
    os.environ["ZENML_LOGGING_VERBOSITY"] = "WARN"

from zenml import pipeline, step  # noqa: E402

PAYLOAD = {"federation_id": "floor", "parties": [{"name": f"p{i:02d}"} for i in range(50)]}


@step
def party_stage(federation: dict[str, Any], party: str, previous: dict[str, str]) -> dict[str, str]:
    """One party's stage: reads the federation and its previous ref, returns a small ref."""
    return {"party": party, "stage": str(len(previous))}


@step
def batched_stage(
    federation: dict[str, Any], parties: list[str], previous: dict[str, dict[str, str]]
) -> dict[str, dict[str, str]]:
    """The same stage for every party sharing a runtime, in one step."""
    return {p: {"party": p, "stage": str(len(previous.get(p, {})))} for p in parties}


@pipeline(dynamic=True, enable_cache=False)
def per_party(parties: int, stages: int) -> None:
    names = [f"p{i:02d}" for i in range(parties)]
    refs: dict[str, Any] = {p: {} for p in names}
    for s in range(stages):
        refs = {p: party_stage(PAYLOAD, p, refs[p], id=f"stage{s}_{p}") for p in names}


@pipeline(dynamic=True, enable_cache=False)
def batched(parties: int, stages: int) -> None:
    names = [f"p{i:02d}" for i in range(parties)]
    refs: Any = {}
    for s in range(stages):
        refs = batched_stage(PAYLOAD, names, refs, id=f"stage{s}_all")


def _measure(pipe: Any, parties: int, stages: int) -> dict[str, Any]:
    from zenml.client import Client

    start = time.perf_counter()
    pipe.with_options(enable_cache=False)(parties=parties, stages=stages)
    wall = time.perf_counter() - start
    run = Client().get_pipeline(pipe.name).last_run
    steps = sorted(run.steps.values(), key=lambda s: s.start_time)
    inside = [(s.end_time - s.start_time).total_seconds() for s in steps]
    pipeline_s = (run.end_time - run.start_time).total_seconds()
    return {
        "steps": len(steps),
        "wall_s": round(wall, 2),
        "pipeline_s": round(pipeline_s, 2),
        "per_step_s": round(pipeline_s / len(steps), 3),
        "inside_step_mean_s": round(sum(inside) / len(inside), 3),
        "between_steps_mean_s": round((pipeline_s - sum(inside)) / len(steps), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parties", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--stages", type=int, default=5)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        args.parties, args.stages = [2], 1
    out = os.fdopen(os.dup(1), "w")  # the JSON alone; ZenML's own lines go to stderr
    os.dup2(2, 1)
    batched(parties=1, stages=1)  # warm-up, unmeasured: the store's first-run setup
    result: dict[str, Any] = {
        "benchmark": "zenml_floor",
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "stages": args.stages,
        "runs": [],
    }
    for n in args.parties:
        row = {"parties": n, "per_party": _measure(per_party, n, args.stages)}
        row["batched"] = _measure(batched, n, args.stages)
        row["saved_s"] = round(row["per_party"]["wall_s"] - row["batched"]["wall_s"], 2)
        result["runs"].append(row)
    result["machine"]["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    out.write(json.dumps(result, indent=2) + "\n")
    out.flush()
    shutil.rmtree(_SCRATCH, ignore_errors=True)


if __name__ == "__main__":
    main()
