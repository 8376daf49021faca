"""Typed configuration of a federation.

The run configuration (`configs/*.yaml`) carries one pipeline parameter, `federation`, whose value
is validated here before anything runs. Validation errors are turned into messages that name the
file, the field path as written in YAML and the fix, because the people editing these files are
platform engineers, not readers of pydantic tracebacks.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cloudfed.aggregation.settings import AggregationSettings
from cloudfed.deadlines import StageDeadlines
from cloudfed.errors import ConfigError
from cloudfed.locations import AnyPath, location
from cloudfed.privacy.settings import PrivacySettings

PARTY_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
BUILTIN_TINY_LLAMA = "builtin:tiny-llama"
# Option names that carry credentials: the run configuration is read by the launcher and logged.
_SECRET_OPTION = re.compile(
    r"secret|password|passwd|token|credential|connection_string|authori[sz]ation|cookie|"
    r"api[-_]?key|(^|[-_])(key|sas)$"
)
# `scheme://user:password@host/...`: a location string that carries its own login.
# (Azure's abfs://container@account... has no password: a place, not a login.)
_URL_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@:]*:[^/@]*@")


def no_login_in_url(url: str, field: str) -> str:
    """A location names where, never who: userinfo in a URL is a credential in the run config."""
    if _URL_USERINFO.match(url.strip()):
        raise ValueError(
            f"{field} {re.sub(r'//[^/@]*@', '//***@', url)} carries a login (user:password@); "
            "the run configuration is seen by the launcher and logged. Fix: drop it from the URL "
            "and give the runtime its credentials (role, workload identity, environment)"
        )
    return url


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Party steps that read the party's rows or load the model: run on its `step_operator`.
HEAVY_PARTY_STEPS = frozenset({"harmonize", "train", "evaluate"})


def _option_names(doc: Any) -> list[str]:
    if not isinstance(doc, dict):
        return []
    return [str(k) for k in doc] + [n for v in doc.values() for n in _option_names(v)]


def no_credentials(options: dict[str, Any] | None, field: str) -> dict[str, Any] | None:
    """Fsspec options of a location may say where (endpoint, region), never who (credentials)."""
    secret = sorted({n for n in _option_names(options) if _SECRET_OPTION.search(n.lower())})
    if secret:
        raise ValueError(
            f"{field} {secret} look like credentials; the run configuration is seen by the "
            "launcher and logged. Fix: give each runtime its credentials (role, environment)"
        )
    return options


class RawSplits(_Strict):
    """Where a party's raw export lies; the held-out split never trains."""

    train: str
    eval: str

    @field_validator("train", "eval")
    @classmethod
    def _no_login(cls, url: str, info: Any) -> str:
        return no_login_in_url(url, f"raw.{info.field_name}")


class PartyConfig(_Strict):
    """One organisation in one cloud."""

    name: str = Field(pattern=PARTY_NAME_PATTERN)
    cloud: str = "local"
    raw: RawSplits
    mapping: str
    # A folder, file:// or fsspec URL (s3://, gs://, abfs://) in the party's own cloud.
    storage: str
    # fsspec options of `storage` (endpoint_url, region...); credentials come from the runtime.
    storage_options: dict[str, Any] = Field(default_factory=dict)
    # fsspec options of raw.train / raw.eval when they are URLs; null: storage_options.
    raw_options: dict[str, Any] | None = None
    # Training, harmonisation and evaluation, which load the party's rows or the model, run here
    # (e.g. a GPU SageMaker/Vertex/AzureML job).
    step_operator: str | None = None
    # The party's protocol stages (share_keys, upload, unmask, CKKS keys and decryption): short
    # and CPU-only, e.g. a Kubernetes pod in the party's own cluster; null: step_operator. See
    # `step_operator_for`.
    light_step_operator: str | None = None
    # The party's own prebuilt image (in its cloud's registry) for its steps on a step operator;
    # null: the pipeline's image. ZenML builds images for a dynamic pipeline's steps only from
    # the pipeline's settings, so a per-party image must be prebuilt (pipelines/_images.py).
    image: str | None = None
    # A party with less compute trains a lower LoRA rank (1..lora.rank); null: lora.rank.
    lora_rank: int | None = Field(None, ge=1)
    # Public link speed in Mbit/s; read by the bandwidth-aware weighting presets only.
    bandwidth_mbps: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    # Public: how many times slower than a reference party this party trains (virtual clock of
    # buffered rounds, cloudfed.aggregation.fedbuff); never measured, so never data-dependent.
    compute_scale: float = Field(1.0, gt=0.0, le=10_000.0)

    @field_validator("storage_options", "raw_options")
    @classmethod
    def _no_credentials(cls, options: dict[str, Any] | None, info: Any) -> dict[str, Any] | None:
        return no_credentials(options, info.field_name)

    @field_validator("storage")
    @classmethod
    def _no_login(cls, url: str) -> str:
        return no_login_in_url(url, "storage")

    @property
    def raw_storage_options(self) -> dict[str, Any]:
        return self.storage_options if self.raw_options is None else self.raw_options

    def step_operator_for(self, step: str) -> str | None:
        """The step operator of one of this party's steps (`harmonize` or a round stage's name).

        Only the steps that read the party's rows or load the model need its training machine;
        every other party step is a few milliseconds of cryptography (README, "Step cost on
        cloud step operators"), which a light operator in the same cloud launches faster.
        """
        if step in HEAVY_PARTY_STEPS:
            return self.step_operator
        return self.light_step_operator or self.step_operator


class LoraSettings(_Strict):
    rank: int = Field(8, gt=0, le=1024)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1
    )


class TrainingSettings(_Strict):
    local_steps: int = Field(20, gt=0)
    batch_size: int = Field(8, gt=0)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    max_seq_len: int = Field(128, ge=16, le=32768)
    weight_decay: float = Field(0.0, ge=0.0)
    eval_batch_size: int = Field(16, gt=0)
    max_eval_rows: int = Field(256, gt=0)


ProtectionMode = Literal["secagg", "ckks", "plaintext"]
DropoutStage = Literal["train", "advertise", "share_keys", "upload", "unmask"]


class SecAggSettings(_Strict):
    """Secure aggregation (Bonawitz et al. 2017 with SecAgg+ neighbourhoods)."""

    # Shares needed to rebuild one party's secrets; null: two thirds of its neighbourhood.
    threshold: int | None = Field(None, ge=1)
    # Masking neighbours per party (k); null: everyone up to complete_graph_up_to, else ~2 log2 n.
    neighbours: int | None = Field(None, ge=1)
    complete_graph_up_to: int = Field(10, ge=2)
    # Values are clipped to [-clip, clip] before quantisation (the fraction clipped is reported).
    clip: float = Field(0.5, gt=0.0)
    # Bits per party; null: 32 - ceil(log2 n), the widest width whose n-party sum cannot wrap.
    bits: int | None = Field(None, ge=2, le=31)


class CkksSettings(_Strict):
    """CKKS homomorphic aggregation (TenSEAL); one party holds the decryption key."""

    key_party: str | None = None  # null: the first participating party
    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: list[int] = Field(default_factory=lambda: [60, 40, 40, 60])
    global_scale_bits: int = Field(40, ge=20, le=60)
    workers: int = Field(2, ge=1, le=64)


class ProtectionRule(_Strict):
    pattern: str = Field(min_length=1)  # fnmatch on the adapter tensor name
    mode: ProtectionMode


class ProtectionSettings(_Strict):
    """Which protection each adapter tensor gets; the first matching rule wins."""

    default: ProtectionMode = "secagg"
    rules: list[ProtectionRule] = Field(default_factory=list)
    # Tensors a federation agrees to reveal per party; only these may use `plaintext`.
    public_tensors: list[str] = Field(default_factory=list)
    # A party's weight is min(examples, weight_cap) / weight_cap, aggregated under protection.
    weight_cap: int = Field(1000, ge=1)
    secagg: SecAggSettings = SecAggSettings()
    ckks: CkksSettings = CkksSettings()


class FederationConfig(_Strict):
    """A whole federation: who takes part, what model, how many rounds."""

    federation_id: str = Field(pattern=PARTY_NAME_PATTERN)
    base_model: str = BUILTIN_TINY_LLAMA
    model_cache: str = ".cloudfed/models"
    exchange: str = ".cloudfed/exchange"
    # fsspec storage options of the exchange, e.g. {endpoint_url: ..., client_kwargs: {...}} for
    # an S3-compatible store; credentials come from the runtime (role, env), never from here.
    exchange_options: dict[str, Any] = Field(default_factory=dict)
    coordinator_storage: str = ".cloudfed/coordinator"
    # fsspec options of coordinator_storage when it is a URL; never credentials.
    coordinator_storage_options: dict[str, Any] = Field(default_factory=dict)
    contracts_dir: str = "data_contracts"
    # The federation's total: a run continues after the last published round and stops here.
    rounds: int = Field(3, ge=1, le=10_000)
    # Start from the base model in a new generation instead of continuing (budgets carry on).
    start_over: bool = False
    # A lock whose holder runs elsewhere and has not beaten for this long is taken over.
    lock_timeout_minutes: float = Field(360, gt=0)
    # One accepted update would make global(r+1) - global(r) that party's plaintext update.
    min_parties: int = Field(2, ge=2)
    seed: int = 0
    participants: list[str] | None = None
    training: TrainingSettings = TrainingSettings()
    lora: LoraSettings = LoraSettings()
    protection: ProtectionSettings = ProtectionSettings()
    privacy: PrivacySettings = PrivacySettings()
    aggregation: AggregationSettings = AggregationSettings()
    # Seconds each party stage may take; a party still running then is dropped from the round.
    deadlines: StageDeadlines = StageDeadlines()
    # Simulation only: make a party fail at a stage of every round (to rehearse dropout recovery).
    simulate_dropouts: dict[str, DropoutStage] = Field(default_factory=dict)
    parties: list[PartyConfig] = Field(min_length=1)

    @field_validator("exchange_options", "coordinator_storage_options")
    @classmethod
    def _no_credentials(cls, options: dict[str, Any], info: Any) -> dict[str, Any]:
        return no_credentials(options, info.field_name) or {}

    @field_validator("exchange", "coordinator_storage")
    @classmethod
    def _no_login(cls, url: str, info: Any) -> str:
        return no_login_in_url(str(url), str(info.field_name))

    @model_validator(mode="after")
    def _check_parties(self) -> FederationConfig:
        names = [p.name for p in self.parties]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"party names must be unique; repeated: {dupes}")
        unknown = sorted(set(self.participants or []) - set(names))
        if unknown:
            raise ValueError(
                f"participants names unknown part{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                f"known parties are {names}"
            )
        if self.min_parties > len(self.active_parties):
            raise ValueError(
                f"min_parties={self.min_parties} exceeds the {len(self.active_parties)} "
                "participating parties"
            )
        unknown_drop = sorted(set(self.simulate_dropouts) - set(names))
        if unknown_drop:
            raise ValueError(f"simulate_dropouts names unknown parties {unknown_drop}")
        key_party = self.protection.ckks.key_party
        if key_party is not None and key_party not in names:
            raise ValueError(f"protection.ckks.key_party {key_party!r} is not one of {names}")
        self._check_privacy(names)
        self._check_buffer()
        self._check_ranks()
        return self

    def _check_ranks(self) -> None:
        from cloudfed.aggregation.ranks import federation_edges, thin_bands

        for i, p in enumerate(self.parties):
            if p.lora_rank is not None and p.lora_rank > self.lora.rank:
                raise ValueError(
                    f"parties[{i}].lora_rank={p.lora_rank} ({p.name}) exceeds lora.rank="
                    f"{self.lora.rank}, the global adapter's rank: set parties[{i}].lora_rank to "
                    f"at most {self.lora.rank} (or null for {self.lora.rank}), or raise lora.rank"
                )
        ranks = [p.lora_rank or self.lora.rank for p in self.active_parties]
        thin = thin_bands(federation_edges(self), ranks, self.min_contributors)
        if thin:
            raise ValueError(
                f"parties[].lora_rank: LoRA rank band(s) {'; '.join(thin)} would be summed over "
                f"fewer than {self.min_contributors} parties (min_parties/min_contributors), so "
                "that band of the aggregate would be one party's update: have at least "
                f"{self.min_contributors} parties at or above every rank in use (e.g. lower a "
                "lone higher-rank party to the next rank below)"
            )

    @model_validator(mode="after")
    def _check_weighting(self) -> FederationConfig:
        from cloudfed.aggregation.weights import check_federation

        check_federation(self)
        return self

    def _check_buffer(self) -> None:
        buffer = self.aggregation.buffer
        if buffer is not None and not self.min_contributors <= buffer.size <= len(
            self.active_parties
        ):
            raise ValueError(
                f"aggregation.buffer.size={buffer.size} must lie between "
                f"{'privacy.min_contributors' if self.privacy.min_contributors else 'min_parties'}"
                f"={self.min_contributors} (each buffer is one secure-aggregation round) and the "
                f"{len(self.active_parties)} participating parties"
            )

    def _check_privacy(self, names: list[str]) -> None:
        privacy = self.privacy
        unknown_dp = sorted(set(privacy.dp_sgd) - set(names))
        if unknown_dp:
            raise ValueError(f"privacy.dp_sgd names unknown parties {unknown_dp}")
        modes = {self.protection.default, *(r.mode for r in self.protection.rules)}
        if privacy.mode == "central" and "ckks" in modes:
            raise ValueError(
                "privacy.mode central adds the noise after the coordinator has the sum, but a "
                "CKKS sum is decrypted by the key party and released to the coordinator without "
                "it. Use mode distributed (each party noises before encrypting) or secagg"
            )
        if privacy.mode == "distributed":
            if "plaintext" in modes:
                raise ValueError(
                    "privacy.mode distributed adds each party's noise inside secure aggregation "
                    "or CKKS; plaintext tensors would be released un-noised per party. Use "
                    "secagg/ckks for every tensor, or mode central"
                )
        m = privacy.min_contributors
        if m is not None and not self.min_parties <= m <= len(self.active_parties):
            raise ValueError(
                f"privacy.min_contributors={m} must lie between min_parties={self.min_parties} "
                f"and the {len(self.active_parties)} participating parties"
            )
        if privacy.mode == "distributed" and privacy.colluding >= self.min_contributors:
            raise ValueError(
                f"privacy.colluding={privacy.colluding} must be below min_contributors="
                f"{self.min_contributors}: with that many co-contributors pooling their noise "
                "shares no honest share is left"
            )

    @property
    def min_contributors(self) -> int:
        """Fewest updates a round may aggregate; distributed noise is sized for this many."""
        return self.privacy.min_contributors or self.min_parties

    @property
    def ckks_key_party(self) -> str:
        """Who alone can decrypt CKKS sums; must not collude with the coordinator."""
        return self.protection.ckks.key_party or self.active_parties[0].name

    @property
    def active_parties(self) -> list[PartyConfig]:
        wanted = set(self.participants) if self.participants else None
        return [p for p in self.parties if wanted is None or p.name in wanted]

    @property
    def coordinator_root(self) -> AnyPath:
        """The coordinator's storage (a folder or an object-store prefix); its keys live here."""
        return location(self.coordinator_storage, self.coordinator_storage_options)

    @property
    def coordinator_dir(self) -> AnyPath:
        """The coordinator's files of this federation (ledger, last run); keys are shared."""
        return self.coordinator_root / self.federation_id

    def party(self, name: str) -> PartyConfig:
        for p in self.parties:
            if p.name == name:
                return p
        raise ConfigError(
            f"unknown party {name!r}; known parties: {[p.name for p in self.parties]}"
        )

    def fingerprint(self) -> str:
        """Hash of the settings, bound into sealed metadata so parties and coordinator agree."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


_FIXES: dict[str, str] = {
    "learning_rate": "use a positive learning rate such as 0.001",
    "rounds": "set rounds to a whole number of at least 1",
    "min_parties": "use at least 2 (one party's aggregate is its own update) and at most the "
    "number of participating parties",
    "aggregation": "see README.md's 'Server optimisers and FedProx' for the strategies and "
    "their params",
    "participants": "list only names that appear under parties[].name",
    "parties": "give each party a unique lowercase name with raw, mapping and storage",
    "name": "use lowercase letters, digits and '-' (e.g. hospital-aws)",
    "rank": "use a LoRA rank between 1 and 1024",
    "lora_rank": "use a party LoRA rank between 1 and lora.rank, or null for lora.rank",
    "local_steps": "set local_steps to at least 1",
    "batch_size": "set batch_size to at least 1",
    "mode": "use one of secagg, ckks or plaintext",
    "default": "use one of secagg, ckks or plaintext",
    "clip": "use a positive clipping range such as 0.5",
    "key_party": "name one of the parties under parties[].name",
    "target_epsilon": "use a positive epsilon such as 8.0, or give noise_multiplier instead",
    "max_epsilon": "use a positive, finite budget such as 8.0",
    "delta": "use a delta strictly between 0 and 1, well below 1/records (e.g. 1e-5)",
    "noise_multiplier": "use a positive noise multiplier such as 1.0",
    "size": "use a buffer size between min_parties and the number of parties",
    "compute_scale": "use a positive slowdown factor such as 1.0 (reference) or 5.0",
    "max_staleness": "use a whole number of versions, at least 0 (e.g. 4)",
    "min_contributors": "use a count between min_parties and the number of parties",
    "colluding": "use at least 1 and fewer than min_contributors (default 1)",
    "privacy": "see the privacy block of configs/local.yaml",
    "dp_sgd": "see the dp_sgd example in configs/local.yaml",
    "deadlines": "give seconds per party stage: train, share_keys, upload, unmask, evaluate",
    "storage_options": "give the storage credentials through the party's runtime (an IAM role, "
    "workload identity, AWS_* / GOOGLE_APPLICATION_CREDENTIALS / AZURE_* in its environment), "
    "and keep only options such as endpoint_url here",
    "coordinator_storage_options": "give the coordinator storage credentials through its "
    "runtime (an IAM role, workload identity, environment variables), and keep only options "
    "such as endpoint_url here",
    "exchange_options": "give the exchange credentials through its runtime (an IAM role, "
    "workload identity, AWS_ACCESS_KEY_ID / GOOGLE_APPLICATION_CREDENTIALS / AZURE_* in the "
    "environment), and keep only options such as endpoint_url here",
}


def _format_loc(prefix: str, loc: tuple[Any, ...]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _model_of(node: Any) -> Any:
    """`X | None` (an optional block) stands for X."""
    if get_origin(node) in (Union, types.UnionType):
        return next((a for a in get_args(node) if a is not type(None)), None)
    return node


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys the configuration accepts where `loc` points, by walking the models' fields."""
    node: Any = FederationConfig
    for part in loc:
        node = _model_of(node)
        if inspect.isclass(node) and issubclass(node, BaseModel):
            field = node.model_fields.get(part) if isinstance(part, str) else None
            node = field.annotation if field else None
        elif get_origin(node) in (list, dict):  # an index, or a name as in dp_sgd.<party>
            node = get_args(node)[-1]
        else:
            return []
    node = _model_of(node)
    return list(node.model_fields) if inspect.isclass(node) and issubclass(node, BaseModel) else []


def closest_key(key: str, loc: tuple[Any, ...]) -> str | None:
    """A misspelt key's likely intent, so the fix can say which key was meant."""
    match = difflib.get_close_matches(key, _keys_at(loc), n=1, cutoff=0.6)
    return match[0] if match else None


def format_validation_error(exc: ValidationError, *, source: str, prefix: str) -> str:
    """Render pydantic errors as `file: field.path: problem (got X). Fix: ...` lines."""
    lines = [f"{source}: the federation configuration is invalid:"]
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        field = _format_loc(prefix, loc)
        key = next((str(p) for p in reversed(loc) if isinstance(p, str)), "")
        got = err.get("input")
        got_txt = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        if isinstance(got, str) and _URL_USERINFO.match(got.strip()):
            got_txt = ""  # the value holds a login: the message names the field, never echoes it
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            meant = closest_key(key, loc[:-1])
            fix = (
                f"did you mean '{meant}'? Rename '{key}' to '{meant}'"
                if meant
                else f"remove '{key}' or correct its spelling"
            )
        elif err.get("type") == "missing":
            fix = f"add '{key}'"
        elif "deadlines" in loc and key != "deadlines":
            fix = "use a positive number of seconds, at most 604800 (a week)"
        else:
            fix = _FIXES.get(key, f"correct '{key}' in {source}" if key else "see the message")
        if "Fix:" in msg:  # the validator says how to fix it, unless a field-specific fix exists
            if key not in _FIXES:
                lines.append(f"  - {field}: {msg}{got_txt}")
                continue
            msg = msg.split(". Fix:")[0]
        lines.append(f"  - {field}: {msg}{got_txt}. Fix: {fix}.")
    return "\n".join(lines)


def parse_federation(
    raw: Any, *, source: str = "the run configuration", prefix: str = "parameters.federation"
) -> FederationConfig:
    """Validate the `federation` parameter; raise `ConfigError` with a readable message."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: {prefix} must be a mapping of settings, got {type(raw).__name__}. "
            "Fix: see configs/local.yaml for the expected shape."
        )
    try:
        return FederationConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=source, prefix=prefix)) from None


def load_run_config(path: str | Path) -> FederationConfig:
    """Read a `zenml pipeline run -c` file and validate its federation parameter."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: run configuration not found. Fix: pass an existing file to -c.")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{path}: not valid YAML ({exc}). Fix: correct the YAML syntax."
        ) from None
    params = doc.get("parameters") if isinstance(doc, dict) else None
    if not isinstance(params, dict) or "federation" not in params:
        typos = [
            f"did you mean '{want}'? Rename '{found}' to '{want}'."
            for keys, want in ((doc, "parameters"), (params, "federation"))
            if isinstance(keys, dict)
            for found in difflib.get_close_matches(want, [str(k) for k in keys], n=1)
            if found != want
        ]
        fix = (
            typos[0] if typos else "add a 'parameters: federation:' block as in configs/local.yaml."
        )
        raise ConfigError(f"{path}: parameters.federation is missing. Fix: {fix}")
    return parse_federation(params["federation"], source=str(path))
