"""What a party releases about its harmonised data: a reference and aggregates, never rows.

A `DatasetRef` is the only thing the harmonise step returns, so it is what reaches the
coordinator's artifact store. Everything in it must be safe to publish: paths inside the party's
own storage, hashes, counts and the names of expectations, no record content.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ValidationSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    suite: str
    success: bool
    evaluated: int
    successful: int
    failed_expectations: list[str] = Field(default_factory=list)


class DatasetRef(BaseModel):
    """Harmonised train and held-out splits of one party, by reference."""

    model_config = ConfigDict(frozen=True)

    party: str
    train_uri: str
    eval_uri: str
    train_sha256: str
    eval_sha256: str
    rows_read: int
    rows_accepted: int
    rows_quarantined: int
    rows_train: int
    rows_eval: int
    quarantine_uri: str
    quarantine_reasons: dict[str, int] = Field(default_factory=dict)
    pii_replaced: dict[str, int] = Field(default_factory=dict)
    contract_sha256: str
    validation: ValidationSummary
