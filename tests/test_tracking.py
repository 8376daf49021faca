"""MLflow keys, run name and experiment kind, on a throwaway sqlite store (no pipeline run).

The keys a round logs must follow one scheme, put the headline charts in the group MLflow's UI
shows first, and all be listed in the README; the pipeline e2e tests check a real run the same way.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import pytest
import yaml

from cloudfed.artifacts import (
    AggregateReport,
    FederationPlan,
    GlobalAdapterRef,
    LocalUpdateRef,
    PartyEval,
    Rejection,
    SealedUpdateRef,
)
from cloudfed.coordinator import RoundEval
from cloudfed.data.ref import DatasetRef, ValidationSummary
from cloudfed.federation import FederationConfig, parse_federation
from cloudfed.tracking import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    PRIVACY_ROUND_KEYS,
    docs_link,
    log_exclusions,
    log_ledger,
    log_plan,
    log_round_metrics,
    name_run,
    run_name,
    summary_text,
)
from tests.mlflow_keys import chart_sections, unlisted

REPO_ROOT = Path(__file__).resolve().parents[1]
HEADLINE = {"eval_loss", "eval_perplexity", "epsilon", "bytes_sent"}


def local_config(**privacy: Any) -> FederationConfig:
    doc = yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text(encoding="utf-8"))
    fed = doc["parameters"]["federation"]
    fed["privacy"].update(privacy)
    return parse_federation(fed)


def plan_for(cfg: FederationConfig, start_round: int = 0, **protection: Any) -> FederationPlan:
    return FederationPlan(
        federation_id=cfg.federation_id,
        run_id="run-1",
        fingerprint="f" * 64,
        parties=[p.name for p in cfg.parties],
        rounds=cfg.rounds,
        min_parties=cfg.min_parties,
        base_model=cfg.base_model,
        coordinator_fingerprint="c" * 64,
        initial_adapter=GlobalAdapterRef(round=start_round, key="k", sha256="0" * 64, bytes=1),
        start_round=start_round,
        adapter_parameters=1000,
        protection={"mode": "secagg", "policy_sha256": "p" * 64, "tensors": {"secagg": 6}}
        | protection,
    )


def dataset(party: str, docs_uri: str) -> DatasetRef:
    return DatasetRef(
        party=party,
        train_uri="t",
        eval_uri="e",
        train_sha256="a" * 64,
        eval_sha256="b" * 64,
        rows_read=10,
        rows_accepted=8,
        rows_quarantined=2,
        rows_train=6,
        rows_eval=2,
        quarantine_uri="q",
        quarantine_reasons={"near_duplicate": 1, "too_long": 1},
        pii_replaced={"IBAN": 1, "EMAIL": 2},
        contract_sha256="c" * 64,
        canonical_sha256="d" * 64,
        validation=ValidationSummary(suite="s", success=True, evaluated=1, successful=1),
        docs_uri=docs_uri,
    )


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> mlflow.MlflowClient:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield mlflow.MlflowClient(uri)
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri("")


def test_run_names_say_federation_protection_privacy_and_rounds() -> None:
    cfg = local_config()
    assert run_name(cfg, plan_for(cfg)) == "demo-federation · secagg+dp-sgd · r1-4"
    assert run_name(cfg, plan_for(cfg, start_round=2)) == "demo-federation · secagg+dp-sgd · r3-4"
    done = "demo-federation · secagg+dp-sgd · no round left (at r4)"
    assert run_name(cfg, plan_for(cfg, start_round=4)) == done
    hybrid = plan_for(cfg, mode="hybrid(secagg=4,plaintext=2)", tensors={"secagg": 4, "ckks": 2})
    assert run_name(cfg, hybrid) == "demo-federation · hybrid(secagg,ckks)+dp-sgd · r1-4"
    plain = local_config(dp_sgd={}, mode="distributed", target_epsilon=8.0, max_epsilon=8.0)
    assert run_name(plain, plan_for(plain)) == "demo-federation · secagg+distributed · r1-4"


def test_data_docs_links_are_absolute_or_the_storage_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    page = "storage/data_docs/run/index.html"
    assert docs_link(page) == (tmp_path / page).resolve().as_uri()
    assert docs_link("/mnt/bank/cloudfed/x.html") == "file:///mnt/bank/cloudfed/x.html"
    assert docs_link("s3://bank/cloudfed/x.html") == "s3://bank/cloudfed/x.html"
    assert docs_link("https://docs.bank.example/x.html") == "https://docs.bank.example/x.html"


def test_a_round_logs_one_scheme_with_the_headline_group_first(
    store: mlflow.MlflowClient, tmp_path: Path
) -> None:
    cfg = local_config()
    plan = plan_for(cfg)
    parties = plan.parties
    experiment = store.create_experiment("federated_training")
    with mlflow.start_run(experiment_id=experiment, run_name="federated_training-2026_11_28"):
        log_plan(cfg, plan)
        log_exclusions([Rejection(party="zz-excluded", reason="excluded: contract")])
        datasets = [dataset(p, f"{p}/storage/data_docs/r/index.html") for p in parties]
        evals = tuple(
            PartyEval(
                party=p, round=0, loss=5.0, perplexity=148.4, tokens=10, examples=2, seconds=1
            )
            for p in parties
        )
        ev0 = RoundEval(released="per-party", loss=5.0, evaluators=tuple(parties), per_party=evals)
        log_round_metrics(0, ev0, None, [], [], datasets)
        ledger = SimpleNamespace(model_dump=lambda mode: {"entries": []})
        reservation = SimpleNamespace(
            epsilon_before=0.0, epsilon_after=1.0, max_epsilon=8.0, granted=False, message="spent"
        )
        log_ledger(ledger, reservation, 1)
        updates = [
            LocalUpdateRef(
                party=p,
                round=1,
                uri="u",
                sha256="s",
                base_sha256="b",
                train={
                    "loss_mean": 4.0,
                    "tokens": 100,
                    "tokens_per_s": 50.0,
                    "seconds": 2.0,
                    "dp_sgd_epsilon": 1.5 + i,
                },
            )
            for i, p in enumerate(parties)
        ]
        sealed = [
            SealedUpdateRef(
                party=p,
                round=1,
                key="k",
                bytes_sent=100,
                plaintext_bytes=90,
                seal_seconds=0.1,
                sender_fingerprint="f",
            )
            for p in parties
        ]
        privacy = {k: 1.0 for k in PRIVACY_ROUND_KEYS} | {
            "party_epsilon": {p: 1.0 for p in parties}
        }
        report = AggregateReport(
            round=1,
            accepted=parties[:2],
            rejected=[Rejection(party=parties[2], reason="bad signature")],
            weights={p: 1.0 for p in parties[:2]},
            bytes_received=200,
            seconds=0.5,
            update_norm=0.1,
            protection_mode="secagg",
            policy_sha256="p" * 64,
            secagg={"uploaded": 2.0, "threshold": 2.0},
            ckks={"seconds_decrypt": 0.1},
            privacy=privacy,
            aggregation={
                "strategy": "fedadam",
                "diagnostics": {"mean_delta_norm": 0.2, "update_norm": 0.3, "eta": 0.05},
            },
        )
        ev1 = RoundEval(released="secure-sum", loss=4.5, evaluators=tuple(parties), note="late")
        row = log_round_metrics(1, ev1, report, updates, sealed)
        run_id = mlflow.active_run().info.run_id
        name_run()
    run = store.get_run(run_id)
    metrics, params = run.data.metrics, run.data.params
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}

    # The group MLflow shows first holds exactly the headline charts.
    sections = chart_sections(list(metrics))
    assert sections[0] == "federation", sections
    assert {k.split("/", 1)[1] for k in metrics if k.startswith("federation/")} == HEADLINE
    assert metrics["federation/epsilon"] == 1.0  # party-level when on, else the largest DP-SGD
    assert metrics["federation/bytes_sent"] == 300
    assert metrics["round/server/update_norm"] == 0.3 and metrics["round/server/eta"] == 0.05
    # The round table's row (the summary printed at the end) reads the same values.
    assert row["bytes_sent"] == 300
    assert row["eval_perplexity"] == pytest.approx(math.exp(4.5))
    # One scheme: `/` between levels, lower case, per-party values under `party/<name>/`.
    for key in [*metrics, *params, *tags]:
        assert re.fullmatch(r"[a-z0-9_]+(/[a-z0-9_.-]+)+|[a-z_]+", key), key
        head = key.split("/")
        if any(p in head for p in parties):
            assert head[0] == "party" and head[1] in parties, key
    assert metrics[f"party/{parties[0]}/pii/iban"] == 1
    assert metrics[f"party/{parties[0]}/quarantined/near_duplicate"] == 1
    assert params["privacy/mode"] == "off" and params["training/batch_size"] == "32"
    assert tags["privacy/budget_stop"] == "spent"
    assert tags["federation/metrics_withheld/round_0001"] == "late"
    # Data Docs: an absolute link into the party's storage.
    docs = tags[f"party/{parties[0]}/data_docs"]
    assert docs == (tmp_path / parties[0] / "storage/data_docs/r/index.html").resolve().as_uri()
    # Named by what ran once the last tracked step has run; the experiment opens as training.
    assert run.info.run_name == "demo-federation · secagg+dp-sgd · r1-4"
    assert store.get_experiment(experiment).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    report = mlflow.artifacts.load_dict(f"runs:/{run_id}/harmonisation/report.json")
    assert report["data_docs"][parties[0]] == docs  # the report links as the tags do
    artifacts = [a.path for a in store.list_artifacts(run_id)]
    files = [f.path for d in artifacts for f in store.list_artifacts(run_id, d)]
    keys = [*metrics, *params, *tags, *files]
    assert not unlisted(keys), unlisted(keys)


def test_a_chosen_experiment_kind_is_kept(store: mlflow.MlflowClient) -> None:
    cfg = local_config()
    experiment = store.create_experiment(
        "federated_training", tags={EXPERIMENT_KIND_TAG: "genai_development"}
    )
    with mlflow.start_run(experiment_id=experiment):
        log_plan(cfg, plan_for(cfg))
    assert store.get_experiment(experiment).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def _table_rows(parties: list[str], dp: bool) -> list[dict[str, Any]]:
    rows = []
    for r in range(2):
        row: dict[str, Any] = {
            "round": r,
            "eval_loss": 5.0 - r,
            "eval_perplexity": math.exp(5.0 - r),
            "train_loss": float("nan"),
            "parties": len(parties),
            "rejected": 0,
            "bytes_sent": 1000 * r,
        }
        for i, p in enumerate(parties):
            row[f"{p}/eval_loss"] = 5.0 - r + i / 100
            if dp and r:
                row[f"{p}/dp_sgd_epsilon"] = 1.0 + i / 10
        rows.append(row)
    return rows


def test_the_round_table_has_a_column_per_party_for_a_few_parties() -> None:
    parties = ["bank-gcp", "hospital-aws", "insurer-azure"]
    text = summary_text(_table_rows(parties, dp=True), "round limit (1) reached")
    header = next(line for line in text.splitlines() if "eval loss" in line and "round" in line)
    for p in parties:
        assert f"eps {p}" in header and f" {p}" in header.replace(f"eps {p}", "")
    assert "party loss min" not in text
    assert "4.0200" in text and "1.200" in text  # insurer-azure's own loss and epsilon


def test_the_round_table_shows_the_range_beyond_six_parties() -> None:
    parties = [f"p{i:02d}-aws" for i in range(50)]
    text = summary_text(_table_rows(parties, dp=True), "round limit (1) reached")
    assert max(len(line) for line in text.splitlines()) <= 160
    assert not any(p in text for p in parties)  # no column, and no value, names a party
    header = next(line for line in text.splitlines() if "eval loss" in line and "round" in line)
    for col in ("eps min", "eps max", "party loss min", "party loss max"):
        assert col in header, header
    cells = {line.strip("│ ").split()[0]: line for line in text.splitlines() if "│" in line}
    last = cells["1"]
    # round 1: eps 1.000..5.900, party losses 4.0000..4.4900
    assert "1.000" in last and "5.900" in last and "4.0000" in last and "4.4900" in last, last
    first = cells["0"]
    assert "5.0000" in first and "5.4900" in first and first.count(" - ") == 2, first  # no eps yet
    assert "50 parties: each party's values are in MLflow" in text
    assert "eps min/max: the lowest and highest of the parties'" in text
