"""A whole federation whose every location is an S3 bucket (moto on 127.0.0.1).

The exchange, the coordinator's storage, each party's storage and raw exports, and one party's
policy state each sit in a bucket of their own. The in-process simulation runs every stage of
two rounds against them; afterwards nothing was written to local disk in their place, and the
residency scan reads the buckets: no raw or harmonised record and no party's plaintext update is
in the exchange's or the coordinator's bucket, and each party's rows are in its own bucket only.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from cloudfed.data.demo import MARKER_PREFIX, MARKER_RE, generate_demo
from cloudfed.data.ref import DatasetRef
from cloudfed.data.tokens import count_utf8_bytes
from cloudfed.federation import FederationConfig, parse_federation
from tests.e2e_support import REPO_ROOT, federation, scan_for, stored_files
from tests.storage_servers import free_port

PARTIES = ["hospital-aws", "bank-gcp"]
EXTENSION = {"hospital-aws": "csv", "bank-gcp": "jsonl"}
EXCHANGE, COORDINATOR = "cf-exchange", "cf-coordinator"
RUNS = ("", "zen-")  # the simulation's buckets, and the `zenml pipeline run`'s own


def _bucket(party: str, run: str = "") -> str:
    return f"cf-{run}{party}"


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, Any]]:
    """A moto S3 server for this module, with dummy credentials in the environment only."""
    import logging

    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            options = {"endpoint_url": f"http://127.0.0.1:{port}"}
            fs = fsspec.filesystem("s3", **options)
            for run in RUNS:
                for name in [*PARTIES, "exchange", "coordinator"]:
                    fs.mkdir(_bucket(name, run))
            fs.mkdir("cf-state")
            yield {"options": options, "fs": fs, "mp": mp}
        finally:
            server.stop()


def bucket_federation(
    work: Path,
    clouds: Path,
    options: dict[str, Any],
    run: str = "",
    rounds: int = 2,
    **overrides: Any,
) -> dict[str, Any]:
    """The e2e federation with every location moved into its own bucket."""
    fed = federation(
        work,
        clouds,
        PARTIES,
        exchange=f"s3://{_bucket('exchange', run)}",
        exchange_options=options,
        coordinator_storage=f"s3://{_bucket('coordinator', run)}/coordinator",
        coordinator_storage_options=options,
        rounds=rounds,
        training={"local_steps": 6, "batch_size": 8, "max_seq_len": 96, "max_eval_rows": 16},
        **overrides,
    )
    for p in fed["parties"]:
        name, ext = p["name"], EXTENSION[p["name"]]
        p["raw"] = {s: f"s3://{_bucket(name, run)}/raw/{s}.{ext}" for s in ("train", "eval")}
        p["storage"] = f"s3://{_bucket(name, run)}/storage"
        p["storage_options"] = options
    return fed


def _demo_in_buckets(fs: Any, clouds: Path, run: str = "") -> None:
    """Demo raw exports put into each party's bucket, and removed from local disk."""
    generate_demo(clouds, seed=11, train_rows=80, eval_rows=24)
    for p in PARTIES:
        for split in ("train", "eval"):
            local = clouds / p / "raw" / f"{split}.{EXTENSION[p]}"
            fs.pipe_file(f"{_bucket(p, run)}/raw/{local.name}", local.read_bytes())
        for local in (clouds / p / "raw").iterdir():
            local.unlink()


def _state_in_bucket(policies: Path, options: dict[str, Any]) -> None:
    """hospital-aws keeps its DP-SGD ledger and seen-ledger heads in a bucket of its own."""
    path = policies / "hospital-aws.yaml"
    doc = yaml.safe_load(path.read_text())
    doc.update(state_dir="s3://cf-state/hospital-aws", state_options=options)
    path.write_text(yaml.safe_dump(doc))


@pytest.fixture(scope="module")
def run(s3: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from cloudfed.data.harmonize import harmonize_party
    from cloudfed.party_policy import POLICY_DIR_ENV, provision
    from cloudfed.preflight import check_party_source
    from cloudfed.simulation import Simulation

    work = tmp_path_factory.mktemp("s3-federation")
    clouds = work / "clouds"
    _demo_in_buckets(s3["fs"], clouds)
    policies = work / "party-policies"
    s3["mp"].setenv(POLICY_DIR_ENV, str(policies))
    dp_sgd = {"hospital-aws": {"noise_multiplier": 1.0, "sample_rate": 0.2, "max_epsilon": 50.0}}
    cfg = parse_federation(
        bucket_federation(work, clouds, s3["options"], privacy={"dp_sgd": dp_sgd})
    )
    provision(cfg)
    _state_in_bucket(policies, s3["options"])
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    cwd_before = sorted(os.listdir(REPO_ROOT))
    datasets: dict[str, DatasetRef] = {}
    for p in PARTIES:  # as the harmonise step does, minus the release (Simulation redacts)
        check_party_source(cfg, cfg.party(p), REPO_ROOT, private=True)  # reads the raw URLs
        datasets[p] = harmonize_party(
            cfg.party(p),
            root=REPO_ROOT,
            contracts_dir=Path(cfg.contracts_dir),
            count_tokens=count_utf8_bytes,
            run_id="s3",
            private=True,
        )
    results = Simulation(cfg, datasets).run()
    return {
        "cfg": cfg,
        "datasets": datasets,
        "results": results,
        "work": work,
        "new_local": sorted(set(p.relative_to(work) for p in work.rglob("*")) - set(before)),
        "new_in_repo": sorted(set(os.listdir(REPO_ROOT)) - set(cwd_before)),
        "options": s3["options"],
    }


def _keys(run: dict[str, Any], bucket: str) -> list[str]:
    return sorted(name.split(f"s3://{bucket}/", 1)[1] for name, _ in _files(run, bucket))


def _files(run: dict[str, Any], bucket: str) -> list[tuple[str, bytes]]:
    return list(stored_files(f"s3://{bucket}", run["options"]))


def test_every_stage_runs_against_the_buckets(run: dict[str, Any]) -> None:
    cfg: FederationConfig = run["cfg"]
    assert [r.round for r in run["results"]] == [0, 1, 2]  # both rounds published
    assert all(set(r.party_tokens) == set(PARTIES) for r in run["results"][1:])
    for p in PARTIES:
        ref = run["datasets"][p]
        assert ref.status == "ok", ref
        assert ref.train_uri == f"s3://{_bucket(p)}/storage/harmonised/train.parquet"
        assert ref.docs_uri.startswith(f"s3://{_bucket(p)}/storage/data_docs/s3/")
        keys = _keys(run, _bucket(p))
        for expected in (
            "storage/harmonised/train.parquet",
            "storage/harmonised/eval.parquet",
            "storage/quarantine/train.jsonl",
            f"storage/keys/party-{p}.x25519.pem",
            "storage/updates/",  # the plaintext update stays here...
            "storage/secagg/",  # ...with the round's secrets
            "storage/evals/",  # under DP each party's own metrics
        ):
            assert any(k.startswith(expected) for k in keys), (expected, keys)
        assert any(k.startswith("storage/data_docs/s3/") and k.endswith(".html") for k in keys)
        assert not any("/." in f"/{k}" for k in keys), "a temp or staging file was uploaded"
    coordinator = _keys(run, COORDINATOR)
    assert "coordinator/keys/coordinator-coordinator.ed25519.pem" in coordinator
    assert f"coordinator/{cfg.federation_id}/history_head.json" in coordinator
    assert not any("/opened/" in k for k in coordinator), "opened uploads outlived their round"
    exchange = _keys(run, EXCHANGE)
    assert any(k.endswith("/updates/hospital-aws.sealed") for k in exchange)
    state = _keys(run, "cf-state")
    assert "hospital-aws/dp_sgd_ledger.json" in state and "hospital-aws/dp_sgd.lock" not in state


def test_nothing_lands_on_local_disk_in_place_of_a_bucket(run: dict[str, Any]) -> None:
    """Only the model cache and the party state their policies keep on local disk are local;
    no storage, exchange or coordinator folder appeared."""
    new = [str(p) for p in run["new_local"]]
    # Every party but hospital-aws keeps its state (once-only records) beside its policy.
    local_state = tuple(f"party-policies/{p}-state" for p in PARTIES if p != "hospital-aws")
    assert new and all(p.split("/")[0] == "models" or p.startswith(local_state) for p in new), new
    assert not any(p.startswith("party-policies/hospital-aws-state") for p in new)
    state = _keys(run, "cf-state")  # hospital-aws's are in its state bucket
    assert any(k.startswith("hospital-aws/secagg/revealed/") for k in state), state
    assert run["new_in_repo"] == []


def _harmonised_needles(run: dict[str, Any], party: str) -> list[bytes]:
    """Marked instruction texts of a party's harmonised rows, read from its bucket."""
    data = dict(_files(run, _bucket(party)))[
        f"s3://{_bucket(party)}/storage/harmonised/train.parquet"
    ]
    rows = pd.read_parquet(io.BytesIO(data))
    texts = [t for t in rows["instruction"] if MARKER_RE.search(t)][:5]
    assert texts, "the demo's records carry markers"
    return [MARKER_RE.search(t).group(0).encode() for t in texts]


def _tensor_slice(data: bytes) -> bytes:
    """64 bytes of a plaintext update's tensors (past the safetensors header)."""
    header = 8 + int.from_bytes(data[:8], "little")
    return data[header + 256 : header + 320]


def _update_needles(run: dict[str, Any], party: str) -> list[bytes]:
    """A slice of each of the party's plaintext updates, read from its bucket."""
    return [
        _tensor_slice(data)
        for name, data in _files(run, _bucket(party))
        if "/storage/updates/" in name and name.endswith(".safetensors")
    ]


def test_residency_scan_across_the_buckets(run: dict[str, Any]) -> None:
    options = run["options"]
    coordinator_side = [f"s3://{EXCHANGE}", f"s3://{COORDINATOR}"]
    markers = [MARKER_PREFIX.encode()]
    for p in PARTIES:
        own = f"s3://{_bucket(p)}"
        others = [f"s3://{_bucket(q)}" for q in PARTIES if q != p]
        rows, updates = _harmonised_needles(run, p), _update_needles(run, p)
        assert len(updates) == 2, "one plaintext update per round, in the party's bucket"
        # Positive controls: the scan reads buckets and finds what lives in the party's own.
        assert set(scan_for([own], rows + updates, options)) == {
            n.decode(errors="replace") for n in rows + updates
        }
        assert not scan_for(others, rows + updates, options), f"{p}'s rows left its bucket"
        leaks = scan_for(coordinator_side, markers + rows + updates, options)
        assert not leaks, f"{p}: records or plaintext updates reached the coordinator side: {leaks}"
    for name, data in _files(run, EXCHANGE) + _files(run, COORDINATOR):
        assert b"PAR1" not in data[:4], f"{name}: a parquet file on the coordinator side"


def test_storage_options_with_credentials_are_refused() -> None:
    fed = federation(Path("w"), Path("c"), PARTIES)
    fed["parties"][0]["storage_options"] = {"key": "AKIA...", "endpoint_url": "http://x"}
    with pytest.raises(Exception, match=r"storage_options.*\['key'\].*credentials"):
        parse_federation(fed, source="configs/x.yaml")
    fed = federation(Path("w"), Path("c"), PARTIES)
    fed["coordinator_storage_options"] = {"client_kwargs": {"aws_secret_access_key": "x"}}
    with pytest.raises(Exception, match="coordinator_storage_options"):
        parse_federation(fed, source="configs/x.yaml")


@pytest.mark.e2e
def test_zenml_pipeline_run_keeps_every_location_in_its_bucket(
    s3: dict[str, Any], tmp_path: Path
) -> None:
    """The real `zenml pipeline run` against buckets, then the residency scan across them."""
    from tests.e2e_support import make_project, run_pipeline, write_config

    options, run = s3["options"], "zen-"
    clouds = tmp_path / "clouds"
    _demo_in_buckets(s3["fs"], clouds, run)
    project = make_project(tmp_path / "project")
    fed = bucket_federation(tmp_path, clouds, options, run, rounds=1, federation_id="zen-s3")
    proc = run_pipeline(project, write_config(tmp_path / "run.yaml", fed))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    coordinator = [n for n, _ in stored_files(f"s3://{_bucket('coordinator', run)}", options)]
    report = f"s3://{_bucket('coordinator', run)}/coordinator/zen-s3/last_run/"
    assert {report + "summary.txt", report + "adapter.safetensors"} <= set(coordinator)
    updates: list[bytes] = []
    for p in PARTIES:
        for name, data in stored_files(f"s3://{_bucket(p, run)}/storage/updates", options):
            if name.endswith(".safetensors"):
                updates.append(_tensor_slice(data))
    assert len(updates) == len(PARTIES)  # one round
    markers = [MARKER_PREFIX.encode()]
    assert scan_for([f"s3://{_bucket(PARTIES[0], run)}/raw"], markers, options)  # controls
    assert scan_for([f"s3://{_bucket(PARTIES[1], run)}/storage"], updates, options)
    coordinator_side = [f"s3://{_bucket('exchange', run)}", f"s3://{_bucket('coordinator', run)}"]
    leaks = scan_for(coordinator_side, markers + updates, options)
    leaks.update(scan_for([Path(os.environ["ZENML_CONFIG_PATH"])], markers + updates))
    assert not leaks, f"raw records or plaintext updates reached the coordinator side: {leaks}"
    assert not (tmp_path / "coordinator").exists() and not (tmp_path / "exchange").exists()
    assert MARKER_PREFIX not in proc.stdout + proc.stderr
