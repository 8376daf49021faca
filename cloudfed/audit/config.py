"""The audit's own configuration (`configs/audit.yaml`), validated before anything trains.

The audit is a measurement, so a setting that would make its numbers meaningless (a delta of 1, an
epsilon of 0, more canaries than secrets, an MLflow file store) is refused up front with a message
that names the file, the field and the fix, instead of surfacing minutes later as a traceback.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cloudfed.data.demo import MIN_TRAIN_ROWS, PARTIES
from cloudfed.errors import ConfigError
from cloudfed.federation import BUILTIN_TINY_LLAMA, LoraSettings, TrainingSettings

SQLITE_PREFIX = "sqlite:///"
SECRET_FIELD = "{secret}"
NAME_FIELD = "{name}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSettings(_Strict):
    """Which demo parties take part and how many rows each holds (before canaries)."""

    parties: list[str] = Field(default_factory=lambda: list(PARTIES), min_length=2)
    canary_party: str = "hospital-aws"
    train_rows: int = Field(120, ge=MIN_TRAIN_ROWS)
    eval_rows: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _check(self) -> DataSettings:
        unknown = sorted(set(self.parties) - set(PARTIES))
        if unknown:
            raise ValueError(f"parties {unknown} are not demo parties; known: {list(PARTIES)}")
        if len(set(self.parties)) != len(self.parties):
            raise ValueError("parties must not repeat a name")
        if self.canary_party not in self.parties:
            raise ValueError(f"canary_party {self.canary_party!r} is not one of {self.parties}")
        return self


class CanarySettings(_Strict):
    """Secret-sharer canaries: `per_repeat` random secrets inserted r times for each r."""

    per_repeat: int = Field(4, ge=1, le=1000)
    repeats: list[int] = Field(default_factory=lambda: [1, 4, 16], min_length=1)
    instruction: str = Field("Write down the note.", min_length=1)
    # Everything before {secret} is the prefix the secret is ranked after.
    format: str = "the secret code of {name} is {secret}"
    secret_digits: int = Field(6, ge=2, le=12)
    # Random other secrets each canary's loss is ranked among.
    references: int = Field(2000, ge=10, le=1_000_000)

    @field_validator("repeats")
    @classmethod
    def _check_repeats(cls, value: list[int]) -> list[int]:
        if any(r < 1 for r in value) or len(set(value)) != len(value):
            raise ValueError("repeats must be distinct whole numbers of at least 1")
        return sorted(value)

    @field_validator("format")
    @classmethod
    def _check_format(cls, value: str) -> str:
        if value.count(SECRET_FIELD) != 1 or value.count(NAME_FIELD) != 1:
            raise ValueError("format must contain {name} once and {secret} once")
        if value.index(NAME_FIELD) > value.index(SECRET_FIELD):
            raise ValueError("format must name the person before the {secret}")
        try:
            value.format(name="n", secret="s")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"format has a stray placeholder ({exc})") from None
        return value

    @model_validator(mode="after")
    def _check_space(self) -> CanarySettings:
        space = 10**self.secret_digits
        needed = self.references + self.canaries
        if needed > space // 2:
            raise ValueError(
                f"{self.canaries} canaries + {self.references} references need more than half "
                f"of the {space} possible secrets"
            )
        return self

    @property
    def canaries(self) -> int:
        return self.per_repeat * len(self.repeats)

    @property
    def inserted_rows(self) -> int:
        return self.per_repeat * sum(self.repeats)


class DpSettings(_Strict):
    """Record-level DP-SGD for the canary party, one audit arm per target epsilon."""

    target_epsilons: list[float] = Field(default_factory=lambda: [8.0], min_length=1)
    delta: float = 1e-5
    max_grad_norm: float = Field(1.0, gt=0.0)
    accountant: Literal["rdp", "prv"] = "rdp"

    @field_validator("target_epsilons")
    @classmethod
    def _check_epsilons(cls, value: list[float]) -> list[float]:
        for eps in value:
            if not (math.isfinite(eps) and eps > 0):
                raise ValueError(f"epsilon must be a positive finite number, got {eps}")
        if len(set(value)) != len(value):
            raise ValueError("target_epsilons must not repeat a value")
        return value

    @field_validator("delta")
    @classmethod
    def _check_delta(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError("delta must lie strictly between 0 and 1")
        return value


class MlflowSettings(_Strict):
    tracking_uri: str = SQLITE_PREFIX + ".cloudfed/audit/mlflow.db"
    experiment: str = Field("cloudfed-audit", min_length=1)

    @field_validator("tracking_uri")
    @classmethod
    def _check_uri(cls, value: str) -> str:
        if not value.startswith(SQLITE_PREFIX) or len(value) == len(SQLITE_PREFIX):
            raise ValueError("tracking_uri must be an MLflow sqlite store (sqlite:///path.db)")
        return value

    @property
    def db_path(self) -> Path:
        return Path(self.tracking_uri[len(SQLITE_PREFIX) :])


class AuditConfig(_Strict):
    """One canary audit: a small in-process federation trained once per arm."""

    model: str = BUILTIN_TINY_LLAMA
    model_cache: str = ".cloudfed/models"
    out_dir: str = ".cloudfed/audit"
    seed: int = 0
    rounds: int = Field(3, ge=1, le=1000)
    data: DataSettings = DataSettings()
    training: TrainingSettings = TrainingSettings()
    lora: LoraSettings = LoraSettings()
    canaries: CanarySettings = CanarySettings()
    dp: DpSettings = DpSettings()
    mlflow: MlflowSettings = MlflowSettings()


_FIXES: dict[str, str] = {
    "target_epsilons": "list positive epsilons such as [8.0]",
    "delta": "use a delta strictly between 0 and 1, well below 1/records (e.g. 1e-5)",
    "max_grad_norm": "use a positive clipping norm such as 1.0",
    "accountant": "use rdp or prv",
    "repeats": "list distinct repeat counts of at least 1, e.g. [1, 4, 16]",
    "format": "write e.g. 'the secret code of {name} is {secret}'",
    "secret_digits": "use between 2 and 12 digits (6 gives 10^6 possible secrets)",
    "references": "use at least 10 reference secrets, e.g. 2000",
    "per_repeat": "insert at least 1 canary per repeat level",
    "tracking_uri": "use an MLflow sqlite store such as sqlite:///.cloudfed/audit/mlflow.db",
    "parties": f"list at least two of {list(PARTIES)}",
    "canary_party": "name one of the parties under data.parties",
    "train_rows": f"use at least {MIN_TRAIN_ROWS} rows per party",
    "rounds": "use at least 1 round",
    "learning_rate": "use a positive learning rate such as 0.005",
    "rank": "use a LoRA rank between 1 and 1024",
    "local_steps": "set local_steps to at least 1",
    "batch_size": "set batch_size to at least 1",
}


def _field(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".") or "(top level)"


def format_errors(exc: ValidationError, source: str) -> str:
    """`file: field: problem (got X). Fix: ...` per error, for people editing YAML."""
    lines = [f"{source}: the audit configuration is invalid:"]
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        key = next((str(p) for p in reversed(loc) if isinstance(p, str)), "")
        got = err.get("input")
        got_txt = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            fix = f"remove '{key}' or correct its spelling"
        elif err.get("type") == "missing":
            fix = f"add '{key}'"
        else:
            fix = _FIXES.get(key, f"correct '{key}' (see configs/audit.yaml)")
        lines.append(f"  - {_field(loc)}: {msg}{got_txt}. Fix: {fix}.")
    return "\n".join(lines)


def parse_audit_config(raw: Any, *, source: str) -> AuditConfig:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: the audit configuration must be a mapping of settings, got "
            f"{type(raw).__name__}. Fix: see configs/audit.yaml for the expected shape."
        )
    try:
        return AuditConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source)) from None


def load_audit_config(path: str | Path) -> AuditConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: audit configuration not found. Fix: pass an existing file to -c."
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{path}: not valid YAML ({exc}). Fix: correct the YAML syntax."
        ) from None
    return parse_audit_config({} if raw is None else raw, source=str(path))
