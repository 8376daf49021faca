"""What a party releases about its harmonised data: a reference and aggregates, never rows.

A `DatasetRef` is the only thing the harmonise step returns, so it is what reaches the
coordinator's artifact store. Everything in it must be safe to publish: paths inside the party's
own storage, hashes, counts, coarse histograms and the names of expectations, no record content.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Upper bounds (tokens) of the released length histograms; coarse on purpose: a histogram with
# one-token bins over few rows could single out a record.
LENGTH_BINS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)
# What became of a party's harmonisation. config-error: a file the run configuration names is
# missing or does not fit the party (the run stops); data-failed: the rows fail their contract or
# cannot be read (the party is excluded); refused: the party declines this run under its policy.
HarmonizeStatus = Literal["ok", "config-error", "data-failed", "refused"]


class ValidationSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    suite: str
    success: bool
    evaluated: int
    successful: int
    failed_expectations: list[str] = Field(default_factory=list)


class ExpectationOutcome(BaseModel):
    """One expectation on one split: verdict and counts (no values, no row numbers)."""

    model_config = ConfigDict(frozen=True)

    suite: str
    split: str
    expectation: str
    on_failure: str
    success: bool
    evaluated: int
    unexpected: int


class LengthHistogram(BaseModel):
    """Token lengths in `LENGTH_BINS` (last count: longer than the last bound)."""

    model_config = ConfigDict(frozen=True)

    bins: list[int] = Field(default_factory=lambda: list(LENGTH_BINS))
    counts: list[int] = Field(default_factory=lambda: [0] * (len(LENGTH_BINS) + 1))
    total_tokens: int = 0

    @property
    def rows(self) -> int:
        return sum(self.counts)

    @property
    def mean(self) -> float:
        return self.total_tokens / self.rows if self.rows else 0.0

    def quantile_bound(self, q: float) -> int | None:
        """The bin bound under which at least ``q`` of the rows fall (None: above the last)."""
        need, seen = q * self.rows, 0
        for bound, count in zip([*self.bins, None], self.counts, strict=True):
            seen += count
            if seen >= need and self.rows:
                return bound
        return None


class DataProfile(BaseModel):
    """Aggregates of the accepted rows that a party releases for the cross-party report."""

    model_config = ConfigDict(frozen=True)

    columns: dict[str, str]
    rows: dict[str, int]
    instruction_tokens: LengthHistogram
    response_tokens: LengthHistogram
    domains: dict[str, int]
    tasks: dict[str, int]


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
    rows_repaired: int = 0
    contract_sha256: str
    canonical_sha256: str = ""
    validation: ValidationSummary
    expectations: list[ExpectationOutcome] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    profile: DataProfile | None = None
    docs_uri: str = ""
    # Under DP the party releases a redacted copy: counts, profile and expectation outcomes stay
    # in its storage, and the two sha256 fields are its keyed digests (see protection.commitments).
    redacted: bool = False
    # The outcome travels in the artifact, not as an exception type: a step that failed on a
    # remote step operator reaches the pipeline without its type, yet a configuration error must
    # stop the run where a contract failure only excludes the party.
    status: HarmonizeStatus = "ok"
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def unavailable(party: str, status: HarmonizeStatus, message: str) -> DatasetRef:
    """A reference to no data that says why: empty paths and digests, no counts."""
    return DatasetRef(
        party=party,
        train_uri="",
        eval_uri="",
        train_sha256="",
        eval_sha256="",
        rows_read=0,
        rows_accepted=0,
        rows_quarantined=0,
        rows_train=0,
        rows_eval=0,
        quarantine_uri="",
        contract_sha256="",
        validation=ValidationSummary(suite="", success=False, evaluated=0, successful=0),
        status=status,
        message=message,
    )


def redact(ref: DatasetRef, train_digest: str, eval_digest: str) -> DatasetRef:
    """What a party releases about its data under DP: paths, keyed digests, contract hashes."""
    return ref.model_copy(
        update={
            "train_sha256": train_digest,
            "eval_sha256": eval_digest,
            "rows_read": 0,
            "rows_accepted": 0,
            "rows_quarantined": 0,
            "rows_train": 0,
            "rows_eval": 0,
            "quarantine_reasons": {},
            "pii_replaced": {},
            "rows_repaired": 0,
            "validation": ValidationSummary(
                suite=ref.validation.suite, success=True, evaluated=0, successful=0
            ),
            "expectations": [],
            "warnings": [],
            "profile": None,
            "redacted": True,
        }
    )
