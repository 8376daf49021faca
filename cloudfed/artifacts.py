"""The typed values that flow between steps, and so into the coordinator's artifact store.

Each one is a reference, a hash or a number: by construction none can hold a record or a single
party's plaintext update, which is what keeps the privacy invariant checkable.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Ref(BaseModel):
    model_config = ConfigDict(frozen=True)


class FederationPlan(_Ref):
    """What the coordinator fixed before round 1 and every party must agree on."""

    federation_id: str
    run_id: str
    fingerprint: str
    parties: list[str]
    rounds: int  # the federation's total: this run trains rounds start_round+1 .. rounds
    min_parties: int
    base_model: str
    coordinator_fingerprint: str
    initial_adapter: GlobalAdapterRef  # the last published round's adapter (round start_round)
    start_round: int = 0  # 0 for a new federation; the last published round when continuing
    generation: int = 1  # start_over opens a new generation of round records
    adapter_parameters: int
    # Layout summary: mode label, policy hash, tensors and values per mode.
    protection: dict[str, Any] = Field(default_factory=dict)


class GlobalAdapterRef(_Ref):
    """The global LoRA adapter after `round` (0 = initial), published on the exchange."""

    round: int
    key: str
    sha256: str
    bytes: int
    run_id: str = ""  # the pipeline run that published it (parties key their DP-SGD spend on it)


class LocalUpdateRef(_Ref):
    """A party's plaintext update, by reference: the file stays in the party's storage.

    `sha256` is the party's keyed digest (HMAC under its own key) of the file, not its plain hash,
    and `train` holds only what the release rules let out: every training metric without DP, the
    party's DP-SGD epsilon and delta under DP. Its example count never leaves the party.
    """

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    party: str
    round: int
    uri: str
    sha256: str
    base_sha256: str
    train: dict[str, float | int | str]


class SealedUpdateRef(_Ref):
    """A sealed update on the exchange: only ciphertext, its size and public metadata."""

    party: str
    round: int
    key: str
    bytes_sent: int
    plaintext_bytes: int
    seal_seconds: float
    sender_fingerprint: str


class StageRef(_Ref):
    """A party's message of one protocol stage on the exchange (sealed or signed)."""

    party: str
    round: int
    stage: str
    key: str
    sha256: str
    bytes: int
    fingerprint: str
    seconds: float


class SecAggRoster(_Ref):
    """The coordinator's signed view of who is still in the round after a stage."""

    round: int
    stage: str
    key: str
    sha256: str
    parties: list[str]
    shared: list[str] = Field(default_factory=list)
    uploaded: list[str] = Field(default_factory=list)
    rejected: list[Rejection] = Field(default_factory=list)
    neighbours: int
    threshold: int


class CkksKeyRef(_Ref):
    """The key party's public CKKS context (no secret key), signed, on the exchange."""

    party: str
    round: int
    key: str
    sha256: str
    fingerprint: str
    bytes: int


class Rejection(_Ref):
    party: str
    reason: str


class AggregateReport(_Ref):
    round: int
    accepted: list[str]
    rejected: list[Rejection] = Field(default_factory=list)
    weights: dict[str, float]
    bytes_received: int
    seconds: float
    update_norm: float
    protection_mode: str = ""
    policy_sha256: str = ""
    weight_sum: float = 0.0
    clipped_values: int = 0
    secagg: dict[str, float] = Field(default_factory=dict)
    ckks: dict[str, float] = Field(default_factory=dict)
    # Party-level DP of the round: noise, clip, fraction clipped, epsilon after it (per party too).
    privacy: dict[str, Any] = Field(default_factory=dict)
    # The strategy's server state after the round (stored signed beside the adapter) and the
    # strategy's diagnostics; becomes the round record's AggregationState.
    aggregation: dict[str, Any] = Field(default_factory=dict)


class PartyEval(_Ref):
    party: str
    round: int
    loss: float
    perplexity: float
    tokens: int
    examples: int
    seconds: float


class EvalRelease(_Ref):
    """What an evaluate step lets out: the party's metrics (no DP) or its masked share of a sum.

    Under any DP, `metrics` is None and `sealed_key` points at the party's masked, sealed metrics
    on the exchange, which the coordinator can only add up with every other evaluator's.
    """

    party: str
    round: int
    model_sha256: str
    evaluators: list[str]
    seconds: float
    metrics: PartyEval | None = None
    sealed_key: str | None = None
    sealed_sha256: str | None = None
    fingerprint: str = ""


FederationPlan.model_rebuild()
SecAggRoster.model_rebuild()
