"""A federation continues across pipeline runs, survives SIGKILL anywhere, and runs once at a time.

One isolated project copy; privacy off and seeded CPU training, so an interrupted federation and an
uninterrupted one must end with the same adapter bytes:
- `straight`: 3 rounds in one run;
- `killed`: the same federation (same data, seed and settings, its own exchange and storage) run
  and killed with SIGKILL (whole process group) during round 1's training, then between the
  secure-aggregation stages of round 2, then during round 3's aggregation, each time continued by
  the next run, and finally run to the end.
Then, on the finished federation: a run with nothing left to train, a run while another holds the
lock, and a run whose LoRA rank changed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from cloudfed.data.demo import generate_demo
from tests.e2e_support import (
    federation,
    make_project,
    run_pipeline,
    run_until_killed,
    write_config,
)

pytestmark = pytest.mark.e2e
PARTIES = ["hospital-aws", "bank-gcp"]
FED = "test-federation"
ROUNDS = 3


def _fed(work: Path, **overrides: Any) -> dict[str, Any]:
    """Both federations use the same parties: their data, storage and keys (the keys fix the
    secure-aggregation rounding coins, as they do for a party that retries a round)."""
    clouds = work.parent / "clouds"
    if not clouds.exists():
        generate_demo(clouds, seed=31, train_rows=60, eval_rows=8)
    fed = federation(work, clouds, PARTIES, **{"rounds": ROUNDS, **overrides})
    fed["training"]["local_steps"] = 3
    return fed


def _history(work: Path) -> list[int]:
    """Rounds with a published record in generation 1."""
    folder = work / "exchange" / FED / "history" / "g0001"
    return sorted(int(p.stem[1:]) for p in folder.glob("r*.signed"))


def _adapter(work: Path) -> bytes:
    return (work / "coordinator" / FED / "last_run" / "adapter.safetensors").read_bytes()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("resume")
    project = make_project(root / "project")
    straight = root / "straight"
    straight.mkdir()
    proc = run_pipeline(project, write_config(straight / "run.yaml", _fed(straight)))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    work = root / "killed"
    work.mkdir()
    config = write_config(work / "run.yaml", _fed(work))
    exchange = work / "exchange" / FED
    first_update = root / "clouds" / PARTIES[0] / "storage" / "updates" / "r0001.safetensors"
    first_update.unlink()  # the straight run's: the kill waits for this run's

    def round_files(round: int, pattern: str) -> list[Path]:
        return list(exchange.glob(f"runs/*/r{round:04d}/{pattern}"))

    points = {
        # a party's update is on its disk, the other party is still training
        "training r1": lambda: first_update.exists(),
        # the keys roster of round 2 is signed, no party has shared its keys yet
        "between secagg stages r2": lambda: bool(round_files(2, "secagg/roster-keys.signed")),
        # every party revealed its shares: the coordinator is unmasking and aggregating
        "aggregation r3": lambda: len(round_files(3, "secagg/unmask/*.sealed")) == len(PARTIES),
    }
    kills = []
    for i, (point, when) in enumerate(points.items()):
        before = _history(work)
        killed, out = run_until_killed(project, config, when, work / f"killed-{i}.log")
        kills.append(
            {
                "point": point,
                "killed": killed,
                "out": out,
                "before": before,
                "after": _history(work),
            }
        )
    final = run_pipeline(project, config)
    return {
        "project": project,
        "straight": straight,
        "work": work,
        "config": config,
        "kills": kills,
        "final": final.stdout + final.stderr,
        "final_rc": final.returncode,
    }


def test_an_interrupted_federation_ends_with_the_same_adapter_bytes(runs: dict[str, Any]) -> None:
    assert runs["final_rc"] == 0, runs["final"][-6000:]
    for kill in runs["kills"]:
        assert kill["killed"], (
            f"{kill['point']}: the run ended before the kill\n{kill['out'][-3000:]}"
        )
    assert _history(runs["straight"]) == list(range(ROUNDS + 1))
    assert _history(runs["work"]) == list(range(ROUNDS + 1))
    assert _adapter(runs["work"]) == _adapter(runs["straight"])


def test_each_run_continues_at_the_first_unpublished_round(runs: dict[str, Any]) -> None:
    kills = runs["kills"]
    # Run 1 was killed before round 1 was published; every later run continued where the one
    # before it was killed, from the last published adapter.
    assert kills[0]["before"] == [] and kills[0]["after"] == [0]
    assert (
        "starting federation test-federation (generation 1) from the base model" in kills[0]["out"]
    )
    for previous, kill in zip(kills, kills[1:], strict=False):
        last = previous["after"][-1]
        assert kill["before"] == previous["after"]
        assert f"continuing federation {FED} at round {last + 1} from global adapter" in kill["out"]
        # The killed run's lock is taken over: its process is gone.
        assert "taking over the lock of run" in kill["out"], kill["out"][-3000:]
    assert kills[1]["before"][-1] < 2 <= max(kills[1]["after"] + [2])  # killed inside round 2
    last = kills[-1]["after"][-1]
    if last == ROUNDS:  # the kill landed after round 3 was published: the run had ended its work
        assert f"has published all {ROUNDS} rounds" in runs["final"], runs["final"][-3000:]
    else:
        assert f"continuing federation {FED} at round {last + 1}" in runs["final"]


def test_a_retried_round_does_not_meet_the_first_attempts_messages(runs: dict[str, Any]) -> None:
    exchange = runs["work"] / "exchange" / FED / "runs"
    # Round 2 was attempted by the run killed between its secure-aggregation stages and again by
    # a later run: each attempt under its own run id, the first one's messages left in place.
    attempts = sorted(exchange.glob("*/r0002/secagg/roster-keys.signed"))
    assert len(attempts) >= 2, attempts
    assert len({p.parent.parent.parent.name for p in attempts}) == len(attempts)
    assert not (exchange.parent / "lock.json").exists()  # the last run released it


def test_a_run_with_nothing_left_to_train_publishes_nothing(runs: dict[str, Any]) -> None:
    work = runs["work"]
    before = {p: p.read_bytes() for p in (work / "coordinator" / FED / "last_run").iterdir()}
    history = _history(work)
    attempts = sorted((work / "exchange" / FED / "runs").iterdir())
    proc = run_pipeline(runs["project"], runs["config"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"federation {FED} has published all {ROUNDS} rounds" in out
    assert "nothing to train and nothing new published" in out
    assert "adapter.safetensors" in out and str(work / "coordinator" / FED / "last_run") in out
    assert _history(work) == history
    assert sorted((work / "exchange" / FED / "runs").iterdir()) == attempts  # wrote nothing
    after = {p: p.read_bytes() for p in (work / "coordinator" / FED / "last_run").iterdir()}
    assert after == before


def test_a_second_run_at_once_is_refused(runs: dict[str, Any]) -> None:
    """The lock names a live process (this test's own): the run stops before anything runs."""
    import json
    import socket

    from cloudfed.storage import open_store

    exchange = open_store(str(runs["work"] / "exchange" / FED))  # a lock as another run writes it
    now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    holder = {
        "run_id": "a" * 32,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": now,
        "heartbeat_at": now,
    }
    exchange.put_bytes("lock.json", json.dumps(holder).encode(), exclusive=True)
    try:
        proc = run_pipeline(runs["project"], runs["config"])
    finally:
        exchange.delete("lock.json")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    assert f"federation '{FED}' is being run by run {'a' * 32} (pid {os.getpid()}" in out
    assert "make unlock" in out


def test_continuing_with_another_lora_rank_is_refused(runs: dict[str, Any]) -> None:
    work = runs["work"]
    fed = _fed(work, rounds=ROUNDS + 1)
    fed["lora"]["rank"] = 8
    config = write_config(work / "rank8.yaml", fed)
    proc = run_pipeline(runs["project"], config)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    flat = " ".join(out.split())
    assert f"federation '{FED}' is at round {ROUNDS}, trained with lora.rank = 4" in flat
    assert "this config has 8" in flat and "start_over: true" in flat
    assert _history(work) == list(range(ROUNDS + 1))
