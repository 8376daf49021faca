"""Privacy against utility on the demo federation, and DP-SGD's cost against plain training.

    .venv/bin/python benchmarks/privacy_utility.py [--config configs/local.yaml] [--quick]
    .venv/bin/python benchmarks/privacy_utility.py --tiny --project DIR --clouds DIR  # a test

`--tiny`: one round of two steps, the no-DP and DP-SGD epsilon-8 arms only, results not saved.
`--project` runs the pipelines in another ZenML project folder, `--clouds` takes the demo raw
data from another folder (a test runs it on an isolated stack).

Runs the real pipeline once per arm, each on its own exchange, coordinator and party storage
(so no arm spends another's budget), and reads the final held-out loss:
- epsilon = infinity: no DP (the reference every ratio divides by);
- party-level DP, distributed noise inside secure aggregation, at epsilon 1, 4, 8 over the run
  (target_epsilon = max_epsilon = epsilon, delta 1e-5, the config's clip);
- record-level DP-SGD (Opacus) in every party at epsilon 1, 4, 8 per party over the run.
Then times `local_steps` of plain training against DP-SGD on one party's rows, in process.
Targets: final-loss ratio <= 1.10 at epsilon 8; DP-SGD overhead reported against Opacus's
published 2.2-8x. Prints JSON and writes benchmarks/results_privacy.json.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EPSILONS = (1.0, 4.0, 8.0)
TARGET_RATIO_AT_8 = 1.10
OPACUS_OVERHEAD = (2.2, 8.0)


PROJECT = ROOT  # where `zenml pipeline run` runs (--project)


def _arm_config(base: dict[str, Any], work: Path, privacy: dict[str, Any]) -> Path:
    doc = copy.deepcopy(base)
    fed = doc["parameters"]["federation"]
    fed["exchange"] = str(work / "exchange")
    fed["coordinator_storage"] = str(work / "coordinator")
    for party in fed["parties"]:
        party["storage"] = str(work / party["name"])
    fed["privacy"] = privacy
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _run(config: Path) -> dict[str, Any]:
    env = dict(os.environ, ZENML_ANALYTICS_OPT_IN="false", NO_COLOR="1", HF_HUB_OFFLINE="1")
    # Each arm's parties keep their own policies and ledgers (accepting exactly that arm).
    env["CLOUDFED_PARTY_POLICIES"] = str(config.parent / "party-policies")
    subprocess.run(
        [sys.executable, "-m", "cloudfed.party_policy", "provision", str(config)],
        cwd=PROJECT,
        env=env,
        check=True,
        capture_output=True,
    )
    zenml = str(Path(sys.executable).parent / "zenml")
    start = time.perf_counter()
    proc = subprocess.run(
        [zenml, "pipeline", "run", "pipelines.federated_training.federated_training"]
        + ["-c", str(config)],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(proc.returncode)
    fed = yaml.safe_load(config.read_text())["parameters"]["federation"]
    last_run = Path(fed["coordinator_storage"]) / fed["federation_id"] / "last_run"
    with open(last_run / "round_table.csv") as fh:
        rows = list(csv.DictReader(fh))
    last = rows[-1]
    eps = float(last["epsilon"]) if last.get("epsilon") not in (None, "", "nan") else None
    return {
        "final_eval_loss": float(last["eval_loss"]),
        "initial_eval_loss": float(rows[0]["eval_loss"]),
        "rounds": int(last["round"]),
        "party_level_epsilon": eps,
        "seconds": round(seconds, 1),
    }


def _dp_sgd_epsilons(fed: dict[str, Any], policies: Path) -> dict[str, float]:
    out = {}
    for party in fed["parties"]:
        ledger = policies / f"{party['name']}-state" / "dp_sgd_ledger.json"
        if ledger.exists():
            out[party["name"]] = json.loads(ledger.read_text())["entries"][-1]["epsilon_after"]
    return out


def _overhead(base: dict[str, Any], steps: int, storage: Path) -> dict[str, float]:
    """Plain training against DP-SGD, same party rows, same steps, same model, in process."""
    import pandas as pd

    from cloudfed.federation import parse_federation
    from cloudfed.training.dp_sgd import train_local_dp
    from cloudfed.training.local import initial_adapter, train_local
    from cloudfed.training.model import resolve_base_model

    cfg = parse_federation(base["parameters"]["federation"])
    shards = sorted(storage.rglob("train*.parquet"))
    if not shards:
        raise SystemExit(f"no harmonised rows under {storage}: run `make run` once first")
    rows = pd.read_parquet(shards[0])
    cache = Path(cfg.model_cache)
    model = resolve_base_model(
        cfg.base_model, cache_dir=cache if cache.is_absolute() else ROOT / cache, seed=cfg.seed
    )
    training = cfg.training.model_copy(update={"local_steps": steps})
    state = initial_adapter(model, cfg.lora, seed=cfg.seed)
    train_local(model, state, rows, training=training, lora=cfg.lora, seed=1)  # warm-up
    times: dict[str, list[float]] = {"plain": [], "dp_sgd": []}
    for rep in range(3):
        t = time.perf_counter()
        train_local(model, state, rows, training=training, lora=cfg.lora, seed=rep)
        times["plain"].append(time.perf_counter() - t)
        t = time.perf_counter()
        train_local_dp(
            model,
            state,
            rows,
            training=training,
            lora=cfg.lora,
            seed=rep,
            noise_multiplier=1.0,
            max_grad_norm=0.1,
        )
        times["dp_sgd"].append(time.perf_counter() - t)
    plain, dp = min(times["plain"]), min(times["dp_sgd"])
    return {
        "steps": steps,
        "batch_size": training.batch_size,
        "plain_s": round(plain, 3),
        "dp_sgd_s": round(dp, 3),
        "overhead_x": round(dp / plain, 2),
        "opacus_published_x": list(OPACUS_OVERHEAD),
    }


def _arms(
    base: dict[str, Any], epsilons: tuple[float, ...], tmp: Path, *, party_level: bool = True
) -> dict[str, dict[str, Any]]:
    """One pipeline run per arm, each in its own folder under `tmp`; no arm spends another's."""
    privacy = base["parameters"]["federation"].get("privacy", {})
    clip = privacy.get("clip", 0.1)
    names = [p["name"] for p in base["parameters"]["federation"]["parties"]]
    # Each party's DP-SGD settings from the config (clip, public sample rate), the target varied.
    base_dp = {
        n: {
            k: v
            for k, v in privacy.get("dp_sgd", {}).get(n, {}).items()
            if k in ("max_grad_norm", "sample_rate", "delta")
        }
        for n in names
    }

    def arm(name: str, privacy: dict[str, Any]) -> dict[str, Any]:
        work = tmp / name
        work.mkdir()
        config = _arm_config(base, work, privacy)
        result = _run(config)
        result.update(privacy=privacy)
        fed = yaml.safe_load(config.read_text())["parameters"]["federation"]
        if eps := _dp_sgd_epsilons(fed, work / "party-policies"):
            result["dp_sgd_epsilon"] = eps
        print(name, json.dumps(result), file=sys.stderr, flush=True)
        return result

    arms = {"infinity": arm("infinity", {"mode": "off"})}
    for eps in epsilons:
        if party_level:
            arms[f"party_level_eps{eps:g}"] = arm(
                f"party_level_eps{eps:g}",
                {"mode": "distributed", "clip": clip, "target_epsilon": eps, "max_epsilon": eps},
            )
        arms[f"dp_sgd_eps{eps:g}"] = arm(
            f"dp_sgd_eps{eps:g}",
            {
                "mode": "off",
                "dp_sgd": {
                    n: {**base_dp[n], "target_epsilon": eps, "max_epsilon": eps} for n in names
                },
            },
        )
    return arms


def _tiny(base: dict[str, Any]) -> dict[str, Any]:
    """One round of two local steps on few eval rows: the whole benchmark in under a minute."""
    doc = copy.deepcopy(base)
    fed = doc["parameters"]["federation"]
    fed["rounds"] = 1
    fed["training"].update(local_steps=2, max_eval_rows=16)
    return doc


def _relocate(base: dict[str, Any], clouds: Path | None, models: Path) -> dict[str, Any]:
    """Paths of the config made absolute, raw data from `clouds`, so any project can run it."""
    doc = copy.deepcopy(base)
    fed = doc["parameters"]["federation"]
    fed["contracts_dir"] = str(ROOT / fed.get("contracts_dir", "data_contracts"))
    fed["model_cache"] = str(models)
    for party in fed["parties"]:
        party["mapping"] = str(ROOT / party["mapping"])
        if clouds is not None:
            party["raw"] = {
                k: str(clouds / Path(v).relative_to(".cloudfed/clouds"))
                for k, v in party["raw"].items()
            }
    return doc


def _utility(arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    reference = arms["infinity"]["final_eval_loss"]
    table = [
        {
            "arm": name,
            "final_eval_loss": round(r["final_eval_loss"], 4),
            "loss_ratio": round(r["final_eval_loss"] / reference, 4),
        }
        for name, r in arms.items()
    ]
    return {
        "reference_final_eval_loss": reference,
        "initial_eval_loss": arms["infinity"]["initial_eval_loss"],
        "table": table,
        "target": {"loss_ratio_at_eps8": TARGET_RATIO_AT_8},
        "met_at_eps8": {
            r["arm"]: r["loss_ratio"] <= TARGET_RATIO_AT_8 for r in table if r["arm"].endswith("8")
        },
        "arms": arms,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    global PROJECT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/local.yaml")
    parser.add_argument("--quick", action="store_true", help="only epsilon 8 and infinity")
    parser.add_argument(
        "--only", choices=["utility", "overhead"], help="run one half, keep the other's last result"
    )
    parser.add_argument("--tiny", action="store_true", help="seconds per arm, nothing saved")
    parser.add_argument("--project", type=Path, default=ROOT)
    parser.add_argument("--clouds", type=Path, default=None, help="demo raw data root")
    args = parser.parse_args(argv)
    PROJECT = args.project
    base = yaml.safe_load((ROOT / args.config).read_text())
    if args.tiny:
        base = _tiny(base)
    out_file = ROOT / "benchmarks" / "results_privacy.json"
    result: dict[str, Any] = {"benchmark": "privacy_utility", "tiny": args.tiny}
    if args.only and out_file.exists() and not args.tiny:
        result.update(json.loads(out_file.read_text()))
    steps = base["parameters"]["federation"]["training"]["local_steps"]
    first = base["parameters"]["federation"]["parties"][0]
    with tempfile.TemporaryDirectory(prefix="cloudfed-privacy-bench-") as name:
        tmp = Path(name)
        models = tmp / "models" if args.tiny else ROOT / ".cloudfed" / "models"
        base = _relocate(base, args.clouds, models)
        storage = ROOT / first["storage"]  # --only overhead: what `make run` harmonised
        if args.only != "overhead":
            epsilons = (8.0,) if args.quick or args.tiny else EPSILONS
            arms = _arms(base, epsilons, tmp, party_level=not args.tiny)
            result.update(_utility(arms))
            storage = tmp / "infinity" / first["name"]
        if args.only != "utility":
            result["dp_sgd_overhead"] = _overhead(base, steps, storage)
    out = json.dumps(result, indent=2)
    if not args.tiny:
        out_file.write_text(out + "\n")
    print(out)
    return result


if __name__ == "__main__":
    main()
