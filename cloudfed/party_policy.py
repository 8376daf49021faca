"""A party's own policy: the weakest federation it takes part in, and whose keys it trusts.

Whoever launches the pipeline writes the run configuration, and is not trusted to speak for a
party: a config with `privacy: off`, `min_parties: 2` where the party agreed to 3, or another
coordinator key would otherwise weaken the party's protection silently. So every party step reads
the party's policy from the party's side (an environment variable or folder of the party's
runtime, never a path from the run configuration) and refuses a round that is weaker than it, or
whose coordinator or peer keys are not the ones it pinned. A missing policy refuses too.

    CLOUDFED_PARTY_POLICY_<PARTY>   the policy file of one party (dashes as underscores, upper case)
    CLOUDFED_PARTY_POLICIES         else: a folder holding <party>.yaml
                                    (default .cloudfed/party-policies, the local demo's)

Next to its policy the party keeps its own state (`state_dir`): its record-level DP-SGD ledger,
the newest federation-ledger version it has seen, and which metrics it released for which model.

`python -m cloudfed.party_policy provision CONFIG` writes, for the local demo, one policy per
simulated cloud that accepts exactly that configuration and pins the keys it finds (creating them
once); in a real federation each party writes its own after comparing fingerprints out of band.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cloudfed.aggregation.weights import weight_floor
from cloudfed.errors import CloudfedError, ConfigError
from cloudfed.federation import (
    PARTY_NAME_PATTERN,
    FederationConfig,
    load_run_config,
    no_credentials,
)
from cloudfed.locations import AnyPath, location, write_private
from cloudfed.privacy.settings import DEFAULT_DP_SGD_MAX_EPSILON, PrivacyMode
from cloudfed.storage import normalised_location

if TYPE_CHECKING:
    from cloudfed.protection.rotation import RotationStatement

POLICY_DIR_ENV = "CLOUDFED_PARTY_POLICIES"
DEFAULT_POLICY_DIR = ".cloudfed/party-policies"
_PROTECTION_ORDER = {"plaintext": 0, "ckks": 1, "secagg": 2}
_PRIVACY_ORDER = {"off": 0, "central": 1, "distributed": 2}
_FINGERPRINT = r"^[0-9a-f]{64}$"


class ConsentError(CloudfedError):
    """A party refuses a round: weaker than its policy, unpinned keys, or no policy at all."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Pins(_Strict):
    """Fingerprints the party trusts: the coordinator's and every member's, its own included."""

    coordinator: str = Field(pattern=_FINGERPRINT)
    parties: dict[str, str] = Field(min_length=1)


class PartyLevelFloor(_Strict):
    """The weakest party-level DP (noise on the aggregate) the party accepts."""

    mode: PrivacyMode = "off"
    min_noise_multiplier: float | None = Field(None, gt=0.0)
    clip: float | None = Field(None, gt=0.0)  # the L2 clip it agreed to; any other is refused
    min_contributors: int = Field(2, ge=2)
    min_colluding: int = Field(1, ge=1)
    max_delta: float = Field(1e-5, gt=0.0, lt=1.0)
    # Its own party-level budget across every run; the stricter of this and max_epsilon holds.
    max_epsilon: float | None = Field(None, gt=0.0)


class DpSgdFloor(_Strict):
    """Record-level DP-SGD the party insists on for its own training."""

    required: bool = True
    min_noise_multiplier: float | None = Field(None, gt=0.0)
    max_delta: float = Field(1e-5, gt=0.0, lt=1.0)
    # Its own record-level budget over every run and federation on its data...
    max_epsilon: float = Field(DEFAULT_DP_SGD_MAX_EPSILON, gt=0.0)
    # ... and what one run may spend of it (else one run could spend it all).
    max_epsilon_per_run: float | None = Field(None, gt=0.0)


class KeysPolicy(_Strict):
    """Where the party's private keys live: its choice, never the run configuration's.

    storage: PEM files in a folder of the party's own storage (`folder`, default
      `<party storage>/keys`; relative to the policy file's folder), local or fsspec URL.
    env: key material in an environment variable of the party's runtime (`env_var`, default
      CLOUDFED_PARTY_KEY_<PARTY>), e.g. injected from the cloud's secret manager.
    secret_manager: a secret (`secret_id`) read through a hook (`secret_manager`: an entry point
      name in the `cloudfed.secret_managers` group, such as `aws`, or `module:factory`), built
      with `options`.
    """

    source: Literal["storage", "env", "secret_manager"] = "storage"
    folder: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)
    # CLOUDFED_* only: steps refuse a run configuration that sets those for a party's steps,
    # so the launcher cannot set the variable the party reads its key from.
    env_var: str | None = None
    secret_manager: str | None = None
    secret_id: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("env_var")
    @classmethod
    def _party_namespace(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"CLOUDFED_[A-Z0-9_]+", value):
            raise ValueError(
                f"keys.env_var={value!r} must match ^CLOUDFED_[A-Z0-9_]+$: a run configuration "
                "may set any other variable for the party's steps, and so choose its key. Fix: "
                "rename it, e.g. CLOUDFED_PARTY_KEY_<PARTY>"
            )
        return value

    @model_validator(mode="after")
    def _fields_of_the_source(self) -> KeysPolicy:
        if self.source == "secret_manager" and not (self.secret_manager and self.secret_id):
            raise ValueError("keys.source=secret_manager needs keys.secret_manager and secret_id")
        used = {
            "storage": {"folder", "storage_options"},
            "env": {"env_var"},
            "secret_manager": {"secret_manager", "secret_id", "options"},
        }[self.source]
        fields = ("folder", "storage_options", "env_var", "secret_manager", "secret_id", "options")
        stray = [f for f in fields if f not in used and getattr(self, f)]
        if stray:
            raise ValueError(f"keys.{', keys.'.join(stray)} do(es) not apply to {self.source}")
        return self


class PartyPolicy(_Strict):
    party: str = Field(pattern=PARTY_NAME_PATTERN)
    federation_id: str = Field(pattern=PARTY_NAME_PATTERN)
    # Weakest protection any adapter tensor may get: plaintext < ckks (trusts the key party)
    # < secagg (trusts no single party).
    min_protection: Literal["plaintext", "ckks", "secagg"] = "secagg"
    min_parties: int = Field(2, ge=2)
    # Who it trusts to hold a CKKS secret key (which must not collude with the coordinator);
    # itself always.
    ckks_key_parties: list[str] = Field(default_factory=list)
    privacy: PartyLevelFloor = PartyLevelFloor()
    dp_sgd: DpSgdFloor | None = None
    # The most one contributor's aggregation weight may exceed another's (every weight lies in
    # [1/ratio, 1]): a launcher must not shrink every peer until the aggregate is one party's
    # update. The config's weighting.min_weight (default 1/weight_cap) must be >= 1/ratio.
    max_weight_ratio: float = Field(1000.0, ge=1.0)
    pins: Pins
    # Where its private keys live (see KeysPolicy); today's storage folder by default.
    keys: KeysPolicy = KeysPolicy()
    # Its own storage (parties[].storage) as provisioned: a run configuration that points it
    # elsewhere is refused, or the party would write its data and updates where the launcher
    # chose. None: not checked (a policy written before this field).
    storage: str | None = None
    # Party-side state; relative paths are relative to the policy file's folder. A folder or an
    # object-store URL (s3://, gs://, abfs://) with its fsspec `state_options` (never credentials).
    state_dir: str | None = None
    state_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("state_options")
    @classmethod
    def _no_credentials(cls, options: dict[str, Any]) -> dict[str, Any]:
        return no_credentials(options, "state_options") or {}


@dataclass(frozen=True)
class LoadedPolicy:
    policy: PartyPolicy
    path: Path

    @property
    def state_dir(self) -> AnyPath:
        given = self.policy.state_dir
        if given is None:
            return self.path.parent / f"{self.policy.party}-state"
        path = location(given, self.policy.state_options)
        return path if not isinstance(path, Path) or path.is_absolute() else self.path.parent / path

    @property
    def rotations_file(self) -> AnyPath:
        """The key rotations this party followed (its own included): its pin record."""
        return self.state_dir / ROTATIONS_FILE


ROTATIONS_FILE = "key_rotations.json"


def policy_env_var(party: str) -> str:
    return "CLOUDFED_PARTY_POLICY_" + party.upper().replace("-", "_")


def policy_path(party: str) -> Path:
    specific = os.environ.get(policy_env_var(party))
    if specific:
        return Path(specific)
    return Path(os.environ.get(POLICY_DIR_ENV) or DEFAULT_POLICY_DIR) / f"{party}.yaml"


def load_policy(party: str) -> LoadedPolicy:
    path = policy_path(party)
    if not path.is_file():
        raise ConsentError(
            f"{party}: no party policy at {path}; a party takes part only under a policy of its "
            f"own. Fix: write one (see README, Party policies), point {policy_env_var(party)} or "
            f"{POLICY_DIR_ENV} at it, or for the local demo run "
            "`python -m cloudfed.party_policy provision configs/local.yaml`"
        )
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        policy = PartyPolicy.model_validate(doc)
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConsentError(f"{path}: the party policy is invalid: {exc}") from None
    if policy.party != party:
        raise ConsentError(f"{path}: the policy is {policy.party}'s, not {party}'s")
    return _follow_recorded_rotations(LoadedPolicy(policy, path))


def _recorded_rotations(loaded: LoadedPolicy) -> list[dict[str, Any]]:
    path = loaded.rotations_file
    if not path.exists():
        return []
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        records = None
    if not isinstance(records, list):
        raise ConsentError(f"{path}: the party's key rotation record is not a JSON list")
    return records


def _follow_recorded_rotations(loaded: LoadedPolicy) -> LoadedPolicy:
    """Pins as the policy file sets them, then along every rotation the party accepted.

    Each record is re-verified; a rotation applies only from the fingerprint pinned at that point,
    so a record cannot move a pin the party never held, and a re-pinned policy file starts over.
    """
    from cloudfed.errors import ProtectionError
    from cloudfed.protection.rotation import parse_rotation

    records = _recorded_rotations(loaded)
    if not records:
        return loaded
    pins = loaded.policy.pins
    parties = dict(pins.parties)
    for record in records:
        try:
            statement = parse_rotation(record)
        except ProtectionError as exc:
            raise ConsentError(f"{loaded.rotations_file}: {exc}") from None
        if parties.get(statement.party) == statement.old.fingerprint:
            parties[statement.party] = statement.new.fingerprint
    followed = pins.model_copy(update={"parties": parties})
    return LoadedPolicy(loaded.policy.model_copy(update={"pins": followed}), loaded.path)


def record_rotation(loaded: LoadedPolicy, statement: RotationStatement) -> LoadedPolicy:
    """Accept a verified rotation of a pinned key into the party's own pin record.

    Refuses (ConsentError) one whose old fingerprint is not the key this party pins: that is a
    rotation signed by someone else's key.
    """
    name = statement.party
    pinned = loaded.policy.pins.parties.get(name)
    if pinned == statement.new.fingerprint:
        return loaded
    if pinned != statement.old.fingerprint:
        raise ConsentError(
            f"{loaded.policy.party} refuses a key rotation of {name}: it is signed by the key of "
            f"fingerprint {statement.old.fingerprint[:16]}..., not the one pinned "
            f"({str(pinned)[:16]}..., {loaded.path} pins.parties.{name} and "
            f"{loaded.rotations_file}). Fix: compare fingerprints out of band"
        )
    records = [*_recorded_rotations(loaded), statement.model_dump(mode="json")]
    # The party's other state files' writer: the state may be an object-store prefix.
    write_private(loaded.rotations_file, json.dumps(records, indent=1).encode())
    return _follow_recorded_rotations(LoadedPolicy(loaded.policy, loaded.path))


def _config_modes(cfg: FederationConfig) -> set[str]:
    return {cfg.protection.default, *(r.mode for r in cfg.protection.rules)}


def violations(cfg: FederationConfig, loaded: LoadedPolicy) -> list[str]:
    """Every way the run configuration is weaker than the policy, each naming both fields."""
    pol, where, out = loaded.policy, loaded.path, []

    def weaker(field: str, got: object, policy_field: str, want: object) -> None:
        out.append(
            f"parameters.federation.{field}={got!r} is weaker than {policy_field}={want!r} in "
            f"{where}"
        )

    if cfg.federation_id != pol.federation_id:
        weaker("federation_id", cfg.federation_id, "federation_id", pol.federation_id)
    if cfg.min_parties < pol.min_parties:
        weaker("min_parties", cfg.min_parties, "min_parties", pol.min_parties)
    floor = weight_floor(cfg.aggregation.weighting, cfg.protection.weight_cap)
    if floor * pol.max_weight_ratio < 1.0 - 1e-12:
        weaker(
            "aggregation.weighting.min_weight (or 1/protection.weight_cap)",
            floor,
            "max_weight_ratio",
            pol.max_weight_ratio,
        )
    for mode in sorted(_config_modes(cfg)):
        if _PROTECTION_ORDER[mode] < _PROTECTION_ORDER[pol.min_protection]:
            weaker("protection (a tensor's mode)", mode, "min_protection", pol.min_protection)
    key_party = cfg.ckks_key_party
    if "ckks" in _config_modes(cfg) and key_party not in {pol.party, *pol.ckks_key_parties}:
        out.append(
            f"parameters.federation.protection.ckks.key_party={key_party!r} is not a party "
            f"{where} trusts with a CKKS secret key (ckks_key_parties={pol.ckks_key_parties})"
        )
    mine = next((p for p in cfg.parties if p.name == pol.party), None)
    if (
        pol.storage is not None
        and mine is not None
        and normalised_location(str(mine.storage)) != normalised_location(pol.storage)
    ):
        out.append(
            f"parameters.federation.parties[{pol.party}].storage={str(mine.storage)!r} is not the "
            f"party's own storage {pol.storage!r} (storage in {where}); a party keeps its data, "
            "updates and keys only where it chose"
        )
    members = [p.name for p in cfg.active_parties]
    unpinned = sorted(set(members) - set(pol.pins.parties))
    if unpinned:
        out.append(
            f"parameters.federation.parties lists {unpinned}, whose keys {where} does not pin "
            "(pins.parties); the party does not share a round with them"
        )
    out += _privacy_violations(cfg, loaded, weaker)
    return out


def _privacy_violations(cfg: FederationConfig, loaded: LoadedPolicy, weaker) -> list[str]:
    from cloudfed.privacy.party_level import round_noise_multiplier

    pol, p = loaded.policy, cfg.privacy
    floor = pol.privacy
    out: list[str] = []
    if _PRIVACY_ORDER[p.mode] < _PRIVACY_ORDER[floor.mode]:
        weaker("privacy.mode", p.mode, "privacy.mode", floor.mode)
    if p.enabled:
        z = round_noise_multiplier(cfg)
        if floor.min_noise_multiplier is not None and z < floor.min_noise_multiplier:
            weaker(
                "privacy noise multiplier",
                round(z, 6),
                "privacy.min_noise_multiplier",
                floor.min_noise_multiplier,
            )
        if floor.clip is not None and not math.isclose(p.clip, floor.clip):
            weaker("privacy.clip", p.clip, "privacy.clip", floor.clip)
        if p.delta > floor.max_delta:
            weaker("privacy.delta", p.delta, "privacy.max_delta", floor.max_delta)
        if p.mode == "distributed":
            if cfg.min_contributors < floor.min_contributors:
                weaker(
                    "privacy.min_contributors",
                    cfg.min_contributors,
                    "privacy.min_contributors",
                    floor.min_contributors,
                )
            if p.colluding < floor.min_colluding:
                weaker(
                    "privacy.colluding", p.colluding, "privacy.min_colluding", floor.min_colluding
                )
    dp = p.dp_sgd.get(pol.party)
    if pol.dp_sgd is not None and pol.dp_sgd.required and dp is None:
        weaker(f"privacy.dp_sgd.{pol.party}", None, "dp_sgd.required", True)
    if pol.dp_sgd is not None and dp is not None:
        if dp.delta > pol.dp_sgd.max_delta:
            weaker(
                f"privacy.dp_sgd.{pol.party}.delta",
                dp.delta,
                "dp_sgd.max_delta",
                pol.dp_sgd.max_delta,
            )
        floor_z = pol.dp_sgd.min_noise_multiplier
        if (
            floor_z is not None
            and dp.noise_multiplier is not None
            and dp.noise_multiplier < floor_z
        ):
            weaker(
                f"privacy.dp_sgd.{pol.party}.noise_multiplier",
                dp.noise_multiplier,
                "dp_sgd.min_noise_multiplier",
                floor_z,
            )
    return out


def enforce(cfg: FederationConfig, party: str) -> LoadedPolicy:
    """The party's policy, once the run configuration is found no weaker than it."""
    loaded = load_policy(party)
    problems = violations(cfg, loaded)
    if problems:
        raise ConsentError(
            f"{party} refuses this round: "
            + "; ".join(problems)
            + ". Fix: run with settings at least as strong as the party's policy, or ask the "
            "party to change its policy"
        )
    return loaded


def check_pin(loaded: LoadedPolicy, role: str, name: str, fingerprint: str) -> None:
    """Refuse a coordinator or member key other than the pinned one."""
    pins = loaded.policy.pins
    want = pins.coordinator if role == "coordinator" else pins.parties.get(name)
    if want != fingerprint:
        field = "pins.coordinator" if role == "coordinator" else f"pins.parties.{name}"
        raise ConsentError(
            f"{loaded.policy.party} refuses this round: the {role} key of {name} has fingerprint "
            f"{fingerprint[:16]}..., not the one pinned in {loaded.path} ({field}="
            f"{str(want)[:16]}..., after the rotations in {loaded.rotations_file}). Fix: compare "
            "fingerprints out of band; a party that changes its key rotates it (`python -m "
            "cloudfed.keys rotate`), which its peers follow through the coordinator's roster"
        )


def required_survivors(cfg: FederationConfig, loaded: LoadedPolicy) -> int:
    """Fewest parties whose sum the party helps reveal or decrypt, by its own view."""
    need = max(cfg.min_parties, loaded.policy.min_parties)
    if cfg.privacy.mode == "distributed":
        need = max(need, cfg.min_contributors, loaded.policy.privacy.min_contributors)
    return need


def dp_sgd_cap(cfg: FederationConfig, loaded: LoadedPolicy) -> float:
    """The party's record-level budget: the stricter of the run config's and its own."""
    party = loaded.policy.party
    caps = [cfg.privacy.dp_sgd[party].max_epsilon] if party in cfg.privacy.dp_sgd else []
    if loaded.policy.dp_sgd is not None:
        caps.append(loaded.policy.dp_sgd.max_epsilon)
    return min(caps) if caps else DEFAULT_DP_SGD_MAX_EPSILON


def party_level_cap(cfg: FederationConfig, loaded: LoadedPolicy) -> float | None:
    caps = [c for c in (cfg.privacy.max_epsilon, loaded.policy.privacy.max_epsilon) if c]
    return min(caps) if caps else None


def policy_for(cfg: FederationConfig, party: str, fingerprints: dict[str, str]) -> PartyPolicy:
    """A policy that accepts exactly `cfg` (the demo's provisioning)."""
    from cloudfed.privacy.party_level import round_noise_multiplier

    p = cfg.privacy
    modes = _config_modes(cfg)
    floor = PartyLevelFloor(
        mode=p.mode,
        min_noise_multiplier=_down(round_noise_multiplier(cfg)) if p.enabled else None,
        clip=p.clip if p.enabled else None,
        min_contributors=cfg.min_contributors,
        min_colluding=p.colluding,
        max_delta=p.delta,
        max_epsilon=p.max_epsilon,
    )
    dp = p.dp_sgd.get(party)
    return PartyPolicy(
        party=party,
        federation_id=cfg.federation_id,
        min_protection=min(modes, key=_PROTECTION_ORDER.__getitem__),
        min_parties=cfg.min_parties,
        ckks_key_parties=[cfg.ckks_key_party] if "ckks" in modes else [],
        privacy=floor,
        dp_sgd=None if dp is None else _dp_sgd_floor(cfg, dp),
        max_weight_ratio=max(
            1.0, _up(1.0 / weight_floor(cfg.aggregation.weighting, cfg.protection.weight_cap))
        ),
        pins=Pins(
            coordinator=fingerprints["coordinator"],
            parties={p.name: fingerprints[p.name] for p in cfg.active_parties},
        ),
    )


def _down(x: float) -> float:
    """Six decimals, never above `x`: a floor written from a config must accept that config."""
    return math.floor(x * 1e6) / 1e6


def _up(x: float) -> float:
    return math.ceil(x * 1e6) / 1e6


def _dp_sgd_floor(cfg: FederationConfig, dp) -> DpSgdFloor:
    """Accept exactly this config's DP-SGD: its per-run spend, and its noise as the floor.

    The noise multiplier is known here only with a public sample rate (else it follows from the
    record count, at training time).
    """
    from cloudfed.privacy.accountant import GaussianEvent, epsilon, noise_for_target

    steps = cfg.training.local_steps * cfg.rounds
    z = dp.noise_multiplier
    if z is None and dp.sample_rate is not None:
        z = noise_for_target(
            dp.target_epsilon, dp.delta, sample_rate=dp.sample_rate, steps=steps, accountant="rdp"
        )
    per_run = dp.target_epsilon
    if per_run is None and dp.sample_rate is not None:
        per_run = epsilon([GaussianEvent(z, dp.sample_rate, steps)], dp.delta, "rdp")
    return DpSgdFloor(
        min_noise_multiplier=None if z is None else _down(z),
        max_delta=dp.delta,
        max_epsilon=dp.max_epsilon,
        max_epsilon_per_run=None if per_run is None else _up(per_run),
    )


def provision(cfg: FederationConfig, *, force: bool = False) -> list[str]:
    """Keys for the coordinator and every party (made once), and one policy per party."""
    from cloudfed.keys import load_party_keys
    from cloudfed.keys.sources import key_folder
    from cloudfed.locations import on_disk
    from cloudfed.protection.keys import load_or_create_keys

    with on_disk(cfg.coordinator_root / "keys") as key_dir:
        coordinator = load_or_create_keys("coordinator", "coordinator", key_dir)
    prints = {"coordinator": coordinator.public_bundle().fingerprint}
    existing: dict[str, LoadedPolicy] = {}
    for party in cfg.active_parties:
        try:
            existing[party.name] = load_policy(party.name)
        except ConsentError:  # none yet, or unreadable: --force replaces it, keys in storage
            pass
    for party in cfg.active_parties:  # from the key source each party's policy already names
        keys = load_party_keys(cfg, party, existing.get(party.name))
        prints[party.name] = keys.public_bundle().fingerprint
    lines = []
    for party in cfg.active_parties:
        path = policy_path(party.name)
        if path.exists() and not force:
            lines.append(f"kept {path} (the party's own; --force rewrites it)")
            continue
        policy = policy_for(cfg, party.name, prints)
        keys_spec = existing[party.name].policy.keys if party.name in existing else KeysPolicy()
        if keys_spec.source == "storage" and keys_spec.folder is None:
            # Recorded where the key was found: a launcher that later moves the party's storage
            # moves no key, and the party never makes one there (rounds load with create=False).
            folder = _resolved(key_folder(party, existing.get(party.name)))
            options = keys_spec.storage_options or dict(party.storage_options)
            keys_spec = keys_spec.model_copy(update={"folder": folder, "storage_options": options})
        # Where the party's keys and storage live (the storage as this configuration has it, as
        # everything else provisioning writes): the launcher moves neither later.
        storage = _resolved(str(party.storage))
        policy = policy.model_copy(update={"keys": keys_spec, "storage": storage})
        doc = policy.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        header = (
            f"# {party.name}'s own policy: the weakest federation it takes part in, and the keys\n"
            "# it trusts. Written by `python -m cloudfed.party_policy provision` for the local\n"
            "# demo; a real party writes its own and compares fingerprints out of band.\n"
        )
        path.write_text(header + yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        lines.append(f"wrote {path}")
    return lines


def _resolved(where: str) -> str:
    return where if "://" in where else str(Path(where).resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloudfed.party_policy")
    sub = parser.add_subparsers(dest="command", required=True)
    prov = sub.add_parser("provision", help="keys and one policy per party, for the local demo")
    prov.add_argument("config")
    prov.add_argument("--force", action="store_true", help="rewrite existing policies")
    check = sub.add_parser("check", help="would every party accept this run configuration?")
    check.add_argument("config")
    args = parser.parse_args(argv)
    try:
        cfg = load_run_config(args.config)
        if args.command == "provision":
            for line in provision(cfg, force=args.force):
                print(line)
        else:
            for party in cfg.active_parties:
                enforce(cfg, party.name)
                print(f"ok  {party.name} accepts {args.config} ({policy_path(party.name)})")
    except (CloudfedError, ConfigError) as exc:
        print(f"cloudfed: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
