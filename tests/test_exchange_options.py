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


@pytest.mark.parametrize(
    ("where", "value", "named"),
    [
        ("raw_options", {"headers": {"Authorization": "Bearer s3cr3t"}}, "Authorization"),
        ("storage_options", {"client_kwargs": {"headers": {"x-api-key": "s"}}}, "x-api-key"),
        ("storage_options", {"headers": {"Cookie": "session=s"}}, "Cookie"),
        ("raw", {"train": "sftp://u:s3cr3t@host/t.csv", "eval": "e.csv"}, "raw.train"),
        ("storage", "s3://AKIAX:s3cr3t@bucket/party", "storage"),
    ],
)
def test_a_login_in_a_header_option_or_a_location_url_is_refused(
    where: str, value: Any, named: str
) -> None:
    """The launcher reads and logs the run config: a login hidden in an HTTP header option or in
    a URL's userinfo is as much a credential as `secret_access_key` (storage review, finding 5)."""
    fed = _fed()
    fed["parties"][0][where] = value
    with pytest.raises(ConfigError, match=named) as err:
        parse_federation(fed)
    assert "s3cr3t" not in str(err.value)  # the refusal itself must not log the secret


@pytest.mark.parametrize("field", ["exchange", "coordinator_storage"])
def test_a_login_in_the_exchange_or_coordinator_url_is_refused(field: str) -> None:
    with pytest.raises(ConfigError, match=rf"{field} s3://\*\*\*@bucket/x carries a login"):
        parse_federation(_fed(**{field: "s3://key:s3cr3t@bucket/x"}))


def test_ordinary_fsspec_options_are_not_mistaken_for_credentials() -> None:
    options = {
        "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"region_name": "eu-west-1"},
        "config_kwargs": {"retries": {"max_attempts": 3}},
        "s3_additional_kwargs": {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/x"},
        "account_name": "insurerdata",
        "anon": False,
    }
    fed = _fed()
    fed["parties"][0]["storage_options"] = options
    assert parse_federation(fed).parties[0].storage_options == options


def test_retry_settings_in_exchange_options_tune_the_store_not_fsspec() -> None:
    options = {"endpoint_url": "http://minio.internal:9000", "retry": {"attempts": 8}}
    ex = federation_exchange(parse_federation(_fed(exchange_options=options)))
    assert ex.retry.attempts == 8
    assert ex.fs.storage_options == {"endpoint_url": "http://minio.internal:9000"}
