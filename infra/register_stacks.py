"""Register cloudfed's ZenML stacks from infra/stacks.yaml, idempotently.

    python infra/register_stacks.py --stack cloudfed-multicloud [--env FILE] [--dry-run]

Every input is checked before anything is registered, and each missing one is named with its
field and how to find it, because a half-registered stack fails later, in a cloud, with a less
helpful message. A component that exists is updated only where it differs from the spec, so
re-running changes nothing. Each change is printed as the `zenml` command that does the same.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

SPEC = Path(__file__).with_name("stacks.yaml")
# `zenml stack register` flags per component type (the types a stack of the spec may name).
STACK_FLAGS = {
    "orchestrator": "-o",
    "artifact_store": "-a",
    "experiment_tracker": "-e",
    "container_registry": "-c",
    "image_builder": "-i",
    "step_operator": "-s",
}
COMPONENT_TYPES = tuple(STACK_FLAGS)
# Flavor classes by (type, flavor): importable without the clouds' SDKs, so the spec can be
# checked on any machine; the integration's name says what to install where it is registered.
_Z = "zenml.integrations"
FLAVORS: dict[tuple[str, str], tuple[str, str, str | None]] = {
    ("orchestrator", "local"): ("zenml.orchestrators", "LocalOrchestratorFlavor", None),
    ("orchestrator", "kubernetes"): (
        f"{_Z}.kubernetes.flavors",
        "KubernetesOrchestratorFlavor",
        "kubernetes",
    ),
    ("artifact_store", "local"): ("zenml.artifact_stores", "LocalArtifactStoreFlavor", None),
    ("artifact_store", "s3"): (f"{_Z}.s3.flavors", "S3ArtifactStoreFlavor", "s3"),
    ("artifact_store", "gcp"): (f"{_Z}.gcp.flavors", "GCPArtifactStoreFlavor", "gcp"),
    ("artifact_store", "azure"): (f"{_Z}.azure.flavors", "AzureArtifactStoreFlavor", "azure"),
    ("experiment_tracker", "mlflow"): (
        f"{_Z}.mlflow.flavors",
        "MLFlowExperimentTrackerFlavor",
        "mlflow",
    ),
    ("container_registry", "aws"): (f"{_Z}.aws.flavors", "AWSContainerRegistryFlavor", "aws"),
    ("container_registry", "gcp"): (
        "zenml.container_registries",
        "GCPContainerRegistryFlavor",
        None,
    ),
    ("container_registry", "azure"): (
        "zenml.container_registries",
        "AzureContainerRegistryFlavor",
        None,
    ),
    ("container_registry", "default"): (
        "zenml.container_registries",
        "DefaultContainerRegistryFlavor",
        None,
    ),
    ("image_builder", "local"): ("zenml.image_builders", "LocalImageBuilderFlavor", None),
    ("step_operator", "sagemaker"): (f"{_Z}.aws.flavors", "SagemakerStepOperatorFlavor", "aws"),
    ("step_operator", "vertex"): (f"{_Z}.gcp.flavors", "VertexStepOperatorFlavor", "gcp"),
    ("step_operator", "azureml"): (f"{_Z}.azure.flavors", "AzureMLStepOperatorFlavor", "azure"),
    ("step_operator", "kubernetes"): (
        f"{_Z}.kubernetes.flavors",
        "KubernetesStepOperatorFlavor",
        "kubernetes",
    ),
}
# Where each cloud's login lives when a component names no service connector.
CREDENTIALS = {
    "aws": (
        ["AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE",
         "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"],
        ["~/.aws/credentials", "~/.aws/config"],
        "`aws configure sso` / `aws sso login`, or an IAM role on this machine",
    ),
    "gcp": (
        ["GOOGLE_APPLICATION_CREDENTIALS"],
        ["~/.config/gcloud/application_default_credentials.json"],
        "`gcloud auth application-default login`, or workload identity on this machine",
    ),
    "azure": (
        ["AZURE_CLIENT_ID", "AZURE_FEDERATED_TOKEN_FILE"],
        ["~/.azure/azureProfile.json"],
        "`az login`, or a managed identity on this machine",
    ),
}  # fmt: skip
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")
_SECRET_REF = re.compile(r"^\{\{([^.}]+)\.([^}]+)\}\}$")


class SpecError(Exception):
    """The spec or its inputs cannot be registered; the message lists every problem."""


@dataclass
class Component:
    name: str
    type: str
    flavor: str
    config: dict[str, Any]
    cloud: str | None = None
    party: str | None = None
    connector: str | None = None

    @property
    def cli_type(self) -> str:
        return self.type.replace("_", "-")


@dataclass
class Plan:
    components: list[Component]
    stacks: dict[str, dict[str, list[str]]]
    problems: list[str] = field(default_factory=list)


def load_spec(path: Path = SPEC) -> dict[str, Any]:
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: cannot be read as YAML ({exc})") from exc
    for key in ("components", "stacks"):
        if not isinstance(spec, dict) or not isinstance(spec.get(key), dict):
            raise SpecError(f"{path}: `{key}` is missing; see the comments at the top of the file")
    return spec


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (a leading `export ` and quotes allowed), as a shell would source them."""
    out = {}
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"--env {path}: cannot be read ({exc.strerror})") from exc
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise SpecError(f"{path}:{n}: expected KEY=VALUE, got {line!r}")
        out[key.strip()] = shlex.split(value)[0] if value.strip() else ""
    return out


def _hint(var: str, inputs: dict[str, str]) -> str:
    for suffix, what in sorted(inputs.items(), key=lambda kv: -len(kv[0])):
        if var.endswith(suffix):
            return what
    return "see infra/README.md"


def _resolve(
    value: Any, where: str, env: dict[str, str], plan: Plan, inputs: dict[str, str]
) -> Any:
    """`${VAR}` / `${VAR:-default}` from env, recursively; a missing VAR is a named problem."""
    if isinstance(value, dict):
        return {k: _resolve(v, f"{where}.{k}", env, plan, inputs) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, f"{where}[{i}]", env, plan, inputs) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        var, default = m.group(1), m.group(2)
        got = env.get(var) or default
        if got is None:
            plan.problems.append(
                f"{where} needs ${{{var}}}, which is not set. "
                f"Fix: export {var}=<{_hint(var, inputs)}> (or put it in --env FILE)"
            )
            return ""
        return got

    return _VAR.sub(sub, value)


def flavor_class(type_: str, flavor: str) -> Any:
    """The flavor's class, from the table or (custom flavors) from the ZenML store."""
    if (type_, flavor) in FLAVORS:
        module, name, _ = FLAVORS[(type_, flavor)]
        return getattr(importlib.import_module(module), name)
    from zenml.client import Client
    from zenml.enums import StackComponentType
    from zenml.utils import source_utils

    model = Client().get_flavor_by_name_and_type(flavor, StackComponentType(type_))
    return source_utils.load(model.source)


def validate_config(component: Component) -> tuple[dict[str, Any] | None, str | None]:
    """The config as ZenML will store it, or why the flavor refuses it.

    A `{{secret.key}}` value is validated as a plain stand-in: ZenML resolves references while
    validating, and whether the secret exists is the store's question (`Registrar.preflight`).
    """
    try:
        cls = flavor_class(component.type, component.flavor)().config_class
    except KeyError:
        return None, f"flavor {component.flavor!r} of {component.type} is unknown here"
    refs = {
        k: v for k, v in component.config.items() if isinstance(v, str) and _SECRET_REF.match(v)
    }
    stand_ins = {k: f"<{v.strip('{}')}>" for k, v in refs.items()}
    try:
        model = cls(**{**component.config, **stand_ins})
    except ValidationError as exc:
        why = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return None, why
    except (ValueError, TypeError) as exc:
        return None, str(exc)
    return {**model.model_dump(mode="json", exclude_unset=True), **refs}, None


def build_plan(
    spec: dict[str, Any], stacks: list[str], env: dict[str, str], source: str = "infra/stacks.yaml"
) -> Plan:
    """Resolve the selected stacks' components and check every input without touching ZenML."""
    inputs = spec.get("inputs") or {}
    plan = Plan(components=[], stacks={})
    known = spec["stacks"]
    for name in stacks:
        if name not in known:
            plan.problems.append(f"{source}: no stack {name!r}; known stacks are {sorted(known)}")
            continue
        members: dict[str, list[str]] = {}
        for type_, value in known[name].items():
            if type_ not in COMPONENT_TYPES:
                plan.problems.append(
                    f"{source}: stacks.{name}.{type_} is not a component type; use one of "
                    f"{list(COMPONENT_TYPES)}"
                )
                continue
            names = value if isinstance(value, list) else [value]
            where = f"{source}: stacks.{name}.{type_}"
            members[type_] = [_resolve(n, where, env, plan, inputs) for n in names]
        plan.stacks[name] = members
    wanted = list(dict.fromkeys(n for m in plan.stacks.values() for ns in m.values() for n in ns))
    for cname in wanted:
        raw = spec["components"].get(cname)
        if raw is None:
            continue  # an existing component of the store (e.g. `default`); checked on apply
        where = f"{source}: components.{cname}"
        missing = [k for k in ("type", "flavor") if k not in raw]
        if missing:
            plan.problems.append(f"{where} needs {missing}")
            continue
        comp = Component(
            name=cname,
            type=raw["type"],
            flavor=raw["flavor"],
            config=_resolve(raw.get("config") or {}, f"{where}.config", env, plan, inputs),
            cloud=raw.get("cloud"),
            party=raw.get("party"),
            connector=_resolve(raw.get("connector"), f"{where}.connector", env, plan, inputs)
            or None,
        )
        plan.components.append(comp)
    for comp in plan.components:
        if any(comp.name in p for p in plan.problems):
            continue  # its unresolved values would only repeat the missing input
        _, why = validate_config(comp)
        if why:
            plan.problems.append(
                f"{source}: components.{comp.name} ({comp.flavor} {comp.type}) is refused by "
                f"its flavor: {why}. Fix: the field in the spec or the variable it reads"
            )
    for name, members in plan.stacks.items():
        for type_, names in members.items():
            for cname in names:
                comp = next((c for c in plan.components if c.name == cname), None)
                if comp is not None and comp.type != type_:
                    plan.problems.append(
                        f"{source}: stacks.{name}.{type_} names {cname}, a {comp.type}"
                    )
    return plan


def check_credentials(plan: Plan, home: Path | None = None) -> list[str]:
    """Each cloud a component reaches without a service connector needs a login here."""
    home = home or Path.home()
    problems = []
    clouds = sorted({c.cloud for c in plan.components if c.cloud and not c.connector})
    for cloud in clouds:
        variables, files, fix = CREDENTIALS[cloud]
        found = any(os.environ.get(v) for v in variables) or any(
            Path(f.replace("~", str(home), 1)).is_file() for f in files
        )
        if not found:
            users = [c.name for c in plan.components if c.cloud == cloud and not c.connector]
            problems.append(
                f"no {cloud} credentials for {users}: none of {variables} is set and none of "
                f"{files} exists. Fix: {fix}; or give each a service connector "
                f"(`connector:` in infra/stacks.yaml, or --skip-credential-check if it is "
                f"connected already)"
            )
    needs_kube = [c.name for c in plan.components if c.flavor == "kubernetes"]
    kubeconfig = os.environ.get("KUBECONFIG", str(home / ".kube" / "config"))
    if needs_kube and not any(Path(p).is_file() for p in kubeconfig.split(os.pathsep)):
        problems.append(
            f"no kubeconfig ({kubeconfig}) for {needs_kube}. Fix: add each cluster's context "
            "(`aws eks update-kubeconfig`, `gcloud container clusters get-credentials`, "
            "`az aks get-credentials`)"
        )
    return problems


def _cli_flags(config: dict[str, Any]) -> list[str]:
    out = []
    for key, value in config.items():
        text = value if isinstance(value, str) else json.dumps(value)
        out.append(f"--{key}={text}")
    return out


def _command(*argv: str) -> str:
    return "zenml " + " ".join(shlex.quote(a) for a in argv)


class Registrar:
    """Applies a plan to the ZenML store (or, dry, says what it would do)."""

    def __init__(self, dry_run: bool) -> None:
        from zenml.client import Client

        self.client = Client()
        self.dry_run = dry_run
        self.calls: list[str] = []

    def _say(self, line: str) -> None:
        self.calls.append(line)
        print(("would run: " if self.dry_run else "") + line)

    def _existing(self, type_: str, name: str) -> Any:
        from zenml.enums import StackComponentType

        try:
            return self.client.get_stack_component(
                StackComponentType(type_), name, allow_name_prefix_match=False
            )
        except KeyError:
            return None

    def preflight(self, plan: Plan) -> list[str]:
        """What only the store can tell: flavors installed, secrets, referenced components."""
        from zenml.enums import StackComponentType

        problems = []
        for comp in plan.components:
            try:
                self.client.get_flavor_by_name_and_type(comp.flavor, StackComponentType(comp.type))
            except KeyError:
                integration = FLAVORS.get((comp.type, comp.flavor), ("", "", None))[2]
                fix = (
                    f"zenml integration install {integration} -y" if integration else "register it"
                )
                problems.append(
                    f"flavor {comp.flavor!r} ({comp.name}) is not available in this ZenML "
                    f"environment. Fix: {fix} (here, in the launcher's environment; each party "
                    "image gets only its own cloud's, pipelines/_images.py)"
                )
            for key, value in comp.config.items():
                ref = _SECRET_REF.match(value) if isinstance(value, str) else None
                if ref:
                    try:
                        self.client.get_secret(ref.group(1), allow_partial_name_match=False)
                    except KeyError:
                        problems.append(
                            f"{comp.name}.{key} reads the ZenML secret {ref.group(1)!r}, which "
                            f"does not exist. Fix: zenml secret create {ref.group(1)} "
                            f"--{ref.group(2)}=..."
                        )
            if comp.connector:
                try:
                    self.client.get_service_connector(comp.connector, allow_name_prefix_match=False)
                except KeyError:
                    problems.append(
                        f"{comp.name} names the service connector {comp.connector!r}, which does "
                        "not exist. Fix: `zenml service-connector register` it, or empty the "
                        "variable to use this machine's login"
                    )
        specified = {c.name for c in plan.components}
        for stack, members in plan.stacks.items():
            for type_, names in members.items():
                for name in names:
                    if name not in specified and self._existing(type_, name) is None:
                        problems.append(
                            f"stack {stack} names the {type_} {name!r}, which is neither in "
                            "infra/stacks.yaml nor registered. Fix: define it in the spec"
                        )
        return problems

    def component(self, comp: Component) -> None:
        from zenml.enums import StackComponentType

        wanted, _ = validate_config(comp)
        assert wanted is not None  # checked by build_plan
        existing = self._existing(comp.type, comp.name)
        if existing is None:
            self._say(
                _command(comp.cli_type, "register", comp.name, f"--flavor={comp.flavor}")
                + "".join(" " + shlex.quote(f) for f in _cli_flags(comp.config))
            )
            if not self.dry_run:
                self.client.create_stack_component(
                    comp.name, comp.flavor, StackComponentType(comp.type), comp.config
                )
        elif existing.flavor_name != comp.flavor:
            raise SpecError(
                f"the {comp.type} {comp.name} exists with flavor {existing.flavor_name!r}, not "
                f"{comp.flavor!r}. Fix: zenml {comp.cli_type} delete {comp.name} (after removing "
                "it from its stacks), or rename it in infra/stacks.yaml"
            )
        else:
            stored = dict(existing.configuration)
            update = {k: v for k, v in wanted.items() if stored.get(k) != v}
            removed = [k for k in stored if k not in wanted]
            if update:
                self._say(
                    _command(comp.cli_type, "update", comp.name)
                    + "".join(" " + shlex.quote(f) for f in _cli_flags(update))
                )
            if removed:
                self._say(
                    _command(comp.cli_type, "remove-attribute", comp.name)
                    + "".join(f" {k}" for k in removed)
                )
            if (update or removed) and not self.dry_run:
                self.client.update_stack_component(
                    comp.name,
                    StackComponentType(comp.type),
                    configuration=update | dict.fromkeys(removed),
                )
            if not (update or removed):
                print(f"unchanged: {comp.type} {comp.name}")
        self._connect(comp, existing)

    def _connect(self, comp: Component, existing: Any) -> None:
        from zenml.enums import StackComponentType

        current = existing.connector.name if existing is not None and existing.connector else None
        if comp.connector == current or (comp.connector is None and existing is None):
            return
        if comp.connector is None:
            self._say(_command(comp.cli_type, "disconnect", comp.name))
            if not self.dry_run:
                self.client.update_stack_component(
                    comp.name, StackComponentType(comp.type), disconnect=True
                )
            return
        self._say(_command(comp.cli_type, "connect", comp.name, "--connector", comp.connector))
        if not self.dry_run:
            connector = self.client.get_service_connector(comp.connector)
            self.client.update_stack_component(
                comp.name, StackComponentType(comp.type), connector_id=connector.id
            )

    def stack(self, name: str, members: dict[str, list[str]]) -> None:
        try:
            existing = self.client.get_stack(name, allow_name_prefix_match=False)
        except KeyError:
            existing = None
        flags = [f for t, ns in members.items() for n in ns for f in (STACK_FLAGS[t], n)]
        if existing is None:
            self._say(_command("stack", "register", name, *flags))
            if not self.dry_run:
                self.client.create_stack(name, components=members)
            return
        have = {t.value: sorted(c.name for c in cs) for t, cs in existing.components.items()}
        changes = {t: ns for t, ns in members.items() if have.get(t) != sorted(ns)}
        if not changes:
            print(f"unchanged: stack {name}")
            return
        update = [f for t, ns in changes.items() for n in ns for f in (STACK_FLAGS[t], n)]
        self._say(_command("stack", "update", name, *update))
        if not self.dry_run:
            self.client.update_stack(name, component_updates=changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=SPEC)
    parser.add_argument(
        "--stack", action="append", help="a stack of the spec (repeatable; default: all of them)"
    )
    parser.add_argument("--env", type=Path, help="KEY=VALUE file read before the environment")
    parser.add_argument("--dry-run", action="store_true", help="check and print, register nothing")
    parser.add_argument(
        "--skip-credential-check",
        action="store_true",
        help="components already connected to service connectors registered elsewhere",
    )
    parser.add_argument("--activate", help="make this stack the active one afterwards")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        env = {**(read_env_file(args.env) if args.env else {}), **os.environ}
        source = os.path.relpath(args.spec) if args.spec.is_absolute() else str(args.spec)
        plan = build_plan(spec, args.stack or list(spec["stacks"]), env, source=source)
        problems = list(plan.problems)
        if not problems and not args.dry_run and not args.skip_credential_check:
            problems += check_credentials(plan)
        if problems:
            raise SpecError("\n".join(f"- {p}" for p in problems))
        registrar = Registrar(dry_run=args.dry_run)
        problems = registrar.preflight(plan)
        if problems and not args.dry_run:
            raise SpecError("\n".join(f"- {p}" for p in problems))
        for p in problems:
            print(f"note (dry run): {p}")
        if args.dry_run:
            print("note (dry run): credentials not checked; they are needed to register and run")
        for comp in plan.components:
            registrar.component(comp)
        for name, members in plan.stacks.items():
            registrar.stack(name, members)
        if args.activate:
            registrar._say(_command("stack", "set", args.activate))
            if not args.dry_run:
                registrar.client.activate_stack(args.activate)
    except SpecError as exc:
        print(f"register_stacks: cannot register:\n{exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
