"""Every benchmark in its tiny mode, so none can rot unnoticed (their numbers are not asserted).

`benchmarks/demo_run.py` is run by the default demo's end-to-end test (tests/test_pipeline_demo.py),
which makes its one pipeline run through it. Flower's peer needs its own venv (`make bench-env`,
which `make test` runs): outside `make test` its part is skipped when the venv is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e_support import REPO_ROOT, make_project, zenml_env

FLOWER = REPO_ROOT / ".venv-flwr" / "bin" / "python"


def _bench(
    script: str, *args: str, python: Path | str = sys.executable, timeout: int = 600, **kw: Any
) -> dict:
    """Run `script` (a path under the repository, e.g. benchmarks/harmonize.py); its JSON."""
    proc = subprocess.run(
        [str(python), str(REPO_ROOT / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout)


def _bench_on_demo(tmp_path: Path, script: str, *args: str, **kw: Any) -> dict:
    """`_bench` for a benchmark that runs pipelines: on a fresh demo and an isolated project."""
    from cloudfed.data.demo import generate_demo

    generate_demo(tmp_path / "clouds")
    project = make_project(tmp_path / "project")
    return _bench(
        script,
        *args,
        "--project",
        str(project),
        "--clouds",
        str(tmp_path / "clouds"),
        env=zenml_env(),
        **kw,
    )


def _flower_or_skip() -> None:
    if not FLOWER.exists():
        if os.environ.get("CLOUDFED_REQUIRE_FLOWER") == "1":
            pytest.fail("Flower's venv is missing: `make test` should have run `make bench-env`")
        pytest.skip("Flower's venv is missing (run through `make test`, or `make bench-env`)")


def test_train_device_tiny() -> None:
    result = _bench("benchmarks/train_device.py", "--tiny")
    assert result["device"] in {"cpu", "cuda"}
    for mode in ("plain", "dp_sgd"):
        run = result[mode]
        assert run["tokens"] > 0 and run["tokens_per_s"] > 0 and run["finite"]
        assert run["lora_dtype"] == "float32"  # adapters stay fp32 over a bf16 base on CUDA
    assert result["plain"]["eval_loss_after"] < result["plain"]["eval_loss_before"]


def test_harmonize_tiny() -> None:
    result = _bench("benchmarks/harmonize.py", "--tiny")
    assert set(result["runs"]) == {"csv@300", "csv@600"}
    for run in result["runs"].values():
        assert run["rows"] == run["accepted"] + run["quarantined"] > 0
        assert run["rows_per_cpu_s"] > 0 and run["peak_above_baseline_mib"] >= 0
    assert set(result["summary"]["peak_mib_small_vs_large"]) == {"csv"}


def test_protection_tiny_without_flower() -> None:
    result = _bench("benchmarks/protection.py", "--tiny", "--no-flower")
    (row,) = result["secagg"]
    assert row["d"] == 20_000 and row["mask_over_raw_aes"] > 0
    rates = row["coordinator_rates_gb_per_s"]
    assert set(rates) == {"aes_gcm_decrypt", "memory_add", "mask_expansion", "sha256"}
    assert all(r > 0 for r in rates.values())
    (entry,) = row["rounds"]
    assert entry["n"] == 3 and entry["max_abs_error"] <= entry["error_bound"]
    assert entry["bytes_over_fp32"] <= 1.05
    for run in (entry, entry["at_2n"]):  # the bandwidth limit the coordinator is held to
        assert run["bytes_opened"] == 4 * row["d"] * run["n"]
        assert run["mask_expansions_in_unmask"] == run["n"]  # one self mask each, no dropouts
        limit = run["bandwidth"]
        assert 0 < limit["limit_s"] < limit["with_signature_hash_s"]
        assert limit["achieved_fraction"] == pytest.approx(
            limit["limit_s"] / run["coordinator_total_s"]
        )
        assert limit["achieved_fraction_with_signature_hash"] > limit["achieved_fraction"] > 0
    assert entry["at_2n"]["n"] == 6 and entry["coordinator_time_2n_over_n"] > 0
    assert result["targets"]["coordinator_fraction_of_bandwidth_limit_min"] == 0.5
    assert result["ckks"]["max_abs_error"] <= result["ckks"]["tolerance"]
    assert "end_to_end" not in result


@pytest.mark.e2e
def test_protection_end_to_end_arms_tiny(tmp_path: Path) -> None:
    """Each protection arm of `make bench` runs its own one-round federation through demo_run."""
    result = _bench_on_demo(
        tmp_path,
        "benchmarks/protection.py",
        "--tiny",
        "--no-flower",
        "--e2e",
        timeout=1800,  # three pipeline runs
    )
    arms = result["end_to_end"]
    assert set(arms) == {"plaintext", "secagg", "ckks"}
    for arm in arms.values():
        assert arm["error"] is None and arm["pipeline_seconds"] > 0 and arm["over_plaintext"] > 0
    assert arms["plaintext"]["over_plaintext"] == 1.0


def test_flower_peer_tiny_beside_ours() -> None:
    _flower_or_skip()
    peer = _bench("benchmarks/flower_peer.py", "--tiny", python=FLOWER)
    assert peer["tool"] == "flower_peer" and peer["sizes"][0]["d"] == 5000
    result = _bench("benchmarks/protection.py", "--tiny")  # the same, through our side-by-side
    assert isinstance(result["flower"], dict)
    assert result["secagg"][0]["mask_speedup_vs_flower"] > 0


@pytest.mark.e2e
def test_privacy_utility_tiny(tmp_path: Path) -> None:
    result = _bench_on_demo(tmp_path, "benchmarks/privacy_utility.py", "--tiny")
    arms = {r["arm"]: r for r in result["table"]}
    assert set(arms) == {"infinity", "dp_sgd_eps8"}
    assert arms["infinity"]["loss_ratio"] == 1.0
    eps = result["arms"]["dp_sgd_eps8"]["dp_sgd_epsilon"]
    assert len(eps) == 3 and all(0 < e <= 8.0 for e in eps.values())
    overhead = result["dp_sgd_overhead"]
    assert overhead["steps"] == 2 and overhead["plain_s"] > 0 and overhead["dp_sgd_s"] > 0


def test_scale_tiny() -> None:
    result = _bench("benchmarks/scale.py", "--tiny")
    small, large = result["in_process"]
    assert (small["parties"], large["parties"]) == (3, 4)
    for row in (small, large):
        assert row["accepted"] == row["parties"]  # every party went through secure aggregation
        assert set(row["coordinator_peak_mib"]) == {
            "keys_roster",
            "shares_roster",
            "inputs_roster",
            "aggregate",
        }
        assert row["update_bytes_masked"] > 0 and all(s > 0 for s in row["round_s"])
    assert result["in_process_growth"]["round_s"]["parties_ratio"] == round(4 / 3, 2)
    assert "pipeline" not in result


def test_load50_config_is_what_the_benchmark_writes(tmp_path: Path) -> None:
    """configs/load50.yaml is generated (`benchmarks/scale.py --write-config`): kept current."""
    from cloudfed.federation import load_run_config

    out = tmp_path / "load50.yaml"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks/scale.py"), "--write-config", str(out)]
        + ["--parties", "50"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    committed = REPO_ROOT / "configs" / "load50.yaml"
    assert out.read_text() == committed.read_text(), "regenerate configs/load50.yaml"
    cfg = load_run_config(committed)
    assert len(cfg.parties) == 50 and cfg.lora.rank == 2 and cfg.protection.default == "secagg"


@pytest.mark.e2e
def test_zenml_floor_tiny() -> None:
    """Its own isolated ZenML config (set before zenml is imported), as every benchmark run."""
    result = _bench("benchmarks/zenml_floor.py", "--tiny")
    (row,) = result["runs"]
    assert row["per_party"]["steps"] == 2 and row["batched"]["steps"] == 1
    assert row["per_party"]["per_step_s"] > 0 and row["batched"]["pipeline_s"] > 0
