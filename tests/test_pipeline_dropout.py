"""A party that crashes mid-round is dropped with its reason; the round goes on with the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.numpy import load_file

from cloudfed.coordinator import coordinator_keys
from cloudfed.data.demo import generate_demo
from cloudfed.exchange import federation_exchange
from cloudfed.federation import parse_federation
from cloudfed.federation_state import history_of
from tests.e2e_support import (
    federation,
    make_project,
    mlflow_last_run,
    run_pipeline,
    write_config,
)

pytestmark = pytest.mark.e2e
PARTIES = ["hospital-aws", "bank-gcp", "insurer-azure"]


def test_crashed_party_is_dropped_and_round_continues(tmp_path: Path) -> None:
    clouds = tmp_path / "clouds"
    generate_demo(clouds, seed=2, train_rows=60, eval_rows=10)
    fed = federation(tmp_path, clouds, PARTIES, rounds=1)
    fed["training"]["local_steps"] = 5
    # The insurer's storage cannot hold updates: its training step fails after harmonisation.
    storage = clouds / "insurer-azure" / "storage"
    storage.mkdir(parents=True)
    (storage / "updates").write_text("not a folder")
    project = make_project(tmp_path / "project")
    proc = run_pipeline(project, write_config(tmp_path / "run.yaml", fed))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "party insurer-azure dropped" in out
    summary = (
        tmp_path / "coordinator" / "test-federation" / "last_run" / "summary.txt"
    ).read_text()
    row = next(line for line in summary.splitlines() if line.strip().startswith("│     1"))
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[4:6] == ["2", "1"], row  # parties accepted, rejected

    client, run = mlflow_last_run()
    rejected = client.get_metric_history(run.info.run_id, "round/parties_rejected")
    assert [m.value for m in rejected] == [1.0]
    assert client.list_artifacts(run.info.run_id, "rejections")


def test_party_failing_its_contract_is_excluded_and_the_run_goes_on(tmp_path: Path) -> None:
    clouds = tmp_path / "clouds"
    generate_demo(clouds, seed=4, train_rows=60, eval_rows=10)
    fed = federation(tmp_path, clouds, PARTIES, rounds=1)
    fed["training"]["local_steps"] = 5
    # The bank's steward labels its rows with a domain the canonical suite does not allow.
    src = Path(fed["parties"][1]["mapping"])
    broken = tmp_path / "bank-gcp.yaml"
    broken.write_text(src.read_text().replace("domain: banking", "domain: retail"))
    fed["parties"][1]["mapping"] = str(broken)
    project = make_project(tmp_path / "project")
    proc = run_pipeline(project, write_config(tmp_path / "run.yaml", fed))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "party bank-gcp excluded" in out
    assert "expect_column_values_to_be_in_set(domain) failed on 60 of 60 rows" in out

    client, run = mlflow_last_run()
    assert run.data.tags["federation/excluded_parties"] == "bank-gcp"
    assert run.data.metrics["round/parties_excluded"] == 1
    assert "rejections/round_0000.json" in {
        a.path for a in client.list_artifacts(run.info.run_id, "rejections")
    }
    accepted = client.get_metric_history(run.info.run_id, "round/parties_accepted")
    assert [m.value for m in accepted] == [2.0]


def test_party_leaving_after_sharing_keys_is_unmasked_around(tmp_path: Path) -> None:
    """Secure aggregation with a dropout after key sharing: survivors' shares remove its masks."""
    clouds = tmp_path / "clouds"
    generate_demo(clouds, seed=5, train_rows=60, eval_rows=10)
    fed = federation(tmp_path, clouds, PARTIES, rounds=1)
    fed["training"]["local_steps"] = 5
    fed["simulate_dropouts"] = {"bank-gcp": "upload"}
    # The strategies run through the same pipeline: a server optimiser with state, the paper's
    # weighting, FedProx, a norm bound, and a party at half the LoRA rank (its band keeps two
    # trainers when it drops).
    fed["aggregation"] = {
        "strategy": "fedavgm",
        "params": {"server_momentum": 0.9},
        "weighting": {
            "preset": "paper",
            "reference_loss": 20.0,
            "reference_examples": 10,
            "reference_bandwidth_mbps": 100.0,
        },
        "proximal_mu": 0.01,
        "max_update_norm": 50.0,
    }
    for p, mbps in zip(fed["parties"], (100.0, 50.0, 20.0), strict=True):
        p["bandwidth_mbps"] = mbps
    fed["parties"][1]["lora_rank"] = 2
    project = make_project(tmp_path / "project")
    proc = run_pipeline(project, write_config(tmp_path / "run.yaml", fed))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "party bank-gcp dropped at upload" in out

    client, run = mlflow_last_run()
    metrics = run.data.metrics
    assert metrics["protection/secagg/shared"] == 3 and metrics["protection/secagg/uploaded"] == 2
    assert metrics["protection/secagg/revealed"] == 2 and metrics["round/parties_accepted"] == 2
    eval_loss = {
        m.step: m.value for m in client.get_metric_history(run.info.run_id, "federation/eval_loss")
    }
    assert eval_loss[1] < eval_loss[0], eval_loss  # the unmasked aggregate is a usable model

    params = run.data.params
    assert (
        params["aggregation/strategy"] == "fedavgm" and params["aggregation/weighting"] == "paper"
    )
    assert params["aggregation/proximal_mu"] == "0.01"
    assert "round/server/momentum_norm" in metrics
    # The bank trained at rank 2: its update is zero beyond its band, padded to the global's 4.
    bank = load_file(str(clouds / "bank-gcp" / "storage" / "updates" / "r0001.safetensors"))
    lora_a = [v for k, v in bank.items() if "lora_A" in k]
    assert lora_a and all(v.shape[0] == 4 and not v[2:].any() and v[:2].any() for v in lora_a)
    # The optimiser's state is signed beside the round's adapter and named by the round record.
    exchange = tmp_path / "exchange"
    states = [p for p in exchange.rglob("server_state.signed") if ".sha256" not in p.parts]
    assert len(states) == 1 and states[0].parent.name == "global"
    cfg = parse_federation(fed)
    keys = coordinator_keys(cfg, federation_exchange(cfg))
    record = history_of(cfg, federation_exchange(cfg), keys).latest()
    assert record is not None and record.round == 1
    assert record.aggregation.strategy == "fedavgm" and record.lineage.aggregation == "fedavgm"
    assert record.aggregation.state["key"].endswith("/global/server_state.signed")
    assert record.aggregation.state["step"] == 1
