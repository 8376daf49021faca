"""Count the steps of a recorded federated_training run, per round: party steps and coordinator's.

    ZENML_CONFIG_PATH=... .venv/bin/python benchmarks/steps_per_round.py [--run NAME]

On a cloud step operator each party step is one job launch, so the number of party steps a
round runs in sequence is what its launch latency multiplies (README, "Step cost on cloud step
operators"). Reads the run back from the active ZenML store (the newest run of the pipeline, or
`--run`), groups step names `<stage>_<party>_r<k>` by round and prints JSON.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict

PARTY_STEP = re.compile(r"^(?P<stage>[a-z_]+?)_(?P<party>[a-z0-9][a-z0-9-]*)_r(?P<round>\d+)$")
COORDINATOR_STEP = re.compile(r"^(?P<stage>[a-z_]+)_r(?P<round>\d+)$")


def count(names: list[str], parties: set[str]) -> dict[int, dict[str, object]]:
    """Per round: party steps by stage and per party; the other steps (coordinator, key party)."""
    rounds: dict[int, dict[str, Counter[str]]] = defaultdict(
        lambda: {"party": Counter(), "per_party": Counter(), "coordinator": Counter()}
    )
    for name in names:
        m = PARTY_STEP.match(name)
        if m and m["party"] in parties:
            r = rounds[int(m["round"])]
            r["party"][m["stage"]] += 1
            r["per_party"][m["party"]] += 1
        elif m := COORDINATOR_STEP.match(name):
            rounds[int(m["round"])]["coordinator"][m["stage"]] += 1
    return {
        k: {
            "party_steps": sum(v["party"].values()),
            "party_steps_by_stage": dict(v["party"]),
            "party_steps_per_party": dict(v["per_party"]),
            "other_steps": dict(v["coordinator"]),  # coordinator, CKKS key party
        }
        for k, v in sorted(rounds.items())
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a pipeline run's name (default: the newest)")
    args = parser.parse_args()
    from zenml.client import Client

    client = Client()
    run = (
        client.get_pipeline_run(args.run)
        if args.run
        else client.get_pipeline("federated_training").last_run
    )
    names = list(run.steps)
    parties = {
        m["party"] for n in names if (m := re.match(r"^harmonize_(?P<party>.+)$", n)) is not None
    }
    result = {"run": run.name, "parties": sorted(parties), "rounds": count(names, parties)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
