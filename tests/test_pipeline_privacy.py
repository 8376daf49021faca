"""The privacy budget through the real pipeline: stop, refuse, survive a kill, DP-SGD, no leaks.

Two federations, four `zenml pipeline run`s in all, on one isolated project copy:
- `budget`: distributed DP with a budget that fits 2 of 3 rounds and DP-SGD at hospital-aws, run
  once (stops after round 2) and again on the same exchange (refuses round 1 of the new run);
- `killed`: a run killed (SIGKILL, whole process group) after it charged round 1, then a new run.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudfed.data.demo import generate_demo
from cloudfed.privacy.accountant import GaussianEvent, epsilon
from cloudfed.privacy.ledger import Ledger, LedgerStore
from tests.e2e_support import (
    federation,
    make_project,
    mlflow_last_run,
    policy_dir,
    run_pipeline,
    run_until_killed,
    scan_for,
    write_config,
)

pytestmark = pytest.mark.e2e
PARTIES = ["hospital-aws", "bank-gcp"]
DP_PARTY = "hospital-aws"
FED = "test-federation"
DELTA = 1e-5  # the privacy block's default
# Distributed mode charges a z a hair below the configured 1.0 (quantisation may lengthen a
# clipped update); anything in (Z_FLOOR, 1.0] leaves MAX_EPSILON between 2 and 3 rounds.
Z_FLOOR = 0.95


def _spend(rounds: int, z: float) -> float:
    return epsilon([GaussianEvent(z, 1.0, 1)] * rounds, DELTA, "rdp")


TWO_ROUNDS_AT_MOST = _spend(2, Z_FLOOR)  # about 7.5
THREE_ROUNDS_AT_LEAST = _spend(3, 1.0)  # about 9.0
MAX_EPSILON = round((TWO_ROUNDS_AT_MOST + THREE_ROUNDS_AT_LEAST) / 2, 2)


def _privacy(max_epsilon: float, **extra: Any) -> dict[str, Any]:
    return {
        "mode": "distributed",
        "clip": 0.1,
        "noise_multiplier": 1.0,
        "max_epsilon": max_epsilon,
        **extra,
    }


def _fed(work: Path, clouds: Path, rounds: int, privacy: dict[str, Any]) -> dict[str, Any]:
    fed = federation(work, clouds, PARTIES, rounds=rounds, privacy=privacy)
    fed["training"]["local_steps"] = 5
    return fed


def _ledger(coordinator: Path) -> Ledger:
    """The coordinator's plain copy (the exchange copy is signed and checked by the pipeline)."""
    return Ledger.model_validate_json((coordinator / FED / "privacy" / "ledger.json").read_bytes())


def _signed_ledger(work: Path) -> Ledger:
    """The exchange copy alone, its coordinator signature checked (no local fallback)."""
    from cloudfed.exchange import Exchange
    from cloudfed.protection.keys import load_or_create_keys

    keys = load_or_create_keys("coordinator", "coordinator", work / "coordinator" / "keys")
    store = LedgerStore(
        Exchange(str(work / "exchange" / "test-federation")),
        keys,
        federation_id="test-federation",
        coordinator_storage=str(work / "no-local-copy"),
    )
    return store.load(delta=DELTA, accountant="rdp")


def _steps_started(out: str) -> list[str]:
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    return re.findall(r"Step (\S+) has started", plain)


def _events_epsilon(entries: list[Any]) -> float:
    return epsilon([e.event() for e in entries], DELTA, "rdp")


def _history(client: Any, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _run(project: Path, config: Path) -> dict[str, Any]:
    """One pipeline run; its output and its MLflow run id (taken before the next run starts)."""
    proc = run_pipeline(project, config)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    _, mlrun = mlflow_last_run()
    return {"out": out, "mlflow_run": mlrun.info.run_id}


def _summary_rounds(summary: str) -> list[int]:
    rounds = []
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if line.strip().startswith("│") and cells[0].isdigit():
            rounds.append(int(cells[0]))
    return rounds


def _flat(text: str) -> str:
    """Rich wraps long lines of the summary; compare with whitespace collapsed."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("privacy-project") / "project")


@pytest.fixture(scope="module")
def budget(project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same budgeted config run twice on one exchange and coordinator storage."""
    work = tmp_path_factory.mktemp("privacy-budget")
    clouds = work / "clouds"
    generate_demo(clouds, seed=21, train_rows=60, eval_rows=10)
    dp_sgd = {DP_PARTY: {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}
    fed = _fed(work, clouds, 3, _privacy(MAX_EPSILON, dp_sgd=dp_sgd))
    config = write_config(work / "run.yaml", fed)
    coordinator = work / "coordinator"
    first = _run(project, config)
    first["summary"] = (coordinator / FED / "last_run" / "summary.txt").read_text()
    first["ledger"] = _ledger(coordinator)
    first["ledger_bytes"] = (coordinator / FED / "privacy" / "ledger.json").read_bytes()
    first["signed_ledger"] = _signed_ledger(work)
    dp_sgd_ledger = policy_dir(config) / f"{DP_PARTY}-state" / "dp_sgd_ledger.json"
    first["dp_sgd_ledger"] = dp_sgd_ledger.read_bytes() if dp_sgd_ledger.exists() else None
    second = _run(project, config)  # continues at round 3, which the budget refuses
    second["summary"] = second["out"]  # it trained nothing, so last_run keeps the first run's
    second["last_run"] = (coordinator / FED / "last_run" / "summary.txt").read_text()
    return {
        "work": work,
        "clouds": clouds,
        "config": config,
        "first": first,
        "second": second,
    }


def test_budget_stops_the_pipeline_after_the_rounds_that_fit(budget: dict[str, Any]) -> None:
    assert TWO_ROUNDS_AT_MOST < MAX_EPSILON < THREE_ROUNDS_AT_LEAST
    first, work = budget["first"], budget["work"]
    ledger: Ledger = first["ledger"]
    assert [(e.round, e.status) for e in ledger.entries] == [(1, "spent"), (2, "spent")]
    assert len({e.run_id for e in ledger.entries}) == 1
    assert all(Z_FLOOR < e.noise_multiplier <= 1.0 for e in ledger.entries), ledger.entries
    assert sorted(ledger.entries[0].parties) == sorted(PARTIES)
    spent = [_events_epsilon(ledger.entries[:k]) for k in (1, 2)]
    refused_at = ledger.epsilon(extra=[ledger.entries[0].event()])
    assert spent[1] <= MAX_EPSILON < refused_at

    summary = first["summary"]
    assert _summary_rounds(summary) == [0, 1, 2], summary
    flat = _flat(summary)
    assert "Stopped: privacy budget:" in flat, summary
    assert f"spent epsilon={spent[1]:.4g} of max_epsilon={MAX_EPSILON:g}" in flat, summary
    assert f"round 3 would bring it to {refused_at:.4g}, so it was not started" in flat
    assert "cloudfed: stopping before round 3: privacy budget" in first["out"]
    assert first["signed_ledger"] == ledger  # the signed exchange copy agrees
    started = _steps_started(first["out"])
    assert {"train_hospital-aws_r2", "train_bank-gcp_r2"} <= set(started), started
    assert [s for s in started if s.endswith("_r3")] == ["privacy_reserve_r3"], started

    client, _ = mlflow_last_run()
    rid = first["mlflow_run"]
    eps = _history(client, rid, "privacy/epsilon")
    assert sorted(eps) == [1, 2] and eps[1] < eps[2], eps
    for k, r in ((1, 1), (2, 2)):
        assert eps[r] == pytest.approx(spent[k - 1], rel=1e-6)
    for party in PARTIES:
        party_eps = _history(client, rid, f"party/{party}/epsilon")
        assert sorted(party_eps) == [1, 2], (party, party_eps)
        assert party_eps[2] == pytest.approx(spent[1], rel=1e-6)
    before = _history(client, rid, "privacy/epsilon_before_round")
    assert sorted(before) == [1, 2, 3] and before[1] == 0.0
    assert before[3] == pytest.approx(spent[1], rel=1e-6)
    for key in ("privacy/delta", "privacy/noise_multiplier", "privacy/clip"):
        assert sorted(_history(client, rid, key)) == [1, 2], key
    # Whether a party's update was clipped depends on its data: not released under DP.
    assert _history(client, rid, "privacy/fraction_clipped") == {}
    assert _history(client, rid, "privacy/clip")[1] == pytest.approx(0.1)
    # Two contributors, min_contributors 2, one curious: each share carries the full z*C, so
    # against the other contributor exactly z; against the coordinator z*sqrt(2).
    effective = _history(client, rid, "privacy/effective_noise_multiplier")
    assert effective == pytest.approx({1: 1.0, 2: 1.0})
    versus = _history(client, rid, "privacy/effective_noise_multiplier_vs_coordinator")
    assert versus == pytest.approx({1: math.sqrt(2), 2: math.sqrt(2)})
    run = client.get_run(rid)
    stop = run.data.tags["privacy/budget_stop"]
    assert f"spent epsilon={spent[1]:.4g}" in stop and "round 3" in stop, stop
    assert "privacy budget" in run.data.tags["federation/stop_reason"]
    local = client.download_artifacts(rid, "privacy/ledger.json", str(work))
    logged = Ledger.model_validate(json.loads(Path(local).read_text()))
    assert logged == ledger
    report = {a.path for a in client.list_artifacts(rid, "report")}
    assert "report/privacy_per_round.png" in report, report


def test_rerun_refuses_a_round_past_the_budget_and_ends_cleanly(budget: dict[str, Any]) -> None:
    first, second, work = budget["first"], budget["second"], budget["work"]
    coordinator = work / "coordinator"
    spent = first["ledger"].epsilon()
    # The re-run continues the federation at round 3 (from round 2's adapter), not at round 1.
    assert "continuing federation test-federation at round 3" in second["out"]
    assert _summary_rounds(second["summary"]) == [2], second["summary"]
    flat = _flat(second["summary"])
    expected = f"spent epsilon={spent:.4g} of max_epsilon={MAX_EPSILON:g}"
    assert "Stopped: privacy budget:" in flat and expected in flat, second["summary"]
    assert "over 2 round(s) of this federation; round 3 would bring it to" in flat
    assert "cloudfed: stopping before round 3: privacy budget" in second["out"]
    assert expected in second["out"]
    # It trained nothing, so it published nothing and says where the model is.
    assert "No round was trained in this run, so nothing new was published" in flat
    assert second["last_run"] == first["summary"]
    # No party trained: only the refused reservation ran after the starting evaluation.
    started = _steps_started(second["out"])
    assert "privacy_reserve_r3" in started and "publish_report" in started, started
    assert not [s for s in started if s.startswith("train_")], started
    assert [s for s in started if s.endswith("_r3")] == ["privacy_reserve_r3"], started
    for party in PARTIES:
        updates = sorted(
            p.name for p in (budget["clouds"] / party / "storage" / "updates").glob("*.safetensors")
        )
        assert [u[:5] for u in updates] == ["r0001", "r0002"], updates
    # No double spend: both copies of the ledger are exactly what the first run left.
    assert (coordinator / FED / "privacy" / "ledger.json").read_bytes() == first["ledger_bytes"]
    assert _ledger(coordinator) == first["ledger"]
    assert _signed_ledger(work) == first["ledger"]
    dp_sgd_ledger = policy_dir(budget["config"]) / f"{DP_PARTY}-state" / "dp_sgd_ledger.json"
    assert dp_sgd_ledger.read_bytes() == first["dp_sgd_ledger"]

    client, _ = mlflow_last_run()
    rid = second["mlflow_run"]
    assert rid != first["mlflow_run"]
    assert _history(client, rid, "privacy/epsilon") == {}
    before = _history(client, rid, "privacy/epsilon_before_round")
    assert list(before) == [3] and before[3] == pytest.approx(spent, rel=1e-6)
    tags = client.get_run(rid).data.tags
    assert expected in tags["privacy/budget_stop"]
    assert tags["federation/final_round"] == "2"
    assert "federation/final_adapter_sha256" not in tags  # nothing new was published


def test_dp_sgd_party_keeps_its_own_ledger_and_epsilon(budget: dict[str, Any]) -> None:
    first, clouds = budget["first"], budget["clouds"]
    assert first["dp_sgd_ledger"] is not None, "the DP-SGD party wrote no ledger"
    ledger = Ledger.model_validate_json(first["dp_sgd_ledger"])
    run_id = first["ledger"].entries[0].run_id
    ids = [f"test-federation/{run_id}/r0001", f"test-federation/{run_id}/r0002"]
    assert [e.id for e in ledger.entries] == ids
    assert all(e.status == "spent" and e.mode == "dp-sgd" for e in ledger.entries)
    assert all(e.parties == [DP_PARTY] and e.noise_multiplier == 1.0 for e in ledger.entries)
    assert all(0.0 < e.sample_rate < 1.0 and e.steps == 5 for e in ledger.entries)
    # The ledger lives with the party's policy, not in the storage the run config names.
    assert not list(clouds.rglob("dp_sgd_ledger.json"))
    for other in PARTIES:
        if other != DP_PARTY:
            assert not (
                policy_dir(budget["config"]) / f"{other}-state" / "dp_sgd_ledger.json"
            ).exists()

    client, _ = mlflow_last_run()
    rid = first["mlflow_run"]
    eps = _history(client, rid, f"party/{DP_PARTY}/dp_sgd_epsilon")
    assert sorted(eps) == [1, 2] and 0.0 < eps[1] < eps[2], eps
    for k in (1, 2):
        expected = epsilon([e.event() for e in ledger.entries[:k]], ledger.delta, "rdp")
        assert eps[k] == pytest.approx(expected, rel=1e-6)
    # The noise multiplier and sample rate follow from the party's record count: kept local.
    assert _history(client, rid, f"party/{DP_PARTY}/dp_sgd_noise_multiplier") == {}
    assert _history(client, rid, f"party/{DP_PARTY}/dp_sgd_sample_rate") == {}
    for other in PARTIES:
        if other != DP_PARTY:
            assert _history(client, rid, f"party/{other}/dp_sgd_epsilon") == {}
    assert client.get_run(rid).data.params["privacy/dp_sgd_parties"] == DP_PARTY


def _update_needles(clouds: Path) -> list[bytes]:
    """64-byte slices of every party's plaintext update tensors (past the safetensors header)."""
    needles = []
    for path in sorted(clouds.glob("*/storage/updates/*.safetensors")):
        data = path.read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        needles.append(data[header + 256 : header + 320])
    return needles


def test_no_plaintext_update_reaches_coordinator_side_with_dp_on(budget: dict[str, Any]) -> None:
    zen = Path(os.environ["ZENML_CONFIG_PATH"])
    work, clouds = budget["work"], budget["clouds"]
    roots = [zen, work / "exchange", work / "coordinator"]
    assert all(r.is_dir() and any(r.rglob("*")) for r in roots), roots
    assert list(zen.rglob("mlflow.db")) and list(zen.rglob("*.log")), "stores not where scanned"
    updates = _update_needles(clouds)
    assert len(updates) == len(PARTIES) * 2, "expected one update per party and round"
    assert scan_for([clouds], updates[:1])  # positive control
    assert next(zen.rglob("federation_plan"), None) is not None, "artifact store not scanned"
    leaks = scan_for(roots, updates)
    assert not leaks, f"plaintext updates leaked to the coordinator side: {leaks}"


@pytest.fixture(scope="module")
def killed(project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run killed once it has charged round 1, then a new run on the same ledger."""
    work = tmp_path_factory.mktemp("privacy-killed")
    clouds = work / "clouds"
    generate_demo(clouds, seed=22, train_rows=60, eval_rows=10)
    coordinator = work / "coordinator"
    local_ledger = coordinator / FED / "privacy" / "ledger.json"
    config = write_config(work / "killed.yaml", _fed(work, clouds, 3, _privacy(50.0)))

    def charged_round_1() -> bool:
        if not local_ledger.exists():
            return False
        try:
            entries = _ledger(coordinator).entries
        except ValueError:  # replaced between exists() and read: read again
            return False
        return any(e.round == 2 or (e.round == 1 and e.status == "spent") for e in entries)

    still_running, output = run_until_killed(
        project, config, charged_round_1, work / "killed.log", timeout=900
    )
    assert still_running, f"the run ended before it could be killed:\n{output[-4000:]}"
    before_rerun = _ledger(coordinator)
    history = work / "exchange" / FED / "history" / "g0001"
    published = max(int(p.stem[1:]) for p in history.glob("r*.signed"))
    rerun_config = write_config(work / "rerun.yaml", _fed(work, clouds, 2, _privacy(50.0)))
    rerun = _run(project, rerun_config)
    return {
        "work": work,
        "killed_entries": before_rerun.entries,
        "killed_output": output,
        "published": published,
        "ledger": _ledger(coordinator),
        "rerun": rerun,
    }


def test_killed_and_rerun_pipeline_shows_no_double_spend(killed: dict[str, Any]) -> None:
    gone = killed["killed_entries"]
    assert gone and gone[0].round == 1, gone
    assert len({e.run_id for e in gone}) == 1
    assert [e.round for e in gone] in ([1], [1, 2]), gone
    ledger: Ledger = killed["ledger"]
    ids = [e.id for e in ledger.entries]
    assert len(ids) == len(set(ids)), ids
    # Every entry of the killed run is kept, once and unchanged; the new run's are appended.
    assert ledger.entries[: len(gone)] == gone
    # The new run continues after the last published round; a reserved but unpublished round is
    # retried under the new run's id and charged again (its first attempt may have been seen).
    new = ledger.entries[len(gone) :]
    first_new = killed["published"] + 1
    assert first_new in (1, 2), killed["published"]
    assert [(e.round, e.status) for e in new] == [(r, "spent") for r in range(first_new, 3)]
    assert {e.run_id for e in new}.isdisjoint({e.run_id for e in gone})
    assert len({e.run_id for e in new}) == 1

    client, _ = mlflow_last_run()
    rid = killed["rerun"]["mlflow_run"]
    before = _history(client, rid, "privacy/epsilon_before_round")
    carried = _events_epsilon(gone)
    assert carried > 0.0
    assert before[first_new] == pytest.approx(carried, rel=1e-6), (before, carried)
    eps = _history(client, rid, "privacy/epsilon")
    assert sorted(eps) == list(range(first_new, 3)) and carried < eps[first_new], eps
    total = epsilon([e.event() for e in ledger.entries], DELTA, "rdp")
    assert eps[2] == pytest.approx(total, rel=1e-6)
    assert eps[first_new] == pytest.approx(
        _events_epsilon(ledger.entries[: len(gone) + 1]), rel=1e-6
    )
    assert math.isclose(ledger.epsilon(), total, rel_tol=1e-9)


@pytest.fixture(scope="module")
def dp_sgd_cap(project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """DP-SGD in both parties, no party-level DP, run twice; before the second run each party
    tightens its own policy's budget to fit exactly one more round (stricter than the config)."""
    work = tmp_path_factory.mktemp("privacy-dp-sgd-cap")
    clouds = work / "clouds"
    generate_demo(clouds, seed=23, train_rows=60, eval_rows=10)
    dp_sgd = {p: {"noise_multiplier": 1.0, "max_epsilon": 50.0} for p in PARTIES}
    config = write_config(work / "run.yaml", _fed(work, clouds, 2, {"dp_sgd": dp_sgd}))
    first = _run(project, config)
    caps = {}
    for p in PARTIES:
        state = policy_dir(config) / f"{p}-state"
        ledger = Ledger.model_validate_json((state / "dp_sgd_ledger.json").read_bytes())
        events = [e.event() for e in ledger.entries]
        three = epsilon(events + events[:1], DELTA, "rdp")
        four = epsilon(events * 2, DELTA, "rdp")
        caps[p] = round((three + four) / 2, 4)
        path = policy_dir(config) / f"{p}.yaml"
        doc = yaml.safe_load(path.read_text())
        doc["dp_sgd"]["max_epsilon"] = caps[p]
        path.write_text(yaml.safe_dump(doc))
    # Rounds is the federation's total: two more rounds, of which each party's cap allows one.
    more = write_config(work / "more.yaml", _fed(work, clouds, 4, {"dp_sgd": dp_sgd}))
    second = _run(project, more)
    second["summary"] = (work / "coordinator" / FED / "last_run" / "summary.txt").read_text()
    return {"work": work, "config": config, "first": first, "second": second, "caps": caps}


def test_repeated_runs_stop_at_the_dp_sgd_cap(dp_sgd_cap: dict[str, Any]) -> None:
    second, caps = dp_sgd_cap["second"], dp_sgd_cap["caps"]
    assert _summary_rounds(second["summary"]) == [2, 3], second["summary"]
    flat = _flat(second["summary"])
    assert "Stopped: round 4: only 0 of 2 parties trained, fewer than min_parties=2" in flat
    for p in PARTIES:
        assert f"{p}: dropped at train: {p}: record-level DP-SGD budget" in flat, flat
        assert f"of {caps[p]:g} (the stricter of privacy.dp_sgd.{p}.max_epsilon" in flat
        ledger = Ledger.model_validate_json(
            (policy_dir(dp_sgd_cap["config"]) / f"{p}-state" / "dp_sgd_ledger.json").read_bytes()
        )
        assert len(ledger.entries) == 3 and ledger.epsilon() <= caps[p]
    assert "cloudfed: stopping: round 4" in second["out"]
    started = _steps_started(second["out"])
    assert not [s for s in started if s.startswith("advertise_") and s.endswith("_r4")]
