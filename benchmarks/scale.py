"""Scale: N simulated parties with tiny adapters through secure aggregation, in one local run.

    .venv/bin/python benchmarks/scale.py [--parties 10 20 30 50] [--rounds 1]
                                         [--pipeline 10 50] [--work DIR]
    .venv/bin/python benchmarks/scale.py --tiny      # 3 and 4 parties in-process (a test)
    .venv/bin/python benchmarks/scale.py --write-config configs/load50.yaml --parties 50

For each N, in-process first (`cloudfed.simulation`, every real stage, no ZenML), so the protocol's
own cost is known apart from ZenML's: wall time per stage, and the coordinator's peak traced
allocation (tracemalloc) in each coordinator stage against the size of one update. The
coordinator streams contributions (`verified_uploads` feeds a running sum), so that peak stays a few
updates plus O(n) small state, not n updates.

With --pipeline N..., the real `zenml pipeline run` on an isolated ZenML config and project copy
(never the user's ~/.config/zenml): pipeline wall time, and per step ZenML's wall time (its
recorded start to end) minus the work inside the step (the `work_seconds` metadata every step
logs, steps/_work.py), plus the gaps between steps: ZenML's overhead per step. Prints JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COORDINATOR_STAGES = ("keys_roster", "shares_roster", "inputs_roster", "aggregate")
SOURCES = ROOT / "data_contracts" / "sources"
PROJECT_DIRS = ("cloudfed", "steps", "pipelines", "infra")


def scale_federation(n: int, root: str, *, rounds: int = 1) -> dict[str, Any]:
    """The load test's federation: `n` parties shaped like the demo's, tiny adapters, secagg.

    `root` prefixes every path (relative to the repository in configs/load50.yaml). One or two
    training steps at LoRA rank 2: the point is the protocol and the orchestration, not the model.
    """
    from cloudfed.data.demo import PARTIES, scaled_parties

    clouds = f"{root}/clouds"
    return {
        "federation_id": f"load{n}",
        "base_model": "builtin:tiny-llama",
        "model_cache": ".cloudfed/models" if root.startswith(".") else f"{root}/models",
        "exchange": f"{root}/exchange",
        "coordinator_storage": f"{root}/coordinator",
        "contracts_dir": "data_contracts" if root.startswith(".") else str(ROOT / "data_contracts"),
        "rounds": rounds,
        "min_parties": 2,
        "seed": 7,
        "training": {
            "local_steps": 2,
            "batch_size": 4,
            "learning_rate": 0.005,
            "max_seq_len": 64,
            "eval_batch_size": 8,
            "max_eval_rows": 8,
        },
        "lora": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "protection": {"default": "secagg"},
        "privacy": {"mode": "off"},
        "parties": [
            {
                "name": name,
                "cloud": ("aws", "gcp", "azure")[i % 3],
                "raw": {
                    split: f"{clouds}/{name}/raw/{split}.{PARTIES[shape]}"
                    for split in ("train", "eval")
                },
                "mapping": f"{clouds}/{name}/mapping.yaml",  # generate_scaled writes it
                "storage": f"{clouds}/{name}/storage",
            }
            for i, (name, shape) in enumerate(scaled_parties(n).items())
        ],
    }


def config_text(n: int, root: str, rounds: int) -> str:
    header = (
        f"# The load test: {n} simulated parties with rank-2 adapters through secure aggregation.\n"
        "# Written by `benchmarks/scale.py --write-config` (a test checks it is current); run it\n"
        '# with `make load50` (README, "Scale"). Paths are relative to the repository root.\n'
    )
    doc = {
        "enable_cache": False,
        "parameters": {"federation": scale_federation(n, root, rounds=rounds)},
    }
    return header + yaml.safe_dump(doc, sort_keys=False, width=120)


def _mib(n: float) -> float:
    return round(n / 2**20, 3)


def in_process(n: int, work: Path, rounds: int) -> dict[str, Any]:
    """One federation of `n` parties through `rounds` rounds of every real stage, in-process."""
    from cloudfed import party
    from cloudfed.comparison.data import policies_in
    from cloudfed.data.demo import generate_scaled
    from cloudfed.data.tokens import counter_for
    from cloudfed.federation import parse_federation
    from cloudfed.party_policy import provision
    from cloudfed.protection import messages
    from cloudfed.protection.stages import round_stages
    from cloudfed.simulation import STAGE_FUNCTIONS, RoundState, Simulation

    root = work / f"sim-n{n}"
    shutil.rmtree(root, ignore_errors=True)
    generate_scaled(root / "clouds", n, sources=SOURCES)
    cfg = parse_federation(scale_federation(n, str(root), rounds=rounds), source=f"scale n={n}")
    out: dict[str, Any] = {"parties": n}
    with policies_in(root / "party-policies"):
        start = time.perf_counter()
        provision(cfg, force=True)
        count = counter_for(cfg.base_model)
        datasets = {}
        for p in cfg.active_parties:
            ref = party.prepare_dataset(cfg, p, None, root=ROOT, run_id="scale", count_tokens=count)
            if not ref.ok:
                raise SystemExit(f"scale: {p.name} has no usable data: {ref.message}")
            datasets[p.name] = ref
        out["prepare_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        sim = Simulation(cfg, datasets)
        out["setup_s"] = round(time.perf_counter() - start, 2)
        layout = messages.layout_for(cfg, sim.exchange, sim.plan)
        seg = layout.segment("secagg")
        assert seg is not None
        slots = messages.strategy_of(cfg, layout).n_slots
        out["update_values"] = seg.size
        out["update_bytes_masked"] = 4 * (seg.size + slots)  # one party's masked words
        out["update_bytes_f64"] = 8 * seg.size  # one update as the coordinator's sums hold it
        stage_s: dict[str, float] = defaultdict(float)
        peak: dict[str, int] = defaultdict(int)
        round_s = []
        last = cfg.rounds
        for r in range(sim.plan.start_round + 1, cfg.rounds + 1):
            t0 = time.perf_counter()
            s = RoundState(cfg, sim.plan, sim.exchange, r, sim.current, sim.parties, sim.datasets)
            for stage in round_stages(sim.modes, privacy=False):
                # tracemalloc slows Python-heavy code (Shamir) several-fold: with 2+ rounds the
                # last one is traced for memory and the others are timed.
                traced = stage.value in COORDINATOR_STAGES and (r == last)
                if traced:
                    tracemalloc.start()
                t = time.perf_counter()
                STAGE_FUNCTIONS[stage](s)
                if r != last or cfg.rounds == 1:
                    stage_s[stage.value] += time.perf_counter() - t
                if traced:
                    peak[stage.value] = max(peak[stage.value], tracemalloc.get_traced_memory()[1])
                    tracemalloc.stop()
                if s.stopped:
                    raise SystemExit(f"scale: round {r} stopped: {s.stopped}")
            assert s.new_ref is not None and s.report is not None
            sim._publish(s.new_ref, s.report)
            sim.current = s.new_ref
            round_s.append(time.perf_counter() - t0)
            out["accepted"] = len(s.report.accepted)
            out["secagg"] = {k: s.report.secagg[k] for k in ("neighbours", "threshold", "bits")}
    timed = max(1, cfg.rounds - 1)  # rounds whose stages were timed (untraced where 2+)
    out["round_s"] = [round(x, 2) for x in round_s]
    out["stage_s"] = {k: round(v / timed, 3) for k, v in stage_s.items()}  # per round
    out["stage_s_traced"] = cfg.rounds == 1
    out["per_party_s"] = {
        k: round(v / timed / n, 4) for k, v in stage_s.items() if k not in COORDINATOR_STAGES
    }
    out["coordinator_peak_mib"] = {k: _mib(v) for k, v in peak.items()}
    worst = max(peak.values())
    out["coordinator_peak_max_mib"] = _mib(worst)
    # At rank 2 one update is ~10 KB, so this is mostly fixed cost (modules, the adapter's
    # metadata); what matters is that it does not grow with n (tests/test_coordinator_memory.py
    # bounds it against large updates).
    out["coordinator_peak_over_one_update"] = round(worst / out["update_bytes_f64"], 2)
    shutil.rmtree(root, ignore_errors=True)
    return out


def _project(dest: Path, env: dict[str, str]) -> Path:
    """A project copy with its own `.zen` and stack, under the isolated ZenML config."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [str(bin_dir / "zenml"), "init"], cwd=dest, env=env, check=True, capture_output=True
    )
    subprocess.run(
        ["bash", "infra/register_local_stack.sh", str(bin_dir), "cloudfed-scale"],
        cwd=dest, env=env, check=True, capture_output=True,
    )  # fmt: skip
    return dest


def _kind(name: str) -> str:
    """A step's kind: its name without the round and party suffixes ZenML's dynamic ids add."""
    base = name.split("_r0")[0].split("_r1")[0]
    for sep in ("_hospital", "_bank", "_insurer"):
        base = base.split(sep)[0]
    return base.rstrip("_0123456789") or name


def pipeline(n: int, work: Path, project: Path, env: dict[str, str], rounds: int) -> dict[str, Any]:
    """The real pipeline for `n` parties; ZenML's overhead per step from the run it records."""
    from cloudfed.data.demo import generate_scaled

    root = work / f"zen-n{n}"
    shutil.rmtree(root, ignore_errors=True)
    generate_scaled(root / "clouds", n, sources=SOURCES)
    config = root / "config.yaml"
    config.write_text(config_text(n, str(root), rounds))
    env = dict(env, CLOUDFED_PARTY_POLICIES=str(root / "party-policies"))
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [str(bin_dir / "python"), "-m", "cloudfed.party_policy", "provision", str(config)],
        cwd=project, env=env, check=True, capture_output=True,
    )  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(
        [str(bin_dir / "zenml"), "pipeline", "run",
         "pipelines.federated_training.federated_training", "-c", str(config)],
        cwd=project, env=env, capture_output=True, text=True,
    )  # fmt: skip
    total = time.perf_counter() - start
    (root / "console.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"scale: the {n}-party pipeline failed ({root / 'console.log'})")
    from zenml.client import Client

    return summarise_run(Client().get_pipeline("federated_training").last_run, n, total)


def summarise_run(run: Any, n: int, total: float) -> dict[str, Any]:
    """ZenML's recorded step times against the work each step timed inside itself."""
    steps = []
    for name, step in run.steps.items():
        wall = (step.end_time - step.start_time).total_seconds()
        work_s = float(step.run_metadata.get("work_seconds", float("nan")))
        steps.append((name, step.start_time, step.end_time, wall, work_s))
    steps.sort(key=lambda x: x[1])
    gaps = [max(0.0, (b[1] - a[2]).total_seconds()) for a, b in zip(steps, steps[1:], strict=False)]
    overhead = [w - x for _, _, _, w, x in steps]
    per_kind: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for name, _, _, wall, work_s in steps:
        per_kind[_kind(name)].append((wall, work_s))
    pipeline_s = (run.end_time - run.start_time).total_seconds()
    in_steps = sum(w for *_, w, _ in steps)
    work_total = sum(x for *_, x in steps)
    return {
        "parties": n,
        "total_s": round(total, 1),
        "pipeline_s": round(pipeline_s, 1),
        "steps": len(steps),
        "work_in_steps_s": round(work_total, 1),
        "zenml_overhead_s": round(pipeline_s - work_total, 1),
        "overhead_per_step_s": {
            "inside_step_mean": round(statistics.mean(overhead), 3),
            "inside_step_median": round(statistics.median(overhead), 3),
            "between_steps_mean": round(statistics.mean(gaps), 3) if gaps else 0.0,
            "total_mean": round((pipeline_s - work_total) / len(steps), 3),
        },
        "between_steps_total_s": round(pipeline_s - in_steps, 1),
        "per_kind": {
            k: {
                "count": len(v),
                "mean_wall_s": round(statistics.mean(w for w, _ in v), 3),
                "mean_work_s": round(statistics.mean(x for _, x in v), 3),
            }
            for k, v in sorted(per_kind.items())
        },
    }


def _growth(rows: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    """How `key` grows from the smallest to the largest N, against N's own growth."""
    if len(rows) < 2:
        return None
    a, b = rows[0], rows[-1]
    va = a[key] if not isinstance(a[key], list) else sum(a[key])
    vb = b[key] if not isinstance(b[key], list) else sum(b[key])
    return {"from": a["parties"], "to": b["parties"], "ratio": round(vb / va, 2) if va else None,
            "parties_ratio": round(b["parties"] / a["parties"], 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parties", type=int, nargs="*", default=[10, 20, 30, 50])
    parser.add_argument("--pipeline", type=int, nargs="*", default=[], help="N for the real run")
    parser.add_argument("--rounds", type=int, default=2, help="in-process (the pipeline: 1)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--tiny", action="store_true", help="3 and 4 parties in-process, seconds")
    parser.add_argument("--write-config", type=Path, help="write the load config for --parties")
    args = parser.parse_args()
    if args.write_config:
        (n,) = args.parties
        args.write_config.write_text(config_text(n, f".cloudfed/load{n}", 1))
        return
    if args.tiny:
        args.parties, args.pipeline, args.rounds = [3, 4], [], 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    scratch = Path(tempfile.mkdtemp(prefix="cloudfed-scale-")) if args.work is None else args.work
    scratch.mkdir(parents=True, exist_ok=True)
    work = scratch.resolve()
    env = dict(
        os.environ,
        ZENML_CONFIG_PATH=str(work / "zenml-config"),  # never the user's ~/.config/zenml
        ZENML_ANALYTICS_OPT_IN="false",
        ZENML_ENABLE_RICH_TRACEBACK="false",
        NO_COLOR="1",
        CLOUDFED_LOG="quiet",
    )
    if args.pipeline:  # before zenml is imported anywhere: it reads its config path once
        os.environ.update({k: env[k] for k in ("ZENML_CONFIG_PATH", "ZENML_ANALYTICS_OPT_IN")})
    result: dict[str, Any] = {
        "benchmark": "scale",
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "rounds": args.rounds,
    }
    with contextlib.redirect_stdout(sys.stderr):  # progress lines; stdout is the JSON alone
        result["in_process"] = [in_process(n, work, args.rounds) for n in args.parties]
    rows = result["in_process"]
    result["in_process_growth"] = {
        "round_s": _growth(rows, "round_s"),
        "coordinator_peak_max_mib": _growth(rows, "coordinator_peak_max_mib"),
    }
    if args.pipeline:
        with contextlib.redirect_stdout(sys.stderr):
            project = _project(work / "project", env)
            result["pipeline"] = [pipeline(n, work, project, env, 1) for n in args.pipeline]
        result["pipeline_growth"] = {
            "pipeline_s": _growth(result["pipeline"], "pipeline_s"),
            "zenml_overhead_s": _growth(result["pipeline"], "zenml_overhead_s"),
        }
    result["machine"]["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    if args.work is None:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
