"""What a comparison is: arms as data, seeds, splits, targets; validated before anything runs."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from cloudfed.errors import ConfigError
from cloudfed.federation import PARTY_NAME_PATTERN, parse_federation

SplitName = Literal["non-iid", "iid"]
ArmKind = Literal["federated", "local-only", "centralised"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArmSpec(_Strict):
    """One method of the table: a kind of run and the overrides merged into the federation."""

    name: str = Field(pattern=PARTY_NAME_PATTERN)
    kind: ArmKind = "federated"
    overrides: dict[str, Any] = Field(default_factory=dict)
    note: str = ""


class DemoData(_Strict):
    """Where `cloudfed.data.demo` writes the raw exports when a party's file is missing."""

    out: str = ".cloudfed/clouds"
    seed: int = 0
    train_rows: int = 240
    eval_rows: int = 60


class Targets(_Strict):
    """The issue's claims, as ratios."""

    iid_vs_centralised: float = 1.05  # federated / centralised eval loss on IID, at most
    protected_vs_plaintext: float = 0.97  # best cloudfed arm / fedavg-plaintext, non-IID, at most
    local_improvement: float = 0.10  # federated vs local-only, lower eval loss per party, at least
    # asynchronous arm's virtual time to reach the synchronous arm's final eval loss, over the
    # synchronous arm's virtual time (one 5x-slow party), at most
    async_time_vs_sync: float = 0.6


class ComparisonSpec(_Strict):
    """The `comparison` parameter of `configs/compare.yaml`."""

    federation: dict[str, Any]
    arms: list[ArmSpec] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    splits: list[SplitName] = Field(default_factory=lambda: ["non-iid", "iid"], min_length=1)
    iid_seed: int = 0
    work_dir: str = ".cloudfed/comparison/work"
    out_dir: str = ".cloudfed/comparison"
    experiment: str = "cloudfed-comparison"
    demo_data: DemoData | None = None
    plaintext_arm: str = "fedavg-plaintext"  # the traditional-FL reference of the targets
    cloudfed_prefix: str = "cloudfed-"  # arms that count as "cloudfed configurations"
    sync_arm: str = "cloudfed-hybrid-examples"  # synchronous FedAvg under secure aggregation
    async_arm: str = "cloudfed-async-fedbuff"  # buffered rounds (FedBuff) on the same clock
    targets: Targets = Targets()

    def arm(self, name: str) -> ArmSpec:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f"comparison: no arm named {name!r}")


def parse_spec(raw: Any, *, source: str = "the run configuration") -> ComparisonSpec:
    """Validate `parameters.comparison`, every arm's federation config included, up front.

    A misspelt override would otherwise fail only when its arm's turn comes, minutes in.
    """
    from pydantic import ValidationError

    from cloudfed.federation import format_validation_error

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: parameters.comparison is missing (see configs/compare.yaml)")
    try:
        spec = ComparisonSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            format_validation_error(exc, source=source, prefix="parameters.comparison")
        ) from None
    for arm in spec.arms:
        fed = federation_for(spec, "check", Path("."), **arm.overrides)
        parse_federation(fed, source=source, prefix=f"arms[{arm.name}].overrides")
    return spec


def load_spec(path: str | Path) -> ComparisonSpec:
    """Read `parameters.comparison` of a run configuration."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: run configuration not found. Fix: pass an existing file.")
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return parse_spec((doc.get("parameters") or {}).get("comparison"), source=str(path))


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`overrides` onto `base`; mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def federation_for(spec: ComparisonSpec, fed_id: str, run_dir: Path, **overrides: Any) -> dict:
    """The base federation, isolated under `run_dir`: its own exchange, coordinator, storage."""
    fed = deep_merge(spec.federation, overrides)
    fed.update(
        federation_id=fed_id,
        exchange=str(run_dir / "exchange"),
        coordinator_storage=str(run_dir / "coordinator"),
        parties=[
            {**p, "storage": str(run_dir / "clouds" / p["name"])} for p in fed.get("parties", [])
        ],
    )
    return fed
