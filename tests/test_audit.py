"""The canary exposure audit: exposure math, canary planting, config errors, scoring, a tiny run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cloudfed.audit.__main__ import main
from cloudfed.audit.canaries import (
    canary_rows,
    insert_canaries,
    make_canaries,
    reference_secrets,
)
from cloudfed.audit.config import CanarySettings, load_audit_config, parse_audit_config
from cloudfed.audit.exposure import (
    chance_exposure,
    exposure_bits,
    max_exposure,
    rank,
    summarise,
)
from cloudfed.audit.scoring import CanaryScorer
from cloudfed.audit.simulation import plan_arms
from cloudfed.errors import ConfigError
from cloudfed.federation import LoraSettings
from cloudfed.training.batches import collate, encode_pairs
from cloudfed.training.local import initial_adapter

REPO_ROOT = Path(__file__).resolve().parents[1]
LORA = LoraSettings(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


# --- exposure math ---------------------------------------------------------------------------


def test_lowest_loss_gets_the_maximum_exposure() -> None:
    refs = [5.0, 6.0, 7.0]
    assert rank(4.0, refs) == 1
    assert exposure_bits(1, len(refs)) == pytest.approx(2.0) == max_exposure(3)
    assert rank(8.0, refs) == 4
    assert exposure_bits(4, len(refs)) == pytest.approx(0.0)
    assert exposure_bits(2, 2000) == pytest.approx(math.log2(2001) - 1.0)


def test_ties_count_against_the_canary() -> None:
    refs = np.array([1.0, 3.0, 3.0, 3.0, 9.0])
    assert rank(3.0, refs) == 5  # three ties and one lower reference are all ranked first
    assert rank(float("nan"), refs) == 6  # a NaN canary is never credited
    assert rank(2.0, [float("nan"), 5.0]) == 2  # a NaN reference is counted as likelier


def test_exposure_rejects_impossible_ranks() -> None:
    for bad in (0, 12):
        with pytest.raises(ValueError):
            exposure_bits(bad, 10)


@pytest.mark.parametrize("references", [1, 9, 2000])
def test_chance_exposure_is_the_mean_over_uniform_ranks(references: int) -> None:
    brute = np.mean([exposure_bits(r, references) for r in range(1, references + 2)])
    assert chance_exposure(references) == pytest.approx(brute, rel=1e-9)
    if references == 2000:
        assert 1.3 < chance_exposure(references) < 1.5  # ~ 1/ln 2 for a large candidate set


def test_summary_per_repeat_level() -> None:
    levels = summarise([4, 1, 4, 1], [3.0, 0.5, 5.0, 1.5], [10, 90, 1, 40])
    assert [lv.repeats for lv in levels] == [1, 4]
    assert levels[0].mean == pytest.approx(1.0) and levels[0].max == 1.5
    assert levels[1].mean == pytest.approx(4.0) and levels[1].min == 3.0
    assert [lv.extracted for lv in levels] == [0, 1]


# --- canaries --------------------------------------------------------------------------------


SETTINGS = CanarySettings(per_repeat=3, repeats=[1, 4, 16], references=200)


def test_canaries_per_level_distinct_and_seeded() -> None:
    canaries = make_canaries(SETTINGS, seed=3)
    assert [c.repeats for c in canaries] == [1, 1, 1, 4, 4, 4, 16, 16, 16]
    assert len({c.name for c in canaries}) == len({c.secret for c in canaries}) == 9
    assert all(len(c.secret) == 6 and c.secret.isdigit() for c in canaries)
    assert make_canaries(SETTINGS, seed=3) == canaries
    assert [c.secret for c in make_canaries(SETTINGS, seed=4)] != [c.secret for c in canaries]
    c = canaries[0]
    assert c.response() == f"the secret code of {c.name} is {c.secret}"
    assert c.response("000001") == c.prefix + "000001"


def test_references_exclude_every_canary_secret() -> None:
    canaries = make_canaries(SETTINGS, seed=3)
    refs = reference_secrets(SETTINGS, canaries, seed=3)
    assert len(refs) == len(set(refs)) == 200
    assert not set(refs) & {c.secret for c in canaries}


def test_canaries_go_into_the_chosen_party_only() -> None:
    rows = {
        p: pd.DataFrame({"instruction": [f"{p} q{i}" for i in range(30)], "response": ["a"] * 30})
        for p in ("hospital-aws", "bank-gcp", "insurer-azure")
    }
    canaries = make_canaries(SETTINGS, seed=3)
    out = insert_canaries(rows, "bank-gcp", canaries, seed=3)
    assert len(out["bank-gcp"]) == 30 + SETTINGS.inserted_rows == 30 + 3 * 21
    for c in canaries:
        assert (out["bank-gcp"]["response"] == c.response()).sum() == c.repeats
    for p in ("hospital-aws", "insurer-azure"):
        pd.testing.assert_frame_equal(out[p], rows[p])
        assert not out[p]["response"].str.contains("secret code").any()
    kept = out["bank-gcp"][~out["bank-gcp"]["response"].str.contains("secret code")]
    assert sorted(kept["instruction"]) == sorted(rows["bank-gcp"]["instruction"])
    assert len(canary_rows(canaries)) == SETTINGS.inserted_rows
    assert len(rows["bank-gcp"]) == 30  # the caller's rows are not modified


# --- configuration ---------------------------------------------------------------------------


def _default() -> dict:
    return yaml.safe_load((REPO_ROOT / "configs/audit.yaml").read_text())


def test_default_config_is_valid() -> None:
    cfg = load_audit_config(REPO_ROOT / "configs/audit.yaml")
    assert cfg.canaries.repeats == [1, 4, 16] and cfg.canaries.references == 2000
    assert cfg.dp.target_epsilons == [8.0]
    assert cfg.mlflow.tracking_uri.startswith("sqlite:///")
    assert cfg.mlflow.experiment == "cloudfed-audit"


@pytest.mark.parametrize(
    ("section", "key", "value", "field", "fix"),
    [
        ("dp", "target_epsilon", 8.0, "dp.target_epsilon", "remove 'target_epsilon'"),
        ("dp", "target_epsilons", [0.0], "dp.target_epsilons", "positive epsilons"),
        ("dp", "target_epsilons", [float("inf")], "dp.target_epsilons", "positive epsilons"),
        ("dp", "delta", 1.0, "dp.delta", "strictly between 0 and 1"),
        ("canaries", "format", "code {secret}", "canaries.format", "{name} is {secret}"),
        ("canaries", "references", 900_000, "canaries", "correct 'canaries'"),
        ("mlflow", "tracking_uri", "file:./mlruns", "mlflow.tracking_uri", "sqlite:///"),
        ("data", "canary_party", "pharmacy-oci", "data", "pharmacy-oci"),
    ],
)
def test_bad_config_names_file_field_and_fix(
    tmp_path: Path, section: str, key: str, value: object, field: str, fix: str
) -> None:
    raw = _default()
    raw[section][key] = value
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_audit_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:")
    assert field in msg and fix in msg and "Fix:" in msg


def test_delta_must_be_below_one_over_records() -> None:
    raw = _default()
    raw["dp"]["delta"] = 0.01
    cfg = parse_audit_config(raw, source="configs/x.yaml")
    with pytest.raises(ConfigError, match=r"configs/x.yaml: dp.delta=0.01 .*Fix:"):
        plan_arms(cfg, canary_records=200, source="configs/x.yaml")
    arms = plan_arms(
        cfg.model_copy(update={"dp": cfg.dp.model_copy(update={"delta": 1e-5})}),
        canary_records=200,
        source="configs/x.yaml",
    )
    assert [a.name for a in arms] == ["no_dp", "dp_eps8"]
    assert arms[0].noise_multiplier is None and arms[1].noise_multiplier > 0


def test_cli_prints_config_errors_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("dp:\n  target_epsilons: [-1]\n")
    assert main(["canaries", "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "dp.target_epsilons" in err and "Fix:" in err
    assert "Traceback" not in err
    assert main(["canaries", "-c", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_audit_package_never_imports_zenml() -> None:
    code = (
        "import sys, cloudfed.audit.run, cloudfed.audit.__main__; sys.exit('zenml' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0


# --- scoring ---------------------------------------------------------------------------------


def _trained_looking(adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A non-zero B, so that the adapter changes the model and merging is exercised."""
    rng = np.random.default_rng(0)
    return {
        k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in adapter.items()
    }


def test_cached_scoring_matches_full_sequence_nll(tiny_model_path: str) -> None:
    from cloudfed.training.local import _peft_model
    from cloudfed.training.model import Device

    adapter = _trained_looking(initial_adapter(tiny_model_path, LORA, seed=0))
    canary = make_canaries(SETTINGS, seed=1)[0]
    refs = reference_secrets(SETTINGS, [canary], seed=1)[:40]
    scorer = CanaryScorer(
        tiny_model_path, adapter, lora=LORA, max_seq_len=128, seed=0, batch_size=16
    )
    fast = scorer.losses(canary, refs)

    model, tok = _peft_model(
        tiny_model_path, LORA, adapter, seed=0, device=Device("cpu", torch.float32)
    )
    model.eval()
    secrets = [canary.secret, *refs]
    enc = encode_pairs(
        tok, [canary.instruction] * 41, [canary.response(s) for s in secrets], max_len=128
    )
    batch = collate(enc, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    labels = batch["labels"][:, 1:]
    nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    whole = nll.sum(dim=1).numpy()  # the whole canary sentence's NLL, as Carlini et al. rank
    shared = whole - fast  # what the cached scorer leaves out: the same prefix for every one
    assert shared.min() > 0
    assert np.ptp(shared) < 1e-3
    assert list(np.argsort(fast, kind="stable")) == list(np.argsort(whole, kind="stable"))
    assert len(set(np.round(fast, 6))) > 30  # candidates really are told apart


def test_scoring_refuses_a_sequence_length_that_cuts_the_canary(tiny_model_path: str) -> None:
    adapter = initial_adapter(tiny_model_path, LORA, seed=0)
    canary = make_canaries(SETTINGS, seed=1)[0]
    scorer = CanaryScorer(tiny_model_path, adapter, lora=LORA, max_seq_len=64, seed=0)
    with pytest.raises(ConfigError, match="training.max_seq_len=64 cuts the canary.*Fix:"):
        scorer.losses(canary, ["123456", "654321"])


# --- end to end ------------------------------------------------------------------------------


def _tiny_config(tmp_path: Path, session_dir: Path) -> Path:
    cfg = {
        "model": "builtin:tiny-llama",
        "model_cache": str(session_dir / "models"),
        "out_dir": str(tmp_path / "unused"),
        "seed": 0,
        "rounds": 1,
        "data": {
            "parties": ["hospital-aws", "bank-gcp"],
            "canary_party": "bank-gcp",
            "train_rows": 60,
            "eval_rows": 4,
        },
        "training": {"local_steps": 3, "batch_size": 4, "learning_rate": 0.005, "max_seq_len": 128},
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "canaries": {"per_repeat": 2, "repeats": [1, 3], "references": 30},
        "dp": {"target_epsilons": [8.0], "delta": 1e-5, "max_grad_norm": 1.0},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "t-audit"},
    }
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_tiny_audit_reports_both_arms_and_logs_to_mlflow(
    tmp_path: Path, session_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    path = _tiny_config(tmp_path, session_dir)
    out = tmp_path / "out"
    assert main(["canaries", "-c", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no_dp" in printed and "dp_eps8" in printed

    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# Canary exposure audit")
    assert (out / "exposure.png").read_bytes()[:4] == b"\x89PNG"
    assert report["references"] == 30 and report["canary_rows"] == 2 * (1 + 3)
    assert report["max_exposure_bits"] == pytest.approx(math.log2(31))
    no_dp, dp = report["arms"]
    assert (no_dp["name"], dp["name"]) == ("no_dp", "dp_eps8")
    assert no_dp["epsilon_spent"] is None
    assert 7.5 < dp["epsilon_spent"] <= 8.0 + 1e-9
    assert dp["noise_multiplier"] > 0
    for arm in (no_dp, dp):
        assert [lv["repeats"] for lv in arm["exposure"]] == [1, 3]
        assert len(arm["canaries"]) == 4
        for c in arm["canaries"]:
            assert 1 <= c["rank"] <= 31
            assert c["exposure_bits"] == pytest.approx(math.log2(31) - math.log2(c["rank"]))

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("t-audit")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for arm in ("no_dp", "dp_eps8"):
        for r in (1, 3):
            assert f"exposure/{arm}/repeats_{r}_mean" in metrics
    assert metrics["exposure/max_possible"] == pytest.approx(math.log2(31))
    assert metrics["epsilon/dp_eps8"] == pytest.approx(dp["epsilon_spent"])
    assert run.data.params["canaries/references"] == "30"
    assert run.info.run_name == "canary audit · no_dp vs dp_eps8"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "audit")}
    assert logged == {"audit/report.json", "audit/report.md", "audit/exposure.png"}


def test_audit_detects_memorisation_without_dp(tiny_model_path: str) -> None:
    """Deterministic under the fixed seed: no DP noise is involved in this arm."""
    from cloudfed.audit.parties import demo_rows
    from cloudfed.audit.simulation import Arm, run_arm

    cfg = parse_audit_config(
        {
            "seed": 0,
            "rounds": 2,
            "data": {
                "parties": ["hospital-aws", "bank-gcp"],
                "canary_party": "hospital-aws",
                "train_rows": 60,
                "eval_rows": 2,
            },
            "training": {"local_steps": 60, "batch_size": 8, "learning_rate": 0.005},
            "lora": {
                "rank": 32,
                "alpha": 64,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
            },
            "canaries": {"per_repeat": 2, "repeats": [16], "references": 200},
        },
        source="test",
    )
    parties = demo_rows(cfg.data.parties, seed=0, train_rows=60, eval_rows=2)
    canaries = make_canaries(cfg.canaries, seed=0)
    refs = reference_secrets(cfg.canaries, canaries, seed=0)
    rows = insert_canaries(
        {p: r.train for p, r in parties.items()}, "hospital-aws", canaries, seed=0
    )
    initial = initial_adapter(tiny_model_path, cfg.lora, seed=0)
    trained = run_arm(cfg, Arm("no_dp"), model_path=tiny_model_path, initial=initial, rows=rows)

    def mean_exposure(adapter: dict[str, np.ndarray]) -> float:
        scorer = CanaryScorer(tiny_model_path, adapter, lora=cfg.lora, max_seq_len=128, seed=0)
        bits = []
        for c in canaries:
            losses = scorer.losses(c, refs)
            bits.append(exposure_bits(rank(float(losses[0]), losses[1:]), len(refs)))
        return float(np.mean(bits))

    before, after = mean_exposure(initial), mean_exposure(trained.adapter)
    assert before < 3.0  # the untrained model has never seen the secrets: about chance
    assert after > 6.0  # max is log2(201) = 7.65: the planted secrets are near the top
    assert trained.epsilon is None and not trained.events
