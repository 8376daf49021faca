"""`exchange_options`: the exchange's fsspec storage options are a documented config field.

An S3-compatible store (MinIO, Ceph, R2) needs an endpoint; before this field the only way was
an undocumented fsspec environment variable. Credentials stay out of the run configuration.
"""

from __future__ import annotations

from typing import Any

import pytest

from cloudfed.errors import ConfigError
from cloudfed.exchange import federation_exchange
from cloudfed.federation import parse_federation


def _fed(**overrides: Any) -> dict[str, Any]:
    fed: dict[str, Any] = {
        "federation_id": "options-test",
        "exchange": "memory://cloudfed-options-test",
        "parties": [
            {"name": n, "raw": {"train": "t", "eval": "e"}, "mapping": "m", "storage": "s"}
            for n in ("a-aws", "b-gcp")
        ],
    }
    fed.update(overrides)
    return fed


def test_exchange_options_reach_the_fsspec_backend() -> None:
    options = {"endpoint_url": "http://minio.internal:9000", "client_kwargs": {"region_name": "x"}}
    cfg = parse_federation(_fed(exchange_options=options))
    ex = federation_exchange(cfg)
    assert ex.fs.storage_options == options
    ex.put_bytes("rounds/r0000/x.bin", b"m")
    assert ex.get_bytes("rounds/r0000/x.bin") == b"m"
    url = ex.url("rounds/r0000/x.bin")
    assert url.endswith("cloudfed-options-test/options-test/rounds/r0000/x.bin")
    assert parse_federation(_fed()).exchange_options == {}  # local folder: none needed


@pytest.mark.parametrize(
    "options",
    [
        {"key": "AKIA...", "endpoint_url": "http://minio:9000"},
        {"secret": "x"},
        {"client_kwargs": {"aws_secret_access_key": "x"}},
        {"account_key": "x"},
        {"sas_token": "x"},
        {"connection_string": "x"},
    ],
)
def test_credentials_in_exchange_options_are_refused_with_a_fix(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as err:
        parse_federation(_fed(exchange_options=options), source="configs/x.yaml")
    text = str(err.value)
    assert "configs/x.yaml" in text and "parameters.federation.exchange_options" in text
    assert "look like credentials" in text and "Fix: give the exchange credentials" in text


def test_retry_settings_in_exchange_options_tune_the_store_not_fsspec() -> None:
    options = {"endpoint_url": "http://minio.internal:9000", "retry": {"attempts": 8}}
    ex = federation_exchange(parse_federation(_fed(exchange_options=options)))
    assert ex.retry.attempts == 8
    assert ex.fs.storage_options == {"endpoint_url": "http://minio.internal:9000"}
