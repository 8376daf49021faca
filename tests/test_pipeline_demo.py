"""The default demo (`configs/local.yaml`, moved into a temp folder) through `zenml pipeline run`.

One run (tests/shared_demo.py, shared with tests/test_mlflow_ui.py), read by every test here: it
learns (held-out loss at least 10% below the base model)
while every party reports a finite record-level epsilon, and what it released matches the README's
list: clear headers on the exchange hold routing only, and MLflow and ZenML's step metadata hold
no per-party training value that is not on the released list. It runs as `make run` runs it
(`CLOUDFED_LOG=quiet`, the Makefile's environment), so its console is what a person reads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from cloudfed.data.demo import MARKER_PREFIX
from cloudfed.protection.headers import ALLOWED
from tests.attacks import headers_on_exchange
from tests.e2e_support import scan_for
from tests.mlflow_keys import chart_sections, unlisted
from tests.shared_demo import demo_mlflow_run, demo_run

pytestmark = pytest.mark.e2e
# What the README lists as released per party under DP (metrics, params, tags, step metadata).
RELEASED_METRICS = {
    "dp_sgd_epsilon",  # the party's record-level epsilon, from its own ledger
    "epsilon",  # party-level epsilon (ledger), when that mode is on
    "bytes_sent",  # fixed by the protection layout, not by data
    "bytes_over_fp32",
    "seconds_protect",  # wall-clock time: see the README on timing
    "weight",  # uniform under DP
}
RELEASED_PARAMS = {"contract_sha256", "canonical_sha256"}
RELEASED_TAGS = {"data_docs"}
# `status` (ok, data-failed, refused, config-error) is participation, released with its reason.
RELEASED_STEP_METADATA = {
    "party",
    "round",
    "work_seconds",
    "contract_sha256",
    "data_docs",
    "status",
}
# The charts MLflow shows first (under DP-SGD, epsilon is the largest party's).
HEADLINE = ("eval_loss", "eval_perplexity", "epsilon", "bytes_sent")
WITHHELD = re.compile(r"rows_|eval_loss|train_loss|tokens|examples|quarantined|pii|clipped")
# A first `make run` prints 28 lines around the pipeline (install 5, zenml init 1, stack 1, demo
# data 7, policies 4, preflight 8, the command and the results line; 48 in all from a fresh clone);
# the pipeline's own share must leave the whole under 80.
PIPELINE_CONSOLE_LINES = 40
NOISE = (
    "Skipping registering function",  # GX, through ZenML's console handler
    "Uploading external artifact",  # ZenML, per step input
    "Failed to disable MLflow autologging",  # ZenML's MLflow tracker: fastai is not installed
    "Full backward hook",  # torch, under Opacus
    "has started",  # ZenML, per step
    "DP-SGD:",  # cloudfed's own progress bars
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return demo_run(tmp_path_factory)


def test_a_default_run_prints_a_page_not_the_step_log(demo: dict[str, Any]) -> None:
    """`make run` shows one progress line per round and the round table once (issue 12)."""
    assert demo["proc"].returncode == 0, demo["proc"].stderr[-6000:]
    lines = demo["console"].splitlines()
    assert demo["bench"]["console_lines"] == len(lines)
    assert len(lines) < PIPELINE_CONSOLE_LINES, "\n".join(lines)
    rounds = demo["fed"]["rounds"]
    for r in range(rounds + 1):
        said = [line for line in lines if f"cloudfed: round {r}/{rounds}: " in line]
        assert len(said) == 1 and "3/3 parties evaluated" in said[0], (r, lines)
    assert sum("held-out loss per round" in line for line in lines) == 1, lines
    assert sum("% lower" in line for line in lines) == 1, lines
    for noise in NOISE:
        assert not [line for line in lines if noise in line], noise


def test_the_demo_benchmark_reports_every_step_kind(demo: dict[str, Any]) -> None:
    bench, rounds = demo["bench"], demo["fed"]["rounds"]
    assert demo["proc"].returncode == 0, demo["proc"].stderr[-6000:]
    kinds = bench["seconds_per_step_kind"]
    assert kinds["train"]["count"] == 3 * rounds and kinds["aggregate"]["count"] == rounds
    assert kinds["evaluate"]["count"] == 3 * (rounds + 1)
    assert bench["steps"] == sum(k["count"] for k in kinds.values())
    assert bench["train_tokens_per_s"] > 0 and bench["total_seconds"] >= bench["pipeline_seconds"]
    assert set(bench["targets"]) == {
        "total_under_240s",
        "mean_overhead_under_1s",
        "max_overhead_under_1s",
    }


def test_the_default_demo_learns_with_a_finite_epsilon_per_party(demo: dict[str, Any]) -> None:
    proc = demo["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    client, run = demo_mlflow_run(demo)
    history = client.get_metric_history(run.info.run_id, "federation/eval_loss")
    losses = {m.step: m.value for m in history}
    rounds = demo["fed"]["rounds"]
    assert sorted(losses) == list(range(rounds + 1))
    assert losses[rounds] <= 0.9 * losses[0], losses  # at least 10% lower than the base model
    for party in demo["fed"]["parties"]:
        name, target = party["name"], demo["fed"]["privacy"]["dp_sgd"][party["name"]]
        eps = {
            m.step: m.value
            for m in client.get_metric_history(run.info.run_id, f"party/{name}/dp_sgd_epsilon")
        }
        assert sorted(eps) == list(range(1, rounds + 1)), (name, eps)
        assert 0 < eps[1] < eps[rounds] <= target["target_epsilon"] + 1e-6, (name, eps)
    assert run.data.tags["federation/metrics_release"] == "secure-sum"
    summary = (
        demo["work"] / "coordinator" / "demo-federation" / "last_run" / "summary.txt"
    ).read_text()
    assert "eps hospital-aws" in summary and "% lower" in summary


def test_clear_headers_on_the_exchange_are_routing_only(demo: dict[str, Any]) -> None:
    assert demo["proc"].returncode == 0
    headers = headers_on_exchange(demo["work"] / "exchange")
    kinds = {h["context"]["kind"] for _, h in headers}
    assert {"update", "secagg-share", "secagg-reveal", "metrics"} <= kinds, kinds
    for path, header in headers:
        assert set(header["metadata"]) <= ALLOWED[header["context"]["kind"]], (path, header)


def test_mlflow_and_step_metadata_hold_only_released_per_party_values(demo: dict[str, Any]) -> None:
    from zenml.client import Client

    assert demo["proc"].returncode == 0
    names = {p["name"] for p in demo["fed"]["parties"]}
    client, run = demo_mlflow_run(demo)

    def per_party(keys) -> dict[str, set[str]]:
        """What each party released; a key naming a party anywhere else fails here."""
        out: dict[str, set[str]] = {}
        for key in keys:
            parts = key.split("/")
            if names.intersection(parts):
                assert parts[0] == "party" and parts[1] in names, key
                out.setdefault(parts[1], set()).add("/".join(parts[2:]))
        return out

    for party, keys in per_party(run.data.metrics).items():
        assert keys <= RELEASED_METRICS, (party, keys - RELEASED_METRICS)
    for party, keys in per_party(run.data.params).items():
        assert keys <= RELEASED_PARAMS, (party, keys - RELEASED_PARAMS)
    tags = per_party(k for k in run.data.tags if not k.startswith("mlflow."))
    assert set(tags) == names and all(keys == RELEASED_TAGS for keys in tags.values()), tags
    leaked = [k for k in run.data.metrics if WITHHELD.search(k) and k.startswith("party/")]
    assert not leaked, leaked
    zen_run = Client().get_pipeline_run(demo["zenml_run_id"])
    party_steps = [s for name, s in zen_run.steps.items() if any(n in name for n in names)]
    assert len(party_steps) > 10
    for step in party_steps:
        keys = set(step.run_metadata)
        assert keys <= RELEASED_STEP_METADATA, (step.name, keys - RELEASED_STEP_METADATA)
    # Step logs land in the coordinator's artifact store: this run's harmonise logs hold no count.
    zen = Path(os.environ["ZENML_CONFIG_PATH"])
    ours = [
        p for p in zen.rglob("*.log") if b"(counts stay with the party under DP)" in p.read_bytes()
    ]
    assert len(ours) >= len(names), "the DP run's harmonise logs were not found"
    for path in ours:
        text = path.read_text(errors="replace")
        assert not re.search(r"read=\d|accepted=\d|quarantined=\d|observed \d", text), path


def test_no_raw_record_or_plaintext_update_reaches_the_coordinator_side(
    demo: dict[str, Any],
) -> None:
    assert demo["proc"].returncode == 0
    zen = Path(os.environ["ZENML_CONFIG_PATH"])
    work, clouds = demo["work"], demo["clouds"]
    roots = [zen, work / "exchange", work / "coordinator"]
    updates = []
    for path in sorted(clouds.glob("*/storage/updates/*.safetensors")):
        data = path.read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        updates.append(data[header + 256 : header + 320])
    assert len(updates) == 3 * demo["fed"]["rounds"]
    markers = [MARKER_PREFIX.encode()]
    assert scan_for([clouds], updates[:1]) and scan_for([clouds], markers)  # controls
    assert not scan_for(roots, markers + updates)


def test_mlflow_names_the_run_lists_every_key_and_puts_the_headline_first(
    demo: dict[str, Any],
) -> None:
    client, run = demo_mlflow_run(demo)
    rounds = demo["fed"]["rounds"]
    assert run.info.run_name == f"demo-federation · secagg+dp-sgd · r1-{rounds}"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert chart_sections(list(run.data.metrics))[0] == "federation"
    headline = {k for k in run.data.metrics if k.startswith("federation/")}
    assert headline == {f"federation/{k}" for k in HEADLINE}
    history = client.get_metric_history(run.info.run_id, "federation/epsilon")
    epsilon = {m.step: m.value for m in history}
    parties = [p["name"] for p in demo["fed"]["parties"]]
    largest = max(run.data.metrics[f"party/{p}/dp_sgd_epsilon"] for p in parties)
    assert sorted(epsilon) == list(range(1, rounds + 1)) and epsilon[rounds] == largest
    files, folders = [], [a.path for a in client.list_artifacts(run.info.run_id)]
    while folders:
        for a in client.list_artifacts(run.info.run_id, folders.pop()):
            (folders if a.is_dir else files).append(a.path)
    assert "report/summary.txt" in files and "final_adapter/adapter.safetensors" in files
    tags = [k for k in run.data.tags if not k.startswith("mlflow.")]
    keys = [*run.data.metrics, *run.data.params, *tags, *files]
    assert not unlisted(keys), unlisted(keys)


def test_steps_per_round_counts_the_demo_run_as_the_readme_says(demo: dict[str, Any]) -> None:
    """benchmarks/steps_per_round.py on the shared demo run (its tiny mode: a 3-party run this
    session already recorded), so the README's "5 party steps per round" cannot rot unnoticed."""
    import json
    import subprocess
    import sys

    assert demo["proc"].returncode == 0, demo["proc"].stderr[-6000:]
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "steps_per_round.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--run", str(demo["zenml_run_id"])],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(script.parents[1])},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    parties = out["parties"]
    assert len(parties) == 3, out
    trained = {int(k): v for k, v in out["rounds"].items() if int(k) >= 1}
    assert trained, out
    for r, counts in trained.items():
        # train (advertise folded in), share_keys, upload, unmask, evaluate: one each per party
        assert counts["party_steps_per_party"] == dict.fromkeys(parties, 5), (r, counts)
        assert set(counts["party_steps_by_stage"]) == {
            "train",
            "share_keys",
            "upload",
            "unmask",
            "evaluate",
        }, (r, counts)
        assert counts["party_steps"] == 5 * len(parties)
